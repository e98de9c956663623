// Hot paths of the VM state file (docs/formats/vmstate.md): classifying RAM pages
// (zero, duplicate, unchanged from the parent, data), compressing the data pages
// of runs of spans into independent chunks, and writing pages back on restore.
// The file layout itself (sections, index, footer) is written by TypeScript.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "codec.h"

namespace qcow2img {

enum class PageState : uint8_t { Zero = 0, Data = 1, Duplicate = 2, Parent = 3 };

// A CHUNK section's codec byte is the file's own numbering (docs/formats/vmstate.md: 0 none,
// 1 zstd, 2 raw deflate), not Codec's: it is mapped, never cast. False for a byte the format
// does not define. (The writer's side of the table is src/vmstate/format.ts.)
bool codecFromChunkByte(uint8_t byte, Codec* codec);

// First occurrences of page contents across a whole dump, by XXH3-128.
class DedupTable {
 public:
  struct Entry {
    uint64_t page;        // global page number
    uint64_t dumpOffset;  // where its bytes are in the source dump
  };
  // The entry for `hash`, or nullptr; inserts {page, dumpOffset} when absent.
  const Entry* findOrInsert(uint64_t low, uint64_t high, uint64_t page, uint64_t dumpOffset);
  size_t size() const { return map_.size(); }

 private:
  struct Key {
    uint64_t low, high;
    bool operator==(const Key& o) const { return low == o.low && high == o.high; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return static_cast<size_t>(k.low); }
  };
  std::unordered_map<Key, Entry, KeyHash> map_;
};

struct DumpBatch {
  int sourceFd = -1;            // the raw RAM dump
  uint64_t dumpOffset = 0;      // dump offset of the batch's first page
  uint64_t firstPage = 0;       // global page number of that page
  uint64_t pageCount = 0;
  uint32_t pageSize = 4096;
  uint32_t spanPages = 512;
  uint64_t firstSpan = 0;       // the batch starts a span; spans are cut at pageCount
  const uint8_t* parent = nullptr;  // optional: the parent's bytes for the batch
  const uint8_t* dirty = nullptr;   // optional: 1 bit a page, LSB first; clear = unchanged
  // Optional, one byte a page: 1 = the page lies inside a hole of the dump, so it is zero and is
  // not read (reading a hole of a tmpfs file through the mapping would allocate it).
  const uint8_t* holes = nullptr;
  bool incremental = false;     // unchanged pages (per parent or dirty) become PARENT
  DedupTable* dedup = nullptr;  // optional: duplicates are found only with it
  Codec codec = Codec::Zstd;
  int level = 1;
  uint64_t chunkTargetBytes = 1 << 20;  // raw data bytes after which a chunk is closed
  uint32_t threads = 2;
};

struct DumpChunk {
  uint64_t firstSpan = 0;
  uint32_t spanCount = 0;
  uint32_t rawLength = 0;
  uint64_t rawChecksum = 0;
  Codec codec = Codec::None;
  std::vector<uint8_t> stored;  // what the CHUNK section holds after its 32-byte header
};

struct DumpBatchResult {
  std::string error;                 // empty on success
  std::vector<uint8_t> states;       // one PageState a page
  std::vector<uint64_t> duplicates;  // pairs: page, source page
  std::vector<DumpChunk> chunks;
};

DumpBatchResult processDumpBatch(const DumpBatch& batch);

struct RestoreChunk {
  uint64_t payloadOffset = 0;   // file offset of the CHUNK payload (its 32-byte header)
  uint64_t payloadLength = 0;
  uint64_t checksum = 0;        // the section checksum of the payload
};

struct RestoreBatch {
  int stateFd = -1;
  int outputFd = -1;
  uint32_t pageSize = 4096;
  uint32_t spanPages = 512;
  // Spans of the batch: page count and dump offset of its first page each.
  std::vector<uint32_t> spanPageCounts;
  std::vector<uint64_t> spanDumpOffsets;
  uint64_t firstSpan = 0;
  const uint8_t* states = nullptr;   // one PageState a page of the batch's spans, in order
  std::vector<RestoreChunk> chunks;  // the chunks covering exactly the batch's spans
  std::vector<uint64_t> duplicates;  // pairs: dump offset of the page, dump offset of its source
  bool punchZeros = false;           // ZERO pages over old content: punch holes (fd), or zero them
  // The output as memory instead of outputFd's write(): a caller's buffer (outputMemory), or
  // outputFd mapped shared for the batch (mapOutput; hugetlbfs takes no write()). outputLength
  // bytes from dump offset 0; a page outside them is an error.
  uint8_t* outputMemory = nullptr;
  bool mapOutput = false;
  uint64_t outputLength = 0;
  // Start writing the batch's range to the disk at the end (sync_file_range), so a
  // final fdatasync has less left; off where a later layer rewrites the pages.
  bool startWriteback = false;
  uint32_t threads = 2;
};

struct RestoreBatchResult {
  std::string error;   // empty on success
  bool outputFailed = false;  // the error is writing (or reading back) the output, not the state file
  int64_t badChunk = -1;  // index in chunks of a chunk that failed its checksums
  uint64_t dataBytes = 0;
};

RestoreBatchResult restoreBatch(const RestoreBatch& batch);

// XXH3-64 of a whole file, streamed in large reads; false on a read error.
bool hashFile(int fd, uint64_t offset, uint64_t length, uint64_t* hash);

// XXH3 of a buffer (section checksums, digests).
uint64_t hash64(const uint8_t* data, size_t length);
// The hash64 of the parts one after another, without joining them.
struct ByteSpan {
  const uint8_t* data;
  size_t length;
};
uint64_t hash64(const std::vector<ByteSpan>& parts);
void hash128(const uint8_t* data, size_t length, uint64_t* low, uint64_t* high);

// Decompresses one chunk's stored bytes into `output` (rawLength bytes); false on any mismatch.
bool decompressChunk(Codec codec, const uint8_t* stored, size_t storedLength, uint8_t* output,
                     size_t rawLength);

}  // namespace qcow2img

#include "page_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <libdeflate.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "compress.h"
#include "io.h"
#include "mapped_guard.h"

namespace qcow2img {

const DedupTable::Entry* DedupTable::findOrInsert(uint64_t low, uint64_t high, uint64_t page,
                                                  uint64_t dumpOffset) {
  auto [it, inserted] = map_.try_emplace(Key{low, high}, Entry{page, dumpOffset});
  return inserted ? nullptr : &it->second;
}

uint64_t hash64(const uint8_t* data, size_t length) { return XXH3_64bits(data, length); }

uint64_t hash64(const std::vector<ByteSpan>& parts) {
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  for (const ByteSpan& part : parts) XXH3_64bits_update(&state, part.data, part.length);
  return XXH3_64bits_digest(&state);
}

bool hashFile(int fd, uint64_t offset, uint64_t length, uint64_t* hash) {
  XXH3_state_t* state = XXH3_createState();
  if (!state) return false;
  XXH3_64bits_reset(state);
  std::vector<uint8_t> buffer(4 << 20);
  const uint64_t end = length == UINT64_MAX ? UINT64_MAX : offset + length;
  bool ok = true;
  while (offset < end) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(buffer.size(), end - offset));
    ssize_t n = pread(fd, buffer.data(), want, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ok = false;
      break;
    }
    if (n == 0) break;
    XXH3_64bits_update(state, buffer.data(), static_cast<size_t>(n));
    offset += static_cast<uint64_t>(n);
  }
  *hash = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return ok;
}

void hash128(const uint8_t* data, size_t length, uint64_t* low, uint64_t* high) {
  XXH128_hash_t h = XXH3_128bits(data, length);
  *low = h.low64;
  *high = h.high64;
}

namespace {

// Runs fn(i) for i in [0, count) on up to `threads` threads. False when a task threw
// (std::bad_alloc): the tasks left are skipped, and no exception leaves a thread.
template <typename Fn>
bool parallelFor(uint64_t count, uint32_t threads, Fn fn) {
  uint32_t n = static_cast<uint32_t>(std::max<uint64_t>(1, std::min<uint64_t>(threads, count)));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> threw{false};
  if (n == 1) {
    // One worker: this thread, not a new one.
    try {
      for (uint64_t i = 0; i < count; i++) fn(i);
    } catch (...) {
      return false;
    }
    return true;
  }
  runOnThreads(
      n,
      [&](uint32_t) {
        for (uint64_t i = next.fetch_add(1); i < count && !threw; i = next.fetch_add(1)) fn(i);
      },
      [&] { threw = true; });
  return !threw;
}

// A read-only mapping of a file range: the batch being scanned, and the whole
// file for confirming duplicates against pages of earlier batches. Faults come in
// 64 KiB (fault-around) and are taken in parallel by the scanning threads.
struct Mapping {
  const uint8_t* data = nullptr;
  size_t length = 0;
  Mapping(int fd, uint64_t offset, uint64_t length) {
    if (length == 0) return;
    void* p = mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
    if (p == MAP_FAILED) return;
    data = static_cast<const uint8_t*>(p);
    this->length = length;
  }
  ~Mapping() {
    if (data) munmap(const_cast<uint8_t*>(data), length);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

// A thread's buffers and compressor contexts for the chunks it fills: a fresh zero-filled buffer and
// context per ~1 MiB chunk cost more than compressing a mostly-zero dump's data (measured).
struct ChunkScratch {
  std::unique_ptr<uint8_t[]> raw;
  size_t rawCapacity = 0;
  std::unique_ptr<uint8_t[]> out;
  size_t outCapacity = 0;
  ZSTD_CCtx* zstd = nullptr;
  libdeflate_compressor* deflate = nullptr;
  int deflateLevel = 0;
  ~ChunkScratch() {
    ZSTD_freeCCtx(zstd);
    libdeflate_free_compressor(deflate);
  }

  // libdeflate fixes the level at allocation: a new compressor only when it changes.
  libdeflate_compressor* deflateAt(int level) {
    if (!deflate || deflateLevel != level) {
      libdeflate_free_compressor(deflate);
      deflate = libdeflate_alloc_compressor(level);
      deflateLevel = level;
    }
    return deflate;
  }

  static uint8_t* sized(std::unique_ptr<uint8_t[]>& buffer, size_t& capacity, size_t length) {
    if (capacity < length) {
      buffer.reset(new uint8_t[length]);
      capacity = length;
    }
    return buffer.get();
  }
  uint8_t* rawFor(size_t length) { return sized(raw, rawCapacity, length); }
  uint8_t* outFor(size_t length) { return sized(out, outCapacity, length); }
};

thread_local ChunkScratch chunkScratch;

// Compresses `raw` into the thread's output buffer; the compressed length, or 0.
size_t compressChunk(Codec codec, int level, const uint8_t* raw, size_t rawLength) {
  ChunkScratch& scratch = chunkScratch;
  if (codec == Codec::Zstd) {
    if (!scratch.zstd && !(scratch.zstd = ZSTD_createCCtx())) return 0;
    size_t bound = ZSTD_compressBound(rawLength);
    size_t n = ZSTD_compressCCtx(scratch.zstd, scratch.outFor(bound), bound, raw, rawLength, level);
    return ZSTD_isError(n) ? 0 : n;
  }
  if (codec == Codec::Deflate) {
    libdeflate_compressor* c = scratch.deflateAt(std::clamp(level, 1, 12));
    if (!c) return 0;
    size_t bound = libdeflate_deflate_compress_bound(c, rawLength);
    return libdeflate_deflate_compress(c, raw, rawLength, scratch.outFor(bound), bound);
  }
  return 0;
}

}  // namespace

bool codecFromChunkByte(uint8_t byte, Codec* codec) {
  switch (byte) {
    case 0: *codec = Codec::None; return true;
    case 1: *codec = Codec::Zstd; return true;
    case 2: *codec = Codec::Deflate; return true;
    default: return false;
  }
}

bool decompressChunk(Codec codec, const uint8_t* stored, size_t storedLength, uint8_t* output,
                     size_t rawLength) {
  switch (codec) {
    case Codec::None:
      if (storedLength != rawLength) return false;
      memcpy(output, stored, rawLength);
      return true;
    case Codec::Zstd: {
      size_t n = ZSTD_decompress(output, rawLength, stored, storedLength);
      return !ZSTD_isError(n) && n == rawLength;
    }
    case Codec::Deflate: {
      libdeflate_decompressor* d = libdeflate_alloc_decompressor();
      if (!d) return false;
      bool ok = libdeflate_deflate_decompress(d, stored, storedLength, output, rawLength, nullptr) ==
                LIBDEFLATE_SUCCESS;
      libdeflate_free_decompressor(d);
      return ok;
    }
  }
  return false;
}

namespace {

constexpr uint8_t stateByte(PageState state) { return static_cast<uint8_t>(state); }

// Pages [first, end) of a batch: zero, unchanged or data (hashed). A page in a hole is the zero
// page it reads as, and its bytes are not touched.
void classifyTask(const DumpBatch& b, const uint8_t* pages, std::vector<uint8_t>& states,
                  std::vector<XXH128_hash_t>& hashes, uint64_t first, uint64_t end) {
  for (uint64_t i = first; i < end; i++) {
    const uint8_t* page = pages + i * b.pageSize;
    const bool hole = b.holes && b.holes[i];
    if (b.incremental) {
      bool unchanged = b.dirty  ? !((b.dirty[i / 8] >> (i % 8)) & 1)
                       : hole   ? isAllZero(b.parent + i * b.pageSize, b.pageSize)
                                : memcmp(page, b.parent + i * b.pageSize, b.pageSize) == 0;
      if (unchanged) {
        states[i] = stateByte(PageState::Parent);
        continue;
      }
    }
    if (hole || isAllZero(page, b.pageSize)) continue;
    states[i] = stateByte(PageState::Data);
    if (b.dedup) hashes[i] = XXH3_128bits(page, b.pageSize);
  }
}

// Phase 1 of a dump batch, parallel. False when a task threw (out of memory); `cutShort` is set
// when the dump's pages ended under the mapping (the file was truncated meanwhile).
bool classifyPages(const DumpBatch& b, const uint8_t* pages, std::vector<uint8_t>& states,
                   std::vector<XXH128_hash_t>& hashes, std::atomic<bool>& cutShort) {
  const uint64_t pagesPerTask = 256;
  return parallelFor((b.pageCount + pagesPerTask - 1) / pagesPerTask, b.threads, [&](uint64_t task) {
    const uint64_t first = task * pagesPerTask;
    const uint64_t end = std::min(b.pageCount, first + pagesPerTask);
    if (cutShort || !guardMapped([&] { classifyTask(b, pages, states, hashes, first, end); })) cutShort = true;
  });
}

// Phase 2, in page order: the first occurrence of some contents is DATA, a later one with
// the same bytes (hash, then memcmp against `source`, the whole dump) is its DUPLICATE.
// False when the dump's pages ended under the mapping.
bool markDuplicates(const DumpBatch& b, const Mapping& source, const uint8_t* pages,
                    const std::vector<XXH128_hash_t>& hashes, DumpBatchResult& result) {
  for (uint64_t i = 0; i < b.pageCount; i++) {
    if (result.states[i] != stateByte(PageState::Data)) continue;
    uint64_t offset = b.dumpOffset + i * b.pageSize;
    const DedupTable::Entry* first =
        b.dedup->findOrInsert(hashes[i].low64, hashes[i].high64, b.firstPage + i, offset);
    // The table belongs to one dump; an offset outside this file's mapping is not a match.
    if (!first || first->dumpOffset > source.length || b.pageSize > source.length - first->dumpOffset) continue;
    bool same = false;
    if (!guardMapped([&] { same = memcmp(source.data + first->dumpOffset, pages + i * b.pageSize, b.pageSize) == 0; })) return false;
    if (same) {
      result.states[i] = stateByte(PageState::Duplicate);
      result.duplicates.push_back(b.firstPage + i);
      result.duplicates.push_back(first->page);
    }
  }
  return true;
}

// A chunk to be: a run of spans (batch-relative) and the DATA pages they hold.
struct ChunkPlan {
  uint64_t firstSpan, spanCount, dataPages;
};

// Phase 3: runs of spans into chunks of about chunkTargetBytes of data; spans without data
// pages make no chunk.
std::vector<ChunkPlan> planChunks(const DumpBatch& b, const std::vector<uint8_t>& states) {
  const uint64_t spanCount = (b.pageCount + b.spanPages - 1) / b.spanPages;
  std::vector<ChunkPlan> plans;
  ChunkPlan current{0, 0, 0};
  for (uint64_t s = 0; s < spanCount; s++) {
    uint64_t end = std::min(b.pageCount, (s + 1) * b.spanPages);
    for (uint64_t i = s * b.spanPages; i < end; i++) current.dataPages += states[i] == stateByte(PageState::Data);
    current.spanCount++;
    if (current.dataPages * b.pageSize >= b.chunkTargetBytes || s + 1 == spanCount) {
      if (current.dataPages > 0) plans.push_back(current);
      current = ChunkPlan{s + 1, 0, 0};
    }
  }
  return plans;
}

// Phase 4, one chunk: its DATA pages gathered, then compressed (or stored as they are).
// False when the dump's pages ended under the mapping.
bool fillChunk(const DumpBatch& b, const uint8_t* pages, const std::vector<uint8_t>& states,
               const ChunkPlan& plan, DumpChunk& chunk) {
  chunk.firstSpan = b.firstSpan + plan.firstSpan;
  chunk.spanCount = static_cast<uint32_t>(plan.spanCount);
  chunk.rawLength = static_cast<uint32_t>(plan.dataPages * b.pageSize);
  uint8_t* raw = chunkScratch.rawFor(chunk.rawLength);
  const uint64_t end = std::min(b.pageCount, (plan.firstSpan + plan.spanCount) * b.spanPages);
  const bool gathered = guardMapped([&] {
    uint8_t* at = raw;
    for (uint64_t i = plan.firstSpan * b.spanPages; i < end; i++) {
      if (states[i] != stateByte(PageState::Data)) continue;
      memcpy(at, pages + i * b.pageSize, b.pageSize);
      at += b.pageSize;
    }
  });
  if (!gathered) return false;
  chunk.rawChecksum = XXH3_64bits(raw, chunk.rawLength);
  size_t n = b.codec == Codec::None ? 0 : compressChunk(b.codec, b.level, raw, chunk.rawLength);
  if (n > 0 && n < chunk.rawLength) {
    chunk.stored.assign(chunkScratch.out.get(), chunkScratch.out.get() + n);
    chunk.codec = b.codec;
  } else {
    // Incompressible (or not asked to compress): stored as is.
    chunk.stored.assign(raw, raw + chunk.rawLength);
    chunk.codec = Codec::None;
  }
  return true;
}

}  // namespace

DumpBatchResult processDumpBatch(const DumpBatch& b) {
  DumpBatchResult result;
  const uint64_t batchBytes = b.pageCount * b.pageSize;
  off_t fileSize = lseek(b.sourceFd, 0, SEEK_END);
  if (fileSize < 0 || b.dumpOffset + batchBytes > static_cast<uint64_t>(fileSize) || b.dumpOffset % b.pageSize) {
    result.error = "the RAM dump is shorter than its regions";
    return result;
  }
  Mapping batch(b.sourceFd, b.dumpOffset, batchBytes);
  Mapping source(b.sourceFd, 0, static_cast<uint64_t>(fileSize));
  if (!batch.data || !source.data) {
    result.error = "cannot map the RAM dump";
    return result;
  }
  const uint8_t* pages = batch.data;
  result.states.assign(b.pageCount, stateByte(PageState::Zero));
  std::vector<XXH128_hash_t> hashes(b.pageCount);
  std::atomic<bool> cutShort{false};
  const char* const cutShortError = "reading the RAM dump through its mapping failed (SIGBUS): was it cut short by another process?";
  if (!classifyPages(b, pages, result.states, hashes, cutShort)) {
    result.error = "out of memory";
    return result;
  }
  if (cutShort || (b.dedup && !markDuplicates(b, source, pages, hashes, result))) {
    result.error = cutShortError;
    return result;
  }
  std::vector<ChunkPlan> plans = planChunks(b, result.states);
  result.chunks.resize(plans.size());
  bool completed = parallelFor(plans.size(), b.threads, [&](uint64_t c) {
    if (cutShort || !fillChunk(b, pages, result.states, plans[c], result.chunks[c])) cutShort = true;
  });
  if (!completed) result.error = "out of memory";
  else if (cutShort) result.error = cutShortError;
  return result;
}

namespace {

// The 32-byte header of a CHUNK payload (docs/formats/vmstate.md); byte 0 is the codec.
struct ChunkHeader {
  uint32_t spanCount;
  uint64_t firstSpan;
  uint32_t rawLength;
  uint64_t rawChecksum;
};

ChunkHeader parseChunkHeader(const uint8_t* payload) {
  ChunkHeader h;
  memcpy(&h.spanCount, payload + 4, 4);
  memcpy(&h.firstSpan, payload + 8, 8);
  memcpy(&h.rawLength, payload + 16, 4);
  memcpy(&h.rawChecksum, payload + 24, 8);
  return h;
}

// One restore batch: chunks' DATA pages, then ZERO pages, then duplicates, into an fd or
// memory. The first failure is kept (with its chunk) and stops the tasks not yet started.
class BatchRestorer {
 public:
  explicit BatchRestorer(const RestoreBatch& b) : b_(b), spanFirstPage_(b.spanPageCounts.size() + 1, 0) {
    for (size_t s = 0; s < b.spanPageCounts.size(); s++) spanFirstPage_[s + 1] = spanFirstPage_[s] + b.spanPageCounts[s];
  }

  RestoreBatchResult run() {
    if (!mapOutput()) return result_;
    if (!parallelFor(b_.chunks.size(), b_.threads, [&](uint64_t c) { restoreChunk(c); })) fail("out of memory", -1);
    if (!failed_ && b_.punchZeros) zeroPages();
    // Duplicates last: their sources are DATA pages written above (or by an earlier batch),
    // never other duplicates, so the copies are independent of each other.
    if (!failed_) copyDuplicates();
    result_.dataBytes = dataBytes_;
    if (mapping_ != MAP_FAILED) munmap(mapping_, b_.outputLength);
    if (!failed_ && memory_ == nullptr && b_.startWriteback && !b_.spanDumpOffsets.empty()) startWriteback();
    return result_;
  }

 private:
  void fail(const std::string& message, int64_t chunk, bool output = false) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (result_.error.empty()) {
      result_.error = message;
      result_.badChunk = chunk;
      result_.outputFailed = output;
    }
    failed_ = true;
  }

  // A failure of writing the output (errno says why): it names the output, not the state file.
  void failOutput(const char* what) { fail(std::string(what) + ": " + strerror(errno), -1, true); }

  // A write through the output's mapping faulted: the batch fails naming the output.
  void outputCutShort() { fail("writing it through its mapping failed (SIGBUS): cut short by another process, or out of huge pages?", -1, true); }

  // Memory output: the caller's, or outputFd mapped shared for this batch.
  bool mapOutput() {
    memory_ = b_.outputMemory;
    if (memory_ != nullptr || !b_.mapOutput) return true;
    if (b_.outputLength == 0) {
      result_.error = "nothing to map: the output is empty";
      return false;
    }
    mapping_ = mmap(nullptr, b_.outputLength, PROT_READ | PROT_WRITE, MAP_SHARED, b_.outputFd, 0);
    if (mapping_ == MAP_FAILED) {
      // hugetlbfs reserves the file's huge pages here: ENOMEM when too few are free.
      failOutput(errno == ENOMEM ? "mapping it (too few free huge pages?)" : "mapping it");
      return false;
    }
    memory_ = static_cast<uint8_t*>(mapping_);
    return true;
  }

  bool inOutput(uint64_t offset, uint64_t length) const {
    return offset <= b_.outputLength && length <= b_.outputLength - offset;
  }

  // ZERO pages of an fd: holes, or written zeros where the file system punches none.
  bool zeroRange(uint64_t offset, uint64_t length) {
    if (fallocate(b_.outputFd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return true;
    if (errno != EOPNOTSUPP && errno != ENOTSUP && errno != ENODEV && errno != EINVAL) return false;
    static const std::vector<uint8_t> zeros(1 << 20, 0);
    for (uint64_t done = 0; done < length;) {
      uint64_t n = std::min<uint64_t>(zeros.size(), length - done);
      if (!pwriteFully(b_.outputFd, zeros.data(), n, offset + done)) return false;
      done += n;
    }
    return true;
  }

  // Pages [offset, offset + length) in `state`: DATA from `source` at *sourceCursor, ZERO punched or zeroed.
  bool writeRun(PageState state, uint64_t offset, uint64_t length, const uint8_t* source, uint64_t* sourceCursor) {
    if (state == PageState::Data) {
      if (memory_ != nullptr) {
        if (!guardMapped([&] { memcpy(memory_ + offset, source + *sourceCursor, length); })) outputCutShort();
      } else if (!pwriteFully(b_.outputFd, source + *sourceCursor, length, offset)) {
        return false;
      }
      *sourceCursor += length;
      dataBytes_ += length;
      return true;
    }
    if (memory_ != nullptr) {
      if (!guardMapped([&] { memset(memory_ + offset, 0, length); })) outputCutShort();
      return true;
    }
    return zeroRange(offset, length);
  }

  // Writes runs of consecutive pages in `state` of span s from `source` (or punches them);
  // the caller has checked that `source` holds every DATA page of the span. False with errno
  // set on a failed write; a page outside the output fails the batch and returns true.
  bool writeRuns(size_t s, PageState state, const uint8_t* source, uint64_t* sourceCursor) {
    const uint8_t* states = b_.states + spanFirstPage_[s];
    uint32_t count = b_.spanPageCounts[s];
    for (uint32_t i = 0; i < count;) {
      if (states[i] != stateByte(state)) {
        i++;
        continue;
      }
      uint32_t j = i;
      while (j < count && states[j] == stateByte(state)) j++;
      uint64_t offset = b_.spanDumpOffsets[s] + static_cast<uint64_t>(i) * b_.pageSize;
      uint64_t length = static_cast<uint64_t>(j - i) * b_.pageSize;
      if (memory_ != nullptr && !inOutput(offset, length)) {
        fail("a page at dump offset " + std::to_string(offset) + " lies outside the output (" + std::to_string(b_.outputLength) + " bytes)", -1);
        return true;
      }
      if (!writeRun(state, offset, length, source, sourceCursor)) return false;
      if (failed_) return true;  // reported by writeRun (a mapped output cut short)
      i = j;
    }
    return true;
  }

  // DATA pages of the batch's spans [first, first + count), to compare with a chunk's raw length.
  uint64_t dataPagesOf(uint64_t first, uint64_t count) const {
    uint64_t dataPages = 0;
    for (uint64_t s = first; s < first + count; s++) {
      const uint8_t* states = b_.states + spanFirstPage_[s];
      for (uint32_t i = 0; i < b_.spanPageCounts[s]; i++) dataPages += states[i] == stateByte(PageState::Data);
    }
    return dataPages;
  }

  // The chunk's payload, read and held to its section checksum; empty (after fail) when it is not.
  std::vector<uint8_t> readPayload(uint64_t c) {
    const RestoreChunk& chunk = b_.chunks[c];
    std::vector<uint8_t> payload(chunk.payloadLength);
    if (chunk.payloadLength < 32 || preadFully(b_.stateFd, payload.data(), payload.size(), chunk.payloadOffset) != static_cast<int64_t>(payload.size())) {
      fail("cannot read a chunk", static_cast<int64_t>(c));
      return {};
    }
    if (XXH3_64bits(payload.data(), payload.size()) != chunk.checksum) {
      fail("chunk checksum mismatch", static_cast<int64_t>(c));
      return {};
    }
    return payload;
  }

  // A chunk's header against the batch: its spans inside it, and the raw length they imply
  // (checked before allocating what the chunk claims). False after fail.
  bool checkChunkHeader(const ChunkHeader& h, uint64_t c) {
    // Compared by subtraction: a hostile header's firstSpan + spanCount may wrap.
    const uint64_t batchSpans = b_.spanPageCounts.size();
    if (h.firstSpan < b_.firstSpan || h.firstSpan - b_.firstSpan > batchSpans ||
        h.spanCount > batchSpans - (h.firstSpan - b_.firstSpan)) {
      fail("chunk outside its batch", static_cast<int64_t>(c));
      return false;
    }
    uint64_t dataPages = dataPagesOf(h.firstSpan - b_.firstSpan, h.spanCount);
    if (h.rawLength != dataPages * b_.pageSize) {
      fail(h.rawLength < dataPages * b_.pageSize ? "chunk holds fewer pages than its spans need"
                                                 : "chunk holds more pages than its spans need",
           static_cast<int64_t>(c));
      return false;
    }
    return true;
  }

  void restoreChunk(uint64_t c) {
    if (failed_) return;
    std::vector<uint8_t> payload = readPayload(c);
    if (payload.empty()) return;
    const ChunkHeader h = parseChunkHeader(payload.data());
    if (!checkChunkHeader(h, c)) return;
    std::vector<uint8_t> raw(h.rawLength);
    Codec codec;
    if (!codecFromChunkByte(payload[0], &codec) ||
        !decompressChunk(codec, payload.data() + 32, payload.size() - 32, raw.data(), h.rawLength) ||
        XXH3_64bits(raw.data(), raw.size()) != h.rawChecksum) {
      return fail("chunk does not decompress to its checksum", static_cast<int64_t>(c));
    }
    uint64_t cursor = 0;
    for (uint64_t s = h.firstSpan - b_.firstSpan; s < h.firstSpan - b_.firstSpan + h.spanCount && !failed_; s++) {
      if (!writeRuns(s, PageState::Data, raw.data(), &cursor)) return failOutput("writing its pages");
    }
  }

  void zeroPages() {
    bool completed = parallelFor(b_.spanPageCounts.size(), b_.threads, [&](uint64_t s) {
      uint64_t unused = 0;
      if (!failed_ && !writeRuns(s, PageState::Zero, nullptr, &unused)) failOutput("zeroing its zero pages");
    });
    if (!completed) fail("out of memory", -1);
  }

  // One duplicate page from its source: in memory, or read back from the fd into `page`.
  bool copyDuplicate(uint64_t pair, std::vector<uint8_t>& page) {
    const uint64_t target = b_.duplicates[pair * 2];
    const uint64_t source = b_.duplicates[pair * 2 + 1];
    if (memory_ != nullptr) {
      if (!inOutput(target, b_.pageSize) || !inOutput(source, b_.pageSize)) {
        fail("a duplicate page lies outside the output", -1);
        return false;
      }
      if (!guardMapped([&] { memcpy(memory_ + target, memory_ + source, b_.pageSize); })) {
        outputCutShort();
        return false;
      }
    } else if (preadFully(b_.outputFd, page.data(), b_.pageSize, source) != static_cast<int64_t>(b_.pageSize) ||
               !pwriteFully(b_.outputFd, page.data(), b_.pageSize, target)) {
      failOutput("copying a duplicate page within it");
      return false;
    }
    dataBytes_ += b_.pageSize;
    return true;
  }

  void copyDuplicates() {
    const uint64_t pairs = b_.duplicates.size() / 2;
    const uint64_t pairsPerTask = 256;
    bool completed = parallelFor((pairs + pairsPerTask - 1) / pairsPerTask, b_.threads, [&](uint64_t task) {
      std::vector<uint8_t> page(b_.pageSize);
      for (uint64_t pair = task * pairsPerTask; pair < std::min(pairs, (task + 1) * pairsPerTask) && !failed_; pair++) {
        if (!copyDuplicate(pair, page)) return;
      }
    });
    if (!completed) fail("out of memory", -1);
  }

  void startWriteback() {
    uint64_t start = b_.spanDumpOffsets.front();
    uint64_t end = b_.spanDumpOffsets.back() + static_cast<uint64_t>(b_.spanPageCounts.back()) * b_.pageSize;
    // Advisory: a refusal only leaves more for the fdatasync.
    sync_file_range(b_.outputFd, static_cast<off_t>(start), static_cast<off_t>(end - start), SYNC_FILE_RANGE_WRITE);
  }

  const RestoreBatch& b_;
  RestoreBatchResult result_;
  std::vector<uint64_t> spanFirstPage_;
  std::mutex mutex_;
  std::atomic<bool> failed_{false};
  std::atomic<uint64_t> dataBytes_{0};
  uint8_t* memory_ = nullptr;
  void* mapping_ = MAP_FAILED;
};

}  // namespace

RestoreBatchResult restoreBatch(const RestoreBatch& b) { return BatchRestorer(b).run(); }

}  // namespace qcow2img

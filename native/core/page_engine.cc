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

namespace qcow2img {

const DedupTable::Entry* DedupTable::findOrInsert(uint64_t low, uint64_t high, uint64_t page,
                                                  uint64_t dumpOffset) {
  auto [it, inserted] = map_.try_emplace(Key{low, high}, Entry{page, dumpOffset});
  return inserted ? nullptr : &it->second;
}

uint64_t hash64(const uint8_t* data, size_t length) { return XXH3_64bits(data, length); }

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

size_t compressChunk(Codec codec, int level, const uint8_t* raw, size_t rawLength,
                     std::vector<uint8_t>& out) {
  if (codec == Codec::Zstd) {
    out.resize(ZSTD_compressBound(rawLength));
    size_t n = ZSTD_compress(out.data(), out.size(), raw, rawLength, level);
    return ZSTD_isError(n) ? 0 : n;
  }
  if (codec == Codec::Deflate) {
    libdeflate_compressor* c = libdeflate_alloc_compressor(std::clamp(level, 1, 12));
    if (!c) return 0;
    out.resize(libdeflate_deflate_compress_bound(c, rawLength));
    size_t n = libdeflate_deflate_compress(c, raw, rawLength, out.data(), out.size());
    libdeflate_free_compressor(c);
    return n;
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
  result.states.assign(b.pageCount, static_cast<uint8_t>(PageState::Zero));
  std::vector<XXH128_hash_t> hashes(b.pageCount);

  // Phase 1, parallel: zero pages, unchanged pages, hashes of the rest.
  const uint64_t pagesPerTask = 256;
  bool completed = parallelFor((b.pageCount + pagesPerTask - 1) / pagesPerTask, b.threads, [&](uint64_t task) {
    uint64_t end = std::min(b.pageCount, (task + 1) * pagesPerTask);
    for (uint64_t i = task * pagesPerTask; i < end; i++) {
      const uint8_t* page = pages + i * b.pageSize;
      if (b.incremental) {
        bool unchanged = b.dirty ? !((b.dirty[i / 8] >> (i % 8)) & 1)
                                 : memcmp(page, b.parent + i * b.pageSize, b.pageSize) == 0;
        if (unchanged) {
          result.states[i] = static_cast<uint8_t>(PageState::Parent);
          continue;
        }
      }
      if (isAllZero(page, b.pageSize)) continue;
      result.states[i] = static_cast<uint8_t>(PageState::Data);
      if (b.dedup) hashes[i] = XXH3_128bits(page, b.pageSize);
    }
  });
  if (!completed) {
    result.error = "out of memory";
    return result;
  }

  // Phase 2, in page order: the first occurrence of some contents is DATA, a
  // later one with the same bytes (hash, then memcmp) is its DUPLICATE.
  if (b.dedup) {
    for (uint64_t i = 0; i < b.pageCount; i++) {
      if (result.states[i] != static_cast<uint8_t>(PageState::Data)) continue;
      uint64_t offset = b.dumpOffset + i * b.pageSize;
      const DedupTable::Entry* first =
          b.dedup->findOrInsert(hashes[i].low64, hashes[i].high64, b.firstPage + i, offset);
      // The table belongs to one dump; an offset outside this file's mapping is not a match.
      if (first && first->dumpOffset <= source.length && b.pageSize <= source.length - first->dumpOffset &&
          memcmp(source.data + first->dumpOffset, pages + i * b.pageSize, b.pageSize) == 0) {
        result.states[i] = static_cast<uint8_t>(PageState::Duplicate);
        result.duplicates.push_back(b.firstPage + i);
        result.duplicates.push_back(first->page);
      }
    }
  }

  // Phase 3: runs of spans into chunks of about chunkTargetBytes of data.
  const uint64_t spanCount = (b.pageCount + b.spanPages - 1) / b.spanPages;
  struct ChunkPlan {
    uint64_t firstSpan, spanCount, dataPages;
  };
  std::vector<ChunkPlan> plans;
  ChunkPlan current{0, 0, 0};
  for (uint64_t s = 0; s < spanCount; s++) {
    uint64_t end = std::min(b.pageCount, (s + 1) * b.spanPages);
    for (uint64_t i = s * b.spanPages; i < end; i++) {
      current.dataPages += result.states[i] == static_cast<uint8_t>(PageState::Data);
    }
    current.spanCount++;
    if (current.dataPages * b.pageSize >= b.chunkTargetBytes || s + 1 == spanCount) {
      if (current.dataPages > 0) plans.push_back(current);
      current = ChunkPlan{s + 1, 0, 0};
    }
  }

  // Phase 4, parallel: gather each chunk's data pages and compress them.
  result.chunks.resize(plans.size());
  completed = parallelFor(plans.size(), b.threads, [&](uint64_t c) {
    const ChunkPlan& plan = plans[c];
    DumpChunk& chunk = result.chunks[c];
    chunk.firstSpan = b.firstSpan + plan.firstSpan;
    chunk.spanCount = static_cast<uint32_t>(plan.spanCount);
    chunk.rawLength = static_cast<uint32_t>(plan.dataPages * b.pageSize);
    std::vector<uint8_t> raw(chunk.rawLength);
    uint8_t* at = raw.data();
    uint64_t end = std::min(b.pageCount, (plan.firstSpan + plan.spanCount) * b.spanPages);
    for (uint64_t i = plan.firstSpan * b.spanPages; i < end; i++) {
      if (result.states[i] != static_cast<uint8_t>(PageState::Data)) continue;
      memcpy(at, pages + i * b.pageSize, b.pageSize);
      at += b.pageSize;
    }
    chunk.rawChecksum = XXH3_64bits(raw.data(), raw.size());
    size_t n = b.codec == Codec::None ? 0 : compressChunk(b.codec, b.level, raw.data(), raw.size(), chunk.stored);
    if (n > 0 && n < raw.size()) {
      chunk.stored.resize(n);
      chunk.codec = b.codec;
    } else {
      // Incompressible (or not asked to compress): stored as is.
      chunk.stored = std::move(raw);
      chunk.codec = Codec::None;
    }
  });
  if (!completed) result.error = "out of memory";
  return result;
}

RestoreBatchResult restoreBatch(const RestoreBatch& b) {
  RestoreBatchResult result;
  std::vector<uint64_t> spanFirstPage(b.spanPageCounts.size() + 1, 0);
  for (size_t s = 0; s < b.spanPageCounts.size(); s++) spanFirstPage[s + 1] = spanFirstPage[s] + b.spanPageCounts[s];
  std::mutex mutex;
  std::atomic<bool> failed{false};
  auto fail = [&](const std::string& message, int64_t chunk) {
    std::lock_guard<std::mutex> lock(mutex);
    if (result.error.empty()) {
      result.error = message;
      result.badChunk = chunk;
    }
    failed = true;
  };
  std::atomic<uint64_t> dataBytes{0};

  // Memory output: the caller's, or outputFd mapped shared for this batch.
  uint8_t* memory = b.outputMemory;
  void* mapping = MAP_FAILED;
  if (memory == nullptr && b.mapOutput) {
    if (b.outputLength == 0) {
      result.error = "nothing to map: the output is empty";
      return result;
    }
    mapping = mmap(nullptr, b.outputLength, PROT_READ | PROT_WRITE, MAP_SHARED, b.outputFd, 0);
    if (mapping == MAP_FAILED) {
      result.error = std::string("cannot map the output: ") + strerror(errno);
      return result;
    }
    memory = static_cast<uint8_t*>(mapping);
  }
  auto inOutput = [&](uint64_t offset, uint64_t length) {
    return offset <= b.outputLength && length <= b.outputLength - offset;
  };
  // ZERO pages of an fd: holes, or written zeros where the file system punches none.
  auto zeroRange = [&](uint64_t offset, uint64_t length) -> bool {
    if (fallocate(b.outputFd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return true;
    if (errno != EOPNOTSUPP && errno != ENOTSUP && errno != ENODEV && errno != EINVAL) return false;
    static const std::vector<uint8_t> zeros(1 << 20, 0);
    for (uint64_t done = 0; done < length;) {
      uint64_t n = std::min<uint64_t>(zeros.size(), length - done);
      if (!pwriteFully(b.outputFd, zeros.data(), n, offset + done)) return false;
      done += n;
    }
    return true;
  };

  // Writes runs of consecutive pages in `state` of span s from `source` (or punches them);
  // the caller has checked that `source` holds every DATA page of the span.
  auto writeRuns = [&](size_t s, PageState state, const uint8_t* source, uint64_t* sourceCursor) -> bool {
    const uint8_t* states = b.states + spanFirstPage[s];
    uint32_t count = b.spanPageCounts[s];
    for (uint32_t i = 0; i < count;) {
      if (states[i] != static_cast<uint8_t>(state)) {
        i++;
        continue;
      }
      uint32_t j = i;
      while (j < count && states[j] == static_cast<uint8_t>(state)) j++;
      uint64_t offset = b.spanDumpOffsets[s] + static_cast<uint64_t>(i) * b.pageSize;
      uint64_t length = static_cast<uint64_t>(j - i) * b.pageSize;
      if (memory != nullptr && !inOutput(offset, length)) {
        fail("a page at dump offset " + std::to_string(offset) + " lies outside the output (" + std::to_string(b.outputLength) + " bytes)", -1);
        return true;
      }
      if (state == PageState::Data) {
        if (memory != nullptr) {
          memcpy(memory + offset, source + *sourceCursor, length);
        } else if (!pwriteFully(b.outputFd, source + *sourceCursor, length, offset)) {
          return false;
        }
        *sourceCursor += length;
        dataBytes += length;
      } else if (memory != nullptr) {
        memset(memory + offset, 0, length);
      } else if (!zeroRange(offset, length)) {
        return false;
      }
      i = j;
    }
    return true;
  };

  bool completed = parallelFor(b.chunks.size(), b.threads, [&](uint64_t c) {
    if (failed) return;
    const RestoreChunk& chunk = b.chunks[c];
    std::vector<uint8_t> payload(chunk.payloadLength);
    if (chunk.payloadLength < 32 || preadFully(b.stateFd, payload.data(), payload.size(), chunk.payloadOffset) != static_cast<int64_t>(payload.size())) {
      return fail("cannot read a chunk", static_cast<int64_t>(c));
    }
    if (XXH3_64bits(payload.data(), payload.size()) != chunk.checksum) {
      return fail("chunk checksum mismatch", static_cast<int64_t>(c));
    }
    uint32_t spanCount, rawLength;
    uint64_t firstSpan, rawChecksum;
    memcpy(&spanCount, payload.data() + 4, 4);
    memcpy(&firstSpan, payload.data() + 8, 8);
    memcpy(&rawLength, payload.data() + 16, 4);
    memcpy(&rawChecksum, payload.data() + 24, 8);
    // Compared by subtraction: a hostile header's firstSpan + spanCount may wrap.
    const uint64_t batchSpans = b.spanPageCounts.size();
    if (firstSpan < b.firstSpan || firstSpan - b.firstSpan > batchSpans ||
        spanCount > batchSpans - (firstSpan - b.firstSpan)) {
      return fail("chunk outside its batch", static_cast<int64_t>(c));
    }
    // The raw length the index implies, before allocating what the chunk claims.
    uint64_t dataPages = 0;
    for (uint64_t s = firstSpan - b.firstSpan; s < firstSpan - b.firstSpan + spanCount; s++) {
      const uint8_t* states = b.states + spanFirstPage[s];
      for (uint32_t i = 0; i < b.spanPageCounts[s]; i++) dataPages += states[i] == static_cast<uint8_t>(PageState::Data);
    }
    if (rawLength != dataPages * b.pageSize) {
      return fail(rawLength < dataPages * b.pageSize ? "chunk holds fewer pages than its spans need"
                                                     : "chunk holds more pages than its spans need",
                  static_cast<int64_t>(c));
    }
    std::vector<uint8_t> raw(rawLength);
    Codec codec;
    if (!codecFromChunkByte(payload[0], &codec) ||
        !decompressChunk(codec, payload.data() + 32, payload.size() - 32, raw.data(), rawLength) ||
        XXH3_64bits(raw.data(), raw.size()) != rawChecksum) {
      return fail("chunk does not decompress to its checksum", static_cast<int64_t>(c));
    }
    uint64_t cursor = 0;
    for (uint64_t s = firstSpan - b.firstSpan; s < firstSpan - b.firstSpan + spanCount; s++) {
      if (!writeRuns(s, PageState::Data, raw.data(), &cursor)) return fail(strerror(errno), static_cast<int64_t>(c));
    }
  });
  if (!completed) fail("out of memory", -1);
  if (!failed && b.punchZeros) {
    completed = parallelFor(b.spanPageCounts.size(), b.threads, [&](uint64_t s) {
      uint64_t unused = 0;
      if (!failed && !writeRuns(s, PageState::Zero, nullptr, &unused)) fail(strerror(errno), -1);
    });
    if (!completed) fail("out of memory", -1);
  }
  // Duplicates last: their sources are DATA pages written above (or by an earlier batch),
  // never other duplicates, so the copies are independent of each other.
  if (!failed) {
    const uint64_t pairs = b.duplicates.size() / 2;
    const uint64_t pairsPerTask = 256;
    completed = parallelFor((pairs + pairsPerTask - 1) / pairsPerTask, b.threads, [&](uint64_t task) {
      std::vector<uint8_t> page(b.pageSize);
      for (uint64_t pair = task * pairsPerTask; pair < std::min(pairs, (task + 1) * pairsPerTask) && !failed; pair++) {
        if (memory != nullptr) {
          if (!inOutput(b.duplicates[pair * 2], b.pageSize) || !inOutput(b.duplicates[pair * 2 + 1], b.pageSize)) {
            return fail("a duplicate page lies outside the output", -1);
          }
          memcpy(memory + b.duplicates[pair * 2], memory + b.duplicates[pair * 2 + 1], b.pageSize);
          dataBytes += b.pageSize;
          continue;
        }
        if (preadFully(b.outputFd, page.data(), b.pageSize, b.duplicates[pair * 2 + 1]) != static_cast<int64_t>(b.pageSize) ||
            !pwriteFully(b.outputFd, page.data(), b.pageSize, b.duplicates[pair * 2])) {
          return fail("cannot copy a duplicate page", -1);
        }
        dataBytes += b.pageSize;
      }
    });
    if (!completed) fail("out of memory", -1);
  }
  result.dataBytes = dataBytes;
  if (mapping != MAP_FAILED) munmap(mapping, b.outputLength);
  if (!failed && memory == nullptr && b.startWriteback && !b.spanDumpOffsets.empty()) {
    uint64_t start = b.spanDumpOffsets.front();
    uint64_t end = b.spanDumpOffsets.back() + static_cast<uint64_t>(b.spanPageCounts.back()) * b.pageSize;
    // Advisory: a refusal only leaves more for the fdatasync.
    sync_file_range(b.outputFd, static_cast<off_t>(start), static_cast<off_t>(end - start), SYNC_FILE_RANGE_WRITE);
  }
  return result;
}

}  // namespace qcow2img

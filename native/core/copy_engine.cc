#include "copy_engine.h"

#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace qcow2img {
namespace {

constexpr uint64_t kZeroChunk = 64ULL << 20;        // one zero task
constexpr uint64_t kZeroBufferSize = 1ULL << 20;    // written-zeros buffer
constexpr uint64_t kMaxCompressedGroup = 4ULL << 20;// one coalesced compressed read
constexpr uint64_t kCompressedGap = 4096;           // gap still worth reading through
constexpr uint64_t kMaxClusterSize = 2ULL << 20;

// Calls take(memory, length) for the staged bytes of `source` from `offset` on, in file order,
// for up to `length` bytes, as far as they run without a gap (a range is split where a stage
// chunk ends); returns the bytes covered.
template <typename Take>
uint64_t walkStaged(const Source& source, uint64_t offset, uint64_t length, Take take) {
  // The extent holding `offset` is the last one starting at or before it.
  auto extent = std::upper_bound(source.staged.begin(), source.staged.end(), offset,
                                 [](uint64_t at, const StagedExtent& e) { return at < e.fileOffset; });
  if (extent == source.staged.begin()) return 0;
  --extent;
  uint64_t done = 0;
  while (done < length && extent != source.staged.end() && offset + done >= extent->fileOffset &&
         offset + done < extent->fileOffset + extent->length) {
    uint64_t from = offset + done - extent->fileOffset;
    uint64_t n = std::min(length - done, extent->length - from);
    take(extent->memory + from, n);
    done += n;
    ++extent;
  }
  return done;
}

// Staged bytes [offset, offset + length) where they lie in one piece of memory, as far as they
// run (fewer at a gap or the file's end, as a short read): their address, or nullptr when they
// cross into another chunk or nothing is staged there.
const uint8_t* stagedView(const Source& source, uint64_t offset, uint64_t length, uint64_t* covered) {
  const uint8_t* first = nullptr;
  int pieces = 0;
  *covered = walkStaged(source, offset, length, [&](const uint8_t* memory, uint64_t) {
    if (pieces++ == 0) first = memory;
  });
  return pieces == 1 ? first : nullptr;
}

struct PlanRun {
  uint64_t guest;
  uint64_t length;
  RunKind kind;
  int source;
  uint64_t host;
  uint64_t compressedBytes;
  uint64_t offsetInCluster;
};

PlanRun runAt(const CopyJob& job, size_t index) {
  const double* r = job.runs + index * kPlanRunFields;
  return PlanRun{static_cast<uint64_t>(r[0]), static_cast<uint64_t>(r[1]),
                 static_cast<RunKind>(static_cast<int>(r[2])), static_cast<int>(r[3]),
                 static_cast<uint64_t>(r[4]), static_cast<uint64_t>(r[5]),
                 static_cast<uint64_t>(r[6])};
}

uint64_t alignDown(uint64_t value, uint64_t unit) { return unit ? value / unit * unit : value; }
uint64_t alignUp(uint64_t value, uint64_t unit) {
  return unit ? (value + unit - 1) / unit * unit : value;
}

struct Task {
  bool zero;              // a zero range rather than a data window
  uint64_t start;         // guest
  uint64_t end;           // guest
  size_t firstRun;        // data windows: first run that overlaps
};


class Engine {
 public:
  Engine(const CopyJob& job, std::vector<CopyError>* targetErrors) : job_(job), targetErrors_(targetErrors) {
    if (job.memory == nullptr) {
      targets_.push_back(ExtraTarget{job.targetFd, job.targetTailFd, job.targetBase, job.limitStart, job.limitEnd,
                                     job.alignment, job.zeroMode});
      for (const ExtraTarget& t : job.extraTargets) targets_.push_back(t);
    }
    states_ = std::make_unique<TargetState[]>(targets_.size());
    for (const ExtraTarget& t : targets_) {
      if (t.zeroMode != ZeroMode::Skip) writesZeros_ = true;
    }
  }

  CopyError run() {
    if (!validate()) return finish();
    buildTasks();
    if (job_.counters && !writesZeros_ && job_.memory == nullptr) {
      __atomic_fetch_add(&job_.counters->zeroBytes, skippedZeroBytes_, __ATOMIC_RELAXED);
    }
    if (needsZeroBuffer()) {
      zeroBuffer_ = std::make_unique<AlignedBuffer>(kZeroBufferSize);
      if (!zeroBuffer_->data) return outOfMemory();
      memset(zeroBuffer_->data, 0, kZeroBufferSize);
    }
    uint32_t threadCount = std::max<uint32_t>(1, std::min<uint32_t>(job_.threads, 64));
    if (tasks_.size() < threadCount) threadCount = std::max<size_t>(1, tasks_.size());
    runOnThreads(threadCount, [this](uint32_t) { worker(); }, [this] { fail("memory", "out of memory", ENOMEM, -1, 0, 0); });
    if (!error_.failed && cancelled()) {
      error_.failed = true;
      error_.cancelled = true;
      error_.operation = "cancel";
      error_.message = "cancelled";
    }
    return finish();
  }

 private:
  struct TargetState {
    std::atomic<bool> failed{false};
    CopyError error;
  };

  CopyError finish() {
    if (targetErrors_) {
      targetErrors_->clear();
      for (size_t i = 0; i < targets_.size(); i++) targetErrors_->push_back(states_[i].error);
    }
    return error_;
  }

  bool toMemory() const { return job_.memory != nullptr; }
  bool needsZeroBuffer() const { return !toMemory() && writesZeros_; }
  bool targetFailed(size_t t) const { return states_[t].failed.load(std::memory_order_relaxed); }

  // A failure of writing target `t`: with per-target errors it stops only that target (the job
  // stops once none is left); without, the job.
  void failTarget(size_t t, const char* operation, const std::string& message, int err, uint64_t guest, uint64_t host) {
    if (!targetErrors_) return fail(operation, message, err, -1, guest, host);
    std::lock_guard<std::mutex> lock(errorMutex_);
    TargetState& state = states_[t];
    if (state.error.failed) return;
    state.error.failed = true;
    state.error.operation = operation;
    state.error.message = message;
    state.error.errnoValue = err;
    state.error.guestOffset = guest;
    state.error.hostOffset = host;
    state.failed.store(true, std::memory_order_relaxed);
    for (size_t i = 0; i < targets_.size(); i++) {
      if (!states_[i].failed.load(std::memory_order_relaxed)) return;
    }
    // Every target failed: nothing left to write. The job's error is the first target's.
    if (!error_.failed) {
      error_ = states_[0].error;
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  bool cancelled() const {
    return job_.counters && __atomic_load_n(&job_.counters->cancel, __ATOMIC_RELAXED) != 0;
  }
  bool stopping() const { return failed_.load(std::memory_order_relaxed) || cancelled(); }

  CopyError outOfMemory() {
    fail("memory", "out of memory", ENOMEM, -1, 0, 0);
    return error_;
  }

  void fail(const char* operation, const std::string& message, int err, int source,
            uint64_t guest, uint64_t host) {
    std::lock_guard<std::mutex> lock(errorMutex_);
    if (error_.failed) return;
    error_.failed = true;
    error_.operation = operation;
    error_.message = message;
    error_.errnoValue = err;
    error_.sourceIndex = source;
    error_.guestOffset = guest;
    error_.hostOffset = host;
    failed_.store(true, std::memory_order_relaxed);
  }

  bool validate() {
    if (job_.windowSize == 0 || (job_.alignment && job_.windowSize % job_.alignment) ||
        (job_.alignment & (job_.alignment - 1))) {
      fail("plan", "window size must be a non-zero multiple of the alignment", EINVAL, -1, 0, 0);
      return false;
    }
    for (const ExtraTarget& t : targets_) {
      if ((t.alignment && job_.windowSize % t.alignment) || (t.alignment & (t.alignment - 1)) || t.fd < 0) {
        fail("plan", "a target's fd or alignment is invalid", EINVAL, -1, 0, 0);
        return false;
      }
    }
    uint64_t previousEnd = 0;
    for (size_t i = 0; i < job_.runCount; i++) {
      PlanRun r = runAt(job_, i);
      bool badSource = r.kind != RunKind::Zero &&
                       (r.source < 0 || static_cast<size_t>(r.source) >= job_.sources.size());
      uint64_t clusterSize = badSource ? 0 : job_.sources[static_cast<size_t>(r.source)].clusterSize;
      // By subtraction: no sum of hostile values may wrap past a check.
      bool badCompressed = r.kind == RunKind::Compressed &&
                           (clusterSize == 0 || clusterSize > kMaxClusterSize ||
                            r.offsetInCluster > clusterSize || r.length > clusterSize - r.offsetInCluster ||
                            r.compressedBytes > 2 * clusterSize + 1024);
      if (r.length == 0 || r.length > UINT64_MAX - r.guest || r.guest < previousEnd || badSource || badCompressed) {
        fail("plan", "malformed plan run", EINVAL, -1, r.guest, r.host);
        return false;
      }
      previousEnd = r.guest + r.length;
      if (r.kind == RunKind::Compressed) maxClusterSize_ = std::max(maxClusterSize_, clusterSize);
      if (toMemory() && (r.guest < job_.memoryGuestOffset ||
                         r.guest + r.length > job_.memoryGuestOffset + job_.memoryLength)) {
        fail("bounds", "plan run outside the destination buffer", ERANGE, -1, r.guest, 0);
        return false;
      }
    }
    return true;
  }

  void buildTasks() {
    const uint64_t window = job_.windowSize;
    uint64_t lastWindow = UINT64_MAX;
    for (size_t i = 0; i < job_.runCount; i++) {
      PlanRun r = runAt(job_, i);
      if (r.kind == RunKind::Zero && !toMemory()) {
        if (!writesZeros_) {
          skippedZeroBytes_ += r.length;
          continue;
        }
        // Chunk edges on multiples of kZeroChunk, so inside a run they fall on O_DIRECT units
        // (zeroRange leaves a unit that straddles its edges to whoever holds the rest of it).
        for (uint64_t s = r.guest; s < r.guest + r.length;) {
          uint64_t e = std::min(r.guest + r.length, alignDown(s, kZeroChunk) + kZeroChunk);
          tasks_.push_back(Task{true, s, e, i});
          s = e;
        }
        continue;
      }
      // One task per window a run touches; a window's task starts at the first
      // run that overlaps it, and runs are in guest order.
      for (uint64_t w = alignDown(r.guest, window); w < r.guest + r.length; w += window) {
        if (w == lastWindow) continue;
        tasks_.push_back(Task{false, w, w + window, i});
        lastWindow = w;
      }
    }
    // Zero chunks and data windows interleave: sorting keeps writes near-sequential.
    std::stable_sort(tasks_.begin(), tasks_.end(),
                     [](const Task& a, const Task& b) { return a.start < b.start; });
  }

  void worker() {
    Scratch scratch;
    for (;;) {
      if (stopping()) return;
      size_t index = nextTask_.fetch_add(1, std::memory_order_relaxed);
      if (index >= tasks_.size()) return;
      const Task& task = tasks_[index];
      if (task.zero) {
        zeroRange(task.start, task.end);
      } else if (!scratch.ready(job_, maxClusterSize_)) {
        fail("memory", "out of memory", ENOMEM, -1, task.start, 0);
      } else {
        copyWindow(task, scratch);
      }
    }
  }

  struct Scratch {
    std::unique_ptr<AlignedBuffer> window;
    std::unique_ptr<AlignedBuffer> cluster;
    std::vector<uint8_t> compressed;
    std::unique_ptr<ClusterDecompressor> decompressor;
    bool ready(const CopyJob& job, uint64_t clusterSize) {
      if (!decompressor) {
        decompressor = std::make_unique<ClusterDecompressor>();
        cluster = std::make_unique<AlignedBuffer>(clusterSize);
        if (job.memory == nullptr) window = std::make_unique<AlignedBuffer>(job.windowSize);
      }
      return cluster->data && (job.memory != nullptr || window->data);
    }
  };

  uint8_t* destinationFor(uint64_t guest, uint64_t windowStart, Scratch& scratch) {
    if (toMemory()) return job_.memory + (guest - job_.memoryGuestOffset);
    return scratch.window->data + (guest - windowStart);
  }

  struct Piece {
    PlanRun run;
    uint64_t start;  // guest, clipped to the window
    uint64_t end;
  };

  void copyWindow(const Task& task, Scratch& scratch) {
    std::vector<Piece> pieces;
    for (size_t i = task.firstRun; i < job_.runCount; i++) {
      PlanRun r = runAt(job_, i);
      if (r.guest >= task.end) break;
      if (r.kind == RunKind::Zero && !toMemory()) continue;
      uint64_t start = std::max(r.guest, task.start);
      uint64_t end = std::min(r.guest + r.length, task.end);
      if (start < end) pieces.push_back(Piece{r, start, end});
    }
    if (pieces.empty()) return;
    std::vector<Segment> segments;
    if (stagedInPlace(task, pieces, segments)) {
      writeSegments(task, segments);
      addProgress(pieces);
      if (job_.counters) __atomic_fetch_add(&job_.counters->stagedBytes, task.end - task.start, __ATOMIC_RELAXED);
      return;
    }
    if (!fillPieces(pieces, task.start, scratch)) return;
    if (toMemory()) {
      addProgress(pieces);
      return;
    }
    if (job_.windowHashes) hashWindow(task, pieces, scratch.window->data);

    for (size_t t = 0; t < targets_.size(); t++) {
      if (targetFailed(t)) continue;
      writeWindow(t, task, pieces, scratch.window->data);
    }
    addProgress(pieces);
  }

  struct Segment {
    const uint8_t* memory;
    uint64_t length;
  };

  // A window that is data of staged sources from end to end, in memory each target can write
  // from as it lies (whole O_DIRECT units, inside every target's limits): its bytes in guest
  // order, as `segments`. A remote uncompressed image's windows mostly are; they are written
  // from the stage with no copy into a window.
  bool stagedInPlace(const Task& task, const std::vector<Piece>& pieces, std::vector<Segment>& segments) {
    const uint64_t unit = wholeWindowUnit(task);
    if (unit == 0 || pieces.front().start != task.start || pieces.back().end != task.end) return false;
    uint64_t cursor = task.start;
    for (const Piece& p : pieces) {
      if (p.run.kind != RunKind::Data || p.start != cursor) return false;
      const Source& source = job_.sources[static_cast<size_t>(p.run.source)];
      const uint64_t host = p.run.host + (p.start - p.run.guest);
      const uint64_t length = p.end - p.start;
      if (source.staged.empty() || host > source.sizeBytes || length > source.sizeBytes - host) return false;
      bool whole = true;
      uint64_t covered = walkStaged(source, host, length, [&](const uint8_t* memory, uint64_t n) {
        whole = whole && reinterpret_cast<uintptr_t>(memory) % unit == 0 && n % unit == 0;
        if (!segments.empty() && segments.back().memory + segments.back().length == memory) {
          segments.back().length += n;
        } else {
          segments.push_back(Segment{memory, n});
        }
      });
      if (!whole || covered != length) return false;
      cursor = p.end;
    }
    return true;
  }

  // The largest O_DIRECT unit of the targets (at least 1) when every target takes the whole
  // window as one write and its hash covers all of it; 0 otherwise.
  uint64_t wholeWindowUnit(const Task& task) const {
    if (toMemory() || (job_.windowHashes && task.end > job_.hashedSize)) return 0;
    uint64_t unit = 1;
    for (const ExtraTarget& t : targets_) {
      if (t.base + task.start < t.limitStart || t.base + task.end > t.limitEnd) return 0;
      unit = std::max<uint64_t>(unit, t.alignment);
    }
    return unit;
  }

  // Window `index` holds data whose bytes hash to `hash` (read back by the Verifier).
  void recordHash(size_t index, uint64_t hash) {
    job_.windowHashes[index * 2] = 1;
    job_.windowHashes[index * 2 + 1] = hash;
  }

  // Writes (and hashes) a window held in staged memory as `segments`.
  void writeSegments(const Task& task, const std::vector<Segment>& segments) {
    size_t index = static_cast<size_t>(task.start / job_.windowSize);
    if (job_.windowHashes && index < job_.windowHashCount) {
      XXH3_state_t state;
      XXH3_64bits_reset(&state);
      for (const Segment& s : segments) XXH3_64bits_update(&state, s.memory, s.length);
      recordHash(index, XXH3_64bits_digest(&state));
    }
    for (size_t t = 0; t < targets_.size(); t++) {
      uint64_t guest = task.start;
      for (const Segment& s : segments) {
        if (targetFailed(t) || !writeSpan(t, guest, guest + s.length, s.memory)) break;
        guest += s.length;
      }
    }
  }

  // Writes the pieces of a filled window to target `t`: spans rounded out to its O_DIRECT unit.
  void writeWindow(size_t t, const Task& task, const std::vector<Piece>& pieces, uint8_t* window) {
    const uint64_t alignment = targets_[t].alignment;
    // Spans to write: pieces rounded out to the O_DIRECT unit, within the window.
    struct Span { uint64_t start, end; };
    std::vector<Span> spans;
    for (const Piece& p : pieces) {
      uint64_t s = std::max(alignDown(p.start, alignment), task.start);
      uint64_t e = std::min(alignUp(p.end, alignment), task.end);
      if (!spans.empty() && s <= spans.back().end) {
        spans.back().end = std::max(spans.back().end, e);
      } else {
        spans.push_back(Span{s, e});
      }
    }
    // Bytes of a span that no piece fills are zeros (the target must read zeros there). Only
    // bytes outside every piece are set, so the window stays the same for the next target.
    size_t pieceIndex = 0;
    for (const Span& span : spans) {
      uint64_t cursor = span.start;
      while (pieceIndex < pieces.size() && pieces[pieceIndex].start < span.end) {
        const Piece& p = pieces[pieceIndex++];
        if (p.start > cursor) memset(window + (cursor - task.start), 0, p.start - cursor);
        cursor = p.end;
      }
      if (cursor < span.end) memset(window + (cursor - task.start), 0, span.end - cursor);
      if (!writeSpan(t, span.start, span.end, window + (span.start - task.start))) return;
    }
  }

  // The whole window as the target must read it: pieces, zeros elsewhere.
  void hashWindow(const Task& task, const std::vector<Piece>& pieces, uint8_t* window) {
    uint64_t end = std::min(task.end, job_.hashedSize);
    size_t index = static_cast<size_t>(task.start / job_.windowSize);
    if (task.start >= end || index >= job_.windowHashCount) return;
    uint64_t cursor = task.start;
    for (const Piece& p : pieces) {
      if (p.start > cursor) memset(window + (cursor - task.start), 0, p.start - cursor);
      cursor = p.end;
    }
    if (cursor < end) memset(window + (cursor - task.start), 0, end - cursor);
    recordHash(index, XXH3_64bits(window, end - task.start));
  }

  void addProgress(const std::vector<Piece>& pieces) {
    if (!job_.counters) return;
    uint64_t data = 0, zero = 0;
    for (const Piece& p : pieces) (p.run.kind == RunKind::Zero ? zero : data) += p.end - p.start;
    if (data) __atomic_fetch_add(&job_.counters->dataBytes, data, __ATOMIC_RELAXED);
    if (zero) __atomic_fetch_add(&job_.counters->zeroBytes, zero, __ATOMIC_RELAXED);
  }

  bool fillPieces(const std::vector<Piece>& pieces, uint64_t windowStart, Scratch& scratch) {
    size_t i = 0;
    while (i < pieces.size()) {
      const Piece& p = pieces[i];
      uint8_t* out = destinationFor(p.start, windowStart, scratch);
      if (p.run.kind == RunKind::Zero) {
        memset(out, 0, p.end - p.start);
        i++;
      } else if (p.run.kind == RunKind::Data) {
        if (!readData(p, out)) return false;
        i++;
      } else {
        size_t groupEnd = i + 1;
        uint64_t groupStart = p.run.host;
        uint64_t groupLimit = p.run.host + p.run.compressedBytes;
        while (groupEnd < pieces.size()) {
          const PlanRun& n = pieces[groupEnd].run;
          if (n.kind != RunKind::Compressed || n.source != p.run.source || n.host < groupStart ||
              n.host > groupLimit + kCompressedGap ||
              n.host + n.compressedBytes - groupStart > kMaxCompressedGroup) {
            break;
          }
          groupLimit = std::max(groupLimit, n.host + n.compressedBytes);
          groupEnd++;
        }
        if (!decompressGroup(pieces, i, groupEnd, groupStart, groupLimit, windowStart, scratch)) {
          return false;
        }
        i = groupEnd;
      }
    }
    return true;
  }

  bool readData(const Piece& p, uint8_t* out) {
    const Source& source = job_.sources[static_cast<size_t>(p.run.source)];
    uint64_t host = p.run.host + (p.start - p.run.guest);
    uint64_t length = p.end - p.start;
    if (host > source.sizeBytes || length > source.sizeBytes - host) {
      fail("read", "data beyond the end of the file", 0, p.run.source, p.start, host);
      return false;
    }
    int64_t n = readSource(source, out, length, host);
    if (n < 0 || static_cast<uint64_t>(n) != length) {
      fail("read", n < 0 ? strerror(errno) : "unexpected end of file", n < 0 ? errno : 0,
           p.run.source, p.start, host);
      return false;
    }
    return true;
  }

  bool decompressGroup(const std::vector<Piece>& pieces, size_t first, size_t last,
                       uint64_t groupStart, uint64_t groupEnd, uint64_t windowStart,
                       Scratch& scratch) {
    const int sourceIndex = pieces[first].run.source;
    const Source& source = job_.sources[static_cast<size_t>(sourceIndex)];
    // Past the end of the file QEMU reads zeros, which do not decompress: a decompression failure.
    if (groupStart >= source.sizeBytes) {
      fail("decompress", "compressed cluster beyond the end of the file", 0, sourceIndex,
           pieces[first].start, groupStart);
      return false;
    }
    // The last compressed cluster's sector range may run past the end of the
    // file: the stream itself ends before it, so a short read is expected.
    uint64_t readLength = std::min(groupEnd, source.sizeBytes) - groupStart;
    uint64_t available = 0;
    // Staged bytes in one piece are decoded where they lie.
    const uint8_t* compressed = source.staged.empty() ? nullptr : stagedView(source, groupStart, readLength, &available);
    if (compressed == nullptr) {
      scratch.compressed.resize(readLength);
      int64_t n = readSource(source, scratch.compressed.data(), readLength, groupStart);
      if (n < 0) {
        fail("read", strerror(errno), errno, sourceIndex, pieces[first].start, groupStart);
        return false;
      }
      compressed = scratch.compressed.data();
      available = static_cast<uint64_t>(n);
    }
    for (size_t i = first; i < last; i++) {
      const Piece& p = pieces[i];
      uint64_t at = p.run.host - groupStart;
      if (at >= available) {
        fail("decompress", "compressed cluster beyond the end of the file", 0, sourceIndex, p.start,
             p.run.host);
        return false;
      }
      uint64_t inputSize = std::min(p.run.compressedBytes, available - at);
      uint64_t offsetInCluster = p.run.offsetInCluster + (p.start - p.run.guest);
      uint64_t length = p.end - p.start;
      bool whole = offsetInCluster == 0 && length == source.clusterSize;
      uint8_t* out = destinationFor(p.start, windowStart, scratch);
      uint8_t* target = whole ? out : scratch.cluster->data;
      DecompressStatus status = scratch.decompressor->decompress(
          source.codec, compressed + at, inputSize, target, source.clusterSize);
      if (status != DecompressStatus::Ok) {
        fail("decompress", decompressStatusName(status), 0, sourceIndex, p.start, p.run.host);
        return false;
      }
      if (!whole) memcpy(out, scratch.cluster->data + offsetInCluster, length);
    }
    return true;
  }

  // Writes guest [start, end) from `data` to the target, clamped to the limit; the
  // part of the last O_DIRECT unit past limitEnd is never written, and the bytes
  // before it inside that unit go through the buffered tail fd.
  bool writeSpan(size_t t, uint64_t start, uint64_t end, const uint8_t* data) {
    const ExtraTarget& target = targets_[t];
    uint64_t targetStart = target.base + start;
    uint64_t targetEnd = std::min(target.base + end, target.limitEnd);
    if (targetStart < target.limitStart || targetStart >= targetEnd) {
      failTarget(t, "bounds", "write outside the target range", ERANGE, start, targetStart);
      return false;
    }
    uint64_t directEnd = targetEnd;
    if (target.alignment) directEnd = alignDown(targetEnd, target.alignment);
    if (directEnd > targetStart &&
        !pwriteFully(target.fd, data, directEnd - targetStart, targetStart)) {
      failTarget(t, "write", strerror(errno), errno, start, targetStart);
      return false;
    }
    if (directEnd < targetEnd) {
      uint64_t tailStart = std::max(directEnd, targetStart);
      int fd = target.tailFd >= 0 ? target.tailFd : target.fd;
      if (!pwriteFully(fd, data + (tailStart - targetStart), targetEnd - tailStart, tailStart)) {
        failTarget(t, "write", strerror(errno), errno, start + (tailStart - targetStart), tailStart);
        return false;
      }
    }
    return true;
  }

  // Zeroes guest [start, end) of an fd target. With O_DIRECT, only whole units
  // are touched here: a partial unit at either edge also holds data, and the data
  // window that writes it fills its zeros, so no unit is written twice.
  void zeroRange(uint64_t start, uint64_t end) {
    for (size_t t = 0; t < targets_.size(); t++) {
      if (targetFailed(t) || targets_[t].zeroMode == ZeroMode::Skip) continue;
      zeroTargetRange(t, start, end);
    }
    if (job_.counters) __atomic_fetch_add(&job_.counters->zeroBytes, end - start, __ATOMIC_RELAXED);
  }

  void zeroTargetRange(size_t t, uint64_t start, uint64_t end) {
    const ExtraTarget& target = targets_[t];
    uint64_t targetStart = target.base + start;
    uint64_t targetEnd = std::min(target.base + end, target.limitEnd);
    if (targetStart < target.limitStart) {
      failTarget(t, "bounds", "zeroing outside the target range", ERANGE, start, targetStart);
      return;
    }
    if (targetStart < targetEnd) {
      uint64_t a = target.alignment;
      uint64_t innerStart = alignUp(targetStart, a);
      uint64_t innerEnd = alignDown(targetEnd, a);
      bool tailIsOurs = a && targetEnd == target.limitEnd && targetEnd % a != 0 &&
                        alignDown(targetEnd, a) >= targetStart;
      if (innerStart < innerEnd && !zeroTarget(t, innerStart, innerEnd, target.fd)) return;
      // Buffered (a == 0): zeroTarget above covered [targetStart, targetEnd) exactly.
      if (tailIsOurs) {
        uint64_t tailStart = std::max(innerEnd, targetStart);
        int fd = target.tailFd >= 0 ? target.tailFd : target.fd;
        if (!writeZeros(t, fd, tailStart, targetEnd)) return;
      }
    }
  }

  bool zeroTarget(size_t t, uint64_t start, uint64_t end, int fd) {
    const ZeroMode mode = targets_[t].zeroMode;
    if (mode == ZeroMode::ZeroOut && start % 512 == 0 && end % 512 == 0) {
      uint64_t range[2] = {start, end - start};
      if (ioctl(fd, BLKZEROOUT, &range) == 0) return true;
    } else if (mode == ZeroMode::PunchHole) {
      if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(start),
                    static_cast<off_t>(end - start)) == 0) {
        return true;
      }
    }
    return writeZeros(t, fd, start, end);
  }

  bool writeZeros(size_t t, int fd, uint64_t start, uint64_t end) {
    for (uint64_t at = start; at < end;) {
      uint64_t n = std::min(end - at, kZeroBufferSize);
      if (!pwriteFully(fd, zeroBuffer_->data, n, at)) {
        failTarget(t, "zero", strerror(errno), errno, at - targets_[t].base, at);
        return false;
      }
      at += n;
    }
    return true;
  }

  const CopyJob& job_;
  std::vector<CopyError>* targetErrors_;
  std::vector<ExtraTarget> targets_;
  std::unique_ptr<TargetState[]> states_;
  bool writesZeros_ = false;
  std::vector<Task> tasks_;
  uint64_t skippedZeroBytes_ = 0;
  uint64_t maxClusterSize_ = 512;
  std::atomic<size_t> nextTask_{0};
  std::atomic<bool> failed_{false};
  std::mutex errorMutex_;
  CopyError error_;
  std::unique_ptr<AlignedBuffer> zeroBuffer_;
};

class Verifier {
 public:
  explicit Verifier(const VerifyJob& job) : job_(job) {}

  VerifyResult run() {
    if (job_.windowSize == 0 || (job_.alignment && job_.windowSize % job_.alignment)) {
      result_.error.failed = true;
      result_.error.operation = "verify";
      result_.error.message = "window size must be a multiple of the alignment";
      return result_;
    }
    windows_ = (job_.size + job_.windowSize - 1) / job_.windowSize;
    // The hash of a window that was never written, which must read back as zeros.
    std::vector<uint8_t> zeros(job_.windowSize, 0);
    zeroHash_ = XXH3_64bits(zeros.data(), job_.windowSize);
    uint64_t lastLength = job_.size - (windows_ ? (windows_ - 1) * job_.windowSize : 0);
    lastZeroHash_ = XXH3_64bits(zeros.data(), lastLength);
    uint32_t threadCount = std::max<uint32_t>(1, std::min<uint32_t>(job_.threads, 64));
    runOnThreads(threadCount, [this](uint32_t) { worker(); }, [this] { fail("out of memory", ENOMEM, 0); });
    if (!result_.error.failed && job_.counters &&
        __atomic_load_n(&job_.counters->cancel, __ATOMIC_RELAXED)) {
      result_.error.failed = true;
      result_.error.cancelled = true;
      result_.error.operation = "cancel";
      result_.error.message = "cancelled";
    }
    result_.firstBadWindow = firstBad_.load() == INT64_MAX ? -1 : firstBad_.load();
    return result_;
  }

 private:
  void worker() {
    AlignedBuffer buffer(job_.windowSize);
    if (!buffer.data) return fail("out of memory", ENOMEM, 0);
    for (;;) {
      if (stop_.load(std::memory_order_relaxed)) return;
      if (job_.counters && __atomic_load_n(&job_.counters->cancel, __ATOMIC_RELAXED)) return;
      uint64_t w = next_.fetch_add(1, std::memory_order_relaxed);
      if (w >= windows_) return;
      // Windows past a known mismatch cannot lower the answer.
      if (static_cast<int64_t>(w) > firstBad_.load(std::memory_order_relaxed)) return;
      uint64_t start = w * job_.windowSize;
      uint64_t length = std::min(job_.windowSize, job_.size - start);
      uint64_t readLength = job_.alignment ? alignUp(length, job_.alignment) : length;
      uint64_t done = 0;
      while (done < length) {
        ssize_t n = pread(job_.fd, buffer.data + done, readLength - done,
                          static_cast<off_t>(job_.base + start + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return fail(strerror(errno), errno, start + done);
        if (n == 0) return fail("target ends before the image", 0, start + done);
        done += static_cast<uint64_t>(n);
      }
      uint64_t actual = XXH3_64bits(buffer.data, length);
      bool written = w < job_.windowHashCount && job_.windowHashes[w * 2] != 0;
      uint64_t expected = written ? job_.windowHashes[w * 2 + 1]
                                  : (length == job_.windowSize ? zeroHash_ : lastZeroHash_);
      if (actual != expected) {
        int64_t current = firstBad_.load();
        while (static_cast<int64_t>(w) < current &&
               !firstBad_.compare_exchange_weak(current, static_cast<int64_t>(w))) {
        }
      }
      if (job_.counters) __atomic_fetch_add(&job_.counters->dataBytes, length, __ATOMIC_RELAXED);
    }
  }

  void fail(const char* message, int err, uint64_t guest) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (result_.error.failed) return;
    result_.error.failed = true;
    result_.error.operation = "verify";
    result_.error.message = message;
    result_.error.errnoValue = err;
    result_.error.guestOffset = guest;
    result_.error.hostOffset = job_.base + guest;
    stop_.store(true);
  }

  const VerifyJob& job_;
  uint64_t windows_ = 0;
  uint64_t zeroHash_ = 0;
  uint64_t lastZeroHash_ = 0;
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> firstBad_{INT64_MAX};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  VerifyResult result_;
};

}  // namespace

CopyError runCopyJob(const CopyJob& job, std::vector<CopyError>* targetErrors) {
  Engine engine(job, targetErrors);
  return engine.run();
}

VerifyResult runVerifyJob(const VerifyJob& job) {
  Verifier verifier(job);
  return verifier.run();
}

}  // namespace qcow2img

namespace qcow2img {

int64_t readSource(const Source& source, uint8_t* out, uint64_t length, uint64_t offset) {
  if (source.staged.empty()) return preadFully(source.fd, out, length, source.base + offset);
  uint64_t done = 0;
  walkStaged(source, offset, length, [&](const uint8_t* memory, uint64_t n) {
    std::memcpy(out + done, memory, n);
    done += n;
  });
  return static_cast<int64_t>(done);
}

}  // namespace qcow2img

#include "capture_engine.h"

#include "io.h"

#include <errno.h>
#include <limits.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace qcow2img {
namespace {

constexpr uint64_t kChunkBytes = 1ULL << 20;

uint64_t alignUp(uint64_t value, uint64_t unit) { return unit ? (value + unit - 1) / unit * unit : value; }


struct ClusterOutcome {
  StoredKind kind;
  const uint8_t* bytes;  // what to store (Data, Compressed)
  size_t length;
};

class CaptureEngine {
 public:
  explicit CaptureEngine(const CaptureJob& job) : job_(job) {
    clustersPerChunk_ = std::max<uint64_t>(1, kChunkBytes / job.clusterSize);
    chunkCount_ = (job.clusterCount + clustersPerChunk_ - 1) / clustersPerChunk_;
    position_ = job.outputPosition;
  }

  CaptureResult run() {
    zeroCluster_ = std::make_unique<AlignedBuffer>(job_.clusterSize);
    if (!zeroCluster_->data) return fail("memory", "out of memory", ENOMEM, 0), result();
    memset(zeroCluster_->data, 0, job_.clusterSize);
    uint32_t threadCount = std::max<uint32_t>(1, std::min<uint32_t>(job_.threads, 64));
    threadCount = static_cast<uint32_t>(std::min<uint64_t>(threadCount, std::max<uint64_t>(1, chunkCount_)));
    runOnThreads(threadCount, [this](uint32_t) { worker(); }, [this] { fail("memory", "out of memory", ENOMEM, 0); });
    if (!error_.failed && cancelled()) {
      error_.failed = true;
      error_.cancelled = true;
      error_.operation = "cancel";
      error_.message = "cancelled";
    }
    return result();
  }

 private:
  CaptureResult result() {
    CaptureResult r;
    r.error = error_;
    r.outputPosition = position_;
    return r;
  }

  bool cancelled() const {
    return job_.counters && __atomic_load_n(&job_.counters->cancel, __ATOMIC_RELAXED) != 0;
  }

  void fail(const char* operation, const std::string& message, int err, uint64_t guest) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_.failed) {
        error_.failed = true;
        error_.operation = operation;
        error_.message = message;
        error_.errnoValue = err;
        error_.guestOffset = guest;
      }
      failed_ = true;
    }
    committed_cv_.notify_all();
  }

  bool stopping() {
    std::lock_guard<std::mutex> lock(mutex_);
    return failed_ || cancelled();
  }

  // Reads guest [start, end) of the source into `out`; bytes past the source read as zeros.
  bool readSource(uint64_t start, uint64_t end, uint8_t* out) {
    uint64_t available = start < job_.sourceSize ? std::min(end, job_.sourceSize) - start : 0;
    uint64_t readLength = job_.sourceAlignment ? alignUp(available, job_.sourceAlignment) : available;
    uint64_t done = 0;
    while (done < available) {
      ssize_t n = pread(job_.sourceFd, out + done, readLength - done, static_cast<off_t>(start + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        fail("read", strerror(errno), errno, start + done);
        return false;
      }
      if (n == 0) break;
      done += static_cast<uint64_t>(n);
    }
    if (done < end - start) memset(out + std::min(done, end - start), 0, end - start - std::min(done, end - start));
    return true;
  }

  void worker() {
    const uint64_t chunkBytes = clustersPerChunk_ * job_.clusterSize;
    AlignedBuffer source(chunkBytes);
    AlignedBuffer compressed(chunkBytes);
    ClusterCompressor compressor(job_.codec, job_.level);
    if (!source.data || !compressed.data || !compressor.ok()) {
      return fail("memory", "cannot set up a compression worker", ENOMEM, 0);
    }
    std::vector<ClusterOutcome> outcomes;
    for (;;) {
      if (stopping()) return;
      uint64_t chunk = nextChunk_.fetch_add(1);
      if (chunk >= chunkCount_) return;
      uint64_t first = chunk * clustersPerChunk_;
      uint64_t count = std::min(clustersPerChunk_, job_.clusterCount - first);
      uint64_t chunkStart = job_.guestStart + first * job_.clusterSize;
      // Read runs of clusters not known to be holes.
      for (uint64_t i = 0; i < count;) {
        if (job_.holes && job_.holes[first + i]) {
          i++;
          continue;
        }
        uint64_t j = i;
        while (j < count && !(job_.holes && job_.holes[first + j])) j++;
        if (!readSource(chunkStart + i * job_.clusterSize, chunkStart + j * job_.clusterSize,
                        source.data + i * job_.clusterSize)) {
          return;
        }
        i = j;
      }
      outcomes.clear();
      size_t compressedUsed = 0;
      for (uint64_t i = 0; i < count; i++) {
        const uint8_t* cluster = source.data + i * job_.clusterSize;
        const uint8_t* base = job_.base ? job_.base + (first + i) * job_.clusterSize : nullptr;
        bool hole = job_.holes && job_.holes[first + i];
        bool zero = hole || isAllZero(cluster, job_.clusterSize);
        if (zero) {
          if (!base || isAllZero(base, job_.clusterSize)) {
            outcomes.push_back({StoredKind::Unallocated, nullptr, 0});
          } else if (job_.zeroAsData) {
            outcomes.push_back({StoredKind::Data, zeroCluster_->data, job_.clusterSize});
          } else {
            outcomes.push_back({StoredKind::Zero, nullptr, 0});
          }
          continue;
        }
        if (base && memcmp(cluster, base, job_.clusterSize) == 0) {
          outcomes.push_back({StoredKind::Unallocated, nullptr, 0});
          continue;
        }
        size_t length = 0;
        if (job_.codec != Codec::None) {
          // QEMU's limit: a stream longer than a cluster minus one byte is stored as data.
          length = compressor.compress(cluster, job_.clusterSize, compressed.data + compressedUsed,
                                       job_.clusterSize - 1);
        }
        if (length > 0) {
          outcomes.push_back({StoredKind::Compressed, compressed.data + compressedUsed, length});
          compressedUsed += length;
        } else {
          outcomes.push_back({StoredKind::Data, cluster, job_.clusterSize});
        }
      }
      if (!commit(chunk, first, outcomes)) return;
      if (job_.counters) {
        __atomic_fetch_add(&job_.counters->dataBytes, count * job_.clusterSize, __ATOMIC_RELAXED);
      }
    }
  }

  // Places the chunk's stored clusters after everything before it, in guest order.
  bool commit(uint64_t chunk, uint64_t firstCluster, const std::vector<ClusterOutcome>& outcomes) {
    std::vector<iovec> iov;
    uint64_t writeStart;
    bool direct = false;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      committed_cv_.wait(lock, [&] { return committed_ == chunk || failed_; });
      if (failed_) return false;
      writeStart = position_;
      uint64_t p = position_;
      for (size_t i = 0; i < outcomes.size(); i++) {
        const ClusterOutcome& o = outcomes[i];
        double* r = job_.results + (firstCluster + i) * kCaptureResultFields;
        r[0] = static_cast<double>(o.kind);
        r[1] = 0;
        r[2] = 0;
        if (o.kind == StoredKind::Data) {
          uint64_t aligned = alignUp(p, job_.clusterSize);
          if (aligned > p) iov.push_back({zeroCluster_->data, static_cast<size_t>(aligned - p)});
          p = aligned;
        }
        if (o.kind == StoredKind::Data || o.kind == StoredKind::Compressed) {
          r[1] = static_cast<double>(p);
          r[2] = static_cast<double>(o.kind == StoredKind::Compressed ? o.length : 0);
          iov.push_back({const_cast<uint8_t*>(o.bytes), o.length});
          p += o.length;
        }
      }
      position_ = p;
      committed_++;
      direct = directWritable(writeStart, iov);
    }
    committed_cv_.notify_all();
    int fd = direct ? job_.outputDirectFd : job_.outputFd;
    // The range is ours alone now; write it outside the lock.
    uint64_t offset = writeStart;
    size_t index = 0;
    while (index < iov.size()) {
      int batch = static_cast<int>(std::min<size_t>(iov.size() - index, IOV_MAX));
      ssize_t n = pwritev(fd, iov.data() + index, batch, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EINVAL && fd == job_.outputDirectFd) {
        // A filesystem that opens with O_DIRECT but refuses the writes (or wants another
        // alignment): buffered writes from here on, for every worker.
        directRefused_ = true;
        fd = job_.outputFd;
        continue;
      }
      if (n <= 0) {
        fail("write", n < 0 ? strerror(errno) : "short write", n < 0 ? errno : EIO, offset);
        return false;
      }
      offset += static_cast<uint64_t>(n);
      // What a direct write left (a short write) may be unaligned: the buffered fd takes it.
      fd = job_.outputFd;
      // Drop what was written, including a partly written iovec.
      size_t remaining = static_cast<size_t>(n);
      while (remaining > 0 && index < iov.size()) {
        if (remaining >= iov[index].iov_len) {
          remaining -= iov[index].iov_len;
          index++;
        } else {
          iov[index].iov_base = static_cast<uint8_t*>(iov[index].iov_base) + remaining;
          iov[index].iov_len -= remaining;
          remaining = 0;
        }
      }
    }
    return true;
  }

  bool directWritable(uint64_t offset, const std::vector<iovec>& iov) const {
    const uint64_t unit = job_.outputDirectAlignment;
    if (job_.outputDirectFd < 0 || directRefused_ || unit == 0 || iov.empty() || offset % unit != 0) return false;
    for (const iovec& piece : iov) {
      if (reinterpret_cast<uintptr_t>(piece.iov_base) % unit != 0 || piece.iov_len % unit != 0) return false;
    }
    return true;
  }

  const CaptureJob& job_;
  uint64_t clustersPerChunk_ = 1;
  uint64_t chunkCount_ = 0;
  std::unique_ptr<AlignedBuffer> zeroCluster_;
  std::atomic<uint64_t> nextChunk_{0};
  std::atomic<bool> directRefused_{false};
  std::mutex mutex_;
  std::condition_variable committed_cv_;
  uint64_t committed_ = 0;
  uint64_t position_ = 0;
  bool failed_ = false;
  CopyError error_;
};

}  // namespace

CaptureResult runCaptureJob(const CaptureJob& job) {
  CaptureEngine engine(job);
  return engine.run();
}

}  // namespace qcow2img

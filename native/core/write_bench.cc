#include "write_bench.h"

#include "io.h"

#include <errno.h>
#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace qcow2img {
namespace {

using Clock = std::chrono::steady_clock;

// Log-linear histogram of nanoseconds: 64 buckets per power of two.
class LatencyHistogram {
 public:
  void add(uint64_t ns) {
    if (ns == 0) ns = 1;
    int octave = 63 - __builtin_clzll(ns);
    uint64_t sub = octave >= 6 ? (ns >> (octave - 6)) & 63 : (ns << (6 - octave)) & 63;
    counts_[static_cast<size_t>(octave) * 64 + sub]++;
    total_++;
  }
  void merge(const LatencyHistogram& other) {
    for (size_t i = 0; i < counts_.size(); i++) counts_[i] += other.counts_[i];
    total_ += other.total_;
  }
  double percentileUs(double p) const {
    if (total_ == 0) return 0;
    uint64_t rank = static_cast<uint64_t>(p / 100.0 * static_cast<double>(total_ - 1));
    uint64_t seen = 0;
    for (size_t i = 0; i < counts_.size(); i++) {
      seen += counts_[i];
      if (seen > rank) {
        size_t octave = i / 64, sub = i % 64;
        // The bucket's midpoint.
        double low = std::ldexp(1.0 + static_cast<double>(sub) / 64.0, static_cast<int>(octave));
        double width = std::ldexp(1.0 / 64.0, static_cast<int>(octave));
        return (low + width / 2) / 1000.0;
      }
    }
    return 0;
  }

 private:
  std::vector<uint64_t> counts_ = std::vector<uint64_t>(64 * 64, 0);
  uint64_t total_ = 0;
};

struct AlignedBuffers {
  std::vector<uint8_t*> buffers;
  AlignedBuffers(size_t count, size_t size, uint64_t seed) {
    std::mt19937_64 random(seed);
    for (size_t i = 0; i < count; i++) {
      void* p = nullptr;
      if (posix_memalign(&p, 4096, size) != 0) break;
      auto* bytes = static_cast<uint64_t*>(p);
      // Incompressible data, so no device or layer can shortcut it.
      for (size_t w = 0; w < size / 8; w++) bytes[w] = random();
      buffers.push_back(static_cast<uint8_t*>(p));
    }
  }
  ~AlignedBuffers() {
    for (auto* b : buffers) free(b);
  }
  bool ok(size_t count) const { return buffers.size() == count; }
};

// Block order for one pass: sequential, or a permutation (each block once, like fio's random map).
class BlockOrder {
 public:
  BlockOrder(uint64_t blocks, bool random, uint64_t seed) : blocks_(blocks), random_(random), rng_(seed) {
    if (random_) {
      order_.resize(blocks_);
      for (uint64_t i = 0; i < blocks_; i++) order_[i] = i;
      std::shuffle(order_.begin(), order_.end(), rng_);
    }
  }
  uint64_t at(uint64_t index) const { return random_ ? order_[index % blocks_] : index % blocks_; }

 private:
  uint64_t blocks_;
  bool random_;
  std::mt19937_64 rng_;
  std::vector<uint64_t> order_;
};

constexpr uint64_t kMaxRandomBlocks = 64ULL << 20;

class WriteBench {
 public:
  // The random order is only built within its limit: run() refuses a larger one before use.
  explicit WriteBench(const WriteBenchJob& job)
      : job_(job),
        blocks_(job.blockSize ? job.size / job.blockSize : 0),
        order_(blocks_, job.random && blocks_ <= kMaxRandomBlocks, job.seed) {}

  WriteBenchResult run() {
    if (blocks_ == 0 || job_.blockSize == 0 || job_.blockSize % 512 || job_.queueDepth == 0) {
      return failed("bench", "size must hold at least one block; block size a multiple of 512", EINVAL);
    }
    if (job_.random && blocks_ > kMaxRandomBlocks) {
      return failed("bench", "random pattern limited to 64 Mi blocks", EINVAL);
    }
    // Without a time limit, write the region once; with one, keep going until it runs out.
    planned_ = job_.seconds > 0 ? UINT64_MAX : blocks_;
    deadline_ = job_.seconds > 0 ? Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                      std::chrono::duration<double>(job_.seconds))
                                 : Clock::time_point::max();
    auto start = Clock::now();
    bool done = false;
    if (job_.engine != BenchEngine::Threads) {
      done = runIoUring();
      if (!done && job_.engine == BenchEngine::IoUring) return result_;
    }
    if (!done) {
      result_ = WriteBenchResult();
      start = Clock::now();
      runThreads();
    }
    if (!result_.error.failed && fdatasync(job_.fd) != 0) {
      return failed("fdatasync", strerror(errno), errno);
    }
    result_.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    result_.p50Us = histogram_.percentileUs(50);
    result_.p99Us = histogram_.percentileUs(99);
    result_.p999Us = histogram_.percentileUs(99.9);
    return result_;
  }

 private:
  WriteBenchResult failed(const char* operation, const std::string& message, int err) {
    result_.error.failed = true;
    result_.error.operation = operation;
    result_.error.message = message;
    result_.error.errnoValue = err;
    return result_;
  }

  bool cancelled() const {
    return job_.counters && __atomic_load_n(&job_.counters->cancel, __ATOMIC_RELAXED) != 0;
  }

  bool more(uint64_t issued) const {
    return issued < planned_ && Clock::now() < deadline_ && !cancelled();
  }

  uint64_t offsetOf(uint64_t index) const {
    return job_.offset + order_.at(index) * job_.blockSize;
  }

  void account(uint64_t bytes) {
    result_.bytes += bytes;
    result_.writes++;
    if (job_.counters) __atomic_fetch_add(&job_.counters->dataBytes, bytes, __ATOMIC_RELAXED);
  }

  // One io_uring run: the ring, a slot for each write in flight (its buffer is the slot's).
  struct UringRun {
    struct Slot {
      Clock::time_point issued;
      uint64_t offset;
      uint32_t done;
    };
    io_uring ring;
    std::vector<Slot> slots;
    std::vector<uint32_t> freeSlots;
    uint64_t issued = 0;
    uint32_t inFlight = 0;
  };

  // false: io_uring unavailable here (the caller falls back to threads).
  bool runIoUring() {
    UringRun run;
    if (io_uring_queue_init(job_.queueDepth, &run.ring, 0) != 0) {
      failed("io_uring", "io_uring is not available", ENOSYS);
      return false;
    }
    AlignedBuffers buffers(job_.queueDepth, job_.blockSize, job_.seed);
    if (!buffers.ok(job_.queueDepth)) {
      io_uring_queue_exit(&run.ring);
      failed("memory", "out of memory", ENOMEM);
      return true;
    }
    run.slots.resize(job_.queueDepth);
    for (uint32_t i = 0; i < job_.queueDepth; i++) run.freeSlots.push_back(i);
    if (!writeWithUring(run, buffers)) drainUring(run);
    io_uring_queue_exit(&run.ring);
    result_.engine = "io_uring";
    return true;
  }

  // Prepares the write of slot's block from byte `done` on (submitted with the next round).
  void prepareWrite(UringRun& run, const AlignedBuffers& buffers, uint32_t slot, uint64_t offset, uint32_t done) {
    io_uring_sqe* sqe = io_uring_get_sqe(&run.ring);
    io_uring_prep_write(sqe, job_.fd, buffers.buffers[slot] + done, job_.blockSize - done, offset + done);
    io_uring_sqe_set_data64(sqe, slot);
    run.slots[slot].offset = offset;
    run.slots[slot].done = done;
  }

  // Keeps every slot writing until the plan or the time runs out; false after a failure.
  bool writeWithUring(UringRun& run, const AlignedBuffers& buffers) {
    bool ok = true;
    while (ok) {
      while (!run.freeSlots.empty() && more(run.issued)) {
        uint32_t slot = run.freeSlots.back();
        run.freeSlots.pop_back();
        run.slots[slot].issued = Clock::now();
        prepareWrite(run, buffers, slot, offsetOf(run.issued), 0);
        run.issued++;
        run.inFlight++;
      }
      if (run.inFlight == 0) break;
      if (io_uring_submit(&run.ring) < 0) {
        failed("io_uring", "submit failed", EIO);
        return false;
      }
      io_uring_cqe* cqe = nullptr;
      int wait = io_uring_wait_cqe(&run.ring, &cqe);
      if (wait < 0) {
        if (wait == -EINTR) continue;
        failed("io_uring", strerror(-wait), -wait);
        return false;
      }
      ok = reapCompletions(run, buffers);
    }
    return ok;
  }

  // The completions ready: a finished write frees its slot, a short one continues; false
  // after a failed write.
  bool reapCompletions(UringRun& run, const AlignedBuffers& buffers) {
    bool ok = true;
    io_uring_cqe* cqe = nullptr;
    unsigned head;
    unsigned seen = 0;
    io_uring_for_each_cqe(&run.ring, head, cqe) {
      seen++;
      uint32_t slot = static_cast<uint32_t>(io_uring_cqe_get_data64(cqe));
      // A failed write is over too: it no longer counts as in flight.
      if (cqe->res < 0) {
        failed("write", strerror(-cqe->res), -cqe->res);
        ok = false;
        run.inFlight--;
        continue;
      }
      uint32_t done = run.slots[slot].done + static_cast<uint32_t>(cqe->res);
      if (cqe->res == 0) {
        failed("write", "short write", EIO);
        ok = false;
        run.inFlight--;
      } else if (done < job_.blockSize) {
        prepareWrite(run, buffers, slot, run.slots[slot].offset, done);  // finish a short write
      } else {
        histogram_.add(static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - run.slots[slot].issued).count()));
        account(job_.blockSize);
        run.freeSlots.push_back(slot);
        run.inFlight--;
      }
    }
    io_uring_cq_advance(&run.ring, seen);
    return ok;
  }

  // After an error, waits for what is still in flight (its buffers are freed after); the
  // continuations of short writes prepared in the last round are submitted first.
  void drainUring(UringRun& run) {
    if (run.inFlight == 0 || io_uring_submit(&run.ring) < 0) return;
    while (run.inFlight > 0) {
      io_uring_cqe* cqe = nullptr;
      int wait = io_uring_wait_cqe(&run.ring, &cqe);
      if (wait == -EINTR) continue;
      if (wait < 0) break;
      io_uring_cqe_seen(&run.ring, cqe);
      run.inFlight--;
    }
  }

  void runThreads() {
    result_.engine = "threads";
    std::atomic<uint64_t> next{0};
    std::mutex mutex;
    runOnThreads(
        job_.queueDepth,
        [&](uint32_t t) {
        AlignedBuffers buffer(1, job_.blockSize, job_.seed + t);
        LatencyHistogram local;
        uint64_t bytes = 0, writes = 0;
        if (!buffer.ok(1)) {
          std::lock_guard<std::mutex> lock(mutex);
          failed("memory", "out of memory", ENOMEM);
          return;
        }
        for (;;) {
          uint64_t index = next.fetch_add(1);
          if (!more(index)) break;
          {
            std::lock_guard<std::mutex> lock(mutex);
            if (result_.error.failed) break;
          }
          uint64_t offset = offsetOf(index);
          auto issued = Clock::now();
          uint64_t done = 0;
          while (done < job_.blockSize) {
            ssize_t n = pwrite(job_.fd, buffer.buffers[0] + done, job_.blockSize - done,
                               static_cast<off_t>(offset + done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
              std::lock_guard<std::mutex> lock(mutex);
              failed("write", n < 0 ? strerror(errno) : "short write", n < 0 ? errno : EIO);
              return;
            }
            done += static_cast<uint64_t>(n);
          }
          local.add(static_cast<uint64_t>(
              std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - issued).count()));
          bytes += job_.blockSize;
          writes++;
          if (job_.counters) __atomic_fetch_add(&job_.counters->dataBytes, job_.blockSize, __ATOMIC_RELAXED);
        }
        std::lock_guard<std::mutex> lock(mutex);
        histogram_.merge(local);
        result_.bytes += bytes;
        result_.writes += writes;
        },
        [&] {
          std::lock_guard<std::mutex> lock(mutex);
          failed("memory", "out of memory", ENOMEM);
        });
  }

  const WriteBenchJob& job_;
  uint64_t blocks_;
  BlockOrder order_;
  uint64_t planned_ = 0;
  Clock::time_point deadline_;
  LatencyHistogram histogram_;
  WriteBenchResult result_;
};

}  // namespace

WriteBenchResult runWriteBench(const WriteBenchJob& job) {
  // An exception here (std::bad_alloc) is a failed result like any other.
  try {
    WriteBench bench(job);
    return bench.run();
  } catch (const std::exception&) {
    WriteBenchResult result;
    result.error.failed = true;
    result.error.operation = "memory";
    result.error.message = "out of memory";
    result.error.errnoValue = ENOMEM;
    return result;
  }
}

}  // namespace qcow2img

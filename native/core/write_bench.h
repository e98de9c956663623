// Disk write benchmark as fio measures it: aligned buffers of random bytes,
// `queueDepth` writes in flight (io_uring, or that many threads), completion
// latency per write, and the final fdatasync inside the timed run (end_fsync=1).
#pragma once
#include <cstdint>
#include <string>

#include "copy_engine.h"

namespace qcow2img {

enum class BenchEngine : int { Auto = 0, IoUring = 1, Threads = 2 };

struct WriteBenchJob {
  int fd = -1;
  uint64_t offset = 0;       // first byte of the region written
  uint64_t size = 0;         // bytes of the region (a multiple of blockSize)
  uint32_t blockSize = 1 << 20;
  uint32_t queueDepth = 16;
  bool random = false;       // random block order (each block once per pass) vs sequential
  double seconds = 0;        // > 0: keep writing passes until this much time has run
  BenchEngine engine = BenchEngine::Auto;
  uint64_t seed = 1;
  CopyCounters* counters = nullptr;  // dataBytes: bytes written so far; cancel
};

// Latency percentiles come from a log-linear histogram (1/64 resolution per octave).
struct WriteBenchResult {
  CopyError error;
  uint64_t bytes = 0;
  uint64_t writes = 0;
  double seconds = 0;          // including the final fdatasync
  double p50Us = 0, p99Us = 0, p999Us = 0;
  std::string engine;          // "io_uring" or "threads"
};

WriteBenchResult runWriteBench(const WriteBenchJob& job);

}  // namespace qcow2img

// The capture engine: turns guest clusters of a raw source into stored clusters
// of a qcow2 file. Worker threads read, drop zero clusters and clusters equal to
// a base, and compress; chunks are committed in guest order, so the file grows
// sequentially and the layout does not depend on thread timing.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "compress.h"
#include "copy_engine.h"

namespace qcow2img {

// Per-cluster result, 3 doubles: [kind, hostOffset, compressedBytes].
constexpr size_t kCaptureResultFields = 3;
enum class StoredKind : int {
  Unallocated = 0,  // zero without a base, or equal to the base
  Zero = 1,         // zero where the base is not: needs the zero flag
  Data = 2,         // cluster-aligned at hostOffset
  Compressed = 3,   // byte offset hostOffset, compressedBytes long
};

struct CaptureJob {
  int sourceFd = -1;
  uint32_t sourceAlignment = 0;   // O_DIRECT unit of sourceFd, 0 when buffered
  uint64_t sourceSize = 0;        // bytes past it read as zeros
  uint64_t guestStart = 0;        // cluster aligned
  uint64_t clusterCount = 0;
  uint64_t clusterSize = 65536;
  const uint8_t* holes = nullptr; // optional, one byte per cluster: 1 = known zero, not read
  const uint8_t* base = nullptr;  // optional: the base's bytes for the whole range
  bool zeroAsData = false;        // no zero flag (qcow2 v2): store zeros as data
  Codec codec = Codec::None;
  int level = 0;
  int outputFd = -1;
  // Optional second descriptor of the output opened with O_DIRECT, used for chunks
  // whose every piece is aligned to outputDirectAlignment (whole clusters): the data
  // then goes to the disk while the source is read, instead of piling up in the
  // page cache for the final fdatasync.
  int outputDirectFd = -1;
  uint32_t outputDirectAlignment = 0;
  uint64_t outputPosition = 0;    // byte where the next stored bytes go
  uint32_t threads = 2;
  double* results = nullptr;      // clusterCount * kCaptureResultFields
  CopyCounters* counters = nullptr;  // dataBytes: guest bytes examined
};

struct CaptureResult {
  CopyError error;
  uint64_t outputPosition = 0;  // after the last stored byte
};

CaptureResult runCaptureJob(const CaptureJob& job);

}  // namespace qcow2img

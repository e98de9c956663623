// The copy engine: turns a plan of guest runs into bytes at a target (a file
// descriptor or a memory buffer), with a pool of native threads that read,
// decompress and write windows of the guest address space out of order.
// It knows nothing of qcow2 beyond "compressed run = one cluster of codec X".
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "decompress.h"

namespace qcow2img {

enum class RunKind : int { Zero = 0, Data = 1, Compressed = 2 };

// One planned run, 7 doubles:
// [guestOffset, length, kind, sourceIndex, hostOffset, compressedBytes, offsetInCluster]
// Data: `length` bytes at hostOffset of source. Compressed: the cluster stored at
// hostOffset (compressedBytes an upper bound) decompresses to the source's clusterSize bytes, of
// which `length` bytes from offsetInCluster belong here. Runs are in guest order.
constexpr size_t kPlanRunFields = 7;
// Numbers per staged extent as JavaScript passes them: fileOffset, length, chunk, offset in it.
constexpr size_t kStagedExtentFields = 4;

enum class ZeroMode : int {
  Skip = 0,      // target already reads zeros there (new file, known-zero device)
  Write = 1,     // write zeros (memory targets, devices without BLKZEROOUT)
  ZeroOut = 2,   // BLKZEROOUT on a block device, written zeros where refused
  PunchHole = 3, // fallocate(PUNCH_HOLE) on a file, written zeros where refused
};

// Bytes [fileOffset, fileOffset + length) of a source, held in memory at `memory` (a remote
// file's ranges a job reads, fetched before it runs).
struct StagedExtent {
  uint64_t fileOffset = 0;
  uint64_t length = 0;
  const uint8_t* memory = nullptr;
};

struct Source {
  int fd = -1;
  uint64_t sizeBytes = 0;  // reads past it are errors, except compressed tails
  Codec codec = Codec::Deflate;   // of its compressed clusters
  uint64_t clusterSize = 65536;   // decompressed size of its compressed clusters
  uint64_t base = 0;  // where the image's byte 0 sits in fd (an image inside a .tar); offsets add it
  // When not empty, the source is read from these (sorted, disjoint) instead of fd; a read
  // runs on into the next extent where it continues the file, and stops short at a gap, as a
  // read past a file's end does.
  std::vector<StagedExtent> staged;
};

// Reads like preadFully, from fd or from the source's staged extents.
int64_t readSource(const Source& source, uint8_t* out, uint64_t length, uint64_t offset);

// Counters shared with JavaScript, which polls them for progress and sets cancel.
struct CopyCounters {
  uint64_t dataBytes;     // guest bytes of data and compressed runs written
  uint64_t zeroBytes;     // guest bytes of zero runs handled
  uint64_t cancel;        // set non-zero by JavaScript to stop
  uint64_t stagedBytes;   // of dataBytes, those written from a remote stage as they lie (no copy)
};

// A further fd target of a job (load onto many targets): written from the same decoded windows
// as the job's own target, with its own placement, limits, O_DIRECT unit and zero mode.
struct ExtraTarget {
  int fd = -1;
  int tailFd = -1;
  uint64_t base = 0;
  uint64_t limitStart = 0;
  uint64_t limitEnd = 0;
  uint32_t alignment = 0;
  ZeroMode zeroMode = ZeroMode::Skip;
};

struct CopyJob {
  const double* runs = nullptr;
  size_t runCount = 0;
  std::vector<Source> sources;

  // Target: an fd, or memory when memory != nullptr.
  int targetFd = -1;
  int targetTailFd = -1;     // buffered fd of the same target, for sub-alignment tails
  uint8_t* memory = nullptr;
  uint64_t memoryGuestOffset = 0;  // guest offset of memory[0]
  uint64_t memoryLength = 0;
  // Guest offset g is written at targetBase + g; writes must stay inside
  // [limitStart, limitEnd) of the target, whatever the plan says.
  uint64_t targetBase = 0;
  uint64_t limitStart = 0;
  uint64_t limitEnd = 0;
  uint32_t alignment = 0;    // O_DIRECT unit of targetFd; 0 for buffered
  ZeroMode zeroMode = ZeroMode::Skip;
  // More fd targets (not with memory). Each keeps its own bounds checks.
  std::vector<ExtraTarget> extraTargets;

  uint32_t threads = 4;
  uint64_t windowSize = 1 << 20;
  // Optional, for read-back verification: two words per window of the guest disk,
  // [1, xxh3-64 of the window's bytes], set for every window holding data (windows
  // never written hold zeros). Guest [0, hashedSize) is covered.
  uint64_t* windowHashes = nullptr;
  size_t windowHashCount = 0;
  uint64_t hashedSize = 0;
  CopyCounters* counters = nullptr;
};

struct CopyError {
  bool failed = false;
  std::string operation;   // "read", "write", "decompress", "bounds", "zero", ...
  std::string message;
  int errnoValue = 0;
  int sourceIndex = -1;    // which source, for read and decompress errors
  uint64_t guestOffset = 0;
  uint64_t hostOffset = 0;
  bool cancelled = false;
};

// Runs the job on `job.threads` threads and returns when all are done.
// With `targetErrors` (one per target: the job's own, then extraTargets), a write, zero or bounds
// failure of a target stops only that target and is reported there; the job goes on for the
// others (and fails as a whole only for reads, decompression, the plan, memory or cancel, or
// once every target has failed). Without it, any failure stops the job, as before.
CopyError runCopyJob(const CopyJob& job, std::vector<CopyError>* targetErrors = nullptr);

struct VerifyJob {
  int fd = -1;               // the target, opened for reading (O_DIRECT where possible)
  uint64_t base = 0;         // target offset of guest 0
  uint64_t size = 0;         // guest bytes to check
  uint64_t windowSize = 1 << 20;
  uint32_t alignment = 0;    // O_DIRECT unit of fd, 0 when buffered
  const uint64_t* windowHashes = nullptr;  // as CopyJob::windowHashes
  size_t windowHashCount = 0;
  uint32_t threads = 4;
  CopyCounters* counters = nullptr;  // dataBytes counts bytes read back
};

struct VerifyResult {
  CopyError error;
  int64_t firstBadWindow = -1;  // lowest window whose bytes differ, or -1
};

// Reads guest [0, size) back from the target and compares window hashes.
VerifyResult runVerifyJob(const VerifyJob& job);

}  // namespace qcow2img

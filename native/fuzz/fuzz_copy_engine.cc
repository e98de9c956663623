// libFuzzer target: the copy engine driven by arbitrary plans over an in-memory
// source (memfd) into a memory target. Malformed plans must be refused, and no
// plan may touch memory outside the destination buffer.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "core/copy_engine.h"

using namespace qcow2img;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 16) return 0;
  static int sourceFd = memfd_create("fuzz-source", 0);
  if (sourceFd < 0) return 0;
  // The second half of the input is the source file; the first half encodes runs.
  size_t half = size / 2;
  if (ftruncate(sourceFd, 0) != 0 || pwrite(sourceFd, data + half, size - half, 0) < 0) return 0;
  std::vector<double> runs;
  uint64_t guest = data[0] * 512;
  for (size_t at = 1; at + 6 <= half && runs.size() < 64 * kPlanRunFields; at += 6) {
    uint64_t length = 1 + (data[at] | (data[at + 1] << 8)) % 70000;
    int kind = data[at + 2] % 3;
    uint64_t host = (data[at + 3] | (data[at + 4] << 8)) % (size + 1024);
    uint64_t compressed = 1 + data[at + 5] * 40;
    runs.insert(runs.end(), {static_cast<double>(guest), static_cast<double>(length),
                             static_cast<double>(kind), 0, static_cast<double>(host),
                             static_cast<double>(compressed), static_cast<double>(data[at + 5] % 2 ? 0 : 512)});
    // Occasionally overlapping or out-of-order runs, which must be refused.
    guest += (data[at] & 0x80) ? length / 2 : length;
  }
  if (runs.empty()) return 0;
  uint64_t end = static_cast<uint64_t>(runs[runs.size() - kPlanRunFields] + runs[runs.size() - kPlanRunFields + 1]);
  std::vector<uint8_t> memory(end - data[0] * 512 + (data[1] % 2 ? 0 : 4096));
  CopyJob job;
  job.runs = runs.data();
  job.runCount = runs.size() / kPlanRunFields;
  job.sources.push_back(Source{sourceFd, static_cast<uint64_t>(size - half),
                               (data[2] & 1) ? Codec::Zstd : Codec::Deflate, size_t{512} << (data[3] % 8)});
  job.memory = memory.data();
  job.memoryGuestOffset = data[0] * 512;
  job.memoryLength = memory.size() - (data[1] % 2 ? 0 : 4096);
  job.threads = 1 + data[4] % 3;
  job.windowSize = 1 << 20;
  runCopyJob(job);
  return 0;
}

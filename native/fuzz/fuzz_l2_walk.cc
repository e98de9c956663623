// libFuzzer target: the L2 table walk over arbitrary tables and parameters.
// Invariants: no out-of-bounds access (ASan), runs are in order, cover exactly
// the walked units, and never exceed the capacity the caller gives.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/l2_walk.h"

using namespace qcow2img;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  // Mostly small clusters (fast runs); now and then up to 2 MiB for the wide descriptor fields.
  uint32_t clusterBits = data[0] >= 240 ? 9 + data[0] % 13 : 9 + data[0] % 8;
  bool extendedL2 = data[1] & 1;
  bool externalDataFile = data[1] & 2;
  if (extendedL2 && clusterBits < 14) clusterBits = 14;
  size_t entryBytes = extendedL2 ? 16 : 8;
  size_t tableEntries = (size_t{1} << clusterBits) / entryBytes;
  std::vector<uint8_t> table(tableEntries * entryBytes, 0);
  memcpy(table.data(), data + 4, std::min(table.size(), size - 4));
  size_t firstEntry = (static_cast<size_t>(data[2]) * tableEntries) / 256;
  size_t entryCount = std::max<size_t>(1, ((static_cast<size_t>(data[3]) + 1) * (tableEntries - firstEntry)) / 256);
  L2WalkParams params{table.data(), firstEntry, entryCount, clusterBits, extendedL2, externalDataFile};
  size_t units = entryCount * (extendedL2 ? 32 : 1);
  std::vector<double> runs(units * kL2RunFields);
  L2WalkResult result = walkL2(params, runs.data(), units);
  if (result.runCount > units) abort();
  size_t firstUnit = firstEntry * (extendedL2 ? 32 : 1);
  size_t expected = firstUnit;
  for (size_t i = 0; i < result.runCount; i++) {
    const double* run = runs.data() + i * kL2RunFields;
    if (static_cast<size_t>(run[0]) != expected || run[1] < 1) abort();
    expected += static_cast<size_t>(run[1]);
  }
  if (result.defect == L2Defect::None && expected != firstUnit + units) abort();
  if (expected > firstUnit + units) abort();
  return 0;
}

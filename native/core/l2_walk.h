// Decodes qcow2 L2 tables into runs of like entries.
// Layout reference: docs/formats/qcow2.md ("L2 entries"); QEMU docs/interop/qcow2.rst.
#pragma once
#include <cstddef>
#include <cstdint>

namespace qcow2img {

// The bits of an L2 entry the walker reads; src/qcow2/entries.ts is the TypeScript home of the
// same facts, and test/qcow2/entries.test.ts holds the two equal (the addon exports these).
constexpr uint64_t kL2CopiedBit = 1ULL << 63;
constexpr uint64_t kL2CompressedBit = 1ULL << 62;
constexpr uint64_t kL2ZeroBit = 1ULL;
constexpr uint64_t kL2OffsetMask = 0x00FFFFFFFFFFFE00ULL;
constexpr uint32_t kSubclustersPerCluster = 32;
constexpr uint64_t kCompressedSectorBytes = 512;

// A compressed descriptor: the host offset in its low x bits, the extra sector count above.
constexpr uint32_t compressedOffsetBits(uint32_t clusterBits) { return 62 - (clusterBits - 8); }

// Kinds of a run of clusters (or subclusters, with extended L2).
enum class UnitKind : int {
  Unallocated = 0,  // read from the backing file, or zeros without one
  Zero = 1,         // reads as zeros; no host cluster
  ZeroAllocated = 2,// reads as zeros; a host cluster is reserved at hostOffset
  Data = 3,         // host bytes at hostOffset
  Compressed = 4,   // one compressed cluster at a byte offset
};

enum class L2Defect : int {
  // As QEMU's reader (qcow2_get_host_offset), reserved bits and the bitmap of a compressed
  // entry are ignored: qemu-img check reports them, reading does not fail on them.
  None = 0,
  UnalignedOffset = 2,      // host offset not aligned to the cluster size
  InvalidSubclusters = 3,   // a subcluster both allocated and zero, or allocated without a cluster
  CompressedWithExternalData = 5,
};

const char* l2DefectName(L2Defect defect);

struct L2WalkParams {
  const uint8_t* table;       // whole L2 table, big-endian entries
  size_t firstEntry;          // index of the first entry to walk
  size_t entryCount;          // entries to walk
  uint32_t clusterBits;       // 9..21
  bool extendedL2;            // 16-byte entries with 32 subclusters
  bool externalDataFile;      // offset 0 with COPIED means host offset 0
};

// One output run: 5 doubles [firstUnit, unitCount, kind, hostOffset, compressedBytes].
// Units are clusters, or subclusters with extended L2; firstUnit counts from the
// start of the table. Offsets stay below 2^56, exact in a double.
constexpr size_t kL2RunFields = 5;

struct L2WalkResult {
  size_t runCount = 0;
  L2Defect defect = L2Defect::None;
  size_t defectEntry = 0;  // table index of the defective entry
};

// Writes at most `runCapacity` runs; needs no more than one per unit walked.
L2WalkResult walkL2(const L2WalkParams& params, double* runs, size_t runCapacity);

}  // namespace qcow2img

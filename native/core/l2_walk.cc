#include "l2_walk.h"

namespace qcow2img {
namespace {

uint64_t readBigEndian64(const uint8_t* p) {
  uint64_t value = 0;
  for (int i = 0; i < 8; i++) value = (value << 8) | p[i];
  return value;
}

class RunWriter {
 public:
  RunWriter(double* runs, size_t capacity) : runs_(runs), capacity_(capacity) {}

  // Extends the last run when the unit continues it (same kind, and for kinds
  // with host clusters, the next host offset); starts a new run otherwise.
  bool add(size_t unit, UnitKind kind, uint64_t hostOffset, uint64_t unitSize,
           uint64_t compressedBytes) {
    if (count_ > 0 && kind != UnitKind::Compressed) {
      double* last = runs_ + (count_ - 1) * kL2RunFields;
      bool sameKind = static_cast<int>(last[2]) == static_cast<int>(kind);
      bool adjacent = static_cast<size_t>(last[0] + last[1]) == unit;
      bool hostContinues = true;
      if (kind == UnitKind::Data || kind == UnitKind::ZeroAllocated) {
        hostContinues = static_cast<uint64_t>(last[3]) +
                            static_cast<uint64_t>(last[1]) * unitSize == hostOffset;
      }
      if (sameKind && adjacent && hostContinues) {
        last[1] += 1;
        return true;
      }
    }
    if (count_ >= capacity_) return false;
    double* run = runs_ + count_ * kL2RunFields;
    run[0] = static_cast<double>(unit);
    run[1] = 1;
    run[2] = static_cast<double>(kind);
    run[3] = static_cast<double>(hostOffset);
    run[4] = static_cast<double>(compressedBytes);
    count_++;
    return true;
  }

  size_t count() const { return count_; }

 private:
  double* runs_;
  size_t capacity_;
  size_t count_ = 0;
};

}  // namespace

const char* l2DefectName(L2Defect defect) {
  switch (defect) {
    case L2Defect::None: return "none";
    case L2Defect::UnalignedOffset: return "L2 entry host offset not cluster aligned";
    case L2Defect::InvalidSubclusters: return "invalid subcluster allocation bitmap";
    case L2Defect::CompressedWithExternalData: return "compressed cluster in an image with an external data file";
  }
  return "unknown";
}

L2WalkResult walkL2(const L2WalkParams& p, double* runs, size_t runCapacity) {
  L2WalkResult result;
  RunWriter writer(runs, runCapacity);
  const uint64_t clusterSize = 1ULL << p.clusterBits;
  const uint64_t clusterMask = clusterSize - 1;
  const uint32_t offsetBits = compressedOffsetBits(p.clusterBits);
  const uint64_t compressedOffsetMask = (1ULL << offsetBits) - 1;
  const uint64_t sectorFieldMask = (1ULL << (p.clusterBits - 8)) - 1;
  const size_t entryBytes = p.extendedL2 ? 16 : 8;
  const uint64_t subclusterSize = clusterSize / kSubclustersPerCluster;

  auto fail = [&](L2Defect defect, size_t entry) {
    result.defect = defect;
    result.defectEntry = entry;
    result.runCount = writer.count();
    return result;
  };

  for (size_t i = p.firstEntry; i < p.firstEntry + p.entryCount; i++) {
    const uint8_t* raw = p.table + i * entryBytes;
    const uint64_t entry = readBigEndian64(raw);
    const uint64_t bitmap = p.extendedL2 ? readBigEndian64(raw + 8) : 0;

    if (entry & kL2CompressedBit) {
      if (p.externalDataFile) return fail(L2Defect::CompressedWithExternalData, i);
      uint64_t hostOffset = entry & compressedOffsetMask;
      uint64_t sectors = ((entry >> offsetBits) & sectorFieldMask) + 1;
      uint64_t compressedBytes = sectors * kCompressedSectorBytes - hostOffset % kCompressedSectorBytes;
      size_t firstUnit = p.extendedL2 ? i * kSubclustersPerCluster : i;
      // With extended L2 a compressed cluster is one run of 32 subclusters.
      if (!writer.add(firstUnit, UnitKind::Compressed, hostOffset, 0, compressedBytes)) break;
      if (p.extendedL2) runs[(writer.count() - 1) * kL2RunFields + 1] = kSubclustersPerCluster;
      continue;
    }
    uint64_t hostOffset = entry & kL2OffsetMask;
    if (hostOffset & clusterMask) return fail(L2Defect::UnalignedOffset, i);
    // External data files map offset 0 when COPIED is set: it is a real cluster.
    bool hasHost = hostOffset != 0 || (p.externalDataFile && (entry & kL2CopiedBit));

    if (!p.extendedL2) {
      UnitKind kind;
      if (entry & kL2ZeroBit) {
        // The zero flag comes first (qcow2_get_cluster_type): offset 0 is a plain zero
        // cluster, even with COPIED in an image with an external data file.
        kind = hostOffset != 0 ? UnitKind::ZeroAllocated : UnitKind::Zero;
      } else {
        kind = hasHost ? UnitKind::Data : UnitKind::Unallocated;
      }
      uint64_t unitHost = (kind == UnitKind::Data || kind == UnitKind::ZeroAllocated) ? hostOffset : 0;
      if (!writer.add(i, kind, unitHost, clusterSize, 0)) break;
      continue;
    }

    const uint32_t allocated = static_cast<uint32_t>(bitmap);
    const uint32_t zero = static_cast<uint32_t>(bitmap >> 32);
    if (allocated & zero) return fail(L2Defect::InvalidSubclusters, i);
    if (!hasHost && allocated != 0) return fail(L2Defect::InvalidSubclusters, i);
    for (uint32_t s = 0; s < kSubclustersPerCluster; s++) {
      UnitKind kind;
      uint64_t unitHost = 0;
      if (zero & (1U << s)) {
        kind = hasHost ? UnitKind::ZeroAllocated : UnitKind::Zero;
        if (hasHost) unitHost = hostOffset + s * subclusterSize;
      } else if (allocated & (1U << s)) {
        kind = UnitKind::Data;
        unitHost = hostOffset + s * subclusterSize;
      } else {
        kind = UnitKind::Unallocated;
      }
      if (!writer.add(i * kSubclustersPerCluster + s, kind, unitHost, subclusterSize, 0)) {
        result.runCount = writer.count();
        return result;
      }
    }
  }
  result.runCount = writer.count();
  return result;
}

}  // namespace qcow2img

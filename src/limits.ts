/**
 * Named bounds on every number an image can claim, checked before anything is
 * allocated or read from it. QEMU's own bounds (block/qcow2.h) where it has them.
 */
export const limits = {
  minClusterBits: 9,
  maxClusterBits: 21,
  /** Extended L2 needs subclusters of at least 512 bytes: 32 of them per cluster. */
  minClusterBitsExtendedL2: 14,
  maxBackingNameLength: 1023,
  /** QEMU keeps the backing format in a 16-byte buffer with its NUL. */
  maxBackingFormatLength: 15,
  maxExternalDataFileNameLength: 4095,
  maxRefcountOrder: 6,
  /** QCOW_MAX_L1_SIZE: 32 MiB of L1, 4 Mi entries. */
  maxL1Bytes: 32 * 1024 * 1024,
  /** QCOW_MAX_REFTABLE_SIZE. */
  maxRefcountTableBytes: 8 * 1024 * 1024,
  /** QCOW_MAX_SNAPSHOTS. */
  maxSnapshots: 65536,
  /** QCOW_MAX_SNAPSHOTS_SIZE. */
  maxSnapshotTableBytes: 64 * 1024 * 1024,
  /** QCOW_MAX_SNAPSHOT_EXTRA_DATA. */
  maxSnapshotExtraData: 1024,
  maxSnapshotIdOrNameLength: 65535,
  /** QCOW2_MAX_BITMAPS. */
  maxBitmaps: 65535,
  /** QCOW2_MAX_BITMAP_DIRECTORY_SIZE: 1 KiB a bitmap. */
  maxBitmapDirectoryBytes: 1024 * 65535,
  /** Offsets in qcow2 entries have 56 bits; JavaScript numbers are exact to 2^53. */
  maxOffset: 2 ** 53 - 1,
  /** Largest virtual size accepted: what a maximal L1 can map with 2 MiB clusters is larger. */
  maxVirtualSize: 2 ** 53 - 2 ** 21,
  /** Backing chains deeper than this are refused (QEMU has none; cloud-hypervisor uses 10). */
  maxChainDepth: 32,
  /** Bytes of L2 tables cached per image (QEMU's default maximum is 32 MiB). */
  l2CacheBytes: 32 * 1024 * 1024,
} as const;

/**
 * What the bits of qcow2 table entries mean: L1 and L2 entries (standard and extended),
 * compressed-cluster descriptors, refcount table entries, refcounts and bitmap table entries. The one home of these
 * facts, as QEMU's block/qcow2.h is for its C files; native/core/l2_walk.h holds the native
 * walker's copy, which test/qcow2/entries.test.ts holds equal to this one.
 * Layout reference: docs/formats/qcow2.md.
 *
 * Entries are big-endian u64s. The masks are given whole (bigint); the decoders take an entry's
 * high and low 32-bit words (`hi`, `lo`) as read from a table, so loops over whole tables stay
 * on small integers and never allocate.
 */

/** Bit 63 of L1 and standard L2 entries: the cluster's refcount is exactly one. */
export const COPIED = 1n << 63n;
/** Bit 62 of an L2 entry: the rest is a compressed-cluster descriptor. */
export const COMPRESSED = 1n << 62n;
/** Bit 0 of a standard L2 entry (version 3): the cluster reads as zeros. */
export const ZERO_FLAG = 1n;
/** Bits 9-55: the L2 table of an L1 entry, the host cluster of an L2 entry, the data of a bitmap table entry. */
export const OFFSET_MASK = 0x00fffffffffffe00n;
/** Bits 1-8 and 56-62 of an L1 entry. */
export const L1_RESERVED_MASK = 0x7f000000000001ffn;
/** Bits 1-8 and 56-61 of a standard L2 entry. */
export const L2_STANDARD_RESERVED_MASK = 0x3f000000000001fen;
/** Bits 9-63 of a refcount table entry: its refcount block. */
export const REFCOUNT_TABLE_OFFSET_MASK = 0xfffffffffffffe00n;
/** Bits 0-8 of a refcount table entry. */
export const REFCOUNT_TABLE_RESERVED_MASK = 0x1ffn;
/** Bits 1-8 and 56-63 of a bitmap table entry (its offset is bits 9-55, as in L1 and L2 entries). */
export const BITMAP_TABLE_RESERVED_MASK = 0xff000000000001fen;
/** Bit 0 of a bitmap table entry: with offset 0, the bitmap cluster reads as all ones. */
export const BITMAP_ALL_ONES = 1n;
/** A compressed descriptor counts its length in sectors of this size. */
export const COMPRESSED_SECTOR_BYTES = 512;
export const STANDARD_L2_ENTRY_BYTES = 8;
/** An extended L2 entry: the standard entry, then a u64 whose low half says which subclusters are allocated, its high half which read as zeros. */
export const EXTENDED_L2_ENTRY_BYTES = 16;
export const SUBCLUSTERS_PER_CLUSTER = 32;

const hiWord = (mask: bigint): number => Number(mask >> 32n);
const loWord = (mask: bigint): number => Number(mask & 0xffffffffn);

const COPIED_HI = hiWord(COPIED);
const COMPRESSED_HI = hiWord(COMPRESSED);
const ZERO_FLAG_LO = loWord(ZERO_FLAG);
const OFFSET_HI = hiWord(OFFSET_MASK);
const OFFSET_LO = loWord(OFFSET_MASK);
const L1_RESERVED_HI = hiWord(L1_RESERVED_MASK);
const L1_RESERVED_LO = loWord(L1_RESERVED_MASK);
const L2_RESERVED_HI = hiWord(L2_STANDARD_RESERVED_MASK);
const L2_RESERVED_LO = loWord(L2_STANDARD_RESERVED_MASK);
const BITMAP_TABLE_RESERVED_HI = hiWord(BITMAP_TABLE_RESERVED_MASK);
const BITMAP_TABLE_RESERVED_LO = loWord(BITMAP_TABLE_RESERVED_MASK);
const BITMAP_ALL_ONES_LO = loWord(BITMAP_ALL_ONES);
const REFCOUNT_TABLE_OFFSET_LO = loWord(REFCOUNT_TABLE_OFFSET_MASK);
const REFCOUNT_TABLE_RESERVED_LO = loWord(REFCOUNT_TABLE_RESERVED_MASK);

// ---- Decoders (hot loops: hi and lo words in, numbers out) ----

/** Bits 9-55 of an L1, L2 or bitmap table entry: the offset it holds (exact, below 2^56). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_HI) * 2 ** 32 + ((lo & OFFSET_LO) >>> 0);
}

/** entryOffset of the entry at byte `at` of `table`. */
export function readEntryOffset(table: Buffer, at: number): number {
  return entryOffset(table.readUInt32BE(at), table.readUInt32BE(at + 4));
}

export function isCopied(hi: number): boolean {
  return (hi & COPIED_HI) !== 0;
}

export function isCompressed(hi: number): boolean {
  return (hi & COMPRESSED_HI) !== 0;
}

/** The zero flag of a standard L2 entry (an extended L2 entry keeps its zeros in the bitmap). */
export function hasZeroFlag(lo: number): boolean {
  return (lo & ZERO_FLAG_LO) !== 0;
}

export function hasL1ReservedBits(hi: number, lo: number): boolean {
  return (hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0;
}

/** Reserved bits of an L2 entry that is not compressed. */
export function hasL2ReservedBits(hi: number, lo: number): boolean {
  return (hi & L2_RESERVED_HI) !== 0 || (lo & L2_RESERVED_LO) !== 0;
}

/** The refcount block a refcount table entry points at: bits 9-63 (rounded to a double above 2^53). */
export function refcountBlockOffset(hi: number, lo: number): number {
  return hi * 2 ** 32 + ((lo & REFCOUNT_TABLE_OFFSET_LO) >>> 0);
}

/** refcountBlockOffset of the refcount table entry at byte `at` of `table`. */
export function readRefcountBlockOffset(table: Buffer, at: number): number {
  return refcountBlockOffset(table.readUInt32BE(at), table.readUInt32BE(at + 4));
}

export function hasRefcountTableReservedBits(lo: number): boolean {
  return (lo & REFCOUNT_TABLE_RESERVED_LO) !== 0;
}

export function hasBitmapTableReservedBits(hi: number, lo: number): boolean {
  return (hi & BITMAP_TABLE_RESERVED_HI) !== 0 || (lo & BITMAP_TABLE_RESERVED_LO) !== 0;
}

export function isAllOnesBitmapCluster(lo: number): boolean {
  return (lo & BITMAP_ALL_ONES_LO) !== 0;
}

/** A compressed descriptor: the host offset in its low x bits, x = 62 - (clusterBits - 8); the extra sectors above, up to bit 61. */
export function compressedOffsetBits(clusterBits: number): number {
  return 62 - (clusterBits - 8);
}

/** The byte where a compressed cluster's stream starts. x - 32 (17 to 29) bits of it are in `hi`. */
export function compressedHostOffset(hi: number, lo: number, clusterBits: number): number {
  const hiBits = compressedOffsetBits(clusterBits) - 32;
  return (hi & ((1 << hiBits) - 1)) * 2 ** 32 + (lo >>> 0);
}

/** The descriptor's sectors (the field holds one less): the stream lies within them. */
export function compressedSectors(hi: number, clusterBits: number): number {
  const hiBits = compressedOffsetBits(clusterBits) - 32;
  return ((hi >>> hiBits) & ((1 << (clusterBits - 8)) - 1)) + 1;
}

/** Upper bound of a compressed stream's length: from its host offset to the end of its last sector. */
export function compressedByteCount(hi: number, lo: number, clusterBits: number): number {
  const hostOffset = compressedHostOffset(hi, lo, clusterBits);
  return compressedSectors(hi, clusterBits) * COMPRESSED_SECTOR_BYTES - (hostOffset % COMPRESSED_SECTOR_BYTES);
}

/** Extended L2 entry at byte `at`: one bit a subcluster, set when it is allocated. */
export function allocatedSubclusters(table: Buffer, at: number): number {
  return table.readUInt32BE(at + 12);
}

/** Extended L2 entry at byte `at`: one bit a subcluster, set when it reads as zeros. */
export function zeroSubclusters(table: Buffer, at: number): number {
  return table.readUInt32BE(at + 8);
}

/**
 * The refcount of entry `index` of a refcount block, for every width (`bits` 1 to 64). Below
 * 8 bits a byte holds several, the first in its lowest bits. 64-bit refcounts above 2^53 round.
 */
export function readRefcount(block: Buffer, index: number, bits: number): number {
  switch (bits) {
    case 64:
      return Number(block.readBigUInt64BE(index * 8));
    case 32:
      return block.readUInt32BE(index * 4);
    case 16:
      return block.readUInt16BE(index * 2);
    case 8:
      return block[index]!;
    default: {
      const perByte = 8 / bits;
      return (block[Math.floor(index / perByte)]! >> ((index % perByte) * bits)) & ((1 << bits) - 1);
    }
  }
}

// ---- Encoders (what capture writes) ----

export function encodeL1Entry(l2Offset: number, copied: boolean): bigint {
  return BigInt(l2Offset) | (copied ? COPIED : 0n);
}

/** A standard L2 entry of a data cluster. */
export function encodeDataEntry(hostOffset: number, copied: boolean): bigint {
  return BigInt(hostOffset) | (copied ? COPIED : 0n);
}

/** A standard L2 entry that reads as zeros (and hides the backing file); hostOffset 0 keeps no cluster. */
export function encodeZeroEntry(hostOffset = 0): bigint {
  return BigInt(hostOffset) | ZERO_FLAG;
}

/** The descriptor of a stream of `compressedBytes` at `hostOffset`. */
export function encodeCompressedEntry(clusterBits: number, hostOffset: number, compressedBytes: number): bigint {
  const extraSectors = Math.floor((hostOffset + compressedBytes - 1) / COMPRESSED_SECTOR_BYTES) - Math.floor(hostOffset / COMPRESSED_SECTOR_BYTES);
  return COMPRESSED | (BigInt(extraSectors) << BigInt(compressedOffsetBits(clusterBits))) | BigInt(hostOffset);
}

/** The second u64 of an extended L2 entry from its two 32-bit masks. */
export function encodeSubclusterBitmap(allocated: number, zero: number): bigint {
  return (BigInt(zero >>> 0) << 32n) | BigInt(allocated >>> 0);
}

export function encodeRefcountTableEntry(blockOffset: number): bigint {
  return BigInt(blockOffset);
}

/** Sets the refcount of entry `index` of a refcount block, for every width (readRefcount's layout). */
export function writeRefcount(block: Buffer, index: number, bits: number, value: number): void {
  switch (bits) {
    case 64:
      block.writeBigUInt64BE(BigInt(value), index * 8);
      return;
    case 32:
      block.writeUInt32BE(value, index * 4);
      return;
    case 16:
      block.writeUInt16BE(value, index * 2);
      return;
    case 8:
      block[index] = value;
      return;
    default: {
      const perByte = 8 / bits;
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      const at = Math.floor(index / perByte);
      block[at] = (block[at]! & ~mask) | ((value << shift) & mask);
    }
  }
}

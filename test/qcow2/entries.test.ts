/**
 * src/qcow2/entries.ts: the masks are the qcow2 specification's (docs/interop/qcow2.rst) and the
 * native walker's (native/core/l2_walk.h, through the addon's `l2EntryBits`); every encoder's
 * entry decodes back to what was encoded, and the TypeScript decoders read compressed
 * descriptors as walkL2 does.
 */
import { describe, expect, it } from 'vitest';
import { native, UnitKind } from '../../src/native';
import {
  allocatedSubclusters,
  BITMAP_TABLE_RESERVED_MASK,
  COMPRESSED,
  COMPRESSED_SECTOR_BYTES,
  compressedByteCount,
  compressedHostOffset,
  compressedOffsetBits,
  compressedSectors,
  COPIED,
  encodeCompressedEntry,
  encodeDataEntry,
  encodeL1Entry,
  encodeRefcountTableEntry,
  encodeSubclusterBitmap,
  encodeZeroEntry,
  entryOffset,
  EXTENDED_L2_ENTRY_BYTES,
  hasBitmapTableReservedBits,
  hasL1ReservedBits,
  hasL2ReservedBits,
  hasRefcountTableReservedBits,
  hasZeroFlag,
  isAllOnesBitmapCluster,
  isCompressed,
  isCopied,
  L1_RESERVED_MASK,
  L2_STANDARD_RESERVED_MASK,
  OFFSET_MASK,
  readEntryOffset,
  readRefcount,
  readRefcountBlockOffset,
  REFCOUNT_TABLE_OFFSET_MASK,
  REFCOUNT_TABLE_RESERVED_MASK,
  refcountBlockOffset,
  STANDARD_L2_ENTRY_BYTES,
  SUBCLUSTERS_PER_CLUSTER,
  writeRefcount,
  ZERO_FLAG,
  zeroSubclusters,
} from '../../src/qcow2/entries';

/** An entry's high and low 32-bit words, as a table holds them. */
function words(entry: bigint): [hi: number, lo: number] {
  return [Number(entry >> 32n), Number(entry & 0xffffffffn)];
}

function entryBuffer(...entries: bigint[]): Buffer {
  const buffer = Buffer.alloc(entries.length * 8);
  entries.forEach((entry, i) => buffer.writeBigUInt64BE(entry, i * 8));
  return buffer;
}

/** Bits first..last (inclusive) set. */
function bits(first: number, last: number): bigint {
  return ((1n << BigInt(last + 1)) - 1n) & ~((1n << BigInt(first)) - 1n);
}

const clusterBitsRange = Array.from({ length: 13 }, (_, i) => 9 + i);
const offsets = [0, 512, 65536, 2 ** 32 - 512, 2 ** 32, 2 ** 40 + 3 * 512, 2 ** 53 - 512, 2 ** 56 - 512];

describe('masks', () => {
  it('are the specification bits', () => {
    expect(COPIED).toBe(1n << 63n);
    expect(COMPRESSED).toBe(1n << 62n);
    expect(ZERO_FLAG).toBe(1n);
    expect(OFFSET_MASK).toBe(bits(9, 55));
    expect(L1_RESERVED_MASK).toBe(bits(0, 8) | bits(56, 62));
    expect(L2_STANDARD_RESERVED_MASK).toBe(bits(1, 8) | bits(56, 61));
    expect(REFCOUNT_TABLE_OFFSET_MASK).toBe(bits(9, 63));
    expect(REFCOUNT_TABLE_RESERVED_MASK).toBe(bits(0, 8));
    expect(BITMAP_TABLE_RESERVED_MASK).toBe(bits(1, 8) | bits(56, 63));
    expect(SUBCLUSTERS_PER_CLUSTER).toBe(32);
    expect(STANDARD_L2_ENTRY_BYTES).toBe(8);
    expect(EXTENDED_L2_ENTRY_BYTES).toBe(16);
    expect(clusterBitsRange.map(compressedOffsetBits)).toEqual(clusterBitsRange.map((b) => 70 - b));
  });

  it('are the ones the native walker reads', () => {
    const nativeBits = native().l2EntryBits;
    expect(nativeBits).toEqual({
      copied: COPIED,
      compressed: COMPRESSED,
      zero: ZERO_FLAG,
      offsetMask: OFFSET_MASK,
      subclustersPerCluster: SUBCLUSTERS_PER_CLUSTER,
      compressedSectorBytes: COMPRESSED_SECTOR_BYTES,
      compressedOffsetBits: Object.fromEntries(clusterBitsRange.map((b) => [String(b), compressedOffsetBits(b)])),
    });
  });

  it('each reserved-bit test answers for its bits and no other', () => {
    for (let bit = 0; bit < 64; bit++) {
      const entry = 1n << BigInt(bit);
      const [hi, lo] = words(entry);
      expect(hasL1ReservedBits(hi, lo), `L1 bit ${bit}`).toBe((entry & L1_RESERVED_MASK) !== 0n);
      expect(hasL2ReservedBits(hi, lo), `L2 bit ${bit}`).toBe((entry & L2_STANDARD_RESERVED_MASK) !== 0n);
      expect(hasBitmapTableReservedBits(hi, lo), `bitmap table bit ${bit}`).toBe((entry & BITMAP_TABLE_RESERVED_MASK) !== 0n);
      expect(hasRefcountTableReservedBits(lo), `refcount table bit ${bit}`).toBe((entry & REFCOUNT_TABLE_RESERVED_MASK) !== 0n);
      expect(isCopied(hi), `COPIED bit ${bit}`).toBe(bit === 63);
      expect(isCompressed(hi), `COMPRESSED bit ${bit}`).toBe(bit === 62);
      expect(hasZeroFlag(lo), `zero flag bit ${bit}`).toBe(bit === 0);
      expect(isAllOnesBitmapCluster(lo), `all-ones bit ${bit}`).toBe(bit === 0);
      expect(entryOffset(hi, lo), `offset bit ${bit}`).toBe(bit >= 9 && bit <= 55 ? 2 ** bit : 0);
    }
  });
});

describe('encode, then decode', () => {
  it('L1 entries', () => {
    for (const offset of offsets) {
      for (const copied of [false, true]) {
        const [hi, lo] = words(encodeL1Entry(offset, copied));
        expect(entryOffset(hi, lo)).toBe(offset);
        expect(isCopied(hi)).toBe(copied);
        expect(hasL1ReservedBits(hi, lo)).toBe(false);
      }
    }
  });

  it('standard L2 data and zero entries', () => {
    for (const offset of offsets) {
      const [hi, lo] = words(encodeDataEntry(offset, true));
      expect([entryOffset(hi, lo), isCopied(hi), isCompressed(hi), hasZeroFlag(lo), hasL2ReservedBits(hi, lo)]).toEqual([offset, true, false, false, false]);
      const [zeroHi, zeroLo] = words(encodeZeroEntry(offset));
      expect([entryOffset(zeroHi, zeroLo), isCopied(zeroHi), hasZeroFlag(zeroLo), hasL2ReservedBits(zeroHi, zeroLo)]).toEqual([offset, false, true, false]);
    }
    expect(encodeZeroEntry()).toBe(1n);
    expect(readEntryOffset(entryBuffer(0n, encodeDataEntry(2 ** 45, false)), 8)).toBe(2 ** 45);
  });

  it('extended L2 subcluster bitmaps', () => {
    const table = Buffer.alloc(EXTENDED_L2_ENTRY_BYTES * 2);
    const cases: [allocated: number, zero: number][] = [
      [0, 0],
      [0xffffffff, 0],
      [0, 0xffffffff],
      [0x80000001, 0x7ffffffe],
      [0x12345678, 0x80000000],
    ];
    for (const [allocated, zero] of cases) {
      table.writeBigUInt64BE(encodeDataEntry(65536, true), EXTENDED_L2_ENTRY_BYTES);
      table.writeBigUInt64BE(encodeSubclusterBitmap(allocated, zero), EXTENDED_L2_ENTRY_BYTES + 8);
      expect([allocatedSubclusters(table, EXTENDED_L2_ENTRY_BYTES), zeroSubclusters(table, EXTENDED_L2_ENTRY_BYTES)]).toEqual([allocated, zero]);
      expect(readEntryOffset(table, EXTENDED_L2_ENTRY_BYTES)).toBe(65536);
    }
  });

  it('compressed descriptors, at every cluster size, as walkL2 reads them', () => {
    for (const clusterBits of clusterBitsRange) {
      const clusterSize = 2 ** clusterBits;
      // Up to the largest offset the descriptor holds (or a double counts exactly), and streams from one byte to a whole cluster.
      const hostOffsets = [512, 1000, clusterSize + 7, 2 ** 40 + 511, 2 ** Math.min(52, compressedOffsetBits(clusterBits)) - 1];
      for (const hostOffset of hostOffsets) {
        for (const bytes of [1, 511, 512, 513, clusterSize - 1, clusterSize]) {
          const entry = encodeCompressedEntry(clusterBits, hostOffset, bytes);
          const [hi, lo] = words(entry);
          const sectorEnd = (Math.floor((hostOffset + bytes - 1) / 512) + 1) * 512;
          const what = `${clusterBits} bits, ${bytes} bytes at ${hostOffset}`;
          expect(isCompressed(hi), what).toBe(true);
          expect(isCopied(hi), what).toBe(false);
          expect(compressedHostOffset(hi, lo, clusterBits), what).toBe(hostOffset);
          expect(compressedSectors(hi, clusterBits), what).toBe((sectorEnd - Math.floor(hostOffset / 512) * 512) / 512);
          expect(compressedByteCount(hi, lo, clusterBits), what).toBe(sectorEnd - hostOffset);
          const walk = native().walkL2(entryBuffer(entry), 0, 1, clusterBits, false, false);
          expect([...walk.runs], what).toEqual([0, 1, UnitKind.Compressed, hostOffset, sectorEnd - hostOffset]);
        }
      }
    }
  });

  it('refcount table entries', () => {
    for (const offset of offsets) {
      const [hi, lo] = words(encodeRefcountTableEntry(offset));
      expect(refcountBlockOffset(hi, lo)).toBe(offset);
      expect(hasRefcountTableReservedBits(lo)).toBe(false);
    }
    // Bits 56-63 are the offset's too (where an L1 or L2 entry has flags and reserved bits).
    expect(readRefcountBlockOffset(entryBuffer(0n, (1n << 56n) | 0x1ffn), 8)).toBe(2 ** 56);
  });

  it('refcounts of every width', () => {
    for (const width of [1, 2, 4, 8, 16, 32, 64]) {
      const block = Buffer.alloc(512);
      const count = (512 * 8) / width;
      const max = width >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** width - 1;
      // Every entry a distinct value: a write that spills into its neighbours shows.
      const valueOf = (i: number) => (i * 2654435761 + 1) % (max + 1);
      for (let i = 0; i < count; i++) writeRefcount(block, i, width, valueOf(i));
      for (let i = 0; i < count; i++) expect(readRefcount(block, i, width), `${width}-bit refcount ${i}`).toBe(valueOf(i));
      writeRefcount(block, 3, width, max);
      writeRefcount(block, 4, width, 0);
      expect([readRefcount(block, 2, width), readRefcount(block, 3, width), readRefcount(block, 4, width), readRefcount(block, 5, width)]).toEqual([
        valueOf(2),
        max,
        0,
        valueOf(5),
      ]);
    }
  });

  it('packs sub-byte refcounts first in the lowest bits, as QEMU does', () => {
    const packed = (width: number, index: number, value: number) => {
      const block = Buffer.alloc(2);
      writeRefcount(block, index, width, value);
      return [...block];
    };
    expect(packed(4, 1, 0xa)).toEqual([0xa0, 0]);
    expect(packed(2, 2, 3)).toEqual([0x30, 0]);
    expect(packed(1, 9, 1)).toEqual([0, 0x02]);
  });
});

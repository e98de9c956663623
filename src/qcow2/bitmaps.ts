/**
 * Persistent dirty bitmaps: the directory the bitmaps extension points at, and each bitmap's table,
 * held to the rules QEMU applies when it opens an image (block/qcow2-bitmap.c: bitmap_list_load,
 * check_dir_entry, load_bitmap, check_table_entry, load_bitmap_data). An image that breaks them does
 * not open in QEMU: qemu-img info, convert, map and check all fail on it, and so does qcow2img
 * (`BAD_EXTENSION`). Layout: docs/formats/qcow2.md ("Header extensions"); QEMU docs/interop/qcow2.rst.
 */
import { Qcow2Error } from '../errors';
import { entryOffset, hasBitmapTableReservedBits, isAllOnesBitmapCluster } from './entries';
import type { BitmapsExtension } from './header';

export interface BitmapDirectoryEntry {
  name: string;
  tableOffset: number;
  /** Entries (u64) of the bitmap table. */
  tableSize: number;
  /** BME_FLAG_IN_USE: the bitmap's data is not consistent; QEMU does not load its table. */
  inUse: boolean;
  granularityBits: number;
}

/** Bytes of a directory entry before its name: table offset u64, table size u32, flags u32, type u8, granularity u8, name size u16, extra size u32. */
const entryHeaderBytes = 24;
/** BME_MAX_TABLE_SIZE. */
const maxTableEntries = 0x8000000;
/** BME_MAX_PHYS_SIZE: bytes of bitmap one table may describe. */
const maxBitmapBytes = 0x20000000;
/** BME_MIN_GRANULARITY_BITS, BME_MAX_GRANULARITY_BITS. */
const minGranularityBits = 9;
const maxGranularityBits = 31;
/** BME_MAX_NAME_SIZE. */
const maxNameBytes = 1023;
/** BT_DIRTY_TRACKING_BITMAP, the only type. */
const dirtyTrackingType = 1;
/** BME_FLAG_IN_USE and BME_FLAG_AUTO; the other flag bits are reserved (BME_RESERVED_FLAGS). */
const inUseFlag = 1;
const knownFlags = 3;

/**
 * The directory (`directory` holds its `extension.directorySize` bytes), as bitmap_list_load and
 * check_dir_entry take it. `virtualSize` is the disk the bitmaps cover.
 */
export function parseBitmapDirectory(directory: Buffer, extension: BitmapsExtension, clusterSize: number, virtualSize: number, path: string): BitmapDirectoryEntry[] {
  const fail = (message: string): never => {
    throw new Qcow2Error('BAD_EXTENSION', `bitmap directory: ${message}`, { path, offset: extension.directoryOffset });
  };
  if (extension.directorySize === 0) fail('its size is zero');
  const entries: BitmapDirectoryEntry[] = [];
  const names = new Set<string>();
  let at = 0;
  while (at < directory.length) {
    if (at + entryHeaderBytes > directory.length) fail('an entry runs past its end');
    if (entries.length + 1 > extension.count) fail(`more bitmaps than the ${extension.count} the header extension counts`);
    const rawTableOffset = directory.readBigUInt64BE(at);
    const tableOffset = Number(rawTableOffset);
    const tableSize = directory.readUInt32BE(at + 8);
    const flags = directory.readUInt32BE(at + 12);
    const type = directory[at + 16]!;
    const granularityBits = directory[at + 17]!;
    const nameSize = directory.readUInt16BE(at + 18);
    const extraSize = directory.readUInt32BE(at + 20);
    const size = Math.ceil((entryHeaderBytes + nameSize + extraSize) / 8) * 8;
    if (at + size > directory.length) fail('an entry runs past its end');
    if (extraSize !== 0) fail('a bitmap has extra data');
    const name = directory.toString('utf8', at + entryHeaderBytes, at + entryHeaderBytes + nameSize);
    const inUse = (flags & inUseFlag) !== 0;
    const bitmapBytes = tableSize * clusterSize;
    const satisfied =
      tableSize !== 0 &&
      rawTableOffset !== 0n &&
      rawTableOffset % BigInt(clusterSize) === 0n &&
      tableSize <= maxTableEntries &&
      granularityBits >= minGranularityBits &&
      granularityBits <= maxGranularityBits &&
      (flags & ~knownFlags) === 0 &&
      nameSize <= maxNameBytes &&
      type === dirtyTrackingType &&
      bitmapBytes <= maxBitmapBytes &&
      // A consistent bitmap's table must hold a bit for every granule of the disk.
      (inUse || BigInt(virtualSize) <= BigInt(bitmapBytes * 8) << BigInt(granularityBits));
    if (!satisfied) fail(`bitmap "${name}" does not satisfy the constraints`);
    // bdrv_create_dirty_bitmap: one bitmap a name.
    if (names.has(name)) fail(`bitmap "${name}" appears twice`);
    names.add(name);
    entries.push({ name, tableOffset, tableSize, inUse, granularityBits });
    at += size;
  }
  if (entries.length !== extension.count) fail(`fewer bitmaps than the ${extension.count} the header extension counts`);
  return entries;
}

/**
 * A consistent bitmap's table (`table` holds its `entry.tableSize` u64 entries), as load_bitmap
 * takes it: no reserved bits, data clusters aligned, and as many entries as the disk needs.
 */
export function checkBitmapTable(table: Buffer, entry: BitmapDirectoryEntry, clusterSize: number, virtualSize: number, path: string): void {
  const fail = (message: string): never => {
    throw new Qcow2Error('BAD_EXTENSION', `bitmap "${entry.name}": ${message}`, { path, offset: entry.tableOffset });
  };
  // hbitmap serializes in 64-bit words: the bytes of [0, virtualSize) at the granularity.
  const granules = Math.ceil(virtualSize / 2 ** entry.granularityBits);
  const expected = Math.ceil((Math.ceil(granules / 64) * 8) / clusterSize);
  if (expected !== entry.tableSize) fail(`a table of ${entry.tableSize} entries where the disk needs ${expected}`);
  for (let i = 0; i < entry.tableSize; i++) {
    const hi = table.readUInt32BE(i * 8);
    const lo = table.readUInt32BE(i * 8 + 4);
    if (hasBitmapTableReservedBits(hi, lo)) fail(`table entry ${i} has reserved bits set`);
    const offset = entryOffset(hi, lo);
    // All ones only without a data cluster.
    if (offset !== 0 && (isAllOnesBitmapCluster(lo) || offset % clusterSize !== 0)) fail(`table entry ${i} is not valid`);
  }
}

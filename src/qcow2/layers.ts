/**
 * One file of a backing chain, seen as "what is at guest range [start, end) in
 * this file alone": a qcow2 image (through its L1/L2 tables) or a raw file.
 */
import type { FileHandle } from 'node:fs/promises';
import * as fs from 'node:fs/promises';
import { Qcow2Error, ioError } from '../errors';
import { dataRanges, seekOf } from '../files';
import { limits } from '../limits';
import { lockAsQemu } from '../locks';
import { native, UnitKind, l2RunFields } from '../native';
import { checkBitmapTable, parseBitmapDirectory } from './bitmaps';
import { isCopied, readEntryOffset, readRefcount, readRefcountBlockOffset, SUBCLUSTERS_PER_CLUSTER } from './entries';
import { type Qcow2Header, headerReadSize, parseHeader, checkTableOffset } from './header';
import { type Qcow2Snapshot, parseSnapshotTable, snapshotTableReadSize } from './snapshots';

export type LayerRunKind = 'unallocated' | 'zero' | 'zeroAllocated' | 'data' | 'compressed';

/** An open file the reader takes bytes from. */
export interface OpenFile {
  path: string;
  handle: FileHandle;
  /** Bytes of the image (of its region, when it lies inside a larger file). */
  size: number;
  /** Where the image's byte 0 sits in the file: non-zero for a member of an uncompressed tar. */
  base: number;
  device: number;
  inode: number;
}

export interface LayerRun {
  start: number;
  length: number;
  kind: LayerRunKind;
  /** The file holding the bytes (data, zeroAllocated, compressed), or the host cluster of unallocated subclusters. */
  file?: OpenFile;
  hostOffset: number;
  /** Compressed: upper bound of the stream's length. */
  compressedBytes: number;
  /** Compressed: guest offset where the compressed cluster begins. */
  clusterStart: number;
}

export interface Layer {
  readonly format: 'qcow2' | 'raw';
  readonly file: OpenFile;
  readonly virtualSize: number;
  /** Appends the runs of [start, end) (end <= virtualSize) in guest order. */
  status(start: number, end: number, out: LayerRun[]): Promise<void>;
  close(): Promise<void>;
}

/** A byte range of a larger file that holds an image (a member of an uncompressed tar). */
export interface FileRegion {
  offset: number;
  length: number;
}

/**
 * Opens a file of the chain read-only under QEMU's read locks (shared with every use when
 * `forceShare`), so no running VM can be writing it while it is read.
 */
export async function openFile(path: string, what: string, options: { region?: FileRegion | undefined; forceShare?: boolean | undefined } = {}): Promise<OpenFile> {
  const { region } = options;
  let handle: FileHandle;
  try {
    handle = await fs.open(path, 'r');
  } catch (error) {
    throw ioError(error, path, `cannot open ${what}`);
  }
  try {
    await lockAsQemu(handle.fd, path, options.forceShare ? 'shared-read' : 'read');
    const stats = await handle.stat();
    let size = stats.size;
    if (stats.isBlockDevice()) size = native().blockDeviceInfo(handle.fd).sizeBytes;
    else if (!stats.isFile()) throw new Qcow2Error('NOT_A_REGULAR_FILE', `${what} is not a regular file or block device`, { path });
    if (region) {
      if (region.offset + region.length > size) {
        throw new Qcow2Error('TRUNCATED', `${what} at ${region.offset} (+${region.length} bytes) runs past the end of the file (${size} bytes)`, { path, offset: region.offset });
      }
      return { path, handle, size: region.length, base: region.offset, device: stats.dev, inode: stats.ino };
    }
    return { path, handle, size, base: 0, device: stats.dev, inode: stats.ino };
  } catch (error) {
    await handle.close();
    throw ioError(error, path, `cannot open ${what}`);
  }
}

export async function readExactly(file: OpenFile, offset: number, length: number, what: string): Promise<Buffer> {
  if (offset + length > file.size) {
    throw new Qcow2Error('OFFSET_BEYOND_FILE', `${what} at ${offset} (+${length} bytes) lies beyond the end of the file (${file.size} bytes)`, {
      path: file.path,
      offset,
    });
  }
  return readInto(file, Buffer.allocUnsafe(length), offset, length, what);
}

/**
 * Reads metadata as QEMU reads it: the bytes past the end of the file read as zeros (its block
 * layer zero-fills them, bdrv_aligned_preadv), so a table there reads as an empty one.
 */
export async function readPadded(file: OpenFile, offset: number, length: number, what: string): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  const inside = Math.max(0, Math.min(length, file.size - offset));
  return inside > 0 ? readInto(file, buffer, offset, inside, what) : buffer;
}

/** Reads `length` bytes at `offset` into the start of `buffer`; the file must hold them. */
async function readInto(file: OpenFile, buffer: Buffer, offset: number, length: number, what: string): Promise<Buffer> {
  let done = 0;
  try {
    while (done < length) {
      const { bytesRead } = await file.handle.read(buffer, done, length - done, file.base + offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
  } catch (error) {
    throw ioError(error, file.path, `cannot read ${what}`);
  }
  if (done !== length) {
    throw new Qcow2Error('TRUNCATED', `file ends inside the ${what} at ${offset + done}`, { path: file.path, offset: offset + done });
  }
  return buffer;
}

/** Bounded LRU of L2 tables by host offset; concurrent misses share one read. */
class L2Cache {
  private readonly tables = new Map<number, Promise<Buffer>>();
  private readonly maxTables: number;
  constructor(tableBytes: number) {
    this.maxTables = Math.max(4, Math.floor(limits.l2CacheBytes / tableBytes));
  }
  get(offset: number, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.tables.get(offset);
    if (hit) {
      this.tables.delete(offset);
      this.tables.set(offset, hit);
      return hit;
    }
    const pending = load();
    pending.catch(() => this.tables.delete(offset));
    this.tables.set(offset, pending);
    if (this.tables.size > this.maxTables) {
      const oldest = this.tables.keys().next().value as number;
      this.tables.delete(oldest);
    }
    return pending;
  }
}

export class Qcow2Layer implements Layer {
  readonly format = 'qcow2' as const;
  readonly virtualSize: number;
  private l1: Float64Array | undefined;
  private readonly l2Cache: L2Cache;
  private readonly l1Offset: number;
  private readonly l1Size: number;

  private constructor(
    readonly file: OpenFile,
    readonly header: Qcow2Header,
    readonly snapshots: Qcow2Snapshot[],
    readonly dataFile: OpenFile | undefined,
    readonly snapshot: Qcow2Snapshot | undefined,
  ) {
    this.l2Cache = new L2Cache(header.clusterSize);
    this.virtualSize = snapshot ? Math.floor(snapshot.virtualSize / 512) * 512 : header.virtualSize;
    this.l1Offset = snapshot ? snapshot.l1TableOffset : header.l1TableOffset;
    this.l1Size = snapshot ? snapshot.l1Size : header.l1Size;
  }

  /** Reads and validates the header and snapshot table of an open qcow2 file. */
  static async readHeader(file: OpenFile, options: { metadataOnly?: boolean } = {}): Promise<{ header: Qcow2Header; snapshots: Qcow2Snapshot[] }> {
    const first = await readExactly(file, 0, Math.min(file.size, 112), 'qcow2 header');
    // Cluster 0 holds the header, extensions and backing name: read it whole, zeros past the end
    // of the file as QEMU reads them (a file cut inside it may still open).
    const clusterBits = first.length >= 24 ? first.readUInt32BE(20) : 0;
    const clusterBytes = clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : 0;
    const start = clusterBytes > first.length ? await readPadded(file, 0, Math.min(clusterBytes, headerReadSize), 'qcow2 header') : first;
    const header = parseHeader(start, file.path, file.size, options);
    let snapshots: Qcow2Snapshot[] = [];
    if (header.snapshotCount > 0) {
      // Past the end of the file the table reads as zeros, as QEMU reads it.
      const table = await readPadded(file, header.snapshotsOffset, snapshotTableReadSize(header, file.size, true), 'snapshot table');
      snapshots = parseSnapshotTable(table, header, file.path);
    }
    // QEMU loads the persistent bitmaps when it opens an image (qcow2_load_dirty_bitmaps): one it
    // cannot load is an image it does not open.
    if (header.bitmaps) {
      const { clusterSize, virtualSize } = header;
      const directory = await readPadded(file, header.bitmaps.directoryOffset, header.bitmaps.directorySize, 'bitmap directory');
      for (const entry of parseBitmapDirectory(directory, header.bitmaps, clusterSize, virtualSize, file.path)) {
        if (entry.inUse) continue;
        checkBitmapTable(await readPadded(file, entry.tableOffset, entry.tableSize * 8, 'bitmap table'), entry, clusterSize, virtualSize, file.path);
      }
    }
    return { header, snapshots };
  }

  static async open(file: OpenFile, header: Qcow2Header, snapshots: Qcow2Snapshot[], dataFile: OpenFile | undefined, snapshot?: Qcow2Snapshot): Promise<Qcow2Layer> {
    if (snapshot) {
      if (header.hasExternalDataFile) {
        throw new Qcow2Error('BAD_SNAPSHOT_TABLE', 'internal snapshots cannot be read from an image with an external data file', { path: file.path });
      }
      if (snapshot.l1Size * 8 > limits.maxL1Bytes) {
        throw new Qcow2Error('L1_TOO_LARGE', `L1 table of snapshot "${snapshot.name}" has ${snapshot.l1Size} entries`, { path: file.path });
      }
      // An L1 table too small for the snapshot's disk is not refused: QEMU reads what lies past
      // its end as unallocated (qcow2_snapshot_load_tmp, qcow2_snapshot_goto).
      // As qcow2_snapshot_load_tmp: aligned, wherever it lies (past the end it reads as zeros).
      checkTableOffset(file.path, `L1 table of snapshot "${snapshot.name}"`, snapshot.l1TableOffset, header.clusterSize);
    }
    return new Qcow2Layer(file, header, snapshots, dataFile, snapshot);
  }

  private async loadL1(): Promise<Float64Array> {
    if (this.l1) return this.l1;
    // From the size being read: a snapshot's disk may be larger than the image's is now.
    const entries = Math.min(this.l1Size, Math.ceil(this.virtualSize / (this.header.l2EntryCount * this.header.clusterSize)));
    const raw = await readPadded(this.file, this.l1Offset, entries * 8, 'L1 table');
    const l1 = new Float64Array(entries);
    for (let i = 0; i < entries; i++) {
      // As QEMU reads it: the offset is bits 9-55, the reserved bits (0-8, 56-62) are ignored
      // (qemu-img check reports them), and a table past the end of the file reads as zeros.
      const offset = readEntryOffset(raw, i * 8);
      if (offset % this.header.clusterSize !== 0) {
        throw new Qcow2Error('UNALIGNED_OFFSET', `L1 entry ${i} points at L2 table offset ${offset}, not cluster aligned`, {
          path: this.file.path,
          offset: this.l1Offset + i * 8,
        });
      }
      l1[i] = offset;
    }
    this.l1 = l1;
    return l1;
  }

  private l2Table(offset: number): Promise<Buffer> {
    return this.l2Cache.get(offset, () => readPadded(this.file, offset, this.header.clusterSize, 'L2 table'));
  }

  async status(start: number, end: number, out: LayerRun[]): Promise<void> {
    const l1 = await this.loadL1();
    const { clusterSize, clusterBits, l2EntryCount, extendedL2, hasExternalDataFile, l2EntryBytes } = this.header;
    const tableSpan = l2EntryCount * clusterSize;
    const unitSize = extendedL2 ? clusterSize / SUBCLUSTERS_PER_CLUSTER : clusterSize;
    const dataFile = this.dataFile ?? this.file;
    for (let l1Index = Math.floor(start / tableSpan); l1Index * tableSpan < end; l1Index++) {
      const tableStart = l1Index * tableSpan;
      const rangeStart = Math.max(start, tableStart);
      const rangeEnd = Math.min(end, tableStart + tableSpan);
      const l2Offset = l1[l1Index] ?? 0;
      if (l2Offset === 0) {
        pushRun(out, { start: rangeStart, length: rangeEnd - rangeStart, kind: 'unallocated', hostOffset: 0, compressedBytes: 0, clusterStart: 0 });
        continue;
      }
      const table = await this.l2Table(l2Offset);
      const firstEntry = Math.floor((rangeStart - tableStart) / clusterSize);
      const lastEntry = Math.ceil((rangeEnd - tableStart) / clusterSize);
      const walk = native().walkL2(table, firstEntry, lastEntry - firstEntry, clusterBits, extendedL2, hasExternalDataFile);
      if (walk.defect !== 0) {
        throw new Qcow2Error('BAD_L2_ENTRY', `L2 entry ${walk.defectEntry} of the table at ${l2Offset}: ${walk.defectName}`, {
          path: this.file.path,
          offset: l2Offset + walk.defectEntry * l2EntryBytes,
        });
      }
      const runs = walk.runs;
      for (let r = 0; r < runs.length; r += l2RunFields) {
        const unitStart = tableStart + runs[r]! * unitSize;
        const unitEnd = unitStart + runs[r + 1]! * unitSize;
        const runStart = Math.max(unitStart, rangeStart);
        const runEnd = Math.min(unitEnd, rangeEnd);
        if (runStart >= runEnd) continue;
        const kindCode = runs[r + 2]!;
        const host = runs[r + 3]!;
        const skip = runStart - unitStart;
        // Version 2 has no zero flag: QEMU takes a zero cluster there for corruption (qcow2_get_host_offset).
        if (this.header.version < 3 && (kindCode === UnitKind.Zero || kindCode === UnitKind.ZeroAllocated)) {
          const entry = runs[r]! + Math.floor((runStart - unitStart) / clusterSize);
          throw new Qcow2Error('BAD_L2_ENTRY', `L2 entry ${entry} of the table at ${l2Offset}: a zero cluster in a version 2 image`, {
            path: this.file.path,
            offset: l2Offset + entry * l2EntryBytes,
          });
        }
        switch (kindCode) {
          case UnitKind.Unallocated:
            if (extendedL2) this.pushUnallocatedSubclusters(out, table, tableStart, l2Offset, runStart, runEnd, dataFile);
            else pushRun(out, { start: runStart, length: runEnd - runStart, kind: 'unallocated', hostOffset: 0, compressedBytes: 0, clusterStart: 0 });
            break;
          case UnitKind.Zero:
            pushRun(out, { start: runStart, length: runEnd - runStart, kind: 'zero', hostOffset: 0, compressedBytes: 0, clusterStart: 0 });
            break;
          case UnitKind.ZeroAllocated:
          case UnitKind.Data:
            if (hasExternalDataFile) this.checkDataFileOffset(host, unitStart, l2Offset, tableStart);
            pushRun(out, {
              start: runStart,
              length: runEnd - runStart,
              kind: kindCode === UnitKind.Data ? 'data' : 'zeroAllocated',
              file: dataFile,
              hostOffset: host + skip,
              compressedBytes: 0,
              clusterStart: 0,
            });
            break;
          case UnitKind.Compressed:
            // One that lies past the end of the file is mapped as QEMU maps it; reading it fails.
            out.push({ start: runStart, length: runEnd - runStart, kind: 'compressed', file: this.file, hostOffset: host, compressedBytes: runs[r + 4]!, clusterStart: unitStart });
            break;
          default:
            throw new Qcow2Error('BAD_L2_ENTRY', `unexpected L2 run kind ${kindCode}`, { path: this.file.path, offset: l2Offset });
        }
      }
    }
  }

  private preallocation: Promise<boolean> | undefined;

  /**
   * Whether QEMU takes this image for one made with preallocation=metadata: more clusters have a
   * refcount than the file has blocks for (qcow2_detect_metadata_preallocation). Its map then
   * reports data clusters over holes of the file as zeros. Any failure counts as no.
   */
  metadataPreallocated(): Promise<boolean> {
    this.preallocation ??= this.detectMetadataPreallocation().catch(() => false);
    return this.preallocation;
  }

  private async detectMetadataPreallocation(): Promise<boolean> {
    const { clusterSize, refcountBits, refcountTableOffset, refcountTableClusters } = this.header;
    const stats = await this.file.handle.stat();
    // The block count is the whole file's: it says nothing about an image inside an archive.
    if (!stats.isFile() || this.file.base !== 0) return false;
    const realClusters = Math.floor((stats.blocks * 512) / clusterSize);
    const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
    const endCluster = Math.ceil(this.file.size / clusterSize);
    const perBlock = (clusterSize * 8) / refcountBits;
    const table = await readExactly(this.file, refcountTableOffset, refcountTableClusters * clusterSize, 'refcount table');
    let count = 0;
    for (let index = 0; index * perBlock < endCluster && index * 8 < table.length && count < threshold; index++) {
      const blockOffset = readRefcountBlockOffset(table, index * 8);
      if (blockOffset === 0) continue;
      const block = await readExactly(this.file, blockOffset, clusterSize, 'refcount block');
      const entries = Math.min(perBlock, endCluster - index * perBlock);
      for (let i = 0; i < entries && count < threshold; i++) {
        if (readRefcount(block, i, refcountBits) !== 0) count++;
      }
    }
    // As QEMU: preallocated once the clusters in use reach the threshold (not pass it).
    return count >= threshold;
  }

  /**
   * Unallocated subclusters of a cluster that has a host cluster keep its offset: QEMU's map
   * reports it (QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC) where no backing file decides the range.
   */
  private pushUnallocatedSubclusters(out: LayerRun[], table: Buffer, tableStart: number, l2Offset: number, start: number, end: number, dataFile: OpenFile): void {
    const { clusterSize, l2EntryBytes, hasExternalDataFile } = this.header;
    for (let at = start; at < end; ) {
      const index = Math.floor((at - tableStart) / clusterSize);
      const clusterStart = tableStart + index * clusterSize;
      const pieceEnd = Math.min(end, clusterStart + clusterSize);
      const host = readEntryOffset(table, index * l2EntryBytes);
      const hasHost = host !== 0 || (hasExternalDataFile && isCopied(table.readUInt32BE(index * l2EntryBytes)));
      if (hasHost && hasExternalDataFile) this.checkDataFileOffset(host, clusterStart, l2Offset, tableStart);
      pushRun(out, {
        start: at,
        length: pieceEnd - at,
        kind: 'unallocated',
        ...(hasHost ? { file: dataFile, hostOffset: host + (at - clusterStart) } : { hostOffset: 0 }),
        compressedBytes: 0,
        clusterStart: 0,
      });
      at = pieceEnd;
    }
  }

  /**
   * In an external data file a cluster lies at its own guest offset: QEMU takes any other host
   * offset for corruption and fails the read (qcow2_get_host_offset). `host` and `guest` are those
   * of the same byte.
   */
  private checkDataFileOffset(host: number, guest: number, l2Offset: number, tableStart: number): void {
    if (host === guest) return;
    const entry = Math.floor((guest - tableStart) / this.header.clusterSize);
    throw new Qcow2Error('BAD_L2_ENTRY', `L2 entry ${entry} of the table at ${l2Offset}: host offset ${host} in the external data file is not the guest offset ${guest}`, {
      path: this.file.path,
      offset: l2Offset + entry * this.header.l2EntryBytes,
    });
  }

  async close(): Promise<void> {
    // Both, even if the first fails; the first failure is reported.
    const results = await Promise.allSettled([this.file.handle.close(), ...(this.dataFile ? [this.dataFile.handle.close()] : [])]);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }
}

/** Appends a run, merging it into the previous one when it continues it. */
export function pushRun(out: LayerRun[], run: LayerRun): void {
  const last = out[out.length - 1];
  if (
    last &&
    run.kind !== 'compressed' &&
    last.kind === run.kind &&
    last.start + last.length === run.start &&
    last.file === run.file &&
    (run.file === undefined || last.hostOffset + last.length === run.hostOffset)
  ) {
    last.length += run.length;
    return;
  }
  out.push(run);
}

/**
 * A raw file in a backing chain. QEMU sizes it in whole sectors, so the last
 * partial sector reads as zeros; holes (SEEK_HOLE) read as zeros too.
 */
export class RawLayer implements Layer {
  readonly format = 'raw' as const;
  readonly virtualSize: number;
  constructor(readonly file: OpenFile) {
    this.virtualSize = Math.ceil(file.size / 512) * 512;
  }

  async status(start: number, end: number, out: LayerRun[]): Promise<void> {
    const hole = (from: number, to: number) =>
      pushRun(out, { start: from, length: to - from, kind: 'zeroAllocated', file: this.file, hostOffset: from, compressedBytes: 0, clusterStart: 0 });
    // Past the file's end: zeros. A remote raw file has no holes to seek: all of it is data. (Raw
    // layers are whole files: backing files are never opened as regions.)
    const dataEnd = Math.min(end, this.file.size);
    const remote = (this.file.handle as { remote?: boolean }).remote === true;
    const ranges = remote ? (start < dataEnd ? [[start, dataEnd] as const] : []) : dataRanges(seekOf(this.file.handle.fd), start, dataEnd);
    let position = start;
    for (const [from, to] of ranges) {
      if (from > position) hole(position, from);
      pushRun(out, { start: from, length: to - from, kind: 'data', file: this.file, hostOffset: from, compressedBytes: 0, clusterStart: 0 });
      position = to;
    }
    if (position < end) hole(position, end);
  }

  async close(): Promise<void> {
    await this.file.handle.close();
  }
}

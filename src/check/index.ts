/**
 * `check`: rebuild every reference count from what the image references and
 * compare with the stored refcounts, as `qemu-img check` does (QEMU
 * block/qcow2-refcount.c), with the same counts and the same exit status.
 */
import type { HttpOptions } from '../http/client';
import { openChainFile } from '../http/chain';
import { isUrl, shownUrl } from '../http/url';
import * as fs from 'node:fs/promises';
import { Qcow2Error, ioError, throwIfCancelled } from '../errors';
import { JobCounters, ProgressSampler, type ProgressCallback } from '../jobs';
import { limits } from '../limits';
import { lockAsQemu } from '../locks';
import { checkBitmapTable, parseBitmapDirectory } from '../qcow2/bitmaps';
import {
  allocatedSubclusters,
  compressedByteCount,
  compressedHostOffset,
  entryOffset,
  hasL1ReservedBits,
  hasL2ReservedBits,
  hasRefcountTableReservedBits,
  hasZeroFlag,
  isCompressed,
  isCopied,
  readEntryOffset,
  readRefcount,
  refcountBlockOffset,
  zeroSubclusters,
} from '../qcow2/entries';
import { type Qcow2Header, headerReadSize, parseHeader } from '../qcow2/header';
import { type Qcow2Snapshot, parseSnapshotTable, snapshotTableBytes, snapshotTableReadSize } from '../qcow2/snapshots';

export interface CheckIssue {
  kind: 'corruption' | 'leak' | 'error';
  message: string;
  /** Host cluster index, for refcount mismatches. */
  cluster?: number;
  /** Byte offset in the image file. */
  offset?: number;
}

export interface CheckResult {
  filename: string;
  format: 'qcow2';
  checkErrors: number;
  corruptions: number;
  leaks: number;
  /** End of the last cluster in use or referenced. */
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** The first issues found (at most 1000); `issueCount` says how many there were. */
  issues: CheckIssue[];
  issueCount: number;
}

/** qemu-img check's exit status: 1 check failed, 2 corruptions, 3 leaks only, 0 clean. */
export function checkExitCode(result: CheckResult): number {
  if (result.checkErrors > 0) return 1;
  if (result.corruptions > 0) return 2;
  if (result.leaks > 0) return 3;
  return 0;
}

const maxIssues = 1000;


/** Keeps the most recent summaries only: enough for tables referenced over and over. */
function remember<V>(cache: Map<number, V>, key: number, value: V): void {
  if (cache.size >= 64) cache.delete(cache.keys().next().value as number);
  cache.set(key, value);
}

/** INT_MAX: QEMU's bound on the clusters of a file it checks. */
const maxCheckedClusters = 2 ** 31 - 1;

/** What one L2 table contributes: references by cluster, issues, counters. */
/** Problems a table walk found: the first maxIssues in full, the corruptions past them counted. */
interface IssueSummary {
  issues: { kind: CheckIssue['kind']; message: string; where: { offset: number } }[];
  moreCorruptions: number;
}

interface TableSummary extends IssueSummary {
  references: Map<number, number>;
  allocated: number;
  compressed: number;
  fragmented: number;
}

class Checker {
  readonly result: CheckResult;
  /** check()'s signal and progress: set after construction, asked between tables. */
  control: { signal?: AbortSignal; progress?: { counters: JobCounters; sampler: ProgressSampler } } = {};
  private references: Uint16Array;
  private readonly tooLarge: boolean;
  private readonly overflow = new Map<number, number>();
  private readonly clusterSize: number;
  /** The refcount blocks' offsets, by refcount table index. */
  private reftable: Float64Array = new Float64Array(0);
  /** QEMU stops counting at the largest refcount the width holds, reporting each overflow. */
  private readonly refcountMax: number;
  private readonly refblockCache = new Map<number, Buffer>();
  private readonly tableSummaries = new Map<number, TableSummary>();
  private readonly copiedSummaries = new Map<number, IssueSummary>();

  constructor(
    private readonly handle: fs.FileHandle,
    private readonly path: string,
    private readonly fileSize: number,
    private readonly header: Qcow2Header,
    private readonly snapshots: Qcow2Snapshot[],
    /** Where the image's byte 0 sits in the file (non-zero inside an uncompressed tar). */
    private readonly base: number,
  ) {
    this.clusterSize = header.clusterSize;
    this.refcountMax = header.refcountBits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** header.refcountBits - 1;
    const clusters = Math.ceil(fileSize / this.clusterSize);
    // QEMU refuses to check a file of more clusters than an int counts (a check error): so do we,
    // before allocating a counter for each.
    this.tooLarge = clusters > maxCheckedClusters;
    this.references = new Uint16Array(this.tooLarge ? 0 : clusters);
    this.result = {
      filename: path,
      format: 'qcow2',
      checkErrors: 0,
      corruptions: 0,
      leaks: 0,
      imageEndOffset: 0,
      totalClusters: Math.ceil(header.virtualSize / this.clusterSize),
      allocatedClusters: 0,
      fragmentedClusters: 0,
      compressedClusters: 0,
      issues: [],
      issueCount: 0,
    };
  }

  /** Issues counted without a message (beyond the ones kept). */
  private reportCount(kind: CheckIssue['kind'], count: number): void {
    if (kind === 'corruption') this.result.corruptions += count;
    else if (kind === 'leak') this.result.leaks += count;
    else this.result.checkErrors += count;
    this.result.issueCount += count;
  }

  /** A table's summary replayed: its issues listed while the result keeps fewer than maxIssues, the rest counted. */
  private replayIssues(summary: IssueSummary): void {
    const room = Math.max(0, maxIssues - this.result.issues.length);
    for (const issue of summary.issues.slice(0, room)) this.report(issue.kind, issue.message, issue.where);
    const unreported = Math.max(0, summary.issues.length - room) + summary.moreCorruptions;
    if (unreported > 0) this.reportCount('corruption', unreported);
  }

  private report(kind: CheckIssue['kind'], message: string, where: { cluster?: number; offset?: number } = {}): void {
    if (kind === 'corruption') this.result.corruptions++;
    else if (kind === 'leak') this.result.leaks++;
    else this.result.checkErrors++;
    this.result.issueCount++;
    if (this.result.issues.length < maxIssues) this.result.issues.push({ kind, message, ...where });
  }

  /** Reads like QEMU does: bytes past the end of the file read as zeros. */
  private async read(offset: number, length: number): Promise<Buffer> {
    const buffer = Buffer.alloc(length);
    if (offset >= this.fileSize) return buffer;
    let done = 0;
    const available = Math.min(length, this.fileSize - offset);
    while (done < available) {
      const { bytesRead } = await this.handle.read(buffer, done, available - done, this.base + offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return buffer;
  }

  /** One more reference to every cluster of [offset, offset + size). */
  private reference(offset: number, size: number): void {
    if (size <= 0) return;
    // The last cluster may be partly past the end of the file; a whole cluster past it is corrupt.
    if (offset + size - this.fileSize >= this.clusterSize) {
      this.report('corruption', `reference to ${offset} (+${size} bytes) exceeds the end of the file by a cluster or more`, { offset });
      return;
    }
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + size - 1) / this.clusterSize);
    for (let cluster = first; cluster <= last; cluster++) this.addReferences(cluster, 1);
  }

  /** `count` more references to a cluster, stopping at the refcount width like QEMU (each excess is a corruption). */
  private addReferences(cluster: number, count: number): void {
    if (cluster >= this.references.length) {
      const grown = new Uint16Array(cluster + 1);
      grown.set(this.references);
      this.references = grown;
    }
    const current = this.counted(cluster);
    const total = Math.min(this.refcountMax, current + count);
    const excess = current + count - total;
    if (excess > 0) {
      this.report('corruption', `reference count of cluster ${cluster} overflows its ${this.header.refcountBits}-bit width`, { cluster });
      if (excess > 1) this.reportCount('corruption', excess - 1);
    }
    if (total > 0xffff) this.overflow.set(cluster, total);
    else this.references[cluster] = total;
  }

  private counted(cluster: number): number {
    return this.overflow.get(cluster) ?? this.references[cluster] ?? 0;
  }

  async run(): Promise<CheckResult> {
    const h = this.header;
    if (this.tooLarge) {
      this.report('error', `the file is too large to check: ${Math.ceil(this.fileSize / this.clusterSize)} clusters, above ${maxCheckedClusters}`);
      return this.result;
    }
    this.reference(0, this.clusterSize);
    await this.checkL1(h.l1TableOffset, h.l1Size, true);
    if (h.hasExternalDataFile && this.snapshots.length > 0) {
      this.report('corruption', `${this.snapshots.length} snapshots in an image with an external data file`);
    }
    for (const [i, snapshot] of this.snapshots.entries()) {
      const what = `snapshot ${snapshot.id} (${snapshot.name})`;
      // Version 3 requires the large VM state size and the disk size in the extra data.
      if (h.version === 3 && snapshot.extraDataSize < 16) this.report('corruption', `snapshot table entry ${i} is incomplete (${snapshot.extraDataSize} bytes of extra data)`);
      if (snapshot.l1TableOffset % this.clusterSize !== 0) {
        this.report('corruption', `${what}: L1 table offset ${snapshot.l1TableOffset} is not cluster aligned`, { offset: snapshot.l1TableOffset });
        continue;
      }
      if (snapshot.l1Size * 8 > limits.maxL1Bytes) {
        this.report('corruption', `${what}: L1 table of ${snapshot.l1Size} entries is too large`);
        continue;
      }
      await this.checkL1(snapshot.l1TableOffset, snapshot.l1Size, false);
    }
    this.reference(h.snapshotsOffset, snapshotTableBytes(this.snapshots));
    this.reference(h.refcountTableOffset, h.refcountTableClusters * this.clusterSize);
    if (h.encryptionHeader) this.reference(h.encryptionHeader.offset, h.encryptionHeader.length);
    await this.checkBitmaps();
    await this.checkRefblocks();
    await this.compare();
    await this.checkCopiedFlags();
    return this.result;
  }

  private async checkL1(l1Offset: number, l1Size: number, active: boolean): Promise<void> {
    this.reference(l1Offset, l1Size * 8);
    const l1 = await this.read(l1Offset, l1Size * 8);
    for (let i = 0; i < l1Size; i++) {
      const rawHi = l1.readUInt32BE(i * 8);
      const rawLo = l1.readUInt32BE(i * 8 + 4);
      // QEMU skips only an all-zero entry: COPIED with offset 0 walks cluster 0 as a table.
      if (rawHi === 0 && rawLo === 0) continue;
      if (hasL1ReservedBits(rawHi, rawLo)) {
        this.report('corruption', `L1 entry ${i} has reserved bits set`, { offset: l1Offset + i * 8 });
      }
      const l2Offset = entryOffset(rawHi, rawLo);
      this.reference(l2Offset, this.clusterSize);
      if (l2Offset % this.clusterSize !== 0) {
        this.report('corruption', `L2 table offset ${l2Offset} is not cluster aligned; L1 entry ${i} corrupted`, { offset: l1Offset + i * 8 });
      }
      await this.checkL2(l2Offset, active);
      this.step(active ? Math.min(this.header.virtualSize, (i + 1) * this.header.l2EntryCount * this.clusterSize) : undefined);
    }
  }

  /** Between tables: stop when cancelled; the active L1's progress in guest bytes. */
  private step(guestBytesDone: number | undefined): void {
    throwIfCancelled(this.control.signal, this.path);
    if (guestBytesDone !== undefined && this.control.progress) this.control.progress.counters.dataBytes = guestBytesDone;
  }

  /**
   * Counts what one L2 table references. Each distinct table is read and walked
   * once; a table that many L1 entries point at (hostile images do that) is
   * replayed from its summary, so the check stays linear in distinct tables.
   */
  private async checkL2(l2Offset: number, active: boolean): Promise<void> {
    let summary = this.tableSummaries.get(l2Offset);
    if (!summary) {
      summary = await this.summarizeL2(l2Offset);
      remember(this.tableSummaries, l2Offset, summary);
    }
    this.replayIssues(summary);
    for (const [cluster, count] of summary.references) this.addReferences(cluster, count);
    if (active) {
      this.result.allocatedClusters += summary.allocated;
      this.result.compressedClusters += summary.compressed;
      this.result.fragmentedClusters += summary.fragmented;
    }
  }

  private async summarizeL2(l2Offset: number): Promise<TableSummary> {
    const h = this.header;
    const summary: TableSummary = { references: new Map(), issues: [], moreCorruptions: 0, allocated: 0, compressed: 0, fragmented: 0 };
    const corrupt = (message: () => string, where: { offset: number }) => {
      if (summary.issues.length < maxIssues) summary.issues.push({ kind: 'corruption', message: message(), where });
      else summary.moreCorruptions++;
    };
    const refer = (offset: number, size: number) => {
      if (offset + size - this.fileSize >= this.clusterSize) {
        corrupt(() => `reference to ${offset} (+${size} bytes) exceeds the end of the file by a cluster or more`, { offset });
        return;
      }
      const last = Math.floor((offset + size - 1) / this.clusterSize);
      for (let cluster = Math.floor(offset / this.clusterSize); cluster <= last; cluster++) {
        summary.references.set(cluster, (summary.references.get(cluster) ?? 0) + 1);
      }
    };
    const table = await this.read(l2Offset, this.clusterSize);
    const entryBytes = h.l2EntryBytes;
    let nextContiguous = 0;
    for (let i = 0; i < h.l2EntryCount; i++) {
      const at = i * entryBytes;
      const hi = table.readUInt32BE(at);
      const lo = table.readUInt32BE(at + 4);
      const bitmapAllocated = h.extendedL2 ? allocatedSubclusters(table, at) : 0;
      const bitmapZero = h.extendedL2 ? zeroSubclusters(table, at) : 0;
      const where = { offset: l2Offset + at };
      if (isCompressed(hi)) {
        if (isCopied(hi)) corrupt(() => `compressed cluster entry ${i} of the L2 table at ${l2Offset} has the COPIED flag`, where);
        if (h.hasExternalDataFile) {
          corrupt(() => `compressed cluster entry ${i} of the L2 table at ${l2Offset} in an image with an external data file`, where);
          continue;
        }
        if (bitmapAllocated !== 0 || bitmapZero !== 0) {
          corrupt(() => `compressed cluster entry ${i} of the L2 table at ${l2Offset} has a subcluster bitmap`, where);
          continue;
        }
        refer(compressedHostOffset(hi, lo, h.clusterBits), compressedByteCount(hi, lo, h.clusterBits));
        summary.allocated++;
        summary.compressed++;
        summary.fragmented++;
        continue;
      }
      if (hasL2ReservedBits(hi, lo)) {
        corrupt(() => `entry ${i} of the L2 table at ${l2Offset} has reserved bits set`, where);
      }
      const hostOffset = entryOffset(hi, lo);
      const zeroFlag = !h.extendedL2 && hasZeroFlag(lo);
      const copied = isCopied(hi);
      // As qcow2_get_cluster_type: the zero flag comes first, so offset 0 with it is a plain zero
      // cluster even with COPIED and an external data file.
      const isData = hostOffset !== 0 || (h.hasExternalDataFile && copied && !zeroFlag);
      if (!isData) {
        if (h.extendedL2 && bitmapAllocated !== 0) {
          corrupt(() => `unallocated cluster entry ${i} of the L2 table at ${l2Offset} has allocated subclusters`, where);
        }
        continue; // unallocated or plain zero
      }
      if (h.extendedL2 && (bitmapAllocated & bitmapZero) !== 0) {
        corrupt(() => `invalid subcluster bitmap in entry ${i} of the L2 table at ${l2Offset}`, where);
      }
      if (hostOffset % this.clusterSize !== 0) {
        const preallocated = h.extendedL2 ? bitmapAllocated === 0 : zeroFlag;
        corrupt(() => `${preallocated ? 'preallocated' : 'data'} cluster offset ${hostOffset} is not cluster aligned; entry ${i} of the L2 table at ${l2Offset} corrupted`, where);
      }
      summary.allocated++;
      if (nextContiguous !== 0 && hostOffset !== nextContiguous) summary.fragmented++;
      nextContiguous = hostOffset + this.clusterSize;
      if (!h.hasExternalDataFile) refer(hostOffset, this.clusterSize);
    }
    return summary;
  }

  private async checkBitmaps(): Promise<void> {
    // Only while the autoclear bit says the bitmaps are consistent (parseHeader leaves them out
    // otherwise). What QEMU refuses to open, the check cannot run on either (exit 1): parseHeader
    // and parseBitmapDirectory refuse it, as checkBitmapTable refuses the table of a consistent bitmap.
    const bitmaps = this.header.bitmaps;
    if (!bitmaps) return;
    const { clusterSize, virtualSize } = this.header;
    this.reference(bitmaps.directoryOffset, bitmaps.directorySize);
    const directory = await this.read(bitmaps.directoryOffset, bitmaps.directorySize);
    for (const entry of parseBitmapDirectory(directory, bitmaps, clusterSize, virtualSize, this.path)) {
      this.reference(entry.tableOffset, entry.tableSize * 8);
      const table = await this.read(entry.tableOffset, entry.tableSize * 8);
      if (!entry.inUse) checkBitmapTable(table, entry, clusterSize, virtualSize, this.path);
      for (let i = 0; i < entry.tableSize; i++) {
        const dataOffset = readEntryOffset(table, i * 8);
        if (dataOffset > 1) this.reference(dataOffset, this.clusterSize);
      }
    }
  }

  private async checkRefblocks(): Promise<void> {
    const h = this.header;
    const entries = (h.refcountTableClusters * this.clusterSize) / 8;
    const raw = await this.read(h.refcountTableOffset, entries * 8);
    this.reftable = new Float64Array(entries);
    const clusters = Math.ceil(this.fileSize / this.clusterSize);
    for (let i = 0; i < entries; i++) {
      const hi = raw.readUInt32BE(i * 8);
      const lo = raw.readUInt32BE(i * 8 + 4);
      const offset = refcountBlockOffset(hi, lo);
      this.reftable[i] = offset;
      if (hasRefcountTableReservedBits(lo)) {
        this.report('corruption', `refcount table entry ${i} has reserved bits set`, { offset: h.refcountTableOffset + i * 8 });
        continue;
      }
      if (offset === 0) continue;
      if (offset % this.clusterSize !== 0) {
        this.report('corruption', `refcount block ${i} is not cluster aligned; refcount table entry corrupted`, { offset: h.refcountTableOffset + i * 8 });
        continue;
      }
      const cluster = offset / this.clusterSize;
      if (cluster >= clusters) {
        this.report('corruption', `refcount block ${i} is outside the image`, { offset: h.refcountTableOffset + i * 8 });
        continue;
      }
      this.reference(offset, this.clusterSize);
      if (this.counted(cluster) !== 1) {
        this.report('corruption', `refcount block ${i} (cluster ${cluster}) is referenced ${this.counted(cluster)} times`, { cluster });
      }
    }
  }

  /** The stored refcount of a cluster, or undefined when it cannot be read (an unaligned refblock). */
  private async stored(cluster: number): Promise<number | undefined> {
    const bits = this.header.refcountBits;
    const perBlock = (this.clusterSize * 8) / bits;
    const index = Math.floor(cluster / perBlock);
    if (index >= this.reftable.length) return 0;
    const blockOffset = this.reftable[index]!;
    if (blockOffset === 0) return 0;
    if (blockOffset % this.clusterSize !== 0) return undefined;
    let block = this.refblockCache.get(blockOffset);
    if (!block) {
      block = await this.read(blockOffset, this.clusterSize);
      if (this.refblockCache.size > 64) this.refblockCache.clear();
      this.refblockCache.set(blockOffset, block);
    }
    return readRefcount(block, cluster % perBlock, bits);
  }

  private async compare(): Promise<void> {
    let highest = 0;
    for (let cluster = 0; cluster < this.references.length; cluster++) {
      if (cluster % 65536 === 0) this.step(undefined);
      const stored = await this.stored(cluster);
      if (stored === undefined) {
        this.report('error', `cannot get the refcount of cluster ${cluster}: its refcount block is not cluster aligned`, { cluster });
        continue;
      }
      const counted = this.counted(cluster);
      if (stored > 0 || counted > 0) highest = cluster;
      if (stored === counted) continue;
      if (stored < counted) this.report('corruption', `cluster ${cluster} refcount=${stored} reference=${counted}`, { cluster, offset: cluster * this.clusterSize });
      else this.report('leak', `leaked cluster ${cluster} refcount=${stored} reference=${counted}`, { cluster, offset: cluster * this.clusterSize });
    }
    this.result.imageEndOffset = (highest + 1) * this.clusterSize;
  }

  /** COPIED must say "refcount is 1" in the active L1 and the L2 tables it reaches. */
  private async checkCopiedFlags(): Promise<void> {
    const h = this.header;
    const l1 = await this.read(h.l1TableOffset, h.l1Size * 8);
    for (let i = 0; i < h.l1Size; i++) {
      const l1Hi = l1.readUInt32BE(i * 8);
      const l2Offset = entryOffset(l1Hi, l1.readUInt32BE(i * 8 + 4));
      if (l2Offset === 0) continue;
      const l2Refcount = await this.stored(Math.floor(l2Offset / this.clusterSize));
      if (l2Refcount === undefined) continue;
      if ((l2Refcount === 1) !== isCopied(l1Hi)) {
        // qemu-img's words for it.
        this.report('corruption', `OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${l1.readBigUInt64BE(i * 8).toString(16)} refcount=${l2Refcount}`, { offset: h.l1TableOffset + i * 8 });
      }
      let copied = this.copiedSummaries.get(l2Offset);
      if (!copied) {
        copied = await this.summarizeCopied(l2Offset);
        remember(this.copiedSummaries, l2Offset, copied);
      }
      this.replayIssues(copied);
    }
  }

  private async summarizeCopied(l2Offset: number): Promise<IssueSummary> {
    const h = this.header;
    const table = await this.read(l2Offset, this.clusterSize);
    const summary: IssueSummary = { issues: [], moreCorruptions: 0 };
    for (let j = 0; j < h.l2EntryCount; j++) {
      const at = j * h.l2EntryBytes;
      const hi = table.readUInt32BE(at);
      const lo = table.readUInt32BE(at + 4);
      if (isCompressed(hi)) continue;
      const dataOffset = entryOffset(hi, lo);
      const copied = isCopied(hi);
      const isData = dataOffset !== 0 || (h.hasExternalDataFile && copied);
      if (!isData) continue;
      const refcount = h.hasExternalDataFile ? 1 : await this.stored(Math.floor(dataOffset / this.clusterSize));
      if (refcount === undefined) continue;
      if ((refcount === 1) !== copied) {
        // Each listed, as qemu-img lists them.
        if (summary.issues.length < maxIssues) summary.issues.push({ kind: 'corruption', message: `OFLAG_COPIED data cluster: l2_entry=${table.readBigUInt64BE(at).toString(16)} refcount=${refcount}`, where: { offset: l2Offset + at } });
        else summary.moreCorruptions++;
      }
    }
    return summary;
  }
}

/**
 * Checks the consistency of a qcow2 image like `qemu-img check`.
 * Resolves with the counts; rejects only when the image cannot be opened at all.
 * `options.region`: the image is bytes [offset, offset + length) of the file (a member of an uncompressed tar).
 * `options.forceShare`: check even while a running VM holds the image, as `qemu-img check -U`.
 * `options.signal`: stop between tables (CANCELLED); `options.onProgress`: phase 'check', the
 * guest bytes whose tables were walked, about every 250 ms, then 'done'.
 *
 * @example
 * const result = await check('disk.qcow2');
 * process.exitCode = checkExitCode(result);
 */
export async function check(
  path: string,
  options: {
    /** The image is bytes [offset, offset + length) of the file (a member of an uncompressed tar). */
    region?: { offset: number; length: number };
    /** Check even while a running VM holds the image, as `qemu-img check -U`. */
    forceShare?: boolean;
    /** Stops the check between tables; the promise rejects with CANCELLED. */
    signal?: AbortSignal;
    /** Called about every 250 ms (phase 'check': guest bytes whose tables were walked), then once with 'done'. */
    onProgress?: ProgressCallback;
    /** Headers, retries and timeouts for an http(s) image. */
    http?: HttpOptions;
  } = {},
): Promise<CheckResult> {
  throwIfCancelled(options.signal, path);
  const remote = isUrl(path);
  let handle: fs.FileHandle;
  try {
    if (isUrl(path)) {
      // A remote image: read through its block cache, named without its query string.
      const file = await openChainFile(path, 'image', { region: options.region }, options);
      handle = file.handle;
      path = file.path;
    } else handle = await fs.open(path, 'r');
  } catch (error) {
    throw ioError(error, isUrl(path) ? shownUrl(path) : path, 'cannot open the image');
  }
  try {
    const stats = await handle.stat().catch((error: unknown) => {
      throw ioError(error, path, 'cannot open the image');
    });
    // As open() says it: a folder or a character device is refused before it is read.
    if (!remote && !stats.isFile() && !stats.isBlockDevice()) throw new Qcow2Error('NOT_A_REGULAR_FILE', `image is ${stats.isDirectory() ? 'a folder' : 'not a regular file or block device'}`, { path });
    // A remote file has no lock to take: nothing on this host writes it.
    if (!remote) await lockAsQemu(handle.fd, path, options.forceShare ? 'shared-read' : 'read');
    const wholeFile = stats.size;
    const base = options.region?.offset ?? 0;
    const fileSize = options.region?.length ?? wholeFile;
    if (base + fileSize > wholeFile) throw new Qcow2Error('TRUNCATED', `image region at ${base} (+${fileSize} bytes) runs past the end of the file`, { path, offset: base });
    // Past the end of the file, cluster 0 reads as zeros, as QEMU reads it.
    const start = Buffer.alloc(fileSize >= 24 ? headerReadSize : fileSize);
    await handle.read(start, 0, Math.min(fileSize, headerReadSize), base);
    const header = parseHeader(start, path, fileSize, { forCheck: true });
    if (header.refcountBits > 64) throw new Qcow2Error('BAD_REFCOUNT_ORDER', 'refcount width above 64 bits', { path });
    let snapshots: Qcow2Snapshot[] = [];
    if (header.snapshotCount > 0) {
      // Past the end of the file the table reads as zeros, as QEMU reads it.
      const size = snapshotTableReadSize(header, fileSize, true);
      const table = Buffer.alloc(size);
      const available = Math.max(0, Math.min(size, fileSize - header.snapshotsOffset));
      if (available > 0) await handle.read(table, 0, available, base + header.snapshotsOffset);
      snapshots = parseSnapshotTable(table, header, path);
    }
    const checker = new Checker(handle, path, fileSize, header, snapshots, base);
    const counters = new JobCounters();
    const sampler = options.onProgress ? new ProgressSampler(counters, header.virtualSize, options.onProgress) : undefined;
    checker.control = { ...(options.signal ? { signal: options.signal } : {}), ...(sampler ? { progress: { counters, sampler } } : {}) };
    sampler?.start('check');
    try {
      const result = await checker.run();
      counters.dataBytes = header.virtualSize;
      sampler?.emit('done');
      return result;
    } finally {
      sampler?.stop();
    }
  } finally {
    await handle.close();
  }
}

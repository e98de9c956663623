/**
 * The qcow2 file a capture writes, as it is laid out: cluster 0 kept for the header, the data
 * clusters the native jobs store, each group's L2 tables after its data, then L1, the
 * refcount table and blocks, and the header last, all under a temporary name renamed when
 * complete. Layout reference: docs/formats/qcow2.md ("What capture writes").
 */
import { constants as fsConstants } from 'node:fs';
import * as fs from 'node:fs/promises';
import { ioError } from '../errors';
import { PendingFile } from '../files';
import { native } from '../native';
import { encodeCompressedEntry, encodeDataEntry, encodeL1Entry, encodeRefcountTableEntry, encodeZeroEntry, writeRefcount } from '../qcow2/entries';
import { compressedClusters, encodeHeaderCluster, type HeaderFields, refcountLayout, WRITTEN_REFCOUNT_BITS } from '../qcow2/writer';

/** The header's fields but the table offsets, known only at the end. */
export type HeaderStart = Omit<HeaderFields, 'l1TableOffset' | 'refcountTableOffset' | 'refcountTableClusters'>;

/** What one cluster became, as the native job reports it (first of its three result numbers). */
const enum Stored {
  Unset = 0,
  Zero = 1,
  Data = 2,
}

export class CaptureOutput {
  /** The next free byte: cluster 0 is the header, written last. */
  position: number;
  readonly counts = { dataClusters: 0, compressedClusters: 0, zeroClusters: 0 };
  private readonly clusterSize: number;
  private readonly l1: number[];
  /** Host clusters touched by compressed streams, with how many streams touch each. */
  private touches = new Uint16Array(1024);
  private allocatedEnd = 0;
  private allocateRefused = false;

  private constructor(
    private readonly file: PendingFile,
    /** The output opened again with O_DIRECT, for uncompressed data (whole clusters). */
    readonly direct: { handle: fs.FileHandle; alignment: number } | undefined,
    private header: HeaderStart,
  ) {
    this.clusterSize = 2 ** header.clusterBits;
    this.position = this.clusterSize;
    this.l1 = new Array<number>(header.l1Size).fill(0);
  }

  /** Creates the file under its temporary name; `direct` asks for the O_DIRECT descriptor too. */
  static async create(path: string, header: HeaderStart, direct: boolean): Promise<CaptureOutput> {
    const file = await PendingFile.create(
      path,
      { create: 'cannot create the output file', flush: 'cannot flush the image', rename: 'cannot rename the finished image into place' },
      (temporary) => fs.open(temporary, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o644),
    );
    // Uncompressed data is whole clusters: written with O_DIRECT it reaches the disk
    // while the source is still being read, instead of all at the final fdatasync.
    const handle = direct ? await fs.open(file.temporary, fsConstants.O_WRONLY | fsConstants.O_DIRECT).catch(() => undefined) : undefined;
    const alignment = handle ? Math.max(native().directIoAlignment(handle.fd), 4096) : 0;
    if (handle && alignment > 2 ** header.clusterBits) await handle.close();
    const usable = handle && alignment <= 2 ** header.clusterBits ? { handle, alignment } : undefined;
    return new CaptureOutput(file, usable, header);
  }

  get fd(): number {
    return this.file.handle.fd;
  }

  /**
   * Before a batch of `clusters`: ext4 serialises direct writes that extend a file or fill
   * holes, while direct writes into allocated blocks run side by side. So the most the batch
   * can store is allocated first, and what stays unused is cut off at the end.
   */
  reserve(clusters: number): void {
    const end = this.position + clusters * this.clusterSize;
    if (!this.direct || this.allocateRefused || end <= this.allocatedEnd) return;
    // Refused (no fallocate on this filesystem): the writes work, only slower.
    if (native().allocate(this.fd, this.allocatedEnd, end - this.allocatedEnd) === 0) this.allocatedEnd = end;
    else this.allocateRefused = true;
  }

  /**
   * One L2 table from the native results of its clusters (three numbers each: what was
   * stored, host offset, compressed bytes), written after the data when any entry is used.
   */
  async addTable(tableIndex: number, results: Float64Array): Promise<void> {
    const table = Buffer.alloc(this.clusterSize);
    let used = false;
    for (let i = 0; i < results.length / 3; i++) {
      const kind = results[i * 3]!;
      if (kind === Stored.Unset) continue;
      used = true;
      table.writeBigUInt64BE(this.entryOf(kind, results[i * 3 + 1]!, results[i * 3 + 2]!), i * 8);
    }
    if (!used) return;
    this.position = this.alignUp(this.position);
    await this.writeAt(table, this.position);
    this.l1[tableIndex] = this.position;
    this.position += this.clusterSize;
  }

  /**
   * A disk read from a stream of unknown length: its size, and with it the L1 table's, is
   * known only at the stream's end, before `finish` (L1 and the header are written last).
   */
  setSize(virtualSize: number, l1Size: number): void {
    this.header = { ...this.header, virtualSize, l1Size };
    this.l1.length = Math.max(this.l1.length, l1Size);
  }

  /** Writes L1, the refcounts and the header, and renames the file into place. Returns the file's size. */
  async finish(): Promise<number> {
    const l1Offset = await this.writeL1();
    const refcounts = await this.writeRefcounts((l1Offset + this.alignUp(this.header.l1Size * 8)) / this.clusterSize);
    const fileSize = refcounts.totalClusters * this.clusterSize;
    // Cuts what was allocated and not used.
    if (this.allocatedEnd > 0) await this.file.handle.truncate(fileSize).catch(this.failed('cannot cut the image to size'));
    await this.closeDirect();
    const header = encodeHeaderCluster({ ...this.header, l1TableOffset: l1Offset, refcountTableOffset: refcounts.tableOffset, refcountTableClusters: refcounts.tableClusters });
    // The header last, after everything it points to is on the disk.
    await this.file.flush();
    await this.writeAt(header, 0);
    await this.file.commit();
    return fileSize;
  }

  /** Closes and removes an unfinished output. */
  async abandon(): Promise<void> {
    await this.closeDirect();
    await this.file.abandon();
  }

  private entryOf(kind: number, host: number, bytes: number): bigint {
    if (kind === Stored.Zero) {
      this.counts.zeroClusters++;
      return encodeZeroEntry(); // hides the backing file
    }
    if (kind === Stored.Data) {
      this.counts.dataClusters++;
      return encodeDataEntry(host, true);
    }
    const [firstTouched, lastTouched] = compressedClusters(this.clusterSize, host, bytes);
    for (let c = firstTouched; c <= lastTouched; c++) this.touch(c);
    this.counts.compressedClusters++;
    return encodeCompressedEntry(this.header.clusterBits, host, bytes);
  }

  private touch(cluster: number): void {
    if (cluster >= this.touches.length) {
      const grown = new Uint16Array(Math.max(cluster + 1, this.touches.length * 2));
      grown.set(this.touches);
      this.touches = grown;
    }
    this.touches[cluster]! += 1;
  }

  private async writeL1(): Promise<number> {
    const l1Offset = this.alignUp(this.position);
    const l1Buffer = Buffer.alloc(this.alignUp(this.header.l1Size * 8));
    this.l1.forEach((offset, i) => {
      if (offset !== 0) l1Buffer.writeBigUInt64BE(encodeL1Entry(offset, true), i * 8);
    });
    await this.writeAt(l1Buffer, l1Offset);
    return l1Offset;
  }

  /** The refcount table and blocks from cluster `firstFree` on, which count themselves. */
  private async writeRefcounts(firstFree: number): Promise<{ tableOffset: number; tableClusters: number; totalClusters: number }> {
    const bits = WRITTEN_REFCOUNT_BITS;
    const layout = refcountLayout(firstFree, this.clusterSize, bits);
    const tableOffset = firstFree * this.clusterSize;
    const blocksOffset = tableOffset + layout.tableClusters * this.clusterSize;
    const entriesPerBlock = (this.clusterSize * 8) / bits;
    const refcountTable = Buffer.alloc(layout.tableClusters * this.clusterSize);
    for (let block = 0; block < layout.blockCount; block++) {
      const buffer = Buffer.alloc(this.clusterSize);
      for (let i = 0; i < entriesPerBlock; i++) {
        const cluster = block * entriesPerBlock + i;
        if (cluster >= layout.totalClusters) break;
        // Every cluster up to the end is in use once, except those holding compressed streams.
        writeRefcount(buffer, i, bits, cluster < this.touches.length && this.touches[cluster]! > 0 ? this.touches[cluster]! : 1);
      }
      const blockOffset = blocksOffset + block * this.clusterSize;
      await this.writeAt(buffer, blockOffset);
      refcountTable.writeBigUInt64BE(encodeRefcountTableEntry(blockOffset), block * 8);
    }
    await this.writeAt(refcountTable, tableOffset);
    return { tableOffset, tableClusters: layout.tableClusters, totalClusters: layout.totalClusters };
  }

  private async closeDirect(): Promise<void> {
    await this.direct?.handle.close().catch(() => {});
  }

  private alignUp(value: number): number {
    return Math.ceil(value / this.clusterSize) * this.clusterSize;
  }

  private async writeAt(buffer: Buffer, at: number): Promise<void> {
    await this.file.handle.write(buffer, 0, buffer.length, at).catch(this.failed('cannot write the image'));
  }

  private failed(what: string): (error: unknown) => never {
    return (error) => {
      throw ioError(error, this.file.target, what);
    };
  }
}

/**
 * An opened qcow2 image with its backing chain: info, allocation map, reads.
 */
import { Readable } from 'node:stream';
import { Qcow2Error } from '../errors';
import { dataRanges, seekOf } from '../files';
import type { HttpOptions } from '../http/client';
import { prefetchPlan } from '../http/prefetch';
import { jobError } from '../jobs';
import { Codec, type NativeCopyJob, type NativePlan, type NativeSource, native, planRunFields, PlanKind } from '../native';
import { type CompressionType, encryptedError } from './header';
import { type Layer, type LayerRun, type OpenFile, Qcow2Layer } from './layers';
import type { EncryptionInfo } from './luks';
import type { PathPolicy } from './paths';

/** How `open` reads an image: which snapshot, which external files it may follow, locks. */
export interface OpenOptions extends PathPolicy {
  /** Read the disk as it was at this internal snapshot (id or name). */
  snapshot?: string;
  /** Deepest backing chain accepted (default 32). */
  maxChainDepth?: number;
  /** Called with warnings (corrupt bit, probed backing format); default: ignored. */
  onWarning?: (message: string) => void;
  /**
   * The image is bytes [offset, offset + length) of the file (a member of an
   * uncompressed tar). Such an image cannot name backing or data files.
   */
  region?: {
    /** Byte of the file where the image starts. */
    offset: number;
    /** Bytes of the image. */
    length: number;
  };
  /**
   * Open only to describe the image (`info`): encrypted images are accepted, and
   * every read, map or copy of one refuses with ENCRYPTED. Default: refused at open.
   */
  metadataOnly?: boolean;
  /**
   * Read even while another process (a running VM) may write the files, as `qemu-img -U`:
   * QEMU's locks are taken shared. Default: refused with LOCKED while one holds them.
   */
  forceShare?: boolean;
  /**
   * For http(s) images: request headers (tokens), timeouts, retries, connections. Headers are
   * sent to the image's own origin only, never to a backing file's on another origin.
   */
  http?: HttpOptions;
  /**
   * Finds the backing file named by the image at `depth` of the chain (0 = the image itself)
   * instead of looking the name up as a path: the disks of a snapshot chain whose links are
   * archives, each disk a file or a byte range of its archive. Names are checked by the
   * resolver, so images opened as regions may name backing files. @internal
   */
  backingOf?: BackingResolver;
}

/** @internal */
export type BackingResolver = (depth: number, name: string) => Promise<{ path: string; region?: { offset: number; length: number } }>;

export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  /** ISO 8601 time the snapshot was taken. */
  date: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  icount: number;
  virtualSize: number;
}

export interface ImageInfo {
  format: 'qcow2' | 'raw';
  filename: string;
  /** qcow2 version: 2 (compat 0.10) or 3 (compat 1.1). */
  version?: 2 | 3;
  virtualSize: number;
  clusterSize?: number;
  /** Bytes in the image file. */
  fileSize: number;
  /** Bytes the image file occupies on disk (qemu-img's actual-size); undefined for an http(s) image, whose server does not say. */
  allocatedBytes?: number;
  compressionType?: CompressionType;
  extendedL2?: boolean;
  refcountBits?: number;
  lazyRefcounts?: boolean;
  dirty?: boolean;
  corrupt?: boolean;
  encrypted?: boolean;
  /** How it is encrypted, as qemu-img info describes it (only from open with metadataOnly). */
  encryption?: EncryptionInfo;
  backingFile?: string;
  /** The backing file as resolved against the image's folder. */
  fullBackingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw?: boolean;
  snapshots?: SnapshotInfo[];
}

/** One run of the allocation map, as `qemu-img map --output=json` reports it. */
export interface MapEntry {
  start: number;
  length: number;
  /** Index in the backing chain of the file that decided this range (0 = the image). */
  depth: number;
  /** Allocated in some file of the chain (qemu-img's "present"). */
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Host offset in the file at `depth`, where one exists (not for compressed clusters). */
  offset?: number;
  /** The file holding the bytes at `offset`. */
  filename?: string;
}

/** A run of the guest disk resolved through the backing chain. */
export interface ResolvedRun extends LayerRun {
  depth: number;
  present: boolean;
}

/** Which bytes `createReadStream` reads, as `fs.createReadStream` takes them. */
export interface ReadStreamOptions {
  /** First guest byte (default 0). */
  start?: number;
  /** Last guest byte, inclusive as in `fs.createReadStream` (default: the disk's last byte). */
  end?: number;
  /** Bytes read from the image at a time (default 4 MiB). */
  highWaterMark?: number;
}

/** qcow2's compression_type (header.ts names it) as the native codec. */
const compressionCodec = { zlib: Codec.Deflate, zstd: Codec.Zstd } as const;

export class Image {
  /** @internal */
  constructor(
    readonly path: string,
    /** @internal */ readonly layers: readonly Layer[],
    readonly info: ImageInfo,
    /** Info for each backing file, nearest first. */
    readonly backingChain: readonly ImageInfo[],
    /** Opened without its backing file (openToDescribe): described, never read. @internal */
    private readonly withoutBacking = false,
  ) {}

  private closed = false;
  /** Reads, maps and copy jobs in flight, which close() waits for. */
  private readonly operations = new Set<Promise<unknown>>();

  get virtualSize(): number {
    return this.layers[0]!.virtualSize;
  }

  /** Every file the image reads from (image, backing files, data files). @internal */
  get files(): readonly OpenFile[] {
    const files: OpenFile[] = [];
    for (const layer of this.layers) {
      files.push(layer.file);
      if (layer instanceof Qcow2Layer && layer.dataFile) files.push(layer.dataFile);
    }
    return files;
  }

  private check(): void {
    if (this.closed) throw new Qcow2Error('CLOSED', 'image is closed', { path: this.path });
  }

  /** ENCRYPTED, naming the file, when a layer is encrypted (opened with metadataOnly). @internal */
  checkReadable(): void {
    if (this.withoutBacking) {
      throw new Qcow2Error('INVALID_ARGUMENT', 'the image was opened only to be described: its backing file was not opened, so its disk cannot be read', { path: this.path });
    }
    const encrypted = this.layers.find((layer): layer is Qcow2Layer => layer instanceof Qcow2Layer && layer.header.encryption !== undefined);
    if (encrypted) throw encryptedError(encrypted.header.encryption!, encrypted.file.path);
  }

  /**
   * Runs an operation close() must wait for: native jobs use the layers' descriptors by
   * number, and a table read cut off by close() would fail with an I/O error, not CLOSED.
   */
  private tracked<T>(work: () => Promise<T>): Promise<T> {
    let running: Promise<T>;
    try {
      this.check();
      running = work();
    } catch (error) {
      return Promise.reject(error);
    }
    this.operations.add(running);
    const forget = () => this.operations.delete(running);
    running.then(forget, forget);
    return running;
  }

  /** The runs of guest [start, end), each resolved to the file and depth that decides it. @internal */
  async resolve(start: number, end: number): Promise<ResolvedRun[]> {
    this.check();
    // Every read, map and copy comes through here: an image opened only to describe it stops.
    this.checkReadable();
    const out: ResolvedRun[] = [];
    await this.resolveAt(0, Math.max(0, start), Math.min(end, this.virtualSize), out);
    return out;
  }

  private async resolveAt(depth: number, start: number, end: number, out: ResolvedRun[]): Promise<void> {
    if (start >= end) return;
    const layer = this.layers[depth]!;
    const runs: LayerRun[] = [];
    await layer.status(start, end, runs);
    const backing = this.layers[depth + 1];
    for (const run of runs) {
      if (run.kind !== 'unallocated') {
        // status() made this object for this call: completed in place, not copied (a 2 GiB
        // compressed image resolves to 32768 runs, and copies showed in profiles).
        const resolved = run as ResolvedRun;
        resolved.depth = depth;
        resolved.present = true;
        out.push(resolved);
        continue;
      }
      const runEnd = run.start + run.length;
      // QEMU: unallocated with no backing file, or past its end, reads as zeros here.
      const insideBacking = backing ? Math.min(runEnd, backing.virtualSize) : run.start;
      if (backing && run.start < insideBacking) await this.resolveAt(depth + 1, run.start, insideBacking, out);
      const zeroFrom = Math.max(run.start, insideBacking);
      if (zeroFrom < runEnd) {
        // Unallocated subclusters of an allocated cluster keep its host offset in the map, as in QEMU.
        const host = run.file ? { file: run.file, hostOffset: run.hostOffset + (zeroFrom - run.start) } : { hostOffset: 0 };
        out.push({ start: zeroFrom, length: runEnd - zeroFrom, kind: 'zero', ...host, compressedBytes: 0, clusterStart: 0, depth, present: false });
      }
    }
  }

  /** The allocation map, with the same run boundaries as `qemu-img map --output=json`. */
  extents(): Promise<MapEntry[]> {
    return this.tracked(() => this.extentsNow());
  }

  private async extentsNow(): Promise<MapEntry[]> {
    const entries: MapEntry[] = [];
    // 16 L2 tables a step: the runs of a step are held at once, one a cluster where clusters
    // are compressed (131072 with 64 KiB clusters), so the step bounds the memory.
    const step = 16 * this.mapStep();
    for (let start = 0; start < this.virtualSize; start += step) {
      for (const run of await this.resolve(start, Math.min(this.virtualSize, start + step))) {
        for (const entry of await this.mapEntries(run)) appendMapEntry(entries, entry);
      }
    }
    return entries;
  }

  /**
   * Map entries of one run. For an image QEMU takes for preallocation=metadata, qemu-img map
   * asks the file about data clusters: holes and bytes past its end read as zeros (data and zero).
   */
  private async mapEntries(run: ResolvedRun): Promise<MapEntry[]> {
    return (await this.splitOverHoles(run)).map(({ piece, hole }) => {
      const entry = toMapEntry(piece);
      if (hole) entry.zero = true;
      return entry;
    });
  }

  /**
   * A data run cut where its file has holes, for images QEMU takes for
   * preallocation=metadata (clusters allocated, never written); other runs whole.
   */
  private async splitOverHoles(run: ResolvedRun): Promise<{ piece: ResolvedRun; hole: boolean }[]> {
    const layer = this.layers[run.depth];
    if (run.kind !== 'data' || !run.file || !(layer instanceof Qcow2Layer) || !(await layer.metadataPreallocated())) return [{ piece: run, hole: false }];
    // metadataPreallocated() is false for an image inside an archive: file offsets are the image's here.
    const pieces: { piece: ResolvedRun; hole: boolean }[] = [];
    const end = run.hostOffset + run.length;
    let host = run.hostOffset;
    const piece = (to: number, hole: boolean) => {
      if (to > host) pieces.push({ piece: { ...run, start: run.start + (host - run.hostOffset), length: to - host, hostOffset: host }, hole });
      host = Math.max(host, to);
    };
    // Past the end of the file: a hole too.
    for (const [from, to] of dataRanges(seekOf(run.file.handle.fd), run.hostOffset, Math.min(end, run.file.size))) {
      piece(from, true);
      piece(to, false);
    }
    piece(end, true);
    return pieces;
  }

  /**
   * The runs a copy of [start, end) needs: as `resolve`, with data clusters that
   * a preallocated image never wrote (holes of its file) turned into zero runs,
   * so that a load leaves them as holes instead of writing zeros.
   * @internal
   */
  copyRuns(start: number, end: number): Promise<ResolvedRun[]> {
    return this.tracked(() => this.copyRunsNow(start, end));
  }

  private async copyRunsNow(start: number, end: number): Promise<ResolvedRun[]> {
    const runs = await this.resolve(start, end);
    this.preallocatedDepths ??= Promise.all(this.layers.map((l) => (l instanceof Qcow2Layer ? l.metadataPreallocated() : false)));
    const preallocated = await this.preallocatedDepths;
    if (!preallocated.includes(true)) return runs;
    const out: ResolvedRun[] = [];
    for (const run of runs) {
      if (run.kind !== 'data' || !preallocated[run.depth]) {
        out.push(run);
        continue;
      }
      for (const { piece, hole } of await this.splitOverHoles(run)) {
        out.push(hole ? { ...piece, kind: 'zero', hostOffset: 0, compressedBytes: 0, clusterStart: 0 } : piece);
      }
    }
    return out;
  }

  /** Which layers QEMU takes for preallocation=metadata, by depth; asked once. */
  private preallocatedDepths: Promise<boolean[]> | undefined;

  /** Guest bytes covered by one L2 table of the top image: the natural unit of work. */
  private mapStep(): number {
    const top = this.layers[0]!;
    if (top instanceof Qcow2Layer) return top.header.l2EntryCount * top.header.clusterSize;
    return 64 * 1024 * 1024;
  }

  /**
   * Reads guest bytes at `offset` into `buffer` (all of it, or up to the virtual
   * size); resolves to the number of bytes read. Native threads write into `buffer`
   * until the promise settles: do not transfer its ArrayBuffer meanwhile.
   */
  read(buffer: Buffer | Uint8Array, offset: number): Promise<number> {
    return this.tracked(() => this.readNow(buffer, offset));
  }

  private async readNow(buffer: Buffer | Uint8Array, offset: number): Promise<number> {
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new Qcow2Error('INVALID_ARGUMENT', `read offset ${offset} is not a non-negative integer`, { path: this.path });
    }
    const end = Math.min(this.virtualSize, offset + buffer.length);
    if (end <= offset) return 0;
    const runs = await this.resolve(offset, end);
    const target = Buffer.isBuffer(buffer) ? buffer : Buffer.from(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    const plan = this.plan(runs);
    const fetched = prefetchPlan(this.files, plan);
    try {
      await this.runCopy({
        runs: plan.runs,
        sources: await fetched.ready,
        memory: target.subarray(0, end - offset),
        memoryGuestOffset: offset,
        threads: Math.min(4, Math.max(1, Math.ceil((end - offset) / (1 << 20)))),
      });
    } finally {
      fetched.release();
    }
    return end - offset;
  }

  /**
   * A readable stream of guest bytes `start` to `end`, both included (as `fs.createReadStream`):
   * `{ start: 0, end: 511 }` is the first sector. Zero ranges read as zeros.
   */
  createReadStream(options: ReadStreamOptions = {}): Readable {
    const image = this;
    for (const key of ['start', 'end'] as const) {
      const value = options[key];
      if (value !== undefined && (!Number.isSafeInteger(value) || value < 0)) {
        throw new Qcow2Error('INVALID_ARGUMENT', `createReadStream ${key} ${value} is not a non-negative integer`, { path: this.path });
      }
    }
    const start = options.start ?? 0;
    // Exclusive from here on.
    const end = Math.min(options.end !== undefined ? options.end + 1 : this.virtualSize, this.virtualSize);
    const chunk = options.highWaterMark ?? 4 * 1024 * 1024;
    let position = start;
    return new Readable({
      highWaterMark: chunk,
      read() {
        if (position >= end) {
          this.push(null);
          return;
        }
        const buffer = Buffer.allocUnsafe(Math.min(chunk, end - position));
        image.read(buffer, position).then(
          (n) => {
            position += n;
            this.push(buffer.subarray(0, n));
          },
          (error: unknown) => this.destroy(error as Error),
        );
      },
    });
  }

  /**
   * Turns resolved runs into the native copy plan: 7 numbers a run, zeros merged,
   * data from one file merged where host offsets continue.
   * @internal
   */
  plan(runs: readonly ResolvedRun[]): NativePlan {
    const files = this.files;
    const sourceIndex = new Map<OpenFile, number>(files.map((f, i) => [f, i]));
    const codecOf = new Map<OpenFile, { codec: Codec; clusterSize: number }>();
    for (const layer of this.layers) {
      if (layer instanceof Qcow2Layer) {
        codecOf.set(layer.file, { codec: compressionCodec[layer.header.compressionType], clusterSize: layer.header.clusterSize });
      }
    }
    const sources = files.map((f) => ({ fd: f.handle.fd, base: f.base, size: f.size, codec: codecOf.get(f)?.codec ?? Codec.None, clusterSize: codecOf.get(f)?.clusterSize ?? 512 }));
    // A data run may end past its file's end: up to two plan runs each.
    const out = new Float64Array(runs.length * 2 * planRunFields);
    let count = 0;
    const add = (start: number, length: number, kind: number, source: number, hostOffset: number, compressedBytes: number, offsetInCluster: number) => {
      if (count > 0) {
        const last = (count - 1) * planRunFields;
        const lastEnd = out[last]! + out[last + 1]!;
        const continues =
          lastEnd === start &&
          out[last + 2] === kind &&
          (kind === PlanKind.Zero || (kind === PlanKind.Data && out[last + 3] === source && out[last + 4]! + out[last + 1]! === hostOffset));
        if (continues) {
          out[last + 1]! += length;
          return;
        }
      }
      const at = count * planRunFields;
      out.set([start, length, kind, source, hostOffset, compressedBytes, offsetInCluster], at);
      count++;
    };
    for (const run of runs) {
      const kind = run.kind === 'data' ? PlanKind.Data : run.kind === 'compressed' ? PlanKind.Compressed : PlanKind.Zero;
      if (kind === PlanKind.Zero) {
        add(run.start, run.length, kind, 0, 0, 0, 0);
        continue;
      }
      const source = sourceIndex.get(run.file!)!;
      if (kind === PlanKind.Compressed) {
        // QEMU reads zeros there, which do not decompress (map reports such a cluster; reading it fails).
        if (run.hostOffset >= run.file!.size) {
          throw new Qcow2Error('BAD_COMPRESSED_CLUSTER', `compressed cluster at guest offset ${run.clusterStart} points at ${run.hostOffset}, beyond the end of the file`, {
            path: run.file!.path,
            offset: run.hostOffset,
          });
        }
        add(run.start, run.length, kind, source, run.hostOffset, run.compressedBytes, run.start - run.clusterStart);
        continue;
      }
      // Data past the end of its file reads as zeros, as QEMU reads it (bdrv_aligned_preadv):
      // a truncated image, or a cluster that points past the end.
      const inside = Math.max(0, Math.min(run.length, run.file!.size - run.hostOffset));
      if (inside > 0) add(run.start, inside, kind, source, run.hostOffset, 0, 0);
      if (inside < run.length) add(run.start + inside, run.length - inside, PlanKind.Zero, 0, 0, 0, 0);
    }
    return { runs: out.subarray(0, count * planRunFields), sources };
  }

  /** Runs a native copy job and turns its failure into a Qcow2Error naming the file. @internal */
  runCopy(job: NativeCopyJob, targetPath?: string): Promise<void> {
    // Once close() has begun, no new job: the descriptors in its plan are being closed.
    return this.tracked(() =>
      native().copy(job).catch((error: unknown) => {
        throw jobError('copy', error, { path: this.path, sources: this.files, ...(targetPath !== undefined ? { target: targetPath } : {}) });
      }),
    );
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([...this.operations]);
    for (const layer of this.layers) await layer.close();
  }
}

export function toMapEntry(run: ResolvedRun): MapEntry {
  const entry: MapEntry = {
    start: run.start,
    length: run.length,
    depth: run.depth,
    present: run.present,
    zero: run.kind === 'zero' || run.kind === 'zeroAllocated',
    data: run.kind === 'data' || run.kind === 'compressed',
  };
  if (run.kind !== 'compressed' && run.file) {
    entry.offset = run.hostOffset;
    entry.filename = run.file.path;
  }
  return entry;
}

/** qemu-img map merges runs that agree in every field and continue in the host file. */
export function appendMapEntry(entries: MapEntry[], entry: MapEntry): void {
  const last = entries[entries.length - 1];
  if (
    last &&
    last.start + last.length === entry.start &&
    last.depth === entry.depth &&
    last.present === entry.present &&
    last.zero === entry.zero &&
    last.data === entry.data &&
    last.filename === entry.filename &&
    (last.offset === undefined ? entry.offset === undefined : entry.offset === last.offset + last.length)
  ) {
    last.length += entry.length;
    return;
  }
  entries.push(entry);
}

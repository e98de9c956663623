/**
 * `capture`: a raw disk (file or block device) back into a qcow2 image that QEMU
 * trusts. Native workers read, drop zero clusters (holes of a sparse file are not
 * even read) and clusters equal to a base image, and compress; this module lays
 * out the file (./layout.ts): data first, then L2 tables, L1, refcount structures, and
 * the header last, all under a temporary name that is renamed when complete.
 */
import { constants as fsConstants, type Stats } from 'node:fs';
import * as fs from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import * as os from 'node:os';
import * as nodePath from 'node:path';
import { Qcow2Error, ioError } from '../errors';
import { holeUnits, openToRead, type Seek, seekOf } from '../files';
import { JobCounters, jobError, ProgressSampler, threadCount, type ProgressCallback } from '../jobs';
import { limits } from '../limits';
import { holdLocks, lockAsQemu } from '../locks';
import { Codec, native } from '../native';
import type { Image, OpenOptions } from '../qcow2/image';
import { open } from '../qcow2/open';
import { encodeHeaderCluster } from '../qcow2/writer';
import { CaptureOutput, type HeaderStart } from './layout';

/** The qcow2 image `capture` writes: cluster size, compression, version, base; and the run's threads, progress and cancel. */
export interface CaptureOptions extends Omit<OpenOptions, 'snapshot' | 'metadataOnly' | 'region' | 'backingOf'> {
  /** Compress clusters (zlib = raw deflate as QEMU writes it). Default: none. */
  compress?: 'zlib' | 'zstd';
  /**
   * Compression level: zlib 0-3 (ISA-L's levels: fastest, about 6% larger than qemu-img's
   * output), 4 (default: ISA-L's 3, then zlib's 5 on the clusters ISA-L left at 59-82% of
   * their size; at most 5% larger, about 1.7x ISA-L's CPU) or 5-9 (zlib's own: 6 matches qemu-img's size at zlib's
   * speed); zstd -7 to 19 (default 1).
   */
  level?: number;
  /** 512 B to 2 MiB, a power of two (default 64 KiB). */
  clusterSize?: number;
  /** qcow2 compatibility level: '1.1' (version 3, default) or '0.10' (version 2). */
  compat?: '0.10' | '1.1';
  /** Store only clusters that differ from this image, which becomes the backing file. */
  backing?: string;
  /** Format of the backing file (default: probed between qcow2 and raw). */
  backingFormat?: 'qcow2' | 'raw';
  /** Replace an existing output file. */
  overwrite?: boolean;
  /**
   * The disk's size in bytes when the source is a stream (a pipe such as /dev/stdin): the
   * stream must hold exactly that many bytes. Default: read to the stream's end. Ignored for
   * files and devices, whose size is known.
   */
  size?: number;
  /** Native worker threads, 1 to 64 (default: 4 a CPU, at least 8). */
  threads?: number;
  /** Called about every 250 ms with the guest bytes captured so far, and once at the end. */
  onProgress?: ProgressCallback;
  /** Stops the capture at the next batch; nothing is left under the output's name. */
  signal?: AbortSignal;
}

/**
 * What the library's own callers pass besides CaptureOptions; not part of the API.
 * @internal
 */
export interface CaptureHooks {
  /** The backing file (qcow2) is bytes [offset, offset + length) of `backing` (a disk in a snapshot tar). */
  backingRegion?: OpenOptions['region'];
  /** Finds the backing file's own backing files (a snapshot chain that holds archives). */
  backingOf?: OpenOptions['backingOf'];
  /**
   * The name the image records for its backing file, instead of the backing file's path relative
   * to the output's folder: where the parent's disk lies once the snapshot archives are unpacked.
   */
  backingName?: string;
}

export interface CaptureResult {
  output: string;
  virtualSize: number;
  fileSize: number;
  dataClusters: number;
  compressedClusters: number;
  zeroClusters: number;
  seconds: number;
}

/**
 * Guest bytes per native job. Each job ends with its workers draining one by one, so fewer,
 * larger jobs keep the disk and the cores busier (3% on an uncompressed 2 GiB capture); with a
 * base image the job's base bytes are read into one buffer, which keeps that case smaller.
 */
const batchBytes = 256 * 1024 * 1024;
const batchBytesWithBase = 64 * 1024 * 1024;
/** A stream is read into a staging file one batch at a time: this bounds the memory it takes. */
const batchBytesFromStream = 32 * 1024 * 1024;
const codecs = { none: Codec.None, zlib: Codec.Deflate, zstd: Codec.Zstd } as const;

/** What the capture compares with: qcow2 (through the reader) or raw. */
interface BaseReader {
  read(buffer: Buffer, offset: number): Promise<void>;
  close(): Promise<void>;
  /** Every file it reads (a qcow2 base's whole chain), to refuse an output that is one of them. */
  files: { device: number; inode: number }[];
}


/** The base a capture compares with, and the header fields that name it. */
interface Backing {
  reader: BaseReader;
  format: 'qcow2' | 'raw';
}

/** A base given without its format: qcow2 when it starts with the qcow2 magic, else raw. */
async function probeFormat(path: string, options: OpenOptions): Promise<'qcow2' | 'raw'> {
  const handle = await openToRead(path, 'cannot open the backing file');
  let detected: 'qcow2' | 'raw';
  try {
    const magic = Buffer.alloc(4);
    await handle.read(magic, 0, 4, 0);
    detected = magic.readUInt32BE(0) === 0x514649fb ? 'qcow2' : 'raw';
  } catch (error) {
    throw ioError(error, path, 'cannot read the backing file');
  } finally {
    await handle.close();
  }
  // A raw disk can start with a qcow2 header its guest wrote: say what was guessed.
  options.onWarning?.(`${path}: backing format not given; probed as ${detected} (pass --backing-format to be sure)`);
  return detected;
}

async function openBase(path: string, format: 'qcow2' | 'raw' | undefined, options: OpenOptions & CaptureHooks): Promise<Backing> {
  const detected = format ?? (await probeFormat(path, options));
  if (detected === 'raw') return { format: detected, reader: await rawBase(path, options) };
  const { backingRegion, backingName: _name, ...openOptions } = options;
  const image: Image = await open(path, { ...openOptions, ...(backingRegion ? { region: backingRegion } : {}), metadataOnly: false });
  return {
    format: detected,
    reader: {
      async read(buffer, offset) {
        const n = await image.read(buffer, offset);
        buffer.fill(0, n);
      },
      close: () => image.close(),
      files: image.files.map((f) => ({ device: f.device, inode: f.inode })),
    },
  };
}

async function rawBase(path: string, options: OpenOptions): Promise<BaseReader> {
  const handle = await openToRead(path, 'cannot open the backing file');
  const stats = await lockAsQemu(handle.fd, path, options.forceShare ? 'shared-read' : 'read')
    .then(() => handle.stat())
    .catch(async (error) => {
      await handle.close();
      throw ioError(error, path, 'cannot read the backing file');
    });
  return {
    async read(buffer, offset) {
      let done = 0;
      while (done < buffer.length) {
        const { bytesRead } = await handle.read(buffer, done, buffer.length - done, offset + done).catch((error) => {
          throw ioError(error, path, 'cannot read the backing file');
        });
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      buffer.fill(0, done);
    },
    close: () => handle.close(),
    files: [{ device: stats.dev, inode: stats.ino }],
  };
}

/**
 * The backing file's name as the image stores it: relative to the image's folder, so a folder
 * of images can move as one. Taken between real paths (a folder reached through a link would
 * make a wrong "../"), and with "./" before a first part holding ':', which QEMU would read as
 * a protocol.
 */
async function backingName(outputPath: string, backing: string): Promise<string> {
  const real = async (p: string) => fs.realpath(p).catch(() => nodePath.resolve(p));
  const relative = nodePath.relative(await real(nodePath.dirname(outputPath)), await real(backing));
  return relative.split(nodePath.sep)[0]!.includes(':') ? `.${nodePath.sep}${relative}` : relative;
}

/**
 * Opens options.backing and adds its name and format to the header, encoded once now so that a
 * name the header cluster cannot hold is refused before anything is written.
 */
async function openBacking(outputPath: string, existing: Stats | undefined, header: HeaderStart, options: CaptureOptions & CaptureHooks): Promise<{ base: Backing; header: HeaderStart }> {
  const backing = options.backing!;
  if (options.backingRegion && options.backingFormat !== 'qcow2') throw new Qcow2Error('INVALID_ARGUMENT', 'a backing file inside an archive must be qcow2', { path: backing });
  const base = await openBase(nodePath.resolve(backing), options.backingFormat, options);
  try {
    if (existing && base.reader.files.some((f) => f.device === existing.dev && f.inode === existing.ino)) {
      throw new Qcow2Error('TARGET_IS_SOURCE', 'output is the backing file (or in its chain): it would be replaced by an image over itself', { path: outputPath });
    }
    const backingFile = options.backingName ?? (await backingName(outputPath, backing));
    const withBacking = { ...header, backingFile, backingFormat: base.format };
    try {
      encodeHeaderCluster({ ...withBacking, l1TableOffset: 0, refcountTableOffset: 0, refcountTableClusters: 1 });
    } catch {
      throw new Qcow2Error('INVALID_ARGUMENT', `the backing file's name (${Buffer.byteLength(backingFile)} bytes) does not fit in a ${2 ** header.clusterBits}-byte header cluster; use larger clusters or a shorter path`, { path: outputPath });
    }
    return { base, header: withBacking };
  } catch (error) {
    await base.reader.close().catch(() => {});
    throw error;
  }
}

/** The options, checked: cluster geometry, format version, codec and level, threads. */
interface Settings {
  clusterBits: number;
  clusterSize: number;
  version: 2 | 3;
  codec: Codec;
  level: number;
  threads: number;
}

function validate(options: CaptureOptions, output: string): Settings {
  const clusterSize = options.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw new Qcow2Error('INVALID_ARGUMENT', `cluster size ${clusterSize} is not a power of two from 512 to 2097152`, { path: output });
  }
  const version = options.compat === '0.10' ? 2 : 3;
  if (version === 2 && options.compress === 'zstd') {
    throw new Qcow2Error('INVALID_ARGUMENT', 'zstd compression needs compat 1.1 (qcow2 version 3)', { path: output });
  }
  // zstd 1 is about twice as fast as 3 for a few percent more bytes; capture is on the critical path of a snapshot.
  const level = options.level ?? (options.compress === 'zstd' ? 1 : 4);
  const range = options.compress === 'zstd' ? [-7, 19] : [0, 9];
  if (options.compress && (!Number.isInteger(level) || level < range[0]! || level > range[1]!)) {
    throw new Qcow2Error('INVALID_ARGUMENT', `${options.compress} level ${level} is outside ${range[0]}..${range[1]}`, { path: output });
  }
  return { clusterBits, clusterSize, version, codec: codecs[options.compress ?? 'none'], level, threads: threadCount(options.threads, output) };
}

/** The disk read, locked against writers to the end: a running VM would make the image a mix of two moments. */
interface Source {
  path: string;
  handle: fs.FileHandle;
  /** A regular file's holes, which are not read. */
  seek: Seek | undefined;
  /** Bytes of the disk; -1 for a stream read to its end. */
  size: number;
  /** A pipe: read in order, a batch at a time, through a staging file the native engine can pread. */
  stream?: StreamSource;
  /** O_DIRECT unit of `handle`, 0 when buffered. */
  alignment: number;
  device: number;
  inode: number;
  close(): Promise<void>;
}

async function openSource(path: string, clusterSize: number, options: CaptureOptions): Promise<Source> {
  const stats = await fs.stat(path).catch((error) => {
    throw ioError(error, path, 'cannot open the source');
  });
  if (stats.isFIFO() || stats.isSocket() || stats.isCharacterDevice()) return openStream(path, stats, options);
  if (!stats.isFile() && !stats.isBlockDevice()) {
    throw new Qcow2Error('NOT_A_REGULAR_FILE', `source is ${stats.isDirectory() ? 'a folder' : 'neither a regular file nor a block device'}`, { path });
  }
  const locks = await holdLocks(path, options.forceShare ? 'shared-read' : 'read');
  let handle: fs.FileHandle | undefined;
  try {
    let direct = stats.isBlockDevice();
    handle = await fs.open(path, fsConstants.O_RDONLY | (direct ? fsConstants.O_DIRECT : 0)).catch((error) => {
      if (!direct) throw ioError(error, path, 'cannot open the source');
      direct = false;
      return fs.open(path, 'r');
    });
    const size = stats.isBlockDevice() ? native().blockDeviceInfo(handle.fd).sizeBytes : stats.size;
    let alignment = direct ? native().blockDeviceInfo(handle.fd).logicalBlockSize : 0;
    if (alignment > clusterSize) {
      // Clusters smaller than the device's sector cannot be read with O_DIRECT one by one.
      await handle.close();
      handle = await fs.open(path, 'r');
      alignment = 0;
    }
    const opened = handle;
    const close = async () => {
      await opened.close().catch(() => {});
      await locks.close().catch(() => {});
    };
    return { path, handle: opened, seek: stats.isFile() ? seekOf(opened.fd) : undefined, size, alignment, device: stats.dev, inode: stats.ino, close };
  } catch (error) {
    await handle?.close().catch(() => {});
    await locks.close().catch(() => {});
    throw error;
  }
}

/**
 * A stream (a pipe, /dev/stdin): read in order into a staging file of one batch, which the
 * native engine reads with pread as it reads a file. The staging file is made in /dev/shm
 * (memory, as a memfd would be) where there is one, else in the system's temporary folder,
 * and unlinked at once: nothing is left behind, and it never holds more than one batch.
 */
class StreamSource {
  /** Bytes read from the stream so far. */
  bytesRead = 0;
  ended = false;
  private readonly buffer: Buffer;

  private constructor(
    private readonly path: string,
    private readonly input: fs.FileHandle,
    readonly staging: fs.FileHandle,
    batchBytes: number,
  ) {
    this.buffer = Buffer.allocUnsafe(batchBytes);
  }

  static async open(path: string, input: fs.FileHandle, batchBytes: number): Promise<StreamSource> {
    const folders = ['/dev/shm', os.tmpdir()];
    let lastError: unknown;
    for (const folder of folders) {
      const name = nodePath.join(folder, `.qcow2img-capture-${process.pid}-${randomBytes(4).toString('hex')}`);
      try {
        const staging = await fs.open(name, 'wx+', 0o600);
        await fs.unlink(name).catch(() => {});
        return new StreamSource(path, input, staging, batchBytes);
      } catch (error) {
        lastError = error;
      }
    }
    throw ioError(lastError, path, 'cannot make a staging file to read the stream through');
  }

  /** Reads up to `length` bytes of the stream into the staging file at 0; returns how many (fewer at the end). */
  async next(length: number): Promise<number> {
    let done = 0;
    while (done < length && !this.ended) {
      const { bytesRead } = await this.input.read(this.buffer, done, length - done, null).catch((error) => {
        throw ioError(error, this.path, 'cannot read the source');
      });
      if (bytesRead === 0) this.ended = true;
      done += bytesRead;
    }
    this.bytesRead += done;
    if (done > 0) {
      await this.staging.write(this.buffer, 0, done, 0).catch((error) => {
        throw ioError(error, this.path, 'cannot write the staging file');
      });
    }
    return done;
  }

  /** True when the stream holds no more bytes (reads one byte to see). */
  async atEnd(): Promise<boolean> {
    if (this.ended) return true;
    const { bytesRead } = await this.input.read(this.buffer, 0, 1, null).catch((error) => {
      throw ioError(error, this.path, 'cannot read the source');
    });
    if (bytesRead === 0) this.ended = true;
    return bytesRead === 0;
  }

  async close(): Promise<void> {
    await this.staging.close().catch(() => {});
    await this.input.close().catch(() => {});
  }
}

async function openStream(path: string, stats: Stats, options: CaptureOptions): Promise<Source> {
  if (options.size !== undefined && (!Number.isSafeInteger(options.size) || options.size <= 0)) {
    throw new Qcow2Error('INVALID_ARGUMENT', `size ${options.size} is not a whole number of bytes above 0`, { path });
  }
  const input = await openToRead(path, 'cannot open the source');
  const stream = await StreamSource.open(path, input, batchBytesFromStream).catch(async (error) => {
    await input.close();
    throw error;
  });
  return { path, handle: input, seek: undefined, size: options.size ?? -1, stream, alignment: 0, device: stats.dev, inode: stats.ino, close: () => stream.close() };
}

/** An existing output is refused unless `overwrite`, and always when it is the source itself. */
async function checkOutput(outputPath: string, source: Source, overwrite: boolean | undefined): Promise<Stats | undefined> {
  const existing = await fs.stat(outputPath).catch(() => undefined);
  if (existing && existing.dev === source.device && existing.ino === source.inode) {
    throw new Qcow2Error('TARGET_IS_SOURCE', 'output is the source itself', { path: outputPath });
  }
  if (existing && !existing.isFile()) {
    // Refused before the disk is read: the rename at the end could not replace it.
    throw new Qcow2Error('NOT_A_REGULAR_FILE', `output is ${existing.isDirectory() ? 'a folder' : 'not a regular file'}; name the image file to write`, { path: outputPath });
  }
  if (existing && !overwrite) {
    throw new Qcow2Error('TARGET_EXISTS', 'output exists; pass --overwrite (overwrite: true) to replace it', { path: outputPath });
  }
  return existing;
}

/** How the disk is cut: L2 tables, native batches, and groups (one table's span or, with small clusters, many tables). */
interface Geometry {
  virtualSize: number;
  clusterTotal: number;
  l1Size: number;
  l2EntryCount: number;
  clustersPerBatch: number;
  groupClusters: number;
}

/** `sourceSize` -1: a stream of unknown length, whose geometry sizeFromStream sets at its end. */
function geometryOf(sourceSize: number, clusterSize: number, withBase: boolean, fromStream: boolean, outputPath: string): Geometry {
  const l2EntryCount = clusterSize / 8;
  const clustersPerBatch = Math.max(1, (fromStream ? batchBytesFromStream : withBase ? batchBytesWithBase : batchBytes) / clusterSize);
  const geometry = { virtualSize: 0, clusterTotal: Infinity, l1Size: 1, l2EntryCount, clustersPerBatch, groupClusters: Math.max(l2EntryCount, clustersPerBatch) };
  if (sourceSize >= 0) setSize(geometry, sourceSize, clusterSize, outputPath);
  return geometry;
}

function setSize(geometry: Geometry, sourceSize: number, clusterSize: number, outputPath: string): void {
  // QEMU sees a raw disk in whole sectors; the image has that size.
  const virtualSize = Math.ceil(sourceSize / 512) * 512;
  const l1Size = Math.max(1, Math.ceil(virtualSize / (geometry.l2EntryCount * clusterSize)));
  if (l1Size * 8 > limits.maxL1Bytes) {
    throw new Qcow2Error('INVALID_ARGUMENT', `a ${virtualSize}-byte disk in ${clusterSize}-byte clusters needs an L1 table of ${l1Size} entries, more than QEMU opens (${limits.maxL1Bytes / 8}); use larger clusters`, { path: outputPath });
  }
  Object.assign(geometry, { virtualSize, l1Size, clusterTotal: Math.ceil(virtualSize / clusterSize) });
}

/** Everything the stages of one capture share. */
interface Run {
  settings: Settings;
  geometry: Geometry;
  source: Source;
  base: BaseReader | undefined;
  out: CaptureOutput;
  counters: JobCounters;
  outputPath: string;
}

/** Every cluster of the disk, group by group: the data from the native jobs, then the group's L2 tables. */
async function captureClusters(run: Run, onProgress: ProgressCallback | undefined): Promise<ProgressSampler> {
  const { geometry } = run;
  const sampler = new ProgressSampler(run.counters, geometry.virtualSize, onProgress);
  const results = new Float64Array(geometry.groupClusters * 3);
  const baseBuffer = run.base ? Buffer.alloc(geometry.clustersPerBatch * run.settings.clusterSize) : undefined;
  sampler.start();
  try {
    for (let groupFirst = 0; groupFirst < geometry.clusterTotal; groupFirst += geometry.groupClusters) {
      const groupCount = Math.min(geometry.groupClusters, geometry.clusterTotal - groupFirst);
      results.fill(0);
      let filled = 0;
      for (let done = 0; done < groupCount; done += geometry.clustersPerBatch) {
        const count = Math.min(geometry.clustersPerBatch, groupCount - done);
        const got = await captureBatch(run, groupFirst + done, count, results.subarray(done * 3, (done + count) * 3), baseBuffer);
        filled = done + got;
        if (got < count) break;
      }
      if (run.source.stream) await streamChecked(run);
      for (let first = 0; first < filled; first += geometry.l2EntryCount) {
        const tableClusters = Math.min(geometry.l2EntryCount, filled - first);
        await run.out.addTable((groupFirst + first) / geometry.l2EntryCount, results.subarray(first * 3, (first + tableClusters) * 3));
      }
    }
  } finally {
    sampler.stop();
  }
  sampler.emit('write');
  return sampler;
}

/**
 * After a stream's batches: a stream of unknown length that ended sets the disk's size; one
 * of a given size must hold exactly that many bytes.
 */
async function streamChecked(run: Run): Promise<void> {
  const { source, geometry, settings } = run;
  const stream = source.stream!;
  if (source.size < 0) {
    if (!stream.ended) return;
    if (stream.bytesRead === 0) throw new Qcow2Error('INVALID_ARGUMENT', 'the source stream is empty: no disk to capture', { path: source.path });
    setSize(geometry, stream.bytesRead, settings.clusterSize, run.outputPath);
    run.out.setSize(geometry.virtualSize, geometry.l1Size);
    return;
  }
  if (stream.ended && stream.bytesRead < source.size) {
    throw new Qcow2Error('INVALID_ARGUMENT', `the source stream ended after ${stream.bytesRead} bytes, before the ${source.size} bytes --size (size) gives`, { path: source.path });
  }
  if (stream.bytesRead >= source.size && !(await stream.atEnd())) {
    throw new Qcow2Error('INVALID_ARGUMENT', `the source stream holds more than the ${source.size} bytes --size (size) gives`, { path: source.path });
  }
}

/** One native job: `count` clusters from `firstCluster`, stored at the output's position. Returns the clusters captured (fewer only at a stream's end). */
async function captureBatch(run: Run, firstCluster: number, count: number, results: Float64Array, baseBuffer: Buffer | undefined): Promise<number> {
  const { settings, source, out } = run;
  let guestStart = firstCluster * settings.clusterSize;
  let sourceSize = source.size;
  let readFrom = guestStart;
  if (source.stream) {
    // The batch's bytes, staged at offset 0 of the staging file.
    const wanted = source.size < 0 ? count * settings.clusterSize : Math.min(count * settings.clusterSize, source.size - guestStart);
    const got = await source.stream.next(wanted);
    if (got < wanted || got === 0) {
      count = Math.ceil(got / settings.clusterSize);
      if (count === 0) return 0;
    }
    sourceSize = got;
    readFrom = 0;
  }
  // Clusters wholly inside holes of a sparse file are not read.
  const holes = source.seek ? holeUnits(source.seek, guestStart, count, settings.clusterSize) : undefined;
  const baseBytes = baseBuffer?.subarray(0, count * settings.clusterSize);
  if (baseBytes) await run.base!.read(baseBytes, guestStart);
  out.reserve(count);
  guestStart = readFrom;
  try {
    out.position = await native().capture({
      sourceFd: source.stream ? source.stream.staging.fd : source.handle.fd,
      sourceAlignment: source.alignment,
      sourceSize,
      guestStart,
      clusterCount: count,
      clusterSize: settings.clusterSize,
      ...(holes ? { holes } : {}),
      ...(baseBytes ? { base: baseBytes } : {}),
      zeroAsData: settings.version === 2,
      codec: settings.codec,
      level: settings.level,
      outputFd: out.fd,
      ...(out.direct ? { outputDirectFd: out.direct.handle.fd, outputDirectAlignment: out.direct.alignment } : {}),
      outputPosition: out.position,
      threads: settings.threads,
      results,
      counters: run.counters.words,
    });
  } catch (error) {
    throw jobError('capture', error, { path: run.outputPath, cancelled: 'cancelled; no image was written', source: source.path, target: run.outputPath });
  }
  return count;
}

/**
 * Captures `source` (raw file or block device) into the qcow2 file `output`.
 *
 * @example
 * await capture('/dev/vg/guest-disk', 'snapshot.qcow2', { compress: 'zstd' });
 */
export async function capture(source: string, output: string, options: CaptureOptions = {}): Promise<CaptureResult> {
  return captureWith(source, output, options);
}

/** `capture` with the hooks only the library passes. @internal */
export async function captureWith(source: string, output: string, options: CaptureOptions & CaptureHooks = {}): Promise<CaptureResult> {
  const outputPath = nodePath.resolve(output);
  if (options.signal?.aborted) throw new Qcow2Error('CANCELLED', 'cancelled before the first byte', { path: outputPath });
  const settings = validate(options, outputPath);
  const input = await openSource(nodePath.resolve(source), settings.clusterSize, options);
  const counters = new JobCounters();
  const release = counters.cancelOn(options.signal);
  let backing: { base: Backing; header: HeaderStart } | undefined;
  let out: CaptureOutput | undefined;
  try {
    const existing = await checkOutput(outputPath, input, options.overwrite);
    const geometry = geometryOf(input.size, settings.clusterSize, options.backing !== undefined, input.stream !== undefined, outputPath);
    const header: HeaderStart = { version: settings.version, clusterBits: settings.clusterBits, virtualSize: geometry.virtualSize, l1Size: geometry.l1Size, compressionType: options.compress === 'zstd' ? 'zstd' : 'zlib' };
    backing = options.backing !== undefined ? await openBacking(outputPath, existing, header, options) : undefined;
    out = await CaptureOutput.create(outputPath, backing?.header ?? header, options.compress === undefined);
    const run: Run = { settings, geometry, source: input, base: backing?.base.reader, out, counters, outputPath };
    const sampler = await captureClusters(run, options.onProgress);
    const fileSize = await out.finish();
    return { output: outputPath, virtualSize: geometry.virtualSize, fileSize, ...out.counts, seconds: sampler.elapsedSeconds() };
  } finally {
    release();
    await out?.abandon();
    await input.close();
    await backing?.base.reader.close().catch(() => {});
  }
}

/**
 * `bench`: a disk's write speed measured the way fio measures it (aligned
 * buffers of random bytes, Q writes in flight, completion latency, the final
 * fdatasync inside the timed run), and how close an image load comes to it.
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { Qcow2Error, ioError } from '../errors';
import { native } from '../native';
import { load } from '../load/index';
import { claimDevice } from '../load/target';
import { JobCounters, jobError, ProgressSampler, type ProgressCallback } from '../jobs';
import type { OpenOptions } from '../qcow2/image';
import { open } from '../qcow2/open';

/** What `bench` writes, and how (fio's words: size, block size, queue depth, pattern). */
export interface BenchOptions extends Omit<OpenOptions, 'metadataOnly' | 'region' | 'backingOf'> {
  /** Bytes to write (default 1 GiB, or the image's virtual size with `image`; a device's size caps it). */
  size?: number;
  /** Bytes per write (default 1 MiB), a multiple of 512. */
  blockSize?: number;
  /** Writes in flight (default 16). */
  queueDepth?: number;
  /** Sequential offsets (default) or random ones, as fio's rw=write and rw=randwrite. */
  pattern?: 'seq' | 'rand';
  /** Keep writing for this many seconds (wrapping around the region) instead of writing it once. */
  time?: number;
  /** O_DIRECT (default always; never = through the page cache, flushed at the end). */
  direct?: 'always' | 'never';
  /** io_uring where the kernel has it (auto, the default), required, or a thread per write in flight. */
  engine?: 'auto' | 'io_uring' | 'threads';
  /** Benchmark a mounted or in-use device anyway (never the root disk). */
  force?: boolean;
  /** Also load this image onto the same target and report its throughput beside the raw bandwidth. */
  image?: string;
  /** Called about every 250 ms with the bytes written so far. */
  onProgress?: ProgressCallback;
  /** Stops the run at the next write; files it made are removed (CANCELLED). */
  signal?: AbortSignal;
}

export interface BenchResult {
  target: string;
  bandwidthBytesPerSec: number;
  iops: number;
  latencyUs: { p50: number; p99: number; p999: number };
  bytes: number;
  seconds: number;
  blockSize: number;
  queueDepth: number;
  pattern: 'seq' | 'rand';
  direct: boolean;
  engine: 'io_uring' | 'threads';
  /** With `image`: the load of the image onto the same target. */
  load?: {
    image: string;
    virtualSize: number;
    dataBytes: number;
    seconds: number;
    /** Data bytes written per second, flush included. */
    bytesPerSec: number;
    /** bytesPerSec / bandwidthBytesPerSec. */
    ratio: number;
  };
}

const engines = { auto: 0, io_uring: 1, threads: 2 } as const;

interface BenchTarget {
  fd: number;
  size: number;
  direct: boolean;
  /** Where a load writes (the device, or a fresh file path). */
  loadPath: string;
  release(): Promise<void>;
}

async function openBenchTarget(path: string, wanted: number | undefined, options: BenchOptions): Promise<BenchTarget> {
  const stats = await fs.stat(path).catch(() => undefined);
  const directFlag = options.direct === 'never' ? 0 : fsConstants.O_DIRECT;
  if (stats?.isBlockDevice()) {
    const claimed = await claimDevice(path, stats.rdev, { force: options.force === true, direct: options.direct === 'never' ? 'never' : 'always' }, []);
    const deviceSize = native().blockDeviceInfo(claimed.handle.fd).sizeBytes;
    let released = false;
    return {
      fd: claimed.handle.fd,
      size: Math.min(wanted ?? 1024 ** 3, deviceSize),
      direct: claimed.direct,
      loadPath: path,
      async release() {
        if (released) return;
        released = true;
        await claimed.handle.close();
        await claimed.locks.close();
      },
    };
  }
  // A folder gets a file of our own inside it; a new name is created; an existing file is left alone.
  let file = path;
  if (stats?.isDirectory()) file = nodePath.join(path, `.qcow2img-bench-${process.pid}-${randomBytes(4).toString('hex')}`);
  else if (stats) throw new Qcow2Error('TARGET_EXISTS', 'bench target exists and is not a block device or folder; name a new file or a folder', { path });
  const size = wanted ?? 1024 ** 3;
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(file, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | directFlag, 0o600);
  } catch (error) {
    throw ioError(error, file, 'cannot create the bench file');
  }
  // Preallocated like fio's file (fallocate=native), so writes do not extend it.
  const err = native().allocate(handle.fd, 0, size);
  if (err !== 0) {
    await handle.close();
    await fs.unlink(file).catch(() => {});
    throw new Qcow2Error('IO_ERROR', `cannot preallocate ${size} bytes (errno ${err})`, { path: file });
  }
  // A name of our own beside it for a load: nothing there is the user's.
  const loadPath = nodePath.join(nodePath.dirname(file), `.qcow2img-bench-load-${process.pid}-${randomBytes(4).toString('hex')}`);
  let released = false;
  return {
    fd: handle.fd,
    size,
    direct: directFlag !== 0,
    loadPath,
    async release() {
      if (released) return;
      released = true;
      await handle.close().catch(() => {});
      await fs.unlink(file).catch(() => {});
      await fs.unlink(loadPath).catch(() => {});
    },
  };
}

/** The options of a raw run, checked. */
interface Settings {
  blockSize: number;
  queueDepth: number;
  pattern: 'seq' | 'rand';
}

function validate(options: BenchOptions, path: string): Settings {
  const blockSize = options.blockSize ?? 1 << 20;
  const queueDepth = options.queueDepth ?? 16;
  if (!Number.isInteger(blockSize) || blockSize < 512 || blockSize % 512 !== 0 || blockSize > 64 * 1024 * 1024) {
    throw new Qcow2Error('INVALID_ARGUMENT', `block size ${blockSize} must be a multiple of 512 up to 64 MiB`, { path });
  }
  if (!Number.isInteger(queueDepth) || queueDepth < 1 || queueDepth > 1024) {
    throw new Qcow2Error('INVALID_ARGUMENT', `queue depth ${queueDepth} must be from 1 to 1024`, { path });
  }
  // The buffers in flight: one block a slot.
  if (blockSize * queueDepth > 1024 ** 3) {
    throw new Qcow2Error('INVALID_ARGUMENT', `block size × queue depth (${blockSize * queueDepth} bytes in flight) is over 1 GiB`, { path });
  }
  if (options.time !== undefined && !(options.time > 0 && options.time <= 1e6)) {
    throw new Qcow2Error('INVALID_ARGUMENT', `time ${options.time} must be a number of seconds above 0, up to 1000000`, { path });
  }
  return { blockSize, queueDepth, pattern: options.pattern ?? 'seq' };
}

/** The raw run: whole blocks over the target (or for `time` seconds), with progress and cancel. */
async function writeRun(opened: BenchTarget, settings: Settings, options: BenchOptions, path: string): Promise<BenchResult> {
  const { blockSize, queueDepth, pattern } = settings;
  const size = Math.floor(opened.size / blockSize) * blockSize;
  if (size === 0) throw new Qcow2Error('INVALID_ARGUMENT', `target holds less than one ${blockSize}-byte block`, { path });
  const counters = new JobCounters();
  const release = counters.cancelOn(options.signal);
  const sampler = new ProgressSampler(counters, options.time ? { seconds: options.time } : size, options.onProgress);
  sampler.start();
  let raw;
  try {
    raw = await native().writeBench({
      fd: opened.fd,
      offset: 0,
      size,
      blockSize,
      queueDepth,
      random: pattern === 'rand',
      seconds: options.time ?? 0,
      engine: engines[options.engine ?? 'auto'],
      counters: counters.words,
    });
  } catch (error) {
    throw jobError('bench', error, { path });
  } finally {
    sampler.stop();
    release();
  }
  if (counters.cancelled) throw new Qcow2Error('CANCELLED', 'cancelled', { path });
  return {
    target: path,
    bandwidthBytesPerSec: raw.bytes / raw.seconds,
    iops: raw.writes / raw.seconds,
    latencyUs: { p50: raw.p50Us, p99: raw.p99Us, p999: raw.p999Us },
    bytes: raw.bytes,
    seconds: raw.seconds,
    blockSize,
    queueDepth,
    pattern,
    direct: opened.direct,
    engine: raw.engine,
  };
}

/** The load of `image` onto the same target, beside the raw bandwidth. */
async function loadRun(image: string, opened: BenchTarget, raw: BenchResult, options: BenchOptions): Promise<NonNullable<BenchResult['load']>> {
  // The load claims the device itself: ours must be let go first.
  if (opened.loadPath === raw.target) await opened.release();
  const loaded = await load(image, opened.loadPath, {
    ...options,
    direct: options.direct === 'never' ? 'never' : 'auto',
    ...(options.onProgress ? { onProgress: options.onProgress } : {}),
  });
  const bytesPerSec = loaded.dataBytes / loaded.seconds;
  return {
    image: nodePath.resolve(image),
    virtualSize: loaded.virtualSize,
    dataBytes: loaded.dataBytes,
    seconds: loaded.seconds,
    bytesPerSec,
    ratio: bytesPerSec / raw.bandwidthBytesPerSec,
  };
}

/**
 * Measures write bandwidth, IOPS and latency on `target` (a block device, a
 * folder, or a new file name; files are created and removed afterwards).
 *
 * @example
 * const result = await bench('/dev/nvme1n1', { blockSize: 1 << 20, queueDepth: 16 });
 * console.log(result.bandwidthBytesPerSec / 1e6, 'MB/s');
 */
export async function bench(target: string, options: BenchOptions = {}): Promise<BenchResult> {
  const path = nodePath.resolve(target);
  const settings = validate(options, path);
  let imageSize: number | undefined;
  if (options.image !== undefined) {
    const image = await open(options.image, { ...options, metadataOnly: false });
    imageSize = image.virtualSize;
    await image.close();
  }
  const opened = await openBenchTarget(path, options.size ?? imageSize, options);
  try {
    const result = await writeRun(opened, settings, options, path);
    if (options.image !== undefined) result.load = await loadRun(options.image, opened, result, options);
    return result;
  } finally {
    // The bench file and the load's file, whatever happened (release runs once).
    await opened.release();
  }
}

/** `load`: write an image's virtual disk onto a file, a device or a partition. */
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { Qcow2Error } from '../errors';
import { native } from '../native';
import type { Image, OpenOptions } from '../qcow2/image';
import { open } from '../qcow2/open';
import { copyImage, copyWindowSize, type CopyOptions } from './copy';
import { JobCounters, jobError, ProgressSampler, threadCount, type ProgressCallback } from '../jobs';
import { openTarget, type OpenTarget, type TargetOptions } from './target';
import { loadMany, type LoadManyResult, type LoadTarget } from './many';

export type { Progress, ProgressCallback } from '../jobs';
export type { DirectMode, TargetOptions } from './target';

/** How `load` opens the image, where and how it writes, and the copy's threads, progress and cancel. */
export interface LoadOptions extends Omit<OpenOptions, 'metadataOnly' | 'region' | 'backingOf'>, TargetOptions, CopyOptions {
  /** Read the target back (O_DIRECT) and compare with hashes taken while writing. */
  verify?: boolean;
}

/**
 * What the library's own callers and its tests pass besides LoadOptions; not part of the API.
 * @internal
 */
export interface LoadHooks {
  /** Called after the data is flushed and before it is read back (tests). */
  beforeVerify?: () => Promise<void> | void;
  /** The image is bytes [offset, offset + length) of its file (a member of a snapshot tar). */
  region?: OpenOptions['region'];
  /** Finds each backing file (the disks of a snapshot chain that holds archives). */
  backingOf?: OpenOptions['backingOf'];
}

export interface LoadResult {
  /** What was written: the file, or the device (or partition node). */
  target: string;
  kind: 'file' | 'file-region' | 'device';
  /** Target byte where the disk starts. */
  offset: number;
  virtualSize: number;
  dataBytes: number;
  zeroBytes: number;
  /** Writing and flushing, without the read-back. */
  seconds: number;
  direct: boolean;
  verified: boolean;
}

/**
 * Loads the raw virtual disk of `source` (a path or an open Image) onto `target`:
 * a regular file (made under a temporary name and renamed when complete), a block
 * device, `partition` N of a disk or disk image, or `offset` bytes into either.
 *
 * @example
 * await load('disk.qcow2', '/dev/sdb', { partition: 2, verify: true, onProgress: (p) => console.log(p.bytesDone) });
 */
export async function load(source: string | Image, target: string, options?: LoadOptions): Promise<LoadResult>;
/** Many targets (paths, or LoadTargets with their own partition or offset): the image is read and decoded once and written to each; see loadMany. */
export async function load(source: string | Image, targets: readonly (string | LoadTarget)[], options?: LoadOptions): Promise<LoadManyResult>;
export async function load(source: string | Image, target: string | readonly (string | LoadTarget)[], options: LoadOptions = {}): Promise<LoadResult | LoadManyResult> {
  if (typeof target !== 'string') return loadMany(source, target, options);
  return loadWith(source, target, options);
}

/** `load` with the hooks only the library and its tests pass. @internal */
export async function loadWith(source: string | Image, target: string, options: LoadOptions & LoadHooks = {}): Promise<LoadResult> {
  // Before anything is opened: a bad option writes nothing.
  threadCount(options.threads, nodePath.resolve(target));
  const image = typeof source === 'string' ? await open(source, { ...options, metadataOnly: false }) : source;
  try {
    // An image opened only to be described (metadataOnly) is refused before the target is touched.
    image.checkReadable();
    const opened = await openTarget(image, target, options);
    try {
      const windowSize = copyWindowSize(image, opened.alignment);
      const windowHashes = options.verify ? new BigUint64Array(Math.ceil(image.virtualSize / windowSize) * 2) : undefined;
      const copied = await copyImage(
        image,
        {
          path: opened.path,
          fd: opened.fd,
          tailFd: opened.tailFd,
          base: opened.base,
          alignment: opened.alignment,
          zeroMode: opened.zeroMode,
          preallocate: opened.preallocate,
          ...(windowHashes ? { windowHashes } : {}),
        },
        options,
      );
      options.onProgress?.({ phase: 'flush', bytesDone: image.virtualSize, bytesTotal: image.virtualSize, dataBytes: copied.dataBytes, zeroBytes: copied.zeroBytes, elapsedSeconds: copied.seconds, bytesPerSecond: 0, etaSeconds: 0 });
      const flushStart = process.hrtime.bigint();
      if (windowHashes) {
        // Verify before the rename, so a bad copy never appears under the final name.
        await opened.flush();
        await options.beforeVerify?.();
        await verifyTarget(image, opened, windowHashes, windowSize, options);
      }
      await opened.finish();
      const seconds = copied.seconds + Number(process.hrtime.bigint() - flushStart) / 1e9;
      return { target: opened.path, kind: opened.kind, offset: opened.base, virtualSize: image.virtualSize, dataBytes: copied.dataBytes, zeroBytes: copied.zeroBytes, seconds, direct: opened.direct, verified: windowHashes !== undefined };
    } catch (error) {
      await opened.abort();
      throw error;
    }
  } finally {
    if (typeof source === 'string') await image.close();
  }
}

/**
 * Reads `target` back and compares it with the hashes taken while writing. `onProgress`: phase
 * 'verify' events of the read-back (many-target loads report each target's; a single load none).
 * @internal
 */
export async function verifyTarget(image: Image, target: OpenTarget, windowHashes: BigUint64Array, windowSize: number, options: LoadOptions, onProgress?: ProgressCallback): Promise<void> {
  const reader = await target.openForVerify();
  try {
    const counters = new JobCounters();
    const release = counters.cancelOn(options.signal);
    const sampler = new ProgressSampler(counters, image.virtualSize, onProgress);
    sampler.start('verify');
    let firstBad: number;
    try {
      firstBad = await native().verify({
        fd: reader.fd,
        base: target.base,
        size: image.virtualSize,
        windowSize,
        alignment: reader.alignment,
        threads: threadCount(options.threads, target.path),
        windowHashes,
        counters: counters.words,
      });
    } catch (error) {
      throw jobError('verify', error, { path: target.path, cancelled: 'cancelled during verification; the target is written but unverified' });
    } finally {
      sampler.stop();
      release();
    }
    sampler.emit('verify');
    if (firstBad >= 0) {
      const offset = await firstDifference(image, reader.fd, target.base, firstBad * windowSize, windowSize);
      throw new Qcow2Error('VERIFY_FAILED', `verification failed: the target differs from the image at byte ${offset} of the disk (target offset ${target.base + offset})`, {
        path: target.path,
        offset: target.base + offset,
      });
    }
  } finally {
    await reader.close();
  }
}

/** The exact first differing byte inside a window whose hash did not match. */
async function firstDifference(image: Image, fd: number, base: number, windowStart: number, windowSize: number): Promise<number> {
  const length = Math.min(windowSize, image.virtualSize - windowStart);
  const expected = Buffer.alloc(length);
  await image.read(expected, windowStart);
  // Buffered read (the O_DIRECT fd needs aligned buffers): cache was dropped or bypassed.
  const actual = Buffer.alloc(length);
  const handle = await fs.open(`/proc/self/fd/${fd}`, 'r');
  try {
    await handle.read(actual, 0, length, base + windowStart);
  } finally {
    await handle.close();
  }
  for (let i = 0; i < length; i++) if (expected[i] !== actual[i]) return windowStart + i;
  return windowStart;
}

/**
 * `load IMAGE TARGET...`: the image is read and decoded once, and every window the native engine
 * fills is written to every target (copy_engine's extraTargets). Each target goes through its own
 * safety checks and locks (openTarget), its own zero mode, O_DIRECT unit and bounds, its own flush,
 * verification and rename. A target that fails stops only itself; the others finish.
 */
import * as nodePath from 'node:path';
import { Qcow2Error } from '../errors';
import { hasRemote, type Prefetch, prefetchPlan } from '../http/prefetch';
import { JobCounters, jobError, type Progress, type ProgressCallback, ProgressSampler, threadCount } from '../jobs';
import type { NativeCopyJob } from '../native';
import type { Image } from '../qcow2/image';
import { open } from '../qcow2/open';
import { copyWindowSize, plannedBatches, preallocateData } from './copy';
import { type LoadHooks, type LoadOptions, type LoadResult, verifyTarget } from './index';
import { checkPlacement, openTarget, type OpenTarget } from './target';

/** One target's outcome: its result, or the error that stopped it. */
export type TargetOutcome = { target: string; ok: true; result: LoadResult } | { target: string; ok: false; error: Qcow2Error };

/**
 * A target of loadMany with its own place: a target that gives a partition or an offset takes its
 * place from them alone (the shared `partition` and `offset` options do not apply to it); a target
 * given as a string, or without either, uses the shared ones.
 */
export interface LoadTarget {
  /** A file, a block device, or a disk or disk image with `partition` or `offset`. */
  path: string;
  /** Write into partition N (GPT or MBR) of this target. */
  partition?: number;
  /** Write starting at this byte of this target. */
  offset?: number;
}

export interface LoadManyResult {
  /** In the order the targets were given. */
  targets: TargetOutcome[];
  /** How many failed. */
  failed: number;
  virtualSize: number;
  /** Reading, decoding and writing every target, with the flushes. */
  seconds: number;
}


function asError(error: unknown, path: string): Qcow2Error {
  return error instanceof Qcow2Error ? error : new Qcow2Error('IO_ERROR', (error as Error)?.message ?? String(error), { path });
}

/** Each target as given (absolute) with the options it is opened with; every refusal made before anything is opened. */
function placeTargets(targets: readonly (string | LoadTarget)[], options: LoadOptions, imagePath: string): { name: string; options: LoadOptions }[] {
  if (targets.length === 0) throw new Qcow2Error('INVALID_ARGUMENT', 'no target given', { path: imagePath });
  const placed = targets.map((t) => {
    const name = nodePath.resolve(typeof t === 'string' ? t : t.path);
    let own: LoadOptions = options;
    if (typeof t !== 'string' && (t.partition !== undefined || t.offset !== undefined)) {
      const { partition: _partition, offset: _offset, ...shared } = options;
      own = { ...shared, ...(t.partition !== undefined ? { partition: t.partition } : {}), ...(t.offset !== undefined ? { offset: t.offset } : {}) };
    }
    threadCount(own.threads, name);
    checkPlacement(own, name);
    return { name, options: own };
  });
  const names = placed.map((p) => p.name);
  const duplicate = names.find((t, i) => names.indexOf(t) !== i);
  if (duplicate) throw new Qcow2Error('INVALID_ARGUMENT', 'the same target is named twice', { path: duplicate });
  return placed;
}

/**
 * Each target's progress events, every one naming its target: the write job's counts (shared:
 * one job writes every live target), then the target's own flush, read-back, done or failure.
 */
class TargetEvents {
  private readonly started = process.hrtime.bigint();

  constructor(
    private readonly names: readonly string[],
    private readonly callback: ProgressCallback | undefined,
    private readonly counters: JobCounters,
    private readonly size: number,
  ) {}

  /** Seconds since the load started: every target's events on one clock. */
  private elapsed(): number {
    return Number(process.hrtime.bigint() - this.started) / 1e9;
  }

  /** The write sampler's callback: each event once for every live target. */
  fanOut(live: () => number[]): ProgressCallback | undefined {
    const callback = this.callback;
    if (!callback) return undefined;
    return (p) => {
      const elapsedSeconds = this.elapsed();
      for (const i of live()) callback({ ...p, elapsedSeconds, target: this.names[i]! });
    };
  }

  /** Target i's read-back events: bytesDone counts the bytes read back; dataBytes and zeroBytes stay the write's. */
  of(i: number): ProgressCallback | undefined {
    const callback = this.callback;
    if (!callback) return undefined;
    return (p) => callback({ ...p, dataBytes: this.counters.dataBytes, zeroBytes: this.counters.zeroBytes, elapsedSeconds: this.elapsed(), target: this.names[i]! });
  }

  /** One event of target i with the write job's counts so far. */
  emit(i: number, phase: Progress['phase'], error?: Qcow2Error): void {
    if (!this.callback) return;
    const { dataBytes, zeroBytes } = this.counters;
    this.callback({
      phase,
      bytesDone: Math.min(this.size, dataBytes + zeroBytes),
      bytesTotal: this.size,
      dataBytes,
      zeroBytes,
      elapsedSeconds: this.elapsed(),
      bytesPerSecond: 0,
      etaSeconds: phase === 'done' ? 0 : undefined,
      target: this.names[i]!,
      ...(error ? { error: { code: error.code, message: error.message, ...(error.path !== undefined ? { path: error.path } : {}) } } : {}),
    });
  }
}

/** What the steps of one many-target load share. */
interface ManyLoad {
  image: Image;
  placed: { name: string; options: LoadOptions }[];
  options: LoadOptions;
  outcomes: (TargetOutcome | undefined)[];
  opened: (OpenTarget | undefined)[];
  counters: JobCounters;
  events: TargetEvents;
  /** Records target i's failure, reports it, and closes (for a new file removes) what it opened. */
  fail(i: number, error: unknown): Promise<void>;
  live(): number[];
}

/**
 * Loads `source` onto every one of `targets` (files, devices; strings share the `partition` and
 * `offset` options, a LoadTarget may give its own). Resolves with each target's outcome; rejects
 * only when the image cannot be read (or the load is cancelled), for then no target can be
 * finished. `onProgress` receives events naming their `target`: the first of each target comes in
 * the order the targets were given; phase 'failed' says why one stopped.
 *
 * @example
 * const { targets, failed } = await loadMany('disk.qcow2', ['/dev/sdb', { path: 'disk.img', partition: 2 }], { verify: true });
 */
export async function loadMany(source: string | Image, targets: readonly (string | LoadTarget)[], options: LoadOptions = {}): Promise<LoadManyResult> {
  const placed = placeTargets(targets, options, typeof source === 'string' ? source : source.path);
  const image = typeof source === 'string' ? await open(source, { ...options, metadataOnly: false }) : source;
  const counters = new JobCounters();
  const many: ManyLoad = {
    image,
    placed,
    options,
    outcomes: placed.map(() => undefined),
    opened: placed.map(() => undefined),
    counters,
    events: new TargetEvents(
      placed.map((p) => p.name),
      options.onProgress,
      counters,
      image.virtualSize,
    ),
    async fail(i, error) {
      const failure = asError(error, placed[i]!.name);
      this.outcomes[i] = { target: this.opened[i]?.path ?? placed[i]!.name, ok: false, error: failure };
      this.events.emit(i, 'failed', failure);
      const target = this.opened[i];
      this.opened[i] = undefined;
      await target?.abort().catch(() => {});
    },
    live() {
      return this.opened.flatMap((t, i) => (t ? [i] : []));
    },
  };
  const started = process.hrtime.bigint();
  try {
    image.checkReadable();
    await openAll(many);
    await writeAll(many);
  } catch (error) {
    for (const target of many.opened) await target?.abort().catch(() => {});
    throw error;
  } finally {
    if (typeof source === 'string') await image.close();
  }
  const done = many.outcomes.map((o, i) => o ?? { target: placed[i]!.name, ok: false as const, error: new Qcow2Error('IO_ERROR', 'not written', { path: placed[i]!.name }) });
  return { targets: done, failed: done.filter((o) => !o.ok).length, virtualSize: image.virtualSize, seconds: Number(process.hrtime.bigint() - started) / 1e9 };
}

/** Opens the targets one at a time: a device claimed by one target is then seen by the next one's checks. */
async function openAll(many: ManyLoad): Promise<void> {
  for (let i = 0; i < many.placed.length; i++) {
    try {
      many.opened[i] = await openTarget(many.image, many.placed[i]!.name, many.placed[i]!.options);
      many.events.emit(i, 'write');
    } catch (error) {
      await many.fail(i, error);
    }
  }
}

/** The copy to every live target, then each target's flush, verification and rename. */
async function writeAll(many: ManyLoad): Promise<void> {
  const { image, opened, counters, options } = many;
  const live = many.live();
  const windowSize = Math.max(...live.map((i) => copyWindowSize(image, opened[i]!.alignment)), copyWindowSize(image, 0));
  const windowHashes = options.verify ? new BigUint64Array(Math.ceil(image.virtualSize / windowSize) * 2) : undefined;
  const sampler = new ProgressSampler(counters, image.virtualSize, many.events.fanOut(() => many.live()));
  const release = counters.cancelOn(options.signal);
  sampler.start();
  try {
    if (live.length > 0) await copyToAll(image, opened, (i, error) => many.fail(i, error), counters, windowSize, windowHashes, options);
  } finally {
    sampler.stop();
    release();
  }
  sampler.emit('write');
  const copySeconds = sampler.elapsedSeconds();
  // Each target on its own: a failure here stops only that target.
  await Promise.all(many.live().map((i) => finishTarget(many, i, windowHashes, windowSize, copySeconds)));
}

/** Flushes, verifies (with `windowHashes`) and finishes target i, recording its outcome. */
async function finishTarget(many: ManyLoad, i: number, windowHashes: BigUint64Array | undefined, windowSize: number, copySeconds: number): Promise<void> {
  const { image, counters, options } = many;
  const target = many.opened[i]!;
  const flushStart = process.hrtime.bigint();
  try {
    many.events.emit(i, 'flush');
    if (windowHashes) {
      await target.flush();
      // Tests reach the hook through loadWith's options; it is not part of the public type.
      await (options as LoadOptions & LoadHooks).beforeVerify?.();
      await verifyTarget(image, target, windowHashes, windowSize, options, many.events.of(i));
    }
    await target.finish();
    const seconds = copySeconds + Number(process.hrtime.bigint() - flushStart) / 1e9;
    many.outcomes[i] = {
      target: target.path,
      ok: true,
      result: { target: target.path, kind: target.kind, offset: target.base, virtualSize: image.virtualSize, dataBytes: counters.dataBytes, zeroBytes: counters.zeroBytes, seconds, direct: target.direct, verified: windowHashes !== undefined },
    };
    many.opened[i] = undefined;
    many.events.emit(i, 'done');
  } catch (error) {
    await many.fail(i, error);
  }
}

/** Preallocates the span's data ranges in the targets that preallocate (new files written with O_DIRECT, not on tmpfs). */
function preallocateNewFiles(targets: readonly OpenTarget[], runs: Float64Array, size: number): void {
  for (const t of targets) {
    if (t.preallocate) preallocateData({ path: t.path, fd: t.fd, base: t.base, alignment: t.alignment, zeroMode: t.zeroMode }, runs, size);
  }
}

/** The batches of the copy, each one native job writing every live target. */
async function copyToAll(
  image: Image,
  opened: (OpenTarget | undefined)[],
  fail: (index: number, error: unknown) => Promise<void>,
  counters: JobCounters,
  windowSize: number,
  windowHashes: BigUint64Array | undefined,
  options: LoadOptions,
): Promise<void> {
  const size = image.virtualSize;
  const remote = hasRemote(image.files);
  const liveTargets = () => opened.flatMap((t, i) => (t ? [i] : []));
  const incomplete = () => new Qcow2Error('CANCELLED', 'cancelled; the targets are incomplete', { path: image.path });
  // The job running and the targets it writes; the next batch is planned (and fetched) meanwhile.
  let pending: { job: Promise<(object | null)[]>; live: number[]; fetched: Prefetch | undefined } | undefined;
  let fetching: Prefetch | undefined;
  const settle = async () => {
    if (!pending) return;
    const { job, live, fetched } = pending;
    pending = undefined;
    try {
      const failures = await job;
      for (let k = 0; k < live.length; k++) {
        const failure = failures[k];
        if (failure && opened[live[k]!]) await fail(live[k]!, jobError('copy', failure, { path: image.path, sources: image.files, target: opened[live[k]!]!.path }));
      }
    } finally {
      fetched?.release();
    }
  };
  try {
    for await (const { plan, spanRuns } of plannedBatches(image, remote, windowSize)) {
      fetching = remote ? prefetchPlan(image.files, plan, options.signal) : undefined;
      await settle();
      const live = liveTargets();
      if (live.length === 0 || counters.cancelled) break;
      // No job runs here (settled above).
      if (spanRuns) preallocateNewFiles(live.map((i) => opened[i]!), spanRuns, size);
      // Still `fetching` while it is awaited: a failed fetch is released with the others below.
      const sources = fetching ? await fetching.ready : plan.sources;
      const fetched = fetching;
      fetching = undefined;
      const [first, ...rest] = live.map((i) => opened[i]!);
      const job: NativeCopyJob & { extraTargets: object[] } = {
        runs: plan.runs,
        sources,
        targetFd: first!.fd,
        targetTailFd: first!.tailFd,
        targetBase: first!.base,
        limitStart: first!.base,
        limitEnd: first!.base + size,
        alignment: first!.alignment,
        zeroMode: first!.zeroMode,
        extraTargets: rest.map((t) => ({ fd: t.fd, tailFd: t.tailFd, base: t.base, limitStart: t.base, limitEnd: t.base + size, alignment: t.alignment, zeroMode: t.zeroMode })),
        threads: threadCount(options.threads, first!.path),
        windowSize,
        counters: counters.words,
        ...(windowHashes ? { windowHashes, hashedSize: size } : {}),
      };
      const running = image.runCopy(job, first!.path) as unknown as Promise<(object | null)[]>;
      running.catch(() => {});
      pending = { job: running, live, fetched };
    }
    await settle();
    if (counters.cancelled) throw incomplete();
  } catch (error) {
    // Stop the running job and wait: the caller closes the descriptors it writes by number next.
    counters.cancel();
    await pending?.job.catch(() => {});
    pending?.fetched?.release();
    await fetching?.ready.catch(() => {});
    // A fetch cut by the signal says "cancelled": what matters to the user is the targets.
    throw error instanceof Qcow2Error && error.code === 'CANCELLED' ? incomplete() : error;
  } finally {
    fetching?.release();
  }
}

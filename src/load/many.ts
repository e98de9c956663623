/**
 * `load IMAGE TARGET...`: the image is read and decoded once, and every window the native engine
 * fills is written to every target (copy_engine's extraTargets). Each target goes through its own
 * safety checks and locks (openTarget), its own zero mode, O_DIRECT unit and bounds, its own flush,
 * verification and rename. A target that fails stops only itself; the others finish.
 */
import * as nodePath from 'node:path';
import { Qcow2Error } from '../errors';
import { hasRemote, type Prefetch, prefetchPlan } from '../http/prefetch';
import { JobCounters, jobError, ProgressSampler, threadCount } from '../jobs';
import type { NativeCopyJob } from '../native';
import type { Image } from '../qcow2/image';
import { open } from '../qcow2/open';
import { batchGuestBytes, copyWindowSize, preallocateData } from './copy';
import { type LoadHooks, type LoadOptions, type LoadResult, verifyTarget } from './index';
import { openTarget, type OpenTarget } from './target';

/** One target's outcome: its result, or the error that stopped it. */
export type TargetOutcome = { target: string; ok: true; result: LoadResult } | { target: string; ok: false; error: Qcow2Error };

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

/**
 * Loads `source` onto every one of `targets` (files, devices; the same partition/offset options
 * for each). Resolves with each target's outcome; rejects only when the image cannot be read (or
 * the load is cancelled), for then no target can be finished.
 *
 * @example
 * const { targets, failed } = await loadMany('disk.qcow2', ['/dev/sdb', '/dev/sdc'], { verify: true });
 */
export async function loadMany(source: string | Image, targets: readonly string[], options: LoadOptions = {}): Promise<LoadManyResult> {
  if (targets.length === 0) throw new Qcow2Error('INVALID_ARGUMENT', 'no target given', { path: typeof source === 'string' ? source : source.path });
  const resolved = targets.map((t) => nodePath.resolve(t));
  for (const t of resolved) threadCount(options.threads, t);
  const duplicate = resolved.find((t, i) => resolved.indexOf(t) !== i);
  if (duplicate) throw new Qcow2Error('INVALID_ARGUMENT', 'the same target is named twice', { path: duplicate });
  const image = typeof source === 'string' ? await open(source, { ...options, metadataOnly: false }) : source;
  const outcomes: (TargetOutcome | undefined)[] = targets.map(() => undefined);
  const opened: (OpenTarget | undefined)[] = targets.map(() => undefined);
  const fail = async (index: number, error: unknown) => {
    outcomes[index] = { target: opened[index]?.path ?? resolved[index]!, ok: false, error: asError(error, resolved[index]!) };
    const target = opened[index];
    opened[index] = undefined;
    await target?.abort().catch(() => {});
  };
  const started = process.hrtime.bigint();
  try {
    image.checkReadable();
    // One at a time: a device claimed by one target is then seen by the next one's checks.
    for (let i = 0; i < targets.length; i++) {
      try {
        opened[i] = await openTarget(image, targets[i]!, options);
      } catch (error) {
        await fail(i, error);
      }
    }
    const live = () => opened.flatMap((t, i) => (t ? [i] : []));
    const windowSize = Math.max(...live().map((i) => copyWindowSize(image, opened[i]!.alignment)), copyWindowSize(image, 0));
    const windowHashes = options.verify ? new BigUint64Array(Math.ceil(image.virtualSize / windowSize) * 2) : undefined;
    const counters = new JobCounters();
    const sampler = new ProgressSampler(counters, image.virtualSize, options.onProgress);
    const release = counters.cancelOn(options.signal);
    sampler.start();
    try {
      if (live().length > 0) await copyToAll(image, opened, fail, counters, windowSize, windowHashes, options);
    } finally {
      sampler.stop();
      release();
    }
    sampler.emit('write');
    const copySeconds = sampler.elapsedSeconds();
    // Each target: flush, verify, rename; a failure here stops only that target.
    await Promise.all(
      live().map(async (i) => {
        const target = opened[i]!;
        const flushStart = process.hrtime.bigint();
        try {
          if (windowHashes) {
            await target.flush();
            // Tests reach the hook through loadWith's options; it is not part of the public type.
            await (options as LoadOptions & LoadHooks).beforeVerify?.();
            await verifyTarget(image, target, windowHashes, windowSize, options);
          }
          await target.finish();
          const seconds = copySeconds + Number(process.hrtime.bigint() - flushStart) / 1e9;
          outcomes[i] = {
            target: target.path,
            ok: true,
            result: { target: target.path, kind: target.kind, offset: target.base, virtualSize: image.virtualSize, dataBytes: counters.dataBytes, zeroBytes: counters.zeroBytes, seconds, direct: target.direct, verified: windowHashes !== undefined },
          };
          opened[i] = undefined;
        } catch (error) {
          await fail(i, error);
        }
      }),
    );
  } catch (error) {
    for (let i = 0; i < opened.length; i++) if (opened[i]) await opened[i]!.abort().catch(() => {});
    throw error;
  } finally {
    if (typeof source === 'string') await image.close();
  }
  const done = outcomes.map((o, i) => o ?? { target: resolved[i]!, ok: false as const, error: new Qcow2Error('IO_ERROR', 'not written', { path: resolved[i]! }) });
  return { targets: done, failed: done.filter((o) => !o.ok).length, virtualSize: image.virtualSize, seconds: Number(process.hrtime.bigint() - started) / 1e9 };
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
  const step = batchGuestBytes(remote);
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
    for (let start = 0; start < size; start += step) {
      const plan = image.plan(await image.copyRuns(start, Math.min(size, start + step)));
      fetching = remote ? prefetchPlan(image.files, plan, options.signal) : undefined;
      await settle();
      const live = liveTargets();
      if (live.length === 0 || counters.cancelled) break;
      for (const i of live) {
        const t = opened[i]!;
        if (t.kind === 'file' && t.direct) preallocateData({ path: t.path, fd: t.fd, base: t.base, alignment: t.alignment, zeroMode: t.zeroMode }, plan.runs, size);
      }
      const fetched = fetching;
      fetching = undefined;
      const sources = fetched ? await fetched.ready.catch((error: unknown) => (fetched.release(), Promise.reject(error))) : plan.sources;
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

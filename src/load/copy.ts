/**
 * Copies an image's guest bytes onto an open target in batches: the next batch
 * is planned (table walks, chain resolution) while the native threads write
 * the current one, so memory stays bounded whatever the image size.
 */
import { Qcow2Error } from '../errors';
import type { Image } from '../qcow2/image';
import { Qcow2Layer } from '../qcow2/layers';
import { native, type NativePlan, type NativeSource, planRunFields, PlanKind, runFileBytes } from '../native';
import { hasRemote, type Prefetch, prefetchPlan } from '../http/prefetch';
import { JobCounters, ProgressSampler, threadCount, type ProgressCallback } from '../jobs';

/** A copy is planned a span of the guest disk at a time. */
const planSpan = 1024 * 1024 * 1024;
/**
 * From an http(s) image a span is written in batches that each fetch about 48 MiB (held in
 * memory: two batches being written, one being fetched), the first of them 12 MiB, so that
 * writing starts after a short fetch. (64 MiB measured no faster and 294 MiB at peak; 32 MiB
 * slower by a tenth.) Sized by the bytes fetched, not the guest bytes: a zlib image's batch
 * covers about three times the guest bytes, in a third as many jobs (the benchmark's zlib image:
 * 1.77 s against 1.84 s, 3.15 against 3.25 CPU s).
 */
const remoteBatchBytes = 48 * 1024 * 1024;
/**
 * A remote batch covers at most this many times the bytes it may fetch, in guest bytes: a zlib
 * image's (about 3x) fits, while a stretch of zeros still ends in batches, so that the next
 * fetch starts while they are written.
 */
const remoteGuestPerFetched = 4;

export interface Batch {
  start: number;
  end: number;
  plan: NativePlan;
  /** On a span's first batch: the whole span's runs (what new file targets preallocate). */
  spanRuns?: Float64Array;
}

/** The runs of `runs` (a plan's, in guest order) inside guest [start, end), cut at its edges. */
export function slicePlanRuns(runs: Float64Array, start: number, end: number): Float64Array {
  const count = runs.length / planRunFields;
  const first = firstRunEndingAfter(runs, start);
  // The first run starting at or after `end`.
  const last = firstRun(count, (i) => runs[i * planRunFields]! >= end);
  const out = runs.slice(first * planRunFields, Math.max(first, last) * planRunFields);
  for (const at of out.length ? [0, out.length - planRunFields] : []) {
    const guest = out[at]!;
    const from = Math.max(guest, start);
    const cut = from - guest;
    out[at] = from;
    out[at + 1] = Math.min(guest + out[at + 1]!, end) - from;
    if (out[at + 2] === PlanKind.Data) out[at + 4]! += cut;
    if (out[at + 2] === PlanKind.Compressed) out[at + 6]! += cut;
  }
  return out;
}

/**
 * Where a batch of a remote image's span that starts at `start` (on a window edge) ends: on the
 * first window edge by which its runs read `budget` bytes of their files, or at `limit`.
 */
export function fetchedBatchEnd(runs: Float64Array, start: number, limit: number, budget: number, onWindows: (bytes: number) => number): number {
  const count = runs.length / planRunFields;
  let read = 0;
  for (let i = firstRunEndingAfter(runs, start); i < count && runs[i * planRunFields]! < limit; i++) {
    const at = i * planRunFields;
    const from = Math.max(runs[at]!, start);
    const to = runs[at]! + runs[at + 1]!;
    // A data run is cut where the budget runs out; a compressed cluster is read whole.
    if (runs[at + 2] === PlanKind.Data && read + (to - from) >= budget) return Math.min(limit, start + onWindows(from + (budget - read) - start));
    read += runs[at + 2] === PlanKind.Data ? to - from : runFileBytes(runs, at);
    if (read >= budget) return Math.min(limit, start + onWindows(to - start));
  }
  return limit;
}

/** The index of the first run of `runs` (in guest order) that ends after guest offset `at`, or their count. */
function firstRunEndingAfter(runs: Float64Array, at: number): number {
  return firstRun(runs.length / planRunFields, (i) => runs[i * planRunFields]! + runs[i * planRunFields + 1]! > at);
}

/** The lowest index in [0, count) for which `after` holds (it holds from some index on), or count. */
function firstRun(count: number, after: (index: number) => boolean): number {
  let low = 0;
  let high = count;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (after(middle)) high = middle;
    else low = middle + 1;
  }
  return low;
}

/**
 * The batches of a copy in guest order, each with its plan. Plans are made a span (1 GiB) at a
 * time; a span's first batch carries the span's runs, for new file targets to preallocate from
 * (once a span rather than once a batch, and with no write in flight: each fallocate waits for
 * the direct writes in flight, ext4's inode_dio_wait, and holds the new ones back; measured 0.16 s
 * beside a running job against 0.5 ms without). A remote image's spans are cut into batches,
 * and the next span is planned when a span's second batch is asked for, while its first is
 * written: no batch waits for 1 GiB to be planned.
 */
export async function* plannedBatches(image: Image, remote: boolean, windowSize: number): AsyncGenerator<Batch> {
  const size = image.virtualSize;
  // Batch edges fall on the engine's windows: two jobs never write (or hash) the same window.
  const onWindows = (bytes: number) => Math.ceil(bytes / windowSize) * windowSize;
  const planAt = async (start: number): Promise<Batch> => {
    const end = Math.min(size, start + onWindows(planSpan));
    return { start, end, plan: image.plan(await image.copyRuns(start, end)) };
  };
  let next: Promise<Batch> | undefined;
  const planFrom = (start: number) => {
    if (next || start >= size) return;
    next = planAt(start);
    // Awaited when its span is reached, or in `finally`: not unhandled meanwhile.
    next.catch(() => {});
  };
  try {
    planFrom(0);
    while (next) {
      const span: Batch = await next;
      next = undefined;
      if (!remote) {
        yield { ...span, spanRuns: span.plan.runs };
        planFrom(span.end);
        continue;
      }
      for (let start = span.start; start < span.end; ) {
        const budget = start === 0 ? remoteBatchBytes / 4 : remoteBatchBytes;
        const end = fetchedBatchEnd(span.plan.runs, start, Math.min(span.end, start + onWindows(budget * remoteGuestPerFetched)), budget, onWindows);
        if (start > span.start) planFrom(span.end);
        const plan = { runs: slicePlanRuns(span.plan.runs, start, end), sources: span.plan.sources };
        yield { start, end, plan, ...(start === span.start ? { spanRuns: span.plan.runs } : {}) };
        start = end;
      }
      planFrom(span.end);
    }
  } finally {
    // A caller that stops early closes its descriptors next: no planning may run on after it.
    await next?.catch(() => {});
  }
}

export interface CopyTarget {
  /** What errors of writing name. */
  path: string;
  fd: number;
  /** Buffered fd of the same target for the part of the last O_DIRECT unit before its end. */
  tailFd?: number;
  /** Target byte where guest offset 0 lands. */
  base: number;
  /** O_DIRECT unit of `fd`, or 0 when buffered. */
  alignment: number;
  /** 0 skip (target reads zeros), 1 write zeros, 2 BLKZEROOUT, 3 punch holes. */
  zeroMode: number;
  /** Filled with [written, xxh3] per window of copyWindowSize() bytes, for verification. */
  windowHashes?: BigUint64Array;
  /**
   * A new sparse file written with O_DIRECT: its data ranges are allocated (fallocate) before
   * they are written. Direct writes into holes each allocate under the inode's exclusive lock;
   * into allocated (unwritten) extents they run in parallel.
   */
  preallocate?: boolean;
}

export interface CopyOptions {
  /** Native worker threads, 1 to 64 (default: 4 a CPU, at least 8). */
  threads?: number;
  /** Called about every 250 ms with the bytes done, then at the flush (and the read-back with verify). */
  onProgress?: ProgressCallback;
  /** Stops the copy at the next task; a new file is removed, a device or region is left part written (CANCELLED). */
  signal?: AbortSignal;
}

/** Guest bytes per native task: 1 MiB, or a whole cluster or O_DIRECT unit if larger. */
export function copyWindowSize(image: Image, alignment: number): number {
  const maxCluster = Math.max(...image.layers.map((l) => (l instanceof Qcow2Layer ? l.header.clusterSize : 0)));
  return Math.max(1 << 20, maxCluster, alignment);
}

/**
 * Asks the kernel to read the source ranges of a batch ahead of the workers: the batch
 * after the one being copied is planned, and so read, while that one runs. Runs of one
 * source are merged where they lie within 1 MiB of each other.
 */
function readAhead(runs: Float64Array, sources: readonly NativeSource[]): void {
  const gap = 1 << 20;
  const open = new Map<number, { from: number; to: number }>();
  const flush = (source: number) => {
    const range = open.get(source);
    if (range) native().willNeed(sources[source]!.fd, (sources[source]!.base ?? 0) + range.from, range.to - range.from);
  };
  for (let at = 0; at < runs.length; at += planRunFields) {
    const length = runFileBytes(runs, at);
    if (length === 0) continue;
    const source = runs[at + 3]!;
    const from = runs[at + 4]!;
    const to = from + length;
    const range = open.get(source);
    if (range && from >= range.from && from <= range.to + gap) range.to = Math.max(range.to, to);
    else {
      flush(source);
      open.set(source, { from, to });
    }
  }
  for (const source of open.keys()) flush(source);
}

/**
 * fallocate of the ranges data and compressed runs will be written to, merged and rounded
 * out to the O_DIRECT unit (as the writes are). Zero runs stay holes. Best effort: a
 * filesystem that refuses only loses the speed-up.
 */
export function preallocateData(target: CopyTarget, runs: Float64Array, size: number): void {
  const unit = Math.max(target.alignment, 512);
  let from = -1;
  let to = -1;
  const flush = () => {
    if (to > from) native().allocate(target.fd, target.base + from, to - from);
  };
  for (let at = 0; at < runs.length; at += planRunFields) {
    if (runs[at + 2] === PlanKind.Zero) continue;
    const start = Math.floor(runs[at]! / unit) * unit;
    // Not past the disk's end: fallocate there would make the file longer than the disk.
    const end = Math.min(Math.ceil((runs[at]! + runs[at + 1]!) / unit) * unit, size);
    if (start <= to) to = Math.max(to, end);
    else {
      flush();
      from = start;
      to = end;
    }
  }
  flush();
}

export async function copyImage(image: Image, target: CopyTarget, options: CopyOptions = {}): Promise<{ dataBytes: number; zeroBytes: number; seconds: number }> {
  if (options.signal?.aborted) throw new Qcow2Error('CANCELLED', 'cancelled before the first byte', { path: image.path });
  const counters = new JobCounters();
  const sampler = new ProgressSampler(counters, image.virtualSize, options.onProgress);
  const release = counters.cancelOn(options.signal);
  sampler.start();
  try {
    await copyBatches(image, target, counters, options.threads, options.signal);
  } finally {
    sampler.stop();
    release();
  }
  sampler.emit('write');
  return { dataBytes: counters.dataBytes, zeroBytes: counters.zeroBytes, seconds: sampler.elapsedSeconds() };
}

/**
 * The batches of a copy (plannedBatches), each written by a native job: one at a time from local
 * files, two side by side from remote ones. Any failure stops the running jobs and waits for
 * them: the caller closes the descriptors they write by number next.
 */
async function copyBatches(image: Image, target: CopyTarget, counters: JobCounters, threads: number | undefined, signal: AbortSignal | undefined): Promise<void> {
  const size = image.virtualSize;
  const windowSize = copyWindowSize(image, target.alignment);
  const incomplete = () => new Qcow2Error('CANCELLED', 'cancelled; the target is incomplete', { path: image.path });
  // Remote files: the next batch is fetched (into stage chunks) while the ones before it are
  // written, and a batch's job starts beside the tail of the one before (two at once), so the
  // disk's queue does not drain at every batch's end.
  const remote = hasRemote(image.files);
  const jobsAtOnce = remote ? 2 : 1;
  const running: { job: Promise<void>; fetched: Prefetch | undefined }[] = [];
  const settleOldest = async () => {
    const { job, fetched } = running[0]!;
    try {
      await job;
    } finally {
      fetched?.release();
      running.shift();
    }
  };
  let fetching: Prefetch | undefined;
  // A job that fails while an older one still runs stops the loop before the next batch.
  let failed: { error: unknown } | undefined;
  let first = true;
  try {
    for await (const { plan, spanRuns } of plannedBatches(image, remote, windowSize)) {
      if (remote) fetching = prefetchPlan(image.files, plan, signal);
      // A later batch is read ahead while the one before it is written. The first one once its
      // job runs: asking for a gigabyte already cached takes the kernel 12 ms, which the job need not wait for.
      else if (!first) readAhead(plan.runs, plan.sources);
      // A new span's preallocation waits for every job: fallocate beside running writes stalls them.
      while (running.length >= (spanRuns && target.preallocate ? 1 : jobsAtOnce)) await settleOldest();
      if (failed) throw failed.error;
      if (counters.cancelled) break;
      if (spanRuns && target.preallocate) preallocateData(target, spanRuns, size);
      const fetched = fetching;
      fetching = undefined;
      // Running (to be released) from here, also if its fetch fails.
      const entry = { job: Promise.resolve(), fetched };
      running.push(entry);
      entry.job = image.runCopy({
        runs: plan.runs,
        sources: fetched ? await fetched.ready : plan.sources,
        targetFd: target.fd,
        targetTailFd: target.tailFd ?? -1,
        targetBase: target.base,
        limitStart: target.base,
        limitEnd: target.base + size,
        alignment: target.alignment,
        zeroMode: target.zeroMode,
        threads: threadCount(threads, target.path),
        windowSize,
        counters: counters.words,
        ...(target.windowHashes ? { windowHashes: target.windowHashes, hashedSize: size } : {}),
      }, target.path);
      // A rejection is awaited later or below; do not let it go unhandled meanwhile.
      entry.job.catch((error: unknown) => (failed ??= { error }));
      if (first && !remote) readAhead(plan.runs, plan.sources);
      first = false;
    }
    while (running.length > 0) await settleOldest();
    if (counters.cancelled) throw incomplete();
  } catch (error) {
    // Whatever failed (a job, planning the next batch, a fetch), stop the jobs and wait: the
    // caller closes the target's and the image's descriptors next, and the jobs write by number.
    counters.cancel();
    await Promise.allSettled(running.map((r) => r.job));
    await fetching?.ready.catch(() => {});
    // A job or a fetch stopped by the signal says "cancelled": what matters to the user is the target.
    throw error instanceof Qcow2Error && error.code === 'CANCELLED' ? incomplete() : error;
  } finally {
    for (const { fetched } of running) fetched?.release();
    fetching?.release();
  }
}

/**
 * What every native job is run with, whichever command starts it: the thread count, the
 * counters it shares with its threads (progress and cancel), progress events sampled from
 * them, and the one mapping from a failed job to a Qcow2Error.
 */
import * as os from 'node:os';
import { Qcow2Error, type Qcow2ErrorCode } from './errors';
import type { NativeCopyError } from './native';

/**
 * The native threads of a job: the caller's (a whole number from 1 to 64, as --threads takes)
 * or the default. Checked here, so a bad value is an INVALID_ARGUMENT naming the file rather
 * than an error from the addon.
 */
export function threadCount(threads: number | undefined, path: string): number {
  if (threads === undefined) return defaultThreads();
  if (!Number.isInteger(threads) || threads < 1 || threads > 64) {
    throw new Qcow2Error('INVALID_ARGUMENT', `threads ${threads} must be a whole number from 1 to 64`, { path });
  }
  return threads;
}

function defaultThreads(): number {
  // Writes block in the kernel, so more threads than cores keep the disk's queue full.
  return Math.max(8, os.availableParallelism() * 4);
}

/**
 * threadCount for work that keeps its threads on the CPU (RAM pages: scanning, compressing,
 * restoring): one a core by default, since more only add contention (measured).
 */
export function cpuThreadCount(threads: number | undefined, path: string): number {
  return threads === undefined ? os.availableParallelism() : threadCount(threads, path);
}

/**
 * The four words a native job shares with its threads, used in place:
 * `[dataBytes, zeroBytes, cancel, stagedBytes]` (the last: a copy's bytes written from a remote
 * file's stage as they lie, without a copy through a window). Every worker polls `cancel` between tasks.
 */
export class JobCounters {
  readonly words = new BigUint64Array(4);

  get dataBytes(): number {
    return Number(this.words[0]);
  }

  /** Progress of a job that counts in JavaScript (state files): bytes done so far. */
  set dataBytes(bytes: number) {
    this.words[0] = BigInt(bytes);
  }

  get zeroBytes(): number {
    return Number(this.words[1]);
  }

  /** Asks the job's threads to stop at their next task. */
  cancel(): void {
    this.words[2] = 1n;
  }

  get cancelled(): boolean {
    return this.words[2] !== 0n;
  }

  /**
   * Cancels when `signal` fires, and at once if it already has (during the awaits before the
   * job). Returns the function that unhooks the listener, to call when the job is over.
   */
  cancelOn(signal: AbortSignal | undefined): () => void {
    if (!signal) return () => {};
    const abort = () => this.cancel();
    signal.addEventListener('abort', abort, { once: true });
    if (signal.aborted) abort();
    return () => signal.removeEventListener('abort', abort);
  }
}

/** Progress of a long operation, as events for the API and lines for the CLI. */
export interface Progress {
  /**
   * check reports 'check': bytesDone counts the guest bytes whose tables were walked. 'verify'
   * counts the bytes read back. 'failed' (many-target loads only): `target` stopped, `error` says why.
   */
  phase: 'write' | 'flush' | 'verify' | 'check' | 'done' | 'failed';
  /** Guest bytes handled so far (data written plus zero ranges handled). */
  bytesDone: number;
  /** The disk's size: bytesDone's end. For a bench run bounded by time, an estimate: the bytes done plus the current pace over the time left. */
  bytesTotal: number;
  /** Guest bytes that held data and were written. */
  dataBytes: number;
  /** Guest bytes that read as zero (skipped, punched or zeroed). */
  zeroBytes: number;
  /** Since the operation started. */
  elapsedSeconds: number;
  /** Over the last two seconds. */
  bytesPerSecond: number;
  /** Seconds left at the current pace; undefined before there is a pace. */
  etaSeconds: number | undefined;
  /**
   * Many-target loads (loadMany, or load with an array): the target the event is about, as it
   * was given (made absolute). The write phase's counts are the same for every target (one job
   * writes them all); flush, verify, done and failed are each target's own.
   */
  target?: string;
  /** Phase 'failed': the error that stopped the target. */
  error?: {
    /** Its stable code (Qcow2Error.code). */
    code: Qcow2ErrorCode;
    /** Its one-line message. */
    message: string;
    /** The file or device it names. */
    path?: string;
  };
}

/** Receives Progress events; called on the main thread, so it should return quickly. */
export type ProgressCallback = (progress: Progress) => void;

/** Samples a job's counters every 250 ms (etcher-sdk's cadence) into Progress events. */
export class ProgressSampler {
  private readonly started = process.hrtime.bigint();
  private readonly history: { t: number; bytes: number }[] = [];
  private timer: NodeJS.Timeout | undefined;

  /** `total`: the bytes the job handles, or the seconds it runs for (a bench bounded by time). */
  constructor(
    private readonly counters: JobCounters,
    private readonly total: number | { seconds: number },
    private readonly callback: ProgressCallback | undefined,
    private readonly intervalMs = 250,
  ) {}

  /** Emits `phase` events every interval until stop(). */
  start(phase: Progress['phase'] = 'write'): void {
    if (!this.callback) return;
    this.timer = setInterval(() => this.emit(phase), this.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  elapsedSeconds(): number {
    return Number(process.hrtime.bigint() - this.started) / 1e9;
  }

  emit(phase: Progress['phase']): void {
    if (!this.callback) return;
    const { dataBytes, zeroBytes } = this.counters;
    const t = this.elapsedSeconds();
    const bytesDone = typeof this.total === 'object' ? dataBytes + zeroBytes : Math.min(this.total, dataBytes + zeroBytes);
    this.history.push({ t, bytes: bytesDone });
    while (this.history.length > 2 && t - this.history[0]!.t > 2) this.history.shift();
    const first = this.history[0]!;
    const bytesPerSecond = t > first.t ? (bytesDone - first.bytes) / (t - first.t) : 0;
    let bytesTotal: number;
    let etaSeconds: number | undefined;
    if (typeof this.total === 'object') {
      etaSeconds = Math.max(0, this.total.seconds - t);
      bytesTotal = phase === 'done' ? bytesDone : bytesDone + Math.round(bytesPerSecond * etaSeconds);
    } else {
      bytesTotal = this.total;
      etaSeconds = bytesPerSecond > 0 ? (bytesTotal - bytesDone) / bytesPerSecond : undefined;
    }
    this.callback({ phase, bytesDone, bytesTotal, dataBytes, zeroBytes, elapsedSeconds: t, bytesPerSecond, etaSeconds });
  }

}

/**
 * Which native job failed: `copy` (load, Image.read), `verify` (load's read-back), `capture`,
 * `bench` (writeBench), `pages` (a state file's page batches) and `restore` (a RAM restore).
 */
export type NativeJob = 'copy' | 'verify' | 'capture' | 'bench' | 'pages' | 'restore';

/** What the message and the path of a failed job's Qcow2Error are made from. */
export interface JobErrorContext {
  /** The file the error names unless the failure points at another. */
  path: string;
  /** Message of the CANCELLED error of a job stopped by its cancel word (default "cancelled"). */
  cancelled?: string;
  /** copy: the files of the plan's sources, by source index. */
  sources?: readonly { path: string }[];
  /** copy, capture, restore: the file written, named by a failure to write it. */
  target?: string;
  /** capture: the file read, named by a failure to read it. */
  source?: string;
  /** restore: the chunk a failed checksum names, with the guest ranges it holds. */
  describeChunk?: (chunk: number) => string;
}

/** A native job's rejection: an Error with NativeCopyError's fields (copy, verify, capture) or badChunk (restore). */
type NativeFailure = Partial<Omit<NativeCopyError, 'message'>> & { message?: string; badChunk?: number };

/** The one mapping from a failed native job to a Qcow2Error; a Qcow2Error passes unchanged. */
export function jobError(job: NativeJob, error: unknown, context: JobErrorContext): Qcow2Error {
  if (error instanceof Qcow2Error) return error;
  const e = error as NativeFailure;
  if (e.cancelled) return new Qcow2Error('CANCELLED', context.cancelled ?? 'cancelled', { path: context.path });
  switch (job) {
    case 'copy':
      return copyError(e, context);
    case 'verify':
      return new Qcow2Error('IO_ERROR', `reading the target back failed: ${e.message}`, { path: context.path, ...(e.hostOffset !== undefined ? { offset: e.hostOffset } : {}) });
    case 'capture': {
      const path = e.operation === 'read' ? (context.source ?? context.path) : (context.target ?? context.path);
      return new Qcow2Error('IO_ERROR', `${e.operation} failed at offset ${e.guestOffset}: ${e.message}`, { path, ...(e.guestOffset !== undefined ? { offset: e.guestOffset } : {}) });
    }
    case 'bench':
      return new Qcow2Error('IO_ERROR', `${e.operation ?? 'write'} failed: ${e.message}`, { path: context.path });
    case 'pages':
      return new Qcow2Error('IO_ERROR', String(e.message), { path: context.path });
    case 'restore': {
      // Writing the output failed (a full tmpfs, too few huge pages): the output is named.
      if (e.operation === 'write') return new Qcow2Error('IO_ERROR', `cannot restore the RAM dump into it: ${e.message}`, { path: context.target ?? context.path });
      const where = e.badChunk !== undefined && e.badChunk >= 0 && context.describeChunk ? ` (${context.describeChunk(e.badChunk)})` : '';
      return new Qcow2Error(where ? 'CHECKSUM_MISMATCH' : 'IO_ERROR', `restore failed: ${e.message}${where}`, { path: context.path });
    }
  }
}

/** A copy job's failure: the source file and host offset, or the target and its offset, as the operation says. */
function copyError(e: NativeFailure, context: JobErrorContext): Qcow2Error {
  const file = e.sourceIndex !== undefined && e.sourceIndex >= 0 ? context.sources?.[e.sourceIndex] : undefined;
  const where = `guest offset ${e.guestOffset}, host offset ${e.hostOffset}`;
  switch (e.operation) {
    case 'decompress':
      return new Qcow2Error('BAD_COMPRESSED_CLUSTER', `compressed cluster at ${where}: ${e.message}`, { path: file?.path ?? context.path, offset: e.hostOffset });
    case 'read':
      return new Qcow2Error(e.errno ? 'IO_ERROR' : 'OFFSET_BEYOND_FILE', `reading ${where}: ${e.message}`, { path: file?.path ?? context.path, offset: e.hostOffset });
    case 'write':
    case 'zero':
    case 'bounds':
      // The target's failure, at a target offset.
      return new Qcow2Error('IO_ERROR', `${e.operation} failed at guest offset ${e.guestOffset}, target offset ${e.hostOffset}: ${e.message}`, { path: context.target ?? context.path, offset: e.hostOffset });
    default:
      // A plan the image gave (host offsets in its files), or memory.
      return new Qcow2Error('IO_ERROR', `${e.operation ?? 'copy'} failed at ${where}: ${e.message}`, { path: context.path });
  }
}

/** Progress of a long operation, as events for the API and lines for the CLI. */
export interface Progress {
  phase: 'write' | 'flush' | 'verify' | 'done';
  /** Guest bytes handled so far (data written plus zero ranges handled). */
  bytesDone: number;
  bytesTotal: number;
  /** Guest bytes that held data and were written. */
  dataBytes: number;
  /** Guest bytes that read as zero (skipped, punched or zeroed). */
  zeroBytes: number;
  elapsedSeconds: number;
  /** Over the last two seconds. */
  bytesPerSecond: number;
  etaSeconds: number | undefined;
}

export type ProgressCallback = (progress: Progress) => void;

/** Samples native counters every 250 ms (etcher-sdk's cadence) into Progress events. */
export class ProgressSampler {
  private readonly started = process.hrtime.bigint();
  private readonly history: { t: number; bytes: number }[] = [];
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly counters: BigUint64Array,
    private readonly bytesTotal: number,
    private readonly callback: ProgressCallback | undefined,
    private readonly intervalMs = 250,
  ) {}

  start(): void {
    if (!this.callback) return;
    this.timer = setInterval(() => this.emit('write'), this.intervalMs);
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
    const dataBytes = Number(this.counters[0]);
    const zeroBytes = Number(this.counters[1]);
    const bytesDone = Math.min(this.bytesTotal, dataBytes + zeroBytes);
    const t = this.elapsedSeconds();
    this.history.push({ t, bytes: bytesDone });
    while (this.history.length > 2 && t - this.history[0]!.t > 2) this.history.shift();
    const first = this.history[0]!;
    const bytesPerSecond = t > first.t ? (bytesDone - first.bytes) / (t - first.t) : 0;
    const etaSeconds = bytesPerSecond > 0 ? (this.bytesTotal - bytesDone) / bytesPerSecond : undefined;
    this.callback({ phase, bytesDone, bytesTotal: this.bytesTotal, dataBytes, zeroBytes, elapsedSeconds: t, bytesPerSecond, etaSeconds });
  }
}

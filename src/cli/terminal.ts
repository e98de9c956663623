/**
 * What the CLI writes to the terminal besides its results: the progress bar (only on a
 * terminal, as wide as it is, cleared before any other line on stderr), progress as JSON
 * lines, notices, and the interrupt handling of long commands.
 */
import type { Progress } from '../load/progress';
import { progressLine } from './format';
import { UsageError } from './usage';

let barShown = false;

/** Removes the progress bar's line, if one is drawn: before any other line on stderr. */
export function clearProgress(): void {
  if (barShown) {
    process.stderr.write('\r\x1b[K');
    barShown = false;
  }
}

/** One line on stderr, after clearing the bar. */
export function say(line: string): void {
  clearProgress();
  process.stderr.write(`${line}\n`);
}

/**
 * How a command that made something ends: with --progress=json a last "done" event, with --json
 * the result, else (unless -q) its one summary line.
 */
export function reportResult(mode: 'bar' | 'json' | 'none', flags: ProgressFlags & { json?: boolean }, result: object, summary: () => string): void {
  clearProgress();
  if (mode === 'json') process.stdout.write(JSON.stringify({ phase: 'done', ...result }) + '\n');
  else if (flags.json) printJson(result);
  else if (!flags.quiet) say(summary());
}

export interface ProgressFlags {
  progress?: 'auto' | 'bar' | 'json' | 'none';
  /** -p */
  showProgress?: boolean;
  /** -q */
  quiet?: boolean;
}

/**
 * How progress shows: a bar on stderr (only where stderr is a terminal: a log gets no
 * carriage-return lines), JSON lines on stdout, or not at all. -q wins over -p, as in qemu-img.
 */
export function progressMode(flags: ProgressFlags, command: string, fallback: 'auto' | 'none' = 'auto'): 'bar' | 'json' | 'none' {
  if (flags.showProgress && flags.progress !== undefined && flags.progress !== 'bar') {
    throw new UsageError(`-p and --progress=${flags.progress} cannot be combined`, command);
  }
  const mode = flags.progress ?? (flags.showProgress ? 'bar' : fallback);
  if (mode === 'json') return 'json';
  if (flags.quiet || mode === 'none') return 'none';
  return process.stderr.isTTY ? 'bar' : 'none';
}

export function progressReporter(mode: 'bar' | 'json' | 'none'): ((p: Progress) => void) | undefined {
  if (mode === 'json') return (p) => process.stdout.write(JSON.stringify(p) + '\n');
  if (mode === 'bar') {
    return (p) => {
      process.stderr.write(`\r${progressLine(p, process.stderr.columns || 80)}\x1b[K`);
      barShown = true;
    };
  }
  return undefined;
}

/**
 * Runs `work` with a signal SIGINT and SIGTERM fire meanwhile: the library stops at its next step
 * and removes what it had not finished, and main() exits 130.
 */
export async function untilInterrupted<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const onSignal = () => controller.abort();
  const signals = ['SIGINT', 'SIGTERM'] as const;
  for (const name of signals) process.once(name, onSignal);
  try {
    return await work(controller.signal);
  } finally {
    for (const name of signals) process.off(name, onSignal);
  }
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

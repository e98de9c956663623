/**
 * What the CLI writes to the terminal besides its results: the progress bar, or for a load onto
 * several targets one line per target (only on a terminal, as wide as it is, redrawn in place and
 * cleared before any other line on stderr), progress as JSON lines, notices, and the interrupt
 * handling of long commands.
 */
import type { Progress } from '../load/progress';
import { progressLine, targetProgressLines } from './format';
import { UsageError } from './usage';

/** Lines of progress drawn last on stderr: the bar's one, or one per target; the cursor is at the end of the last. */
let drawnLines = 0;

/** Removes the progress lines, if any are drawn: before any other line on stderr. */
export function clearProgress(): void {
  if (drawnLines === 0) return;
  // Back to the first line drawn, then erase to the end of the screen.
  process.stderr.write(drawnLines === 1 ? '\r\x1b[K' : `\r\x1b[${drawnLines - 1}A\x1b[J`);
  drawnLines = 0;
}

/** Draws `lines` over the progress lines drawn last (in place: back up to the first, each rewritten). */
function draw(lines: readonly string[]): void {
  // ESC[0A would move up one line in many terminals: only from a second line.
  const up = drawnLines > 1 ? `\x1b[${drawnLines - 1}A` : '';
  const shorter = lines.length < drawnLines ? '\x1b[J' : '';
  process.stderr.write(`\r${up}${lines.map((line) => `${line}\x1b[K`).join('\n')}${shorter}`);
  drawnLines = lines.length;
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

/**
 * What shows each Progress event: a JSON line on stdout (with a many-target load's `target` in
 * it), or on a terminal the bar, or for `lines: 'targets'` one line per target, each redrawn in
 * place (the line for an event's `target`, added in the order the targets first report).
 */
export function progressReporter(mode: 'bar' | 'json' | 'none', lines: 'one' | 'targets' = 'one'): ((p: Progress) => void) | undefined {
  if (mode === 'json') return (p) => process.stdout.write(JSON.stringify(p) + '\n');
  if (mode === 'bar' && lines === 'targets') {
    const latest = new Map<string | undefined, Progress>();
    return (p) => {
      latest.set(p.target, p);
      // One row short of the screen: the cursor must be able to go back up to the first line.
      draw(targetProgressLines([...latest.values()], process.stderr.columns || 80, (process.stderr.rows || 24) - 1));
    };
  }
  if (mode === 'bar') return (p) => draw([progressLine(p, process.stderr.columns || 80)]);
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

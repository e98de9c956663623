/** `qcow2img load IMAGE TARGET...`: the raw virtual disk onto files, devices or partitions. */
import { load, type LoadOptions } from '../../load/index';
import { loadMany, type LoadTarget } from '../../load/many';
import type { DirectMode } from '../../load/target';
import { loadToStream } from '../../load/stream';
import { humanBytes } from '../format';
import { defined, type OpenFlags, openOptions } from '../options';
import { UsageError } from '../usage';
import { type ProgressFlags, clearProgress, printJson, progressMode, progressReporter, reportResult, say, untilInterrupted } from '../terminal';

export interface LoadFlags extends OpenFlags, ProgressFlags {
  snapshot?: string;
  threads?: number;
  overwrite?: boolean;
  direct?: DirectMode;
  /** Repeatable: one for every target, or one for each. */
  partition?: number[];
  offset?: number[];
  verify?: boolean;
  targetIsZero?: boolean;
  force?: boolean;
  json?: boolean;
}

export async function run([image, targetArg]: (string | string[])[], flags: LoadFlags): Promise<number | void> {
  const targets = Array.isArray(targetArg) ? targetArg : [targetArg!];
  if (targets.length === 1 && targets[0] === '-') return toStdout(image as string, flags);
  const partitions = perTarget(flags.partition, targets.length, '--partition');
  const offsets = perTarget(flags.offset, targets.length, '--offset');
  const placed = targets.map((path, i) => ({ path, ...defined({ partition: partitions[i], offset: offsets[i] }) }));
  if (targets.length > 1) return runMany(image as string, placed, flags);
  const { path: target, ...place } = placed[0]!;
  const mode = progressMode(flags, 'load');
  const onProgress = progressReporter(mode);
  const result = await untilInterrupted((signal) =>
    load(image as string, target, { ...loadOptions(flags, onProgress, signal), ...place }),
  );
  reportResult(mode, flags, result, () => {
    const rate = result.seconds > 0 ? result.virtualSize / result.seconds : 0;
    return `qcow2img: loaded ${humanBytes(result.virtualSize)} into ${result.target}${result.offset ? ` at offset ${result.offset}` : ''} in ${result.seconds.toFixed(2)} s (${humanBytes(rate)}/s; ${humanBytes(result.dataBytes)} data, ${humanBytes(result.zeroBytes)} zero${result.direct ? ', O_DIRECT' : ''}${result.verified ? ', verified' : ''})`;
  });
}

/**
 * --partition or --offset for each of `count` targets: given once, the same for every one; given
 * once for each, in order. Any other count is a usage error.
 */
function perTarget(values: number[] | undefined, count: number, option: string): (number | undefined)[] {
  if (values === undefined) return Array.from({ length: count }, () => undefined);
  if (values.length === 1) return Array.from({ length: count }, () => values[0]);
  if (values.length === count) return values;
  const targets = count === 1 ? '1 TARGET' : `${count} TARGETs`;
  throw new UsageError(`${option} is given ${values.length} times for ${targets}: give it once (for every TARGET) or once for each TARGET`, 'load');
}

/** The options every target shares; a target's partition or offset goes with the target. */
function loadOptions(flags: LoadFlags, onProgress: LoadOptions['onProgress'], signal: AbortSignal): LoadOptions {
  return {
    ...openOptions(flags),
    ...defined({ snapshot: flags.snapshot, threads: flags.threads, onProgress }),
    verify: flags.verify === true,
    targetIsZero: flags.targetIsZero === true,
    force: flags.force === true,
    overwrite: flags.overwrite === true,
    direct: flags.direct ?? 'auto',
    signal,
    onNotice: (message) => say(`qcow2img: ${message}`),
  };
}

/** Several targets: progress and a summary line per target, and exit status 1 when any failed. */
async function runMany(image: string, targets: LoadTarget[], flags: LoadFlags): Promise<number> {
  const mode = progressMode(flags, 'load');
  const onProgress = progressReporter(mode, 'targets');
  const result = await untilInterrupted((signal) => loadMany(image, targets, loadOptions(flags, onProgress, signal)));
  clearProgress();
  const json = {
    ...result,
    targets: result.targets.map((t) => (t.ok ? { ok: true, ...t.result } : { target: t.target, ok: false, code: t.error.code, error: t.error.message })),
  };
  if (mode === 'json') process.stdout.write(JSON.stringify({ phase: 'done', ...json }) + '\n');
  else if (flags.json) printJson(json);
  for (const t of result.targets) {
    // Failures always print (one line each); successes unless quiet or JSON.
    if (!t.ok) say(`qcow2img: ${t.error.message}`);
    else if (!flags.quiet && !flags.json && mode !== 'json') {
      const r = t.result;
      say(`qcow2img: loaded ${humanBytes(r.virtualSize)} into ${r.target}${r.offset ? ` at offset ${r.offset}` : ''}${r.direct ? ' (O_DIRECT' : ' ('}${r.verified ? `${r.direct ? ', ' : ''}verified` : ''})`.replace(' ()', ''));
    }
  }
  const rate = result.seconds > 0 ? result.virtualSize / result.seconds : 0;
  if (!flags.quiet && !flags.json && mode !== 'json') {
    say(`qcow2img: ${result.targets.length - result.failed} of ${result.targets.length} targets loaded in ${result.seconds.toFixed(2)} s (${humanBytes(rate)}/s each)`);
  }
  if (result.failed > 0) {
    say(`qcow2img: ${result.failed} of ${result.targets.length} targets failed: ${result.targets.filter((t) => !t.ok).map((t) => t.target).join(', ')}`);
    return 1;
  }
  return 0;
}

/** `load IMAGE -`: the raw disk on stdout, in order; the summary and the progress bar on stderr. */
async function toStdout(image: string, flags: LoadFlags): Promise<void> {
  const refuse = (what: string) => {
    throw new UsageError(`${what} cannot be used with TARGET - (stdout carries the disk)`, 'load');
  };
  if (flags.partition !== undefined) refuse('--partition');
  if (flags.offset !== undefined) refuse('--offset');
  if (flags.verify) refuse('--verify');
  if (flags.json) refuse('--json');
  if (flags.progress === 'json') refuse('--progress=json');
  if (process.stdout.isTTY) throw new UsageError('refusing to write a raw disk to a terminal: pipe or redirect stdout (load IMAGE - | ...)', 'load');
  const mode = progressMode(flags, 'load');
  const onProgress = progressReporter(mode);
  const result = await untilInterrupted((signal) =>
    loadToStream(image, process.stdout, {
      ...openOptions(flags),
      ...(flags.snapshot !== undefined ? { snapshot: flags.snapshot } : {}),
      ...(onProgress ? { onProgress } : {}),
      name: 'stdout',
      signal,
    }),
  );
  clearProgress();
  if (!flags.quiet) {
    const rate = result.seconds > 0 ? result.virtualSize / result.seconds : 0;
    say(`qcow2img: loaded ${humanBytes(result.virtualSize)} to stdout in ${result.seconds.toFixed(2)} s (${humanBytes(rate)}/s; ${humanBytes(result.dataBytes)} data, ${humanBytes(result.zeroBytes)} zero)`);
  }
}

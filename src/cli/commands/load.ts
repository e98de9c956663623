/** `qcow2img load IMAGE TARGET`: the raw virtual disk onto a file, device or partition. */
import { load, type LoadOptions } from '../../load/index';
import { loadMany } from '../../load/many';
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
  partition?: number;
  offset?: number;
  verify?: boolean;
  targetIsZero?: boolean;
  force?: boolean;
  json?: boolean;
}

export async function run([image, targetArg]: (string | string[])[], flags: LoadFlags): Promise<number | void> {
  const targets = Array.isArray(targetArg) ? targetArg : [targetArg!];
  if (targets.length === 1 && targets[0] === '-') return toStdout(image as string, flags);
  if (targets.length > 1) return runMany(image as string, targets, flags);
  const target = targets[0]!;
  const mode = progressMode(flags, 'load');
  const onProgress = progressReporter(mode);
  const result = await untilInterrupted((signal) =>
    load(image as string, target, loadOptions(flags, onProgress, signal)),
  );
  reportResult(mode, flags, result, () => {
    const rate = result.seconds > 0 ? result.virtualSize / result.seconds : 0;
    return `qcow2img: loaded ${humanBytes(result.virtualSize)} into ${result.target}${result.offset ? ` at offset ${result.offset}` : ''} in ${result.seconds.toFixed(2)} s (${humanBytes(rate)}/s; ${humanBytes(result.dataBytes)} data, ${humanBytes(result.zeroBytes)} zero${result.direct ? ', O_DIRECT' : ''}${result.verified ? ', verified' : ''})`;
  });
}

function loadOptions(flags: LoadFlags, onProgress: LoadOptions['onProgress'], signal: AbortSignal): LoadOptions {
  return {
    ...openOptions(flags),
    ...defined({ snapshot: flags.snapshot, threads: flags.threads, onProgress, partition: flags.partition, offset: flags.offset }),
    verify: flags.verify === true,
    targetIsZero: flags.targetIsZero === true,
    force: flags.force === true,
    overwrite: flags.overwrite === true,
    direct: flags.direct ?? 'auto',
    signal,
    onNotice: (message) => say(`qcow2img: ${message}`),
  };
}

/** Several targets: one line per target, and exit status 1 when any failed. */
async function runMany(image: string, targets: string[], flags: LoadFlags): Promise<number> {
  const mode = progressMode(flags, 'load');
  const onProgress = progressReporter(mode);
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

/** `qcow2img load IMAGE TARGET`: the raw virtual disk onto a file, device or partition. */
import { load } from '../../load/index';
import type { DirectMode } from '../../load/target';
import { loadToStream } from '../../load/stream';
import { humanBytes } from '../format';
import { type OpenFlags, openOptions } from '../options';
import { UsageError } from '../usage';
import { type ProgressFlags, clearProgress, printJson, progressMode, progressReporter, say, untilInterrupted } from '../terminal';

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

export async function run([image, target]: string[], flags: LoadFlags): Promise<void> {
  if (target === '-') return toStdout(image!, flags);
  const mode = progressMode(flags, 'load');
  const onProgress = progressReporter(mode);
  const result = await untilInterrupted((signal) =>
    load(image!, target!, {
      ...openOptions(flags),
      ...(flags.snapshot !== undefined ? { snapshot: flags.snapshot } : {}),
      ...(flags.threads !== undefined ? { threads: flags.threads } : {}),
      ...(onProgress ? { onProgress } : {}),
      ...(flags.partition !== undefined ? { partition: flags.partition } : {}),
      ...(flags.offset !== undefined ? { offset: flags.offset } : {}),
      verify: flags.verify === true,
      targetIsZero: flags.targetIsZero === true,
      force: flags.force === true,
      overwrite: flags.overwrite === true,
      direct: flags.direct ?? 'auto',
      signal,
      onNotice: (message) => say(`qcow2img: ${message}`),
    }),
  );
  clearProgress();
  if (mode === 'json') {
    process.stdout.write(JSON.stringify({ phase: 'done', ...result }) + '\n');
  } else if (flags.json) {
    printJson(result);
  } else if (!flags.quiet) {
    const rate = result.seconds > 0 ? result.virtualSize / result.seconds : 0;
    say(
      `qcow2img: loaded ${humanBytes(result.virtualSize)} into ${result.target}${result.offset ? ` at offset ${result.offset}` : ''} in ${result.seconds.toFixed(2)} s (${humanBytes(rate)}/s; ${humanBytes(result.dataBytes)} data, ${humanBytes(result.zeroBytes)} zero${result.direct ? ', O_DIRECT' : ''}${result.verified ? ', verified' : ''})`,
    );
  }
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

/** `qcow2img load IMAGE TARGET`: the raw virtual disk onto a file, device or partition. */
import { load } from '../../load/index';
import type { DirectMode } from '../../load/target';
import { humanBytes } from '../format';
import { defined, type OpenFlags, openOptions } from '../options';
import { type ProgressFlags, progressMode, progressReporter, reportResult, say, untilInterrupted } from '../terminal';

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
  const mode = progressMode(flags, 'load');
  const onProgress = progressReporter(mode);
  const result = await untilInterrupted((signal) =>
    load(image!, target!, {
      ...openOptions(flags),
      ...defined({ snapshot: flags.snapshot, threads: flags.threads, onProgress, partition: flags.partition, offset: flags.offset }),
      verify: flags.verify === true,
      targetIsZero: flags.targetIsZero === true,
      force: flags.force === true,
      overwrite: flags.overwrite === true,
      direct: flags.direct ?? 'auto',
      signal,
      onNotice: (message) => say(`qcow2img: ${message}`),
    }),
  );
  reportResult(mode, flags, result, () => {
    const rate = result.seconds > 0 ? result.virtualSize / result.seconds : 0;
    return `qcow2img: loaded ${humanBytes(result.virtualSize)} into ${result.target}${result.offset ? ` at offset ${result.offset}` : ''} in ${result.seconds.toFixed(2)} s (${humanBytes(rate)}/s; ${humanBytes(result.dataBytes)} data, ${humanBytes(result.zeroBytes)} zero${result.direct ? ', O_DIRECT' : ''}${result.verified ? ', verified' : ''})`;
  });
}

/** `qcow2img capture SOURCE OUT.qcow2`: a raw file or block device into a qcow2 image. */
import { capture, type CaptureOptions } from '../../capture/index';
import { humanBytes } from '../format';
import { UsageError } from '../usage';
import { defined, type OpenFlags, openOptions } from '../options';
import { type ProgressFlags, progressMode, progressReporter, reportResult, untilInterrupted } from '../terminal';

/** The API's options as flags (commander's names), plus how to print. */
export interface CaptureFlags
  extends OpenFlags,
    ProgressFlags,
    Pick<CaptureOptions, 'compress' | 'level' | 'clusterSize' | 'compat' | 'backing' | 'backingFormat' | 'size' | 'threads' | 'overwrite'> {
  json?: boolean;
}

export async function run([source, output]: string[], flags: CaptureFlags): Promise<void> {
  if (source === '-' && process.stdin.isTTY) throw new UsageError('refusing to read a raw disk from a terminal: pipe or redirect stdin (... | capture - OUT.qcow2)', 'capture');
  const mode = progressMode(flags, 'capture');
  const onProgress = progressReporter(mode);
  const result = await untilInterrupted((signal) =>
    // - is stdin; the library reads a pipe in order (and a redirected file as a file).
    capture(source === '-' ? '/dev/stdin' : source!, output!, {
      ...openOptions(flags),
      ...defined({
        compress: flags.compress,
        level: flags.level,
        clusterSize: flags.clusterSize,
        compat: flags.compat,
        backing: flags.backing,
        backingFormat: flags.backingFormat,
        size: flags.size,
        threads: flags.threads,
        onProgress,
      }),
      overwrite: flags.overwrite === true,
      signal,
    }),
  );
  reportResult(
    mode,
    flags,
    result,
    () =>
      `qcow2img: captured ${humanBytes(result.virtualSize)} into ${result.output} (${humanBytes(result.fileSize)}; ${result.dataClusters} data, ${result.compressedClusters} compressed, ${result.zeroClusters} zero clusters) in ${result.seconds.toFixed(2)} s`,
  );
}

/** `qcow2img bench TARGET`: write bandwidth, IOPS and latency, as fio measures them. */
import { bench, type BenchOptions } from '../../bench/index';
import { humanBytes } from '../format';
import { defined, type OpenFlags, openOptions } from '../options';
import { type ProgressFlags, clearProgress, printJson, progressMode, progressReporter, untilInterrupted } from '../terminal';

/** The API's options as flags (commander's names), plus how to print. */
export interface BenchFlags
  extends OpenFlags,
    ProgressFlags,
    Pick<BenchOptions, 'size' | 'blockSize' | 'queueDepth' | 'pattern' | 'time' | 'direct' | 'engine' | 'force' | 'image'> {
  json?: boolean;
}

export async function run([target]: string[], flags: BenchFlags): Promise<void> {
  const mode = progressMode(flags, 'bench', flags.json ? 'none' : 'auto');
  const onProgress = progressReporter(mode);
  const result = await untilInterrupted((signal) =>
    bench(target!, {
      ...openOptions(flags),
      ...defined({ size: flags.size, blockSize: flags.blockSize, queueDepth: flags.queueDepth, time: flags.time, image: flags.image, onProgress }),
      pattern: flags.pattern ?? 'seq',
      direct: flags.direct ?? 'always',
      engine: flags.engine ?? 'auto',
      force: flags.force === true,
      signal,
    }),
  );
  clearProgress();
  if (flags.json) {
    printJson(result);
    return;
  }
  const lines = [
    `target: ${result.target} (${result.direct ? 'O_DIRECT' : 'buffered'}, ${result.engine})`,
    `${result.pattern === 'seq' ? 'sequential' : 'random'} writes of ${humanBytes(result.blockSize)}, queue depth ${result.queueDepth}: ${humanBytes(result.bytes)} in ${result.seconds.toFixed(2)} s`,
    `bandwidth: ${(result.bandwidthBytesPerSec / 1e6).toFixed(1)} MB/s (${humanBytes(result.bandwidthBytesPerSec)}/s), ${Math.round(result.iops)} IOPS`,
    `latency: p50 ${result.latencyUs.p50.toFixed(0)} us, p99 ${result.latencyUs.p99.toFixed(0)} us, p99.9 ${result.latencyUs.p999.toFixed(0)} us`,
  ];
  if (result.load) {
    lines.push(
      `image load: ${humanBytes(result.load.dataBytes)} of data in ${result.load.seconds.toFixed(2)} s = ${(result.load.bytesPerSec / 1e6).toFixed(1)} MB/s, ${(100 * result.load.ratio).toFixed(1)}% of the raw bandwidth`,
    );
  }
  process.stdout.write(lines.join('\n') + '\n');
}

/**
 * What a native copy job of a plan reads from remote files, fetched into stage buffers before
 * the job runs (the job reads those files from them) and given back after.
 */
import { type NativePlan, type NativeSource, planRunFields, runFileBytes } from '../native';
import type { OpenFile } from '../qcow2/layers';
import { type Range, remoteOf } from './remote';

export interface Prefetch {
  /** The plan's sources, remote ones read from their stages, once every byte is fetched. */
  ready: Promise<NativeSource[]>;
  /** Gives the stages back (after the job that read them is done). */
  release(): void;
}

/** True when any file of the image is remote. */
export function hasRemote(files: readonly OpenFile[]): boolean {
  return files.some((f) => remoteOf(f) !== undefined);
}

/** The file byte ranges each remote source of `runs` reads. */
function remoteRanges(files: readonly OpenFile[], runs: Float64Array): Map<number, Range[]> {
  const wanted = new Map<number, Range[]>();
  for (let at = 0; at < runs.length; at += planRunFields) {
    const length = runFileBytes(runs, at);
    if (length === 0) continue;
    const source = runs[at + 3]!;
    if (!remoteOf(files[source]!)) continue;
    const from = runs[at + 4]!;
    let list = wanted.get(source);
    if (!list) wanted.set(source, (list = []));
    list.push([from, from + length]);
  }
  return wanted;
}

/**
 * Starts fetching the remote ranges of `plan` (a native plan over `files`, as Image.plan makes
 * it); `signal` stops it (CANCELLED).
 */
export function prefetchPlan(files: readonly OpenFile[], plan: NativePlan, signal?: AbortSignal): Prefetch {
  const staged = [...remoteRanges(files, plan.runs)].map(([source, ranges]) => {
    const handle = remoteOf(files[source]!)!;
    const stage = handle.stage(ranges, signal);
    stage.catch(() => {});
    return { source, handle, stage };
  });
  if (staged.length === 0) return { ready: Promise.resolve(plan.sources), release: () => {} };
  let released = false;
  return {
    ready: Promise.all(staged.map((s) => s.stage)).then((stages) => {
      const sources = [...plan.sources];
      staged.forEach(({ source }, i) => (sources[source] = { ...sources[source]!, stage: stages[i]!.chunks, extents: stages[i]!.extents }));
      return sources;
    }),
    release() {
      if (released) return;
      released = true;
      for (const { handle, stage } of staged) stage.then((s) => handle.unstage(s), () => {});
    },
  };
}

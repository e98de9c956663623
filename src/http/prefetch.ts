/**
 * What a native copy job of a plan reads from remote files, fetched into their memfds
 * before the job runs and punched out after.
 */
import { planRunFields, PlanKind } from '../native';
import type { OpenFile } from '../qcow2/layers';
import { type Range, remoteOf } from './remote';

export interface Prefetch {
  /** Settles when every byte the plan reads from a remote file is in its memfd. */
  ready: Promise<void>;
  /** Frees those bytes (after the job that read them is done). */
  release(): void;
}

const none: Prefetch = { ready: Promise.resolve(), release: () => {} };

/** True when any file of the image is remote. */
export function hasRemote(files: readonly OpenFile[]): boolean {
  return files.some((f) => remoteOf(f) !== undefined);
}

/** Starts fetching the remote ranges of `runs` (a native plan over `files`, as Image.plan makes it); `signal` stops it (CANCELLED). */
export function prefetchPlan(files: readonly OpenFile[], runs: Float64Array, signal?: AbortSignal): Prefetch {
  if (!hasRemote(files)) return none;
  const wanted = new Map<number, Range[]>();
  for (let at = 0; at < runs.length; at += planRunFields) {
    const kind = runs[at + 2]!;
    if (kind === PlanKind.Zero) continue;
    const source = runs[at + 3]!;
    if (!remoteOf(files[source]!)) continue;
    const from = runs[at + 4]!;
    const length = kind === PlanKind.Compressed ? runs[at + 5]! : runs[at + 1]!;
    let list = wanted.get(source);
    if (!list) wanted.set(source, (list = []));
    list.push([from, from + length]);
  }
  const held: { handle: NonNullable<ReturnType<typeof remoteOf>>; token: Promise<Range[]> }[] = [];
  for (const [source, ranges] of wanted) {
    const handle = remoteOf(files[source]!)!;
    const token = handle.ensure(ranges, signal);
    token.catch(() => {});
    held.push({ handle, token });
  }
  let released = false;
  return {
    ready: Promise.all(held.map((h) => h.token)).then(() => {}),
    release() {
      if (released) return;
      released = true;
      for (const { handle, token } of held) token.then((t) => handle.release(t), () => {});
    },
  };
}

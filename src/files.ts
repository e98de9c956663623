import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { ioError } from './errors';
import { native } from './native';

/**
 * The name every output is written under until it is complete, then renamed to `target`:
 * hidden, in the same folder (so the rename is atomic), unique to this process and call.
 */
export function temporaryPathFor(target: string): string {
  return nodePath.join(nodePath.dirname(target), `.${nodePath.basename(target)}.qcow2img-${process.pid}-${randomBytes(4).toString('hex')}.tmp`);
}

/** fsync of a folder, so that a rename in it survives a crash. */
export async function syncFolder(folder: string): Promise<void> {
  const handle = await fs.open(folder, 'r').catch(() => undefined);
  if (!handle) return;
  await handle.sync().catch(() => {});
  await handle.close();
}

/**
 * The next data (SEEK_DATA) or hole (SEEK_HOLE) of the file at or after `offset`, or -1 when
 * there is none; a failure (a file system that cannot say) is an error naming `path`.
 */
export function seekIn(fd: number, what: 'data' | 'hole', offset: number, path: string): number {
  try {
    return what === 'data' ? native().seekData(fd, offset) : native().seekHole(fd, offset);
  } catch (error) {
    throw ioError(error, path, 'cannot find the holes of the file');
  }
}

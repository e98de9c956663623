/** `load`: write an image's virtual disk onto a target. */
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { Qcow2Error } from '../errors';
import { Image, type OpenOptions } from '../qcow2/image';
import { open } from '../qcow2/open';
import { loadToFile, type LoadResult, type LoadToFileOptions } from './file';

export type { LoadResult } from './file';
export type { Progress, ProgressCallback } from './progress';

export interface LoadOptions extends LoadToFileOptions, OpenOptions {}

/**
 * Loads the raw virtual disk of `source` (a path or an open Image) into `target`.
 *
 * @example
 * await load('disk.qcow2', '/var/lib/vm/disk.raw', { onProgress: (p) => console.log(p.bytesDone) });
 */
export async function load(source: string | Image, target: string, options: LoadOptions = {}): Promise<LoadResult> {
  const stats = await fs.stat(nodePath.resolve(target)).catch(() => undefined);
  if (stats?.isBlockDevice()) {
    throw new Qcow2Error('INVALID_ARGUMENT', 'block device targets are not supported yet', { path: target });
  }
  const image = typeof source === 'string' ? await open(source, options) : source;
  try {
    return await loadToFile(image, target, options);
  } finally {
    if (typeof source === 'string') await image.close();
  }
}

import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';

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

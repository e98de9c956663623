/**
 * A small tmpfs of the test's own (as root), for writes that must run out of space.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';

/** Mounts a tmpfs of `size` (mount's units: 1m) on the new folder `where`, runs `body`, unmounts it. */
export async function withTmpfs(where: string, size: string, body: () => Promise<void>): Promise<void> {
  fs.mkdirSync(where);
  const mounted = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', where], { encoding: 'utf8' });
  if (mounted.status !== 0) throw new Error(`cannot mount a tmpfs on ${where}: ${mounted.stderr.trim()}`);
  try {
    await body();
  } finally {
    execFileSync('umount', [where]);
  }
}

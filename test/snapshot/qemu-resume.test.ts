/**
 * The whole hypervisor loop with a real QEMU (TCG): examples/qemu-snapshot.sh boots a tiny
 * guest, pauses it, saves its device state, snapshots disk + RAM + state with qcow2img,
 * destroys them, restores and resumes. The guest must go on counting from where it stopped
 * (a reboot would start at 1 and print "booted") and reread the same files from its disk.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loopUnavailable } from '../helpers/loop';
import { repoRoot } from '../helpers/qemu';

const script = path.join(repoRoot, 'examples', 'qemu-snapshot.sh');
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-qemu-resume-'));

/** The serial console's "count N HASH" lines, and whether the guest printed "booted". */
function serial(file: string): { booted: boolean; counts: number[]; hashes: Set<string> } {
  const text = fs.readFileSync(file, 'utf8');
  const lines = [...text.matchAll(/^count (\d+) ([0-9a-f]{16})\r?$/gm)];
  return { booted: /^booted\r?$/m.test(text), counts: lines.map((m) => Number(m[1])), hashes: new Set(lines.map((m) => m[2]!)) };
}

describe.skipIf(loopUnavailable())('a QEMU guest snapshotted and resumed', () => {
  afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

  for (const format of ['folder', 'tar.zst']) {
    it(`continues where it stopped, from a ${format} bundle`, () => {
      const dir = path.join(work, format);
      execFileSync('bash', [script, dir, format], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 180_000 });
      const before = serial(path.join(dir, 'serial-before.log'));
      const after = serial(path.join(dir, 'serial-after.log'));
      const files = Buffer.concat([fs.readFileSync(path.join(dir, 'files', 'a')), fs.readFileSync(path.join(dir, 'files', 'b'))]);
      const expected = createHash('sha256').update(files).digest('hex').slice(0, 16);

      expect(before.booted).toBe(true);
      expect(before.counts.slice(0, 3)).toEqual([1, 2, 3]);
      expect([...before.hashes]).toEqual([expected]);
      // Resumed, not rebooted: no boot line, and the count goes on by one.
      expect(after.booted).toBe(false);
      expect(after.counts[0]).toBe(before.counts[before.counts.length - 1]! + 1);
      expect(after.counts.length).toBeGreaterThanOrEqual(2);
      // The files reread from the restored disk are the ones the guest started with.
      expect([...after.hashes]).toEqual([expected]);
      expect(fs.existsSync(path.join(dir, format === 'folder' ? 'bundle' : `bundle.${format}`))).toBe(true);
    });
  }
});

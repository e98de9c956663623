/** check lists every problem qemu-img check lists, in its words: the same lines on stderr. */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { cliPath } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-check-problems-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

/** Refcount 2 for every data cluster of a 1 MiB write: each one's COPIED flag disagrees with it. */
function copiedMismatches(image: string): void {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '10M']);
  execFileSync('qemu-io', ['-c', 'write 0 1M', image], { stdio: 'ignore' });
  const bytes = fs.readFileSync(image);
  const block = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
  // Clusters 0-3 are the header, L1, refcount table and block; the 16 data clusters and the L2 table follow.
  for (let cluster = 4; bytes.readUInt16BE(block + 2 * cluster) === 1; cluster++) bytes.writeUInt16BE(2, block + 2 * cluster);
  fs.writeFileSync(image, bytes);
}

const lines = (text: string) => text.split('\n').filter(Boolean).sort();

it('every OFLAG_COPIED data cluster of an L2 table is listed, as qemu-img lists them', () => {
  const image = path.join(work, 'copied.qcow2');
  copiedMismatches(image);
  const qemu = spawnSync('qemu-img', ['check', image], { encoding: 'utf8' });
  const ours = spawnSync(process.execPath, [cliPath, 'check', image], { encoding: 'utf8' });
  expect(ours.status).toBe(qemu.status);
  const qemuProblems = lines(qemu.stderr);
  expect(qemuProblems.filter((l) => l.startsWith('ERROR OFLAG_COPIED data cluster')).length).toBeGreaterThan(10);
  expect(lines(ours.stderr)).toEqual(qemuProblems);
  expect(ours.stdout).toBe(qemu.stdout);
});

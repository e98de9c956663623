/**
 * Issue #20 item 5: incremental snapshots as archives (.tar, .tar.gz, .tar.zst), their parents
 * named by path and themselves archives, restored byte for byte through the chain.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../src/errors';
import { createSnapshot, inspectSnapshot, restoreSnapshot, verifySnapshot } from '../../src/snapshot';
import { sampleCpuState } from '../helpers/cpu';
import { makeRamDump } from '../helpers/ram';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const cli = path.resolve(__dirname, '../../dist/cli/main.js');
let dir: string;
const dumps: Buffer[] = [];

/** The next generation of guest RAM: some pages rewritten, some zeroed. */
function evolve(previous: Buffer, generation: number): Buffer {
  const out = Buffer.from(previous);
  for (let p = generation; p < SIZE / 4096; p += 17) out.fill(`generation ${generation} page ${p}\n`, p * 4096, (p + 1) * 4096);
  for (let p = generation * 5; p < SIZE / 4096; p += 41) out.fill(0, p * 4096, (p + 1) * 4096);
  return out;
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-archive-chain-'));
  dumps.push(makeRamDump(path.join(dir, 'ram1.raw'), SIZE, 21));
  for (const g of [2, 3]) {
    dumps.push(evolve(dumps[g - 2]!, g));
    fs.writeFileSync(path.join(dir, `ram${g}.raw`), dumps[g - 1]!);
  }
  expect(dumps[1]!.equals(dumps[0]!)).toBe(false);
  expect(dumps[2]!.equals(dumps[1]!)).toBe(false);
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe('an incremental chain of archives', () => {
  it('three .tar.zst archives, each over the last: restored byte for byte, the children holding only what changed', async () => {
    const snaps = path.join(dir, 'zst');
    fs.mkdirSync(snaps);
    const s1 = path.join(snaps, 's1.tar.zst');
    const s2 = path.join(snaps, 's2.tar.zst');
    const s3 = path.join(snaps, 's3.tar.zst');
    await createSnapshot(s1, { memory: path.join(dir, 'ram1.raw'), cpu: sampleCpuState, devices: [{ name: 'nic', data: Buffer.from('nic state 1') }] });
    const m2 = await createSnapshot(s2, { memory: path.join(dir, 'ram2.raw'), parent: s1, devices: [{ name: 'nic', data: Buffer.from('nic state 2') }] });
    const m3 = await createSnapshot(s3, { memory: path.join(dir, 'ram3.raw'), parent: s2, cpu: sampleCpuState, devices: [{ name: 'nic', data: Buffer.from('nic state 3') }] });
    expect(m2.parent!.path).toBe('s1.tar.zst');
    expect(m3.parent!.path).toBe('s2.tar.zst');
    expect(fs.statSync(s3).size).toBeLessThan(fs.statSync(s1).size);
    expect(fs.readdirSync(snaps).sort()).toEqual(['s1.tar.zst', 's2.tar.zst', 's3.tar.zst']);

    // Moved together elsewhere: the parents are named relative to the archives.
    const moved = path.join(dir, 'moved');
    fs.renameSync(snaps, moved);
    const temp = path.join(dir, 'temp');
    fs.mkdirSync(temp);
    for (const [g, bundle] of [[3, 's3.tar.zst'], [2, 's2.tar.zst'], [1, 's1.tar.zst']] as const) {
      const out = path.join(dir, `restored${g}.ram`);
      const deviceDir = path.join(dir, `devices${g}`);
      const result = await restoreSnapshot(path.join(moved, bundle), { memory: out, deviceDir, tempDir: temp });
      expect(result.memory!.bytes).toBe(SIZE);
      expect(fs.readFileSync(out).equals(dumps[g - 1]!), `generation ${g}`).toBe(true);
      expect(fs.readFileSync(path.join(deviceDir, 'nic'), 'utf8')).toBe(`nic state ${g}`);
    }
    expect(fs.readdirSync(temp), 'extraction folders removed').toEqual([]);
    expect(await verifySnapshot(path.join(moved, 's3.tar.zst'))).toEqual([]);
    const inspection = await inspectSnapshot(path.join(moved, 's3.tar.zst'));
    expect(inspection.chain.map((l) => l.id)).toEqual([m3.id, m2.id, inspection.chain[2]!.id]);
    expect(inspection.chain).toHaveLength(3);
    expect(inspection.state!.dumpSize).toBe(SIZE);
  });

  it('a mixed chain: folder, then .tar read in place, then .tar.gz, through the CLI', () => {
    const s1 = path.join(dir, 'mixed-s1');
    const s2 = path.join(dir, 'mixed-s2.tar');
    const s3 = path.join(dir, 'mixed-s3.tar.gz');
    const run = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' });
    expect(run('snapshot', 'create', s1, '--memory', path.join(dir, 'ram1.raw')).status).toBe(0);
    expect(run('snapshot', 'create', s2, '--memory', path.join(dir, 'ram2.raw'), '--parent', s1).status).toBe(0);
    const third = run('snapshot', 'create', s3, '--memory', path.join(dir, 'ram3.raw'), '--parent', s2);
    expect(third.status, third.stderr).toBe(0);
    expect(third.stderr).toMatch(/written to .*mixed-s3\.tar\.gz \(parent /);
    const out = path.join(dir, 'mixed.ram');
    const restored = run('snapshot', 'restore', s3, '--memory', out);
    expect(restored.status, restored.stderr).toBe(0);
    expect(fs.readFileSync(out).equals(dumps[2]!)).toBe(true);
  });

  it('a damaged parent archive is named in the error', async () => {
    const s1 = path.join(dir, 'bad-s1.tar.zst');
    const s2 = path.join(dir, 'bad-s2.tar.zst');
    await createSnapshot(s1, { memory: path.join(dir, 'ram1.raw') });
    await createSnapshot(s2, { memory: path.join(dir, 'ram2.raw'), parent: s1 });
    const bytes = fs.readFileSync(s1);
    const middle = Math.floor(bytes.length / 2);
    bytes[middle] = bytes[middle]! ^ 0xff;
    fs.writeFileSync(s1, bytes);
    const error = await restoreSnapshot(s2, { memory: path.join(dir, 'bad.ram') }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).path).toContain('bad-s1.tar.zst');
    expect(fs.existsSync(path.join(dir, 'bad.ram'))).toBe(false);
  });

  it('a disk in an incremental archive is made over its parent archive\'s disk (test/snapshot/incremental-disk.test.ts has the rest)', async () => {
    const disk = path.join(dir, 'disk.raw');
    fs.writeFileSync(disk, Buffer.alloc(MiB, 1));
    const s1 = path.join(dir, 'disk-s1.tar.zst');
    await createSnapshot(s1, { disk, memory: path.join(dir, 'ram1.raw') });
    const s2 = path.join(dir, 'disk-s2.tar.zst');
    const m2 = await createSnapshot(s2, { disk, memory: path.join(dir, 'ram2.raw'), parent: s1 });
    expect(m2.parent!.path).toBe('disk-s1.tar.zst');
    const out = path.join(dir, 'disk-restored.raw');
    await restoreSnapshot(s2, { disk: out });
    expect(fs.readFileSync(out).equals(fs.readFileSync(disk))).toBe(true);
  });
});

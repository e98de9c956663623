/**
 * Snapshot bundles: round trips of memory, CPU state, devices and disk; incremental chains;
 * damage caught by verify. The VM state file alone is in test/vmstate/state-file.test.ts.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshot, inspectSnapshot, Qcow2Error, restoreSnapshot, StateFile, verifySnapshot } from '../../src/index';
import { sampleCpuState as cpu } from '../helpers/cpu';
import { Random } from '../helpers/prng';
import { makeRamDump } from '../helpers/ram';
import { withTmpfs } from '../helpers/tmpfs';

const MiB = 1024 * 1024;
let dir: string;
let ram1: Buffer;
let ram2: Buffer;
let ram3: Buffer;
let disk: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-snapshot-'));
  ram1 = makeRamDump(path.join(dir, 'ram1.raw'), 64 * MiB, 1);
  // Later states: some pages written, some zeroed, the rest unchanged.
  ram2 = Buffer.from(ram1);
  for (let p = 1000; p < 1300; p += 3) ram2.fill(p & 0xff, p * 4096, p * 4096 + 100);
  ram2.fill(0, 2000 * 4096, 2100 * 4096);
  fs.writeFileSync(path.join(dir, 'ram2.raw'), ram2);
  ram3 = Buffer.from(ram2);
  for (let p = 9000; p < 9050; p++) ram3.fill(0xee, p * 4096, (p + 1) * 4096);
  fs.writeFileSync(path.join(dir, 'ram3.raw'), ram3);
  disk = path.join(dir, 'disk.raw');
  fs.writeFileSync(disk, Buffer.alloc(0));
  fs.truncateSync(disk, 32 * MiB);
  const fd = fs.openSync(disk, 'r+');
  fs.writeSync(fd, ram1.subarray(0, 4 * MiB), 0, undefined, 8 * MiB);
  fs.closeSync(fd);
  fs.writeFileSync(path.join(dir, 'cpu.json'), JSON.stringify(cpu));
  fs.writeFileSync(path.join(dir, 'nic.bin'), Buffer.from([0, 1, 2, 3, 254, 255]));
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('snapshot bundles', () => {
  it('round-trip memory, CPU state, devices and disk bit for bit through a chain of three', async () => {
    const s1 = path.join(dir, 's1');
    const s2 = path.join(dir, 's2');
    const s3 = path.join(dir, 's3');
    await createSnapshot(s1, { disk, memory: path.join(dir, 'ram1.raw'), cpu, devices: [{ name: 'nic', data: Buffer.from([9, 8, 7]) }], machine: { type: 'q35' } });
    await createSnapshot(s2, { parent: s1, disk, memory: path.join(dir, 'ram2.raw'), cpu });
    // s3 from a dirty bitmap instead of a comparison: mark exactly the pages written.
    const dirty = Buffer.alloc(64 * 256 / 8);
    for (let p = 9000; p < 9050; p++) dirty[p >> 3] = dirty[p >> 3]! | (1 << (p & 7));
    await createSnapshot(s3, { parent: s2, disk, memory: path.join(dir, 'ram3.raw'), cpu, dirtyBitmap: dirty });

    const inspection = await inspectSnapshot(s3);
    expect(inspection.chain.map((c) => c.dir)).toEqual([s3, s2, s1]);
    expect(inspection.state!.pages.parent).toBe(64 * 256 - 50);
    expect(inspection.metadata.files['state.qvms']!.size).toBeLessThan(fs.statSync(path.join(s1, 'state.qvms')).size);

    const outputs: string[] = [];
    for (const [bundle, ram] of [[s1, ram1], [s2, ram2], [s3, ram3]] as const) {
      const out = fs.mkdtempSync(path.join(dir, 'out-'));
      outputs.push(out);
      const result = await restoreSnapshot(bundle, { disk: path.join(out, 'disk.raw'), memory: path.join(out, 'ram.raw'), cpu: path.join(out, 'cpu.json'), deviceDir: path.join(out, 'devices') });
      expect(fs.readFileSync(path.join(out, 'ram.raw')).equals(ram)).toBe(true);
      expect(fs.readFileSync(path.join(out, 'disk.raw')).equals(fs.readFileSync(disk))).toBe(true);
      expect(JSON.parse(fs.readFileSync(path.join(out, 'cpu.json'), 'utf8'))).toEqual(cpu);
      expect(result.memory!.bytes).toBe(ram.length);
      // Zero pages stay holes.
      expect(fs.statSync(path.join(out, 'ram.raw')).blocks * 512).toBeLessThan(ram.length / 2);
    }
    expect(fs.readFileSync(path.join(outputs[0]!, 'devices', 'nic'))).toEqual(Buffer.from([9, 8, 7]));
    // The child disks hold only what changed: nothing here.
    expect(JSON.parse(execFileSync('qemu-img', ['info', '--output=json', path.join(s2, 'disk.qcow2')], { encoding: 'utf8' }))['backing-filename']).toBe('../s1/disk.qcow2');
    expect(execFileSync('qemu-img', ['compare', '-q', disk, path.join(s3, 'disk.qcow2')]).length).toBe(0);
  });

  it('verify names the damaged file, and for the state file the chunk and guest range', async () => {
    const bundle = path.join(dir, 'damaged');
    await createSnapshot(bundle, { disk, memory: path.join(dir, 'ram1.raw'), cpu });
    expect(await verifySnapshot(bundle)).toEqual([]);
    const flip = (file: string, offset: number) => {
      const fd = fs.openSync(file, 'r+');
      const byte = Buffer.alloc(1);
      fs.readSync(fd, byte, 0, 1, offset);
      byte[0] = byte[0]! ^ 0x40;
      fs.writeSync(fd, byte, 0, 1, offset);
      fs.closeSync(fd);
    };
    const statePath = path.join(bundle, 'state.qvms');
    const state = await StateFile.open(statePath);
    const chunk = state.index.chunks[2]!;
    const section = state.index.sections[chunk.section]!;
    await state.close();
    flip(statePath, section.offset + 32 + 40);
    const problems = await verifySnapshot(bundle);
    const stateProblem = problems.find((p) => p.part === 'CHUNK 2');
    expect(stateProblem?.file).toBe(statePath);
    expect(stateProblem?.guestRanges?.[0]?.start).toBe(chunk.firstSpan * 512 * 4096);
    const cli = spawnSync(process.execPath, [path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js'), 'snapshot', 'verify', bundle], { encoding: 'utf8' });
    expect(cli.status).toBe(1);
    expect(cli.stderr).toContain('state.qvms: CHUNK 2');
    expect(cli.stderr).toContain('guest-physical 0x');
    // The disk and the metadata, each named.
    flip(statePath, section.offset + 32 + 40);
    flip(path.join(bundle, 'disk.qcow2'), 70000);
    expect((await verifySnapshot(bundle)).map((p) => path.basename(p.file))).toEqual(['disk.qcow2']);
    flip(path.join(bundle, 'disk.qcow2'), 70000);
    const metadataPath = path.join(bundle, 'snapshot.json');
    const metadata = JSON.parse(fs.readFileSync(metadataPath, 'utf8'));
    metadata.vcpuCount = -1;
    fs.writeFileSync(metadataPath, JSON.stringify(metadata));
    await expect(verifySnapshot(bundle)).rejects.toThrow(/field vcpuCount/);
  });

  it('refuses truncated state files and a parent that is not the one named', async () => {
    const s1 = path.join(dir, 't1');
    const s2 = path.join(dir, 't2');
    await createSnapshot(s1, { memory: path.join(dir, 'ram1.raw') });
    await createSnapshot(s2, { parent: s1, memory: path.join(dir, 'ram2.raw') });
    const truncated = path.join(dir, 'truncated.qvms');
    const bytes = fs.readFileSync(path.join(s1, 'state.qvms'));
    for (const cut of [10, 100, bytes.length - 1, bytes.length - 64]) {
      fs.writeFileSync(truncated, bytes.subarray(0, cut));
      const error = await StateFile.open(truncated).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect((error as Qcow2Error).message).toContain(truncated);
    }
    // Replace the parent by another snapshot under the same folder name.
    fs.rmSync(s1, { recursive: true });
    await createSnapshot(s1, { memory: path.join(dir, 'ram1.raw') });
    const error = await restoreSnapshot(s2, { memory: path.join(dir, 'never.raw') }).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('PARENT_MISMATCH');
    expect(fs.existsSync(path.join(dir, 'never.raw'))).toBe(false);
  });

  it('leaves nothing under the final name when creation fails', async () => {
    const out = path.join(dir, 'failed');
    await expect(createSnapshot(out, { memory: path.join(dir, 'ram1.raw'), cpu: { arch: 'x86_64', vcpus: [{ id: 0 }] } })).rejects.toThrow(/CPU state: vcpus.0.regs/);
    await expect(createSnapshot(out, { memory: path.join(dir, 'no-such.raw') })).rejects.toBeInstanceOf(Qcow2Error);
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.readdirSync(dir).filter((f) => f.includes('.failed.'))).toEqual([]);
  });
});

describe('a snapshot that does not fit where it is written (a 1 MiB tmpfs)', () => {
  it('names the member of the bundle the user named (not a temporary folder), and leaves nothing behind, as a folder and as an archive', async () => {
    const mnt = path.join(dir, 'small');
    // Random bytes: they do not compress, so the state file needs 4 MiB.
    const noise = path.join(dir, 'noise.raw');
    fs.writeFileSync(noise, new Random(5).bytes(4 * MiB));
    await withTmpfs(mnt, '1m', async () => {
      for (const [target, shown] of [
        [path.join(mnt, 'snap'), path.join(mnt, 'snap', 'state.qvms')],
        [path.join(mnt, 'snap.tar.zst'), `${path.join(mnt, 'snap.tar.zst')}:state.qvms`],
      ]) {
        const error = await createSnapshot(target!, { memory: noise, cpu }).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(Qcow2Error);
        expect(error).toMatchObject({ code: 'IO_ERROR', path: shown });
        expect((error as Error).message).toMatch(/no space left/i);
        expect((error as Error).message).not.toMatch(/qcow2img-\d+-/);
        expect(fs.readdirSync(mnt)).toEqual([]);
      }
    });
  });
});

/** bench: the figures are self-consistent, files are cleaned up, devices get load's safety checks. */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bench, Qcow2Error } from '../src/index';
import { type LoopDevice, loopUnavailable, makeLoop } from './helpers/loop';

const MiB = 1024 * 1024;
let dir: string;
const loops: LoopDevice[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-bench-'));
});
afterAll(() => {
  for (const loop of loops) loop.detach();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('bench', () => {
  it.each(['io_uring', 'threads'] as const)('writes the whole region once with the %s engine and removes its file', async (engine) => {
    const result = await bench(dir, { size: 32 * MiB, blockSize: MiB, queueDepth: 4, engine });
    expect(result.engine).toBe(engine);
    expect(result.bytes).toBe(32 * MiB);
    expect(result.bandwidthBytesPerSec).toBeCloseTo(result.bytes / result.seconds, 0);
    expect(result.iops).toBeCloseTo(32 / result.seconds, 3);
    expect(result.latencyUs.p50).toBeGreaterThan(0);
    expect(result.latencyUs.p50).toBeLessThanOrEqual(result.latencyUs.p99);
    expect(result.latencyUs.p99).toBeLessThanOrEqual(result.latencyUs.p999);
    expect(result.direct).toBe(true);
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  it('random 4 KiB writes cover the region once', async () => {
    const result = await bench(path.join(dir, 'rand.bin'), { size: 8 * MiB, blockSize: 4096, queueDepth: 8, pattern: 'rand' });
    expect(result.pattern).toBe('rand');
    expect(result.bytes).toBe(8 * MiB);
    expect(fs.existsSync(path.join(dir, 'rand.bin'))).toBe(false);
  });

  it('refuses an existing regular file and bad parameters', async () => {
    const file = path.join(dir, 'keep.bin');
    fs.writeFileSync(file, 'precious');
    await expect(bench(file, { size: MiB })).rejects.toMatchObject({ code: 'TARGET_EXISTS' });
    expect(fs.readFileSync(file, 'utf8')).toBe('precious');
    await expect(bench(dir, { blockSize: 1000 })).rejects.toBeInstanceOf(Qcow2Error);
    fs.unlinkSync(file);
  });

  it('the CLI prints the JSON keys scripts rely on', () => {
    const cli = path.join(__dirname, '..', 'dist', 'cli', 'main.js');
    const run = spawnSync(process.execPath, [cli, 'bench', dir, '--size', '8M', '--block-size', '1M', '--queue-depth', '2', '--json'], { encoding: 'utf8' });
    expect(run.status).toBe(0);
    const json = JSON.parse(run.stdout) as Record<string, unknown>;
    for (const key of ['bandwidthBytesPerSec', 'iops', 'latencyUs', 'bytes', 'seconds', 'blockSize', 'queueDepth', 'pattern', 'direct', 'engine']) {
      expect(json).toHaveProperty(key);
    }
    expect(json.bytes).toBe(8 * MiB);
    expect(Object.keys(json.latencyUs as object).sort()).toEqual(['p50', 'p99', 'p999']);
  });

  describe.skipIf(loopUnavailable() !== undefined)('on a loop device', () => {
    it('benchmarks a device, then loads an image onto it and reports the ratio', async () => {
      const loop = makeLoop(path.join(dir, 'dev.img'), 64 * MiB);
      loops.push(loop);
      const image = path.join(dir, 'small.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16M']);
      execFileSync('qemu-io', ['-c', 'write -P 0x42 0 8M', image], { stdio: 'ignore' });
      const result = await bench(loop.device, { queueDepth: 4, image });
      expect(result.bytes).toBe(16 * MiB);
      expect(result.load?.dataBytes).toBe(8 * MiB);
      expect(result.load?.ratio).toBeCloseTo(result.load!.bytesPerSec / result.bandwidthBytesPerSec, 6);
    });

    it('refuses a mounted device', async () => {
      const loop = makeLoop(path.join(dir, 'mounted.img'), 32 * MiB);
      loops.push(loop);
      execFileSync('mkfs.ext4', ['-q', loop.device]);
      const mountPoint = path.join(dir, 'mnt');
      fs.mkdirSync(mountPoint);
      execFileSync('mount', ['-o', 'ro,noload', loop.device, mountPoint]);
      try {
        await expect(bench(loop.device, { size: MiB })).rejects.toMatchObject({ code: 'TARGET_IN_USE' });
      } finally {
        execFileSync('umount', [mountPoint]);
      }
    });
  });
});

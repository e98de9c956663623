/** bench: the figures are self-consistent, files are cleaned up, devices get load's safety checks. */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bench, Qcow2Error } from '../../src/index';
import { native } from '../../src/native';
import { type LoopDevice, loopUnavailable, makeLoop } from '../helpers/loop';
import { interruptedCli } from '../helpers/signals';

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
    const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
    const run = spawnSync(process.execPath, [cli, 'bench', dir, '--size', '8M', '--block-size', '1M', '--queue-depth', '2', '--json'], { encoding: 'utf8' });
    expect(run.status).toBe(0);
    const json = JSON.parse(run.stdout) as Record<string, unknown>;
    for (const key of ['bandwidthBytesPerSec', 'iops', 'latencyUs', 'bytes', 'seconds', 'blockSize', 'queueDepth', 'pattern', 'direct', 'engine']) {
      expect(json).toHaveProperty(key);
    }
    expect(json.bytes).toBe(8 * MiB);
    expect(Object.keys(json.latencyUs as object).sort()).toEqual(['p50', 'p99', 'p999']);
  });

  it('touches no file it did not make: a file named like the target plus ".load" is left alone', async () => {
    const target = path.join(dir, 'named.img');
    fs.writeFileSync(`${target}.load`, 'precious');
    const image = path.join(dir, 'for-load.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '8M']);
    execFileSync('qemu-io', ['-c', 'write -P 0x42 0 4M', image], { stdio: 'ignore' });
    const result = await bench(target, { size: 8 * MiB, queueDepth: 2, image });
    expect(result.load?.dataBytes).toBe(4 * MiB);
    expect(fs.readFileSync(`${target}.load`, 'utf8')).toBe('precious');
    expect(fs.readdirSync(dir).sort()).toEqual(['for-load.qcow2', 'named.img.load']);
    fs.rmSync(`${target}.load`);
    fs.rmSync(image);
  });

  it('with an image, a bench that fails still removes its file', async () => {
    const image = path.join(dir, 'tiny.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '512K']);
    await expect(bench(dir, { image })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    expect(fs.readdirSync(dir)).toEqual(['tiny.qcow2']);
    fs.rmSync(image);
  });

  it('SIGTERM: exit 130 and the bench file is removed', async () => {
    const folder = fs.mkdtempSync(path.join(dir, 'term-'));
    const ran = await interruptedCli(['bench', folder, '--size', '64M', '--time', '60', '--progress=none'], () => fs.readdirSync(folder).length > 0);
    expect(ran.status, ran.stderr).toBe(130);
    expect(fs.readdirSync(folder)).toEqual([]);
    fs.rmdirSync(folder);
  });

  it('a write error with io_uring rejects (in-flight writes are drained, nothing waits forever)', async () => {
    const file = path.join(dir, 'read-only.bin');
    fs.writeFileSync(file, Buffer.alloc(4 * MiB));
    const fd = fs.openSync(file, 'r');
    try {
      for (const engine of [1, 2]) {
        const job = native().writeBench({ fd, offset: 0, size: 4 * MiB, blockSize: 64 * 1024, queueDepth: 8, random: false, seconds: 0, engine, counters: new BigUint64Array(4) });
        await expect(job, `engine ${engine}`).rejects.toMatchObject({ message: expect.stringMatching(/Bad file descriptor/) });
      }
    } finally {
      fs.closeSync(fd);
      fs.rmSync(file);
    }
  });

  it('a random pattern over too many blocks is refused before its order is built', async () => {
    const fd = fs.openSync(path.join(dir, 'never-written.bin'), 'w');
    try {
      const job = native().writeBench({ fd, offset: 0, size: 2 ** 46, blockSize: 512, queueDepth: 1, random: true, seconds: 0, engine: 2, counters: new BigUint64Array(4) });
      await expect(job).rejects.toMatchObject({ message: expect.stringMatching(/limited to 64 Mi blocks/) });
      expect(fs.statSync(path.join(dir, 'never-written.bin')).size).toBe(0);
    } finally {
      fs.closeSync(fd);
      fs.rmSync(path.join(dir, 'never-written.bin'));
    }
  });

  it('the CLI refuses a time that is not a finite number of seconds', () => {
    const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
    for (const time of ['Infinity', '1e400', '0', '-1', 'soon']) {
      const run = spawnSync(process.execPath, [cli, 'bench', dir, '--size', '8M', `--time=${time}`], { encoding: 'utf8' });
      expect(run.status, time).toBe(1);
      expect(run.stderr).toMatch(/--time takes a number of seconds/);
    }
    expect(fs.readdirSync(dir)).toEqual([]);
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

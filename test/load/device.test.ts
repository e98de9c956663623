/**
 * load onto real block devices: loop devices this file creates and detaches.
 * Every expectation comes from qemu-img's raw output of the same image.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { load, Qcow2Error } from '../../src/index';
import { loadWith } from '../../src/load/index';
import { attachLoop, type LoopDevice, loopUnavailable, makeLoop, partition, partitionsOf, readRange } from '../helpers/loop';

const skip = loopUnavailable();
if (skip) console.warn(`skipping device tests: ${skip}`);

const MiB = 1024 * 1024;
let dir: string;
let image: string;
let expected: Buffer;
const loops: LoopDevice[] = [];

function qemuImg(...args: string[]): void {
  execFileSync('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}
function qemuIo(file: string, ...commands: string[]): void {
  execFileSync('qemu-io', [...commands.flatMap((c) => ['-c', c]), file], { stdio: ['ignore', 'ignore', 'pipe'] });
}
function sha(buffer: Buffer): string {
  return createHash('sha256').update(buffer).digest('hex');
}
function newLoop(name: string, size: number, fill?: 'random'): LoopDevice {
  const loop = makeLoop(path.join(dir, name), size);
  loops.push(loop);
  if (fill === 'random') {
    // Old data everywhere, so that zero ranges must really be zeroed.
    const fd = fs.openSync(loop.device, 'w');
    for (let at = 0; at < size; at += 4 * MiB) fs.writeSync(fd, randomBytes(Math.min(4 * MiB, size - at)), 0, undefined, at);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
  }
  return loop;
}

describe.skipIf(skip !== undefined)('load onto block devices', () => {
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-device-'));
    // 20 MiB disk: data, zero writes, a hole, an unaligned tail, compressed clusters.
    const raw = path.join(dir, 'source.raw');
    fs.writeFileSync(raw, Buffer.alloc(0));
    fs.truncateSync(raw, 20 * MiB + 3 * 512);
    const fd = fs.openSync(raw, 'r+');
    fs.writeSync(fd, randomBytes(3 * MiB), 0, undefined, 0);
    fs.writeSync(fd, Buffer.alloc(MiB, 0x5a), 0, undefined, 7 * MiB);
    fs.writeSync(fd, randomBytes(MiB + 1536), 0, undefined, 19 * MiB);
    fs.closeSync(fd);
    image = path.join(dir, 'image.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-c', '-o', 'compression_type=zstd', raw, image);
    qemuIo(image, 'write -P 0xc3 12M 2M', 'write -z 1M 512k');
    const reference = path.join(dir, 'reference.raw');
    qemuImg('convert', '-O', 'raw', image, reference);
    expected = fs.readFileSync(reference);
  });

  afterAll(() => {
    for (const loop of loops) {
      try {
        loop.detach();
      } catch {
        // already detached
      }
    }
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('writes a whole device that held old data, and verifies it', async () => {
    const loop = newLoop('whole.img', 32 * MiB, 'random');
    const tailBefore = readRange(loop.device, expected.length, 32 * MiB - expected.length);
    const result = await load(image, loop.device, { verify: true });
    expect(result.kind).toBe('device');
    expect(result.verified).toBe(true);
    expect(result.direct).toBe(true);
    expect(sha(readRange(loop.device, 0, expected.length))).toBe(sha(expected));
    // Nothing past the virtual size was touched, even inside the last block.
    expect(sha(readRange(loop.device, expected.length, 32 * MiB - expected.length))).toBe(sha(tailBefore));
  });

  it('writes partition 2 of a GPT disk and nothing else', async () => {
    const loop = newLoop('gpt.img', 64 * MiB, 'random');
    partition(loop.device, 'label: gpt\n,8M\n,24M\n,\n');
    const parts = partitionsOf(loop.device);
    const p2 = parts.get(2)!;
    const before = readRange(loop.device, 0, 64 * MiB);
    await load(image, loop.device, { partition: 2, verify: true });
    const after = readRange(loop.device, 0, 64 * MiB);
    expect(sha(after.subarray(p2.start, p2.start + expected.length))).toBe(sha(expected));
    expect(sha(after.subarray(0, p2.start))).toBe(sha(before.subarray(0, p2.start)));
    expect(sha(after.subarray(p2.start + expected.length))).toBe(sha(before.subarray(p2.start + expected.length)));
  });

  it('writes a logical partition of an MBR disk', async () => {
    const loop = newLoop('mbr.img', 64 * MiB, 'random');
    const node = (n: number) => `${loop.device}${/\d$/.test(loop.device) ? 'p' : ''}${n}`;
    partition(loop.device, `label: dos\n${node(1)} : size=4M, type=83\n${node(2)} : size=40M, type=5\n${node(5)} : size=2M, type=83\n${node(6)} : size=24M, type=83\n`);
    const parts = partitionsOf(loop.device);
    const p6 = parts.get(6)!;
    expect(p6.size).toBeGreaterThanOrEqual(expected.length);
    const before = readRange(loop.device, 0, 64 * MiB);
    // Partition 2 is the extended container itself: never a target.
    const extended = await load(image, loop.device, { partition: 2 }).catch((e: unknown) => e);
    expect((extended as Qcow2Error).code).toBe('INVALID_ARGUMENT');
    expect((extended as Qcow2Error).message).toContain('extended');
    await load(image, loop.device, { partition: 6 });
    const after = readRange(loop.device, 0, 64 * MiB);
    expect(sha(after.subarray(p6.start, p6.start + expected.length))).toBe(sha(expected));
    expect(sha(after.subarray(0, p6.start))).toBe(sha(before.subarray(0, p6.start)));
    expect(sha(after.subarray(p6.start + expected.length))).toBe(sha(before.subarray(p6.start + expected.length)));
  });

  it('writes at an offset and leaves the bytes before it alone', async () => {
    const loop = newLoop('offset.img', 40 * MiB, 'random');
    const before = readRange(loop.device, 0, 40 * MiB);
    const offset = 3 * MiB + 4096;
    await load(image, loop.device, { offset, verify: true });
    const after = readRange(loop.device, 0, 40 * MiB);
    expect(sha(after.subarray(offset, offset + expected.length))).toBe(sha(expected));
    expect(sha(after.subarray(0, offset))).toBe(sha(before.subarray(0, offset)));
    expect(sha(after.subarray(offset + expected.length))).toBe(sha(before.subarray(offset + expected.length)));
  });

  it('says when a loop device writes through its backing file\'s page cache, and not once it uses direct I/O', async () => {
    const loop = newLoop('buffered.img', 24 * MiB);
    const noticesOf = async () => {
      const notices: string[] = [];
      await load(image, loop.device, { onNotice: (m) => notices.push(m) });
      expect(sha(readRange(loop.device, 0, expected.length))).toBe(sha(expected));
      return notices.filter((n) => n.includes('loop device without direct I/O'));
    };
    expect(await noticesOf()).toEqual([`${loop.device}: a loop device without direct I/O: its writes are copied through the backing file's page cache, which slows loads (losetup --direct-io=on makes it faster)`]);
    execFileSync('losetup', ['--direct-io=on', loop.device]);
    expect(fs.readFileSync(`/sys/block/${path.basename(loop.device)}/loop/dio`, 'utf8').trim()).toBe('1');
    expect(await noticesOf()).toEqual([]);
  });

  it('writes at an offset inside a sector through the page cache, keeping the device claimed', async () => {
    const loop = newLoop('unaligned.img', 40 * MiB, 'random');
    const before = readRange(loop.device, 0, 40 * MiB);
    const offset = 3 * MiB + 100;
    const notices: string[] = [];
    let claimed: string | undefined;
    const result = await loadWith(image, loop.device, {
      offset,
      verify: true,
      onNotice: (m) => notices.push(m),
      // Written and flushed, not yet verified: nobody else may open the device exclusively.
      beforeVerify: () => {
        try {
          fs.closeSync(fs.openSync(loop.device, fs.constants.O_RDONLY | fs.constants.O_EXCL));
          claimed = 'no';
        } catch (error) {
          claimed = (error as NodeJS.ErrnoException).code;
        }
      },
    });
    expect(claimed).toBe('EBUSY');
    expect(result.direct).toBe(false);
    expect(notices.join('\n')).toMatch(/not a multiple of \d+; writing through the page cache/);
    const after = readRange(loop.device, 0, 40 * MiB);
    expect(sha(after.subarray(offset, offset + expected.length))).toBe(sha(expected));
    expect(sha(after.subarray(0, offset))).toBe(sha(before.subarray(0, offset)));
    expect(sha(after.subarray(offset + expected.length))).toBe(sha(before.subarray(offset + expected.length)));
  });

  it('refuses a partition smaller than the virtual size, writing nothing', async () => {
    const loop = newLoop('small.img', 32 * MiB, 'random');
    partition(loop.device, 'label: gpt\n,8M\n,\n');
    const before = sha(readRange(loop.device, 0, 32 * MiB));
    const error = await load(image, loop.device, { partition: 1 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).code).toBe('TARGET_TOO_SMALL');
    expect((error as Qcow2Error).message).toContain(loop.device);
    expect(sha(readRange(loop.device, 0, 32 * MiB))).toBe(before);
  });

  it('refuses a device too small for the image at its offset', async () => {
    const loop = newLoop('tiny.img', 16 * MiB);
    const error = await load(image, loop.device).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('TARGET_TOO_SMALL');
  });

  it('refuses a mounted device, names the mount point, and leaves it unchanged', async () => {
    const loop = newLoop('mounted.img', 32 * MiB);
    execFileSync('mkfs.ext4', ['-q', loop.device]);
    const mountPoint = path.join(dir, 'mnt');
    fs.mkdirSync(mountPoint, { recursive: true });
    // Read-only, so that mounting and unmounting write nothing themselves.
    execFileSync('mount', ['-o', 'ro,noload', loop.device, mountPoint]);
    let before: string;
    try {
      before = sha(readRange(loop.device, 0, 32 * MiB));
      const error = await load(image, loop.device).catch((e: unknown) => e);
      expect((error as Qcow2Error).code).toBe('TARGET_IN_USE');
      expect((error as Qcow2Error).message).toContain('mounted');
      expect((error as Qcow2Error).message).toContain(mountPoint);
    } finally {
      execFileSync('umount', [mountPoint]);
    }
    expect(sha(readRange(loop.device, 0, 32 * MiB))).toBe(before);
  });

  it('refuses a loop device backed by the image itself', async () => {
    const copy = path.join(dir, 'self.qcow2');
    fs.copyFileSync(image, copy);
    fs.appendFileSync(copy, Buffer.alloc(64 * MiB - fs.statSync(copy).size));
    const loop = newLoop('unused.img', 1);
    loop.detach();
    const self = attachLoop(copy);
    loops.push(self);
    const error = await load(copy, self.device).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('TARGET_IS_SOURCE');
    // Named through a relative path and a symlink: still the same file.
    const link = path.join(dir, 'self-link.qcow2');
    fs.symlinkSync(copy, link);
    const viaLink = await load(path.relative(process.cwd(), link), self.device).catch((e: unknown) => e);
    expect((viaLink as Qcow2Error).code).toBe('TARGET_IS_SOURCE');
  });

  it('catches a byte changed behind its back with the exact offset', async () => {
    const loop = newLoop('verify.img', 32 * MiB);
    const victim = 12 * MiB + 777; // inside the 0xc3 write
    const error = await loadWith(image, loop.device, {
      verify: true,
      beforeVerify: () => {
        const fd = fs.openSync(loop.device, 'r+');
        fs.writeSync(fd, Buffer.from([0x00]), 0, 1, victim);
        fs.fsyncSync(fd);
        fs.closeSync(fd);
      },
    }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).code).toBe('VERIFY_FAILED');
    expect((error as Qcow2Error).offset).toBe(victim);
    expect((error as Qcow2Error).message).toContain(String(victim));
  });

  it('zeroes nothing with --target-is-zero on a zeroed device', async () => {
    const loop = newLoop('zeroed.img', 24 * MiB);
    const result = await load(image, loop.device, { targetIsZero: true, verify: true });
    expect(result.verified).toBe(true);
    expect(sha(readRange(loop.device, 0, expected.length))).toBe(sha(expected));
  });

  it('the CLI loads a partition of a disk image file and refuses an unknown one', () => {
    const disk = path.join(dir, 'disk-image.raw');
    fs.writeFileSync(disk, randomBytes(48 * MiB));
    partition(disk, 'label: gpt\n,4M\n,30M\n');
    const p2 = partitionsOf(disk).get(2)!;
    const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
    const ok = spawnSync(process.execPath, [cli, 'load', image, disk, '--partition', '2', '--verify', '--progress=none'], { encoding: 'utf8' });
    expect(ok.stderr).toContain('verified');
    expect(ok.status).toBe(0);
    expect(sha(readRange(disk, p2.start, expected.length))).toBe(sha(expected));
    const bad = spawnSync(process.execPath, [cli, 'load', image, disk, '--partition', '7'], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toContain('no partition 7');
  });
});

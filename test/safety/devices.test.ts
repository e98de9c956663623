/**
 * Safety checks of `load` on block devices, with hostile input: a stale partition node that names
 * another device, and a root filesystem whose device /proc/self/mountinfo shows only as the mount
 * source (btrfs, multi-device bcachefs). Each case is a bug a review found. Only loop devices this
 * file makes are touched; they (and the partition entries and device nodes made for them) are
 * removed in finally blocks. (Split from test/hostile-input.test.ts.)
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { load } from '../../src/index';
import { attachLoop, type LoopDevice, loopUnavailable, partition, partitionsOf, readRange } from '../helpers/loop';
import { abBytes, abImage, failure, oldDisk, sha } from '../helpers/fixtures';

/** /proc/self/mountinfo as safety.ts reads it, when a test stands in for it. */
const mountinfo = vi.hoisted(() => ({ fake: undefined as string | undefined }));
vi.mock('node:fs/promises', async (importOriginal) => {
  const actual = await importOriginal<typeof import('node:fs/promises')>();
  const readFile = ((file: unknown, ...rest: unknown[]) =>
    file === '/proc/self/mountinfo' && mountinfo.fake !== undefined
      ? Promise.resolve(mountinfo.fake)
      : (actual.readFile as (...a: unknown[]) => Promise<unknown>)(file, ...rest)) as typeof actual.readFile;
  return { ...actual, readFile, default: { ...actual, readFile } };
});

const MiB = 1024 * 1024;
let dir: string;
/** A 1 MiB qcow2 image of 0xab bytes. */
let image: string;
const expected = abBytes;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-review-'));
  image = abImage(dir);
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const loopSkip = loopUnavailable() ?? (spawnSync('partx', ['--version']).status === 0 ? undefined : 'partx is not installed');

describe.skipIf(loopSubjectSkip())('block devices (loop devices this file makes)', () => {
  const loops: LoopDevice[] = [];
  afterAll(() => {
    for (const loop of loops.reverse()) {
      try {
        loop.detach();
      } catch {
        // already detached
      }
    }
  });
  function loopOver(name: string, size: number): LoopDevice {
    const file = oldDisk(dir, name, size);
    const loop = attachLoop(file);
    loops.push(loop);
    return loop;
  }

  it('writes through a partition node only when it is the device sysfs names for the partition', async () => {
    // /dev/<name> is trusted by name: a stale node (a static /dev in a container, minors of
    // major 259 handed out again) leads the write to another device.
    const disk = loopOver('node-disk.img', 32 * MiB);
    const victim = loopOver('node-victim.img', 32 * MiB);
    partition(disk.device, 'label: gpt\n,8M\n,\n');
    const p1 = partitionsOf(disk.device).get(1)!;
    const node = `${disk.device}p1`;
    execFileSync('partx', ['-a', disk.device]);
    try {
      expect(fs.statSync(node).isBlockDevice()).toBe(true);
      const [major, minor] = execFileSync('stat', ['-c', '%t %T', victim.device], { encoding: 'utf8' }).trim().split(' ').map((h) => parseInt(h, 16));
      fs.rmSync(node);
      execFileSync('mknod', [node, 'b', String(major), String(minor)]);
      const victimBefore = sha(readRange(victim.device, 0, 32 * MiB));
      await load(image, disk.device, { partition: 1 }).catch(() => undefined);
      expect(sha(readRange(victim.device, 0, 32 * MiB)), 'another device was written through the stale node').toBe(victimBefore);
      // Written where the table says, through the whole disk (or the real node).
      expect(sha(readRange(disk.device, p1.start, MiB))).toBe(sha(expected));
    } finally {
      fs.rmSync(node, { force: true });
      spawnSync('partx', ['-d', disk.device]);
      fs.rmSync(node, { force: true });
    }
  });

  /**
   * With `mountLine` added to /proc/self/mountinfo as a mount at /, a forced load onto `device`
   * is refused as the root filesystem's, and its `size` bytes stay as they were.
   */
  async function expectRootRefused(device: string, size: number, mountLine: string): Promise<void> {
    const real = fs.readFileSync('/proc/self/mountinfo', 'utf8');
    mountinfo.fake = `${real.trimEnd()}\n${mountLine}\n`;
    const before = sha(readRange(device, 0, size));
    try {
      const error = await failure(load(image, device, { force: true }));
      expect(error.code).toBe('TARGET_IN_USE');
      expect(error.message).toContain('root filesystem');
    } finally {
      mountinfo.fake = undefined;
    }
    expect(sha(readRange(device, 0, size)), 'a device of the root filesystem was written').toBe(before);
  }

  it('--force still refuses the disk that holds / when / is btrfs (mountinfo shows 0:N, the device only as the source)', async () => {
    // btrfs (and bcachefs) report an anonymous st_dev; /proc/self/mountinfo has 0:N in field 3
    // and the block device only after " - btrfs ". Fedora's default root looks like this.
    const disk = loopOver('btrfs-root.img', 32 * MiB);
    await expectRootRefused(disk.device, 32 * MiB, `4242 1 0:4242 /root / rw,relatime shared:1 - btrfs ${disk.device} rw,ssd,space_cache=v2,subvolid=256,subvol=/root`);
  });

  it('--force still refuses a member of a multi-device bcachefs root (mount source "/dev/A:/dev/B")', async () => {
    // A multi-device bcachefs lists its members joined by ":" as its source; stat() of the whole fails.
    const a = loopOver('member-a.img', 8 * MiB);
    const b = loopOver('member-b.img', 8 * MiB);
    await expectRootRefused(b.device, 8 * MiB, `4243 1 0:4243 / / rw,relatime shared:1 - bcachefs ${a.device}:${b.device} rw`);
  });
});

function loopSubjectSkip(): boolean {
  if (loopSkip) console.warn(`skipping loop device tests: ${loopSkip}`);
  return loopSkip !== undefined;
}

/**
 * `load IMAGE TARGET...`: one read and decode, every target written (files, a loop device), each
 * compared with qemu-img convert; a target that fails mid-copy (a full filesystem)
 * stops only itself, and the exit status and summary name it.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error, load, loadMany } from '../../src/index';
import { MiB, cliPath, expectSameFile, qemuConvert, qemuImg, randomBytes, runAsync } from '../helpers/qemu';
import { type LoopDevice, loopUnavailable, makeLoop } from '../helpers/loop';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-load-many-'));
const small = path.join(work, 'small-fs');
let mounted = false;
let image: string;
let loop: LoopDevice | undefined;

beforeAll(() => {
  // Random data, compressed: the decode is the work that is done once.
  const raw = path.join(work, 'source.raw');
  const fd = fs.openSync(raw, 'w');
  fs.ftruncateSync(fd, 40 * MiB);
  fs.writeSync(fd, randomBytes('many-a', 12 * MiB), 0, 12 * MiB, 0);
  fs.writeSync(fd, randomBytes('many-b', 3 * MiB), 0, 3 * MiB, 30 * MiB);
  fs.closeSync(fd);
  image = path.join(work, 'disk.qcow2');
  qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, image]);
  if (process.getuid?.() === 0) {
    // A 4 MiB filesystem: a target there runs out of space in the middle of the copy.
    fs.mkdirSync(small);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', small]);
    mounted = true;
  }
});

afterAll(() => {
  loop?.detach();
  if (mounted) execFileSync('umount', [small]);
  fs.rmSync(work, { recursive: true, force: true });
});

describe('many targets', () => {
  it('files and a loop device (zeros written over garbage) each get the whole disk, verified', async () => {
    const expected = qemuConvert(image);
    const a = path.join(work, 'a.raw');
    const b = path.join(work, 'b.raw');
    const targets = [a, b];
    if (!loopUnavailable()) {
      loop = makeLoop(path.join(work, 'loop.img'), 48 * MiB);
      // Garbage where the disk has zeros: the device's zero runs must be written.
      fs.writeFileSync(loop.file, randomBytes('garbage', 48 * MiB));
      targets.push(loop.device);
    }
    const result = await load(image, targets, { verify: true });
    expect(result.failed).toBe(0);
    expect(result.targets.map((t) => t.ok && t.result.verified)).toEqual(targets.map(() => true));
    expectSameFile(a, expected);
    expectSameFile(b, expected);
    if (loop) {
      const written = fs.readFileSync(loop.device).subarray(0, 40 * MiB);
      expect(written.equals(fs.readFileSync(expected))).toBe(true);
    }
  });

  it('a target that fails in the middle stops only itself: the others finish, the failure is named', async () => {
    if (!mounted) return;
    const good = path.join(work, 'good.raw');
    const full = path.join(small, 'full.raw');
    const other = path.join(work, 'other.raw');
    const result = await loadMany(image, [good, full, other], { verify: true });
    expect(result.failed).toBe(1);
    const failed = result.targets[1]!;
    expect(failed.ok).toBe(false);
    if (!failed.ok) {
      expect(failed.error).toBeInstanceOf(Qcow2Error);
      expect(failed.error.path).toBe(full);
      expect(failed.error.message).toMatch(/No space left on device|ENOSPC/);
    }
    expect(result.targets[0]!.ok && result.targets[2]!.ok).toBe(true);
    expectSameFile(good, qemuConvert(image));
    expectSameFile(other, qemuConvert(image));
    // The failed new file left nothing behind.
    expect(fs.readdirSync(small)).toEqual([]);
  });

  it('the CLI writes every target, exits 1 when one failed, and names it in the summary', async () => {
    const one = path.join(work, 'cli-1.raw');
    const two = path.join(work, 'cli-2.raw');
    const taken = path.join(work, 'cli-taken.raw');
    fs.writeFileSync(taken, 'x');
    const ran = await runAsync(process.execPath, [cliPath, 'load', image, one, taken, two]);
    expect(ran.status).toBe(1);
    expectSameFile(one, qemuConvert(image));
    expectSameFile(two, qemuConvert(image));
    expect(fs.readFileSync(taken, 'utf8')).toBe('x');
    expect(ran.stderr).toContain(`${taken}: target exists`);
    expect(ran.stderr).toContain(`1 of 3 targets failed: ${taken}`);
    const again = await runAsync(process.execPath, [cliPath, 'load', '--json', image, one, two, '--overwrite']);
    expect(again.status).toBe(0);
    const json = JSON.parse(again.stdout) as { failed: number; targets: { ok: boolean; target: string }[] };
    expect(json.failed).toBe(0);
    expect(json.targets.map((t) => [t.target, t.ok])).toEqual([
      [one, true],
      [two, true],
    ]);
  });

  it('the same target twice is refused before anything is written', async () => {
    const t = path.join(work, 'twice.raw');
    const error = (await loadMany(image, [t, t]).catch((e: unknown) => e)) as Qcow2Error;
    expect(error.code).toBe('INVALID_ARGUMENT');
    expect(fs.existsSync(t)).toBe(false);
  });
});

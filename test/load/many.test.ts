/**
 * `load IMAGE TARGET...`: one read and decode, every target written (files, a loop device), each
 * compared with qemu-img convert; a target that fails mid-copy (a full filesystem)
 * stops only itself, and the exit status and summary name it. Targets with their own partition
 * (GPT disk image files) or offset; progress events that name their target.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Progress, Qcow2Error, load, loadMany } from '../../src/index';
import { MiB, cliPath, expectSameFile, qemuConvert, qemuImg, randomBytes, runAsync } from '../helpers/qemu';
import { type LoopDevice, loopUnavailable, makeLoop, partitionsOf } from '../helpers/loop';
import { expectPlaced, gptDisk, oldDisk } from '../helpers/fixtures';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-load-many-'));
const small = path.join(work, 'small-fs');
let mounted = false;
let image: string;
/** 6 MiB, compressed: fits the 8 MiB partitions of gptDisk. */
let smallImage: string;
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
  const smallRaw = path.join(work, 'small.raw');
  fs.writeFileSync(smallRaw, Buffer.concat([randomBytes('small-a', 2 * MiB), Buffer.alloc(2 * MiB + 4097), randomBytes('small-b', MiB), Buffer.alloc(MiB - 4097)]));
  smallImage = path.join(work, 'small.qcow2');
  qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', smallRaw, smallImage]);
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

describe('targets with their own place', () => {
  it('each target in its own partition or at its own offset; a plain path takes the shared offset', async () => {
    const expected = qemuConvert(smallImage);
    const a = gptDisk(work, 'place-a.img');
    const b = gptDisk(work, 'place-b.img');
    const c = oldDisk(work, 'place-c.img', 12 * MiB);
    const d = oldDisk(work, 'place-d.img', 12 * MiB);
    const before = new Map([a, b, c, d].map((f) => [f, fs.readFileSync(f)]));
    const notices: string[] = [];
    // d's offset is not a multiple of the O_DIRECT unit: d alone is written through the page cache.
    const result = await loadMany(smallImage, [{ path: a, partition: 2 }, { path: b, partition: 1 }, c, { path: d, offset: 3 * MiB + 100 }], {
      offset: MiB,
      verify: true,
      onNotice: (m) => notices.push(m),
    });
    expect(result.targets.map((t) => (t.ok ? t.result.verified : t.error.message))).toEqual([true, true, true, true]);
    const starts = [partitionsOf(a).get(2)!.start, partitionsOf(b).get(1)!.start, MiB, 3 * MiB + 100];
    expect(starts[0]).not.toBe(starts[1]);
    expect(result.targets.map((t) => t.ok && t.result.offset)).toEqual(starts);
    [a, b, c, d].forEach((file, i) => expectPlaced(file, before.get(file)!, starts[i]!, expected));
    // Whether or not the filesystem takes O_DIRECT at all, d says once why it is buffered.
    expect(notices.filter((n) => n.startsWith(`${d}: `))).toHaveLength(1);
    expect(result.targets[3]!.ok && result.targets[3]!.result.direct).toBe(false);
  });

  it('a target with both a partition and an offset, or a bad offset, is refused before anything is written', async () => {
    const first = path.join(work, 'refused-first.raw');
    const both = gptDisk(work, 'refused-both.img');
    const kept = fs.readFileSync(both);
    const error = (await loadMany(smallImage, [first, { path: both, partition: 1, offset: 0 }]).catch((e: unknown) => e)) as Qcow2Error;
    expect(error).toBeInstanceOf(Qcow2Error);
    expect([error.code, error.path]).toEqual(['INVALID_ARGUMENT', both]);
    const negative = (await loadMany(smallImage, [first, { path: both, offset: -1 }]).catch((e: unknown) => e)) as Qcow2Error;
    expect([negative.code, negative.path]).toEqual(['INVALID_ARGUMENT', both]);
    expect(fs.existsSync(first)).toBe(false);
    expect(fs.readFileSync(both).equals(kept)).toBe(true);
  });

  it("a target's own offset replaces a shared partition (no combination to refuse)", async () => {
    const disk = gptDisk(work, 'own-offset.img');
    const before = fs.readFileSync(disk);
    const result = await loadMany(smallImage, [{ path: disk, offset: 2 * MiB }], { partition: 1 });
    expect(result.targets[0]!.ok && result.targets[0]!.result.offset).toBe(2 * MiB);
    expectPlaced(disk, before, 2 * MiB, qemuConvert(smallImage));
  });
});

describe('progress of many targets', () => {
  it('every event names its target; each reports its own read-back, done or failure', async () => {
    const good = path.join(work, 'progress-good.raw');
    const taken = path.join(work, 'progress-taken.raw');
    const other = path.join(work, 'progress-other.raw');
    const full = path.join(small, 'progress-full.raw');
    fs.writeFileSync(taken, 'x');
    const targets = mounted ? [good, taken, full, other] : [good, taken, other];
    const events: Progress[] = [];
    const result = await loadMany(image, targets, { verify: true, onProgress: (p) => events.push(p) });
    expect(result.failed).toBe(mounted ? 2 : 1);
    const of = (target: string) => events.filter((e) => e.target === target);
    expect(events.filter((e) => !targets.includes(e.target!))).toEqual([]);
    // The first event of each target comes in the order they were given.
    expect([...new Set(events.map((e) => e.target))]).toEqual(targets);
    for (const target of [good, other]) {
      const phases = of(target).map((e) => e.phase).filter((phase, i, all) => phase !== all[i - 1]);
      expect(phases, target).toEqual(['write', 'flush', 'verify', 'done']);
      const verify = of(target).filter((e) => e.phase === 'verify');
      expect(verify.at(-1)!.bytesDone).toBe(40 * MiB);
      expect(of(target).at(-1)).toMatchObject({ phase: 'done', bytesDone: 40 * MiB, bytesTotal: 40 * MiB });
    }
    expect(of(taken)).toHaveLength(1);
    expect(of(taken)[0]).toMatchObject({ phase: 'failed', error: { code: 'TARGET_EXISTS', path: taken } });
    expect(of(taken)[0]!.error!.message).toContain('target exists');
    if (mounted) {
      expect(of(full).at(-1)).toMatchObject({ phase: 'failed', error: { code: 'IO_ERROR', path: full } });
      expect(of(full).at(-1)!.error!.message).toMatch(/No space left on device|ENOSPC/);
      expect(of(full).filter((e) => e.phase === 'verify' || e.phase === 'done')).toEqual([]);
    }
    expectSameFile(good, qemuConvert(image));
  });
});

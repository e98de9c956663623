/**
 * Issue #20 item 4: restore of RAM into memory that already exists: a file on tmpfs rewritten in
 * place, a file on hugetlbfs written through a mapping, a caller's file descriptor, an ArrayBuffer
 * and a SharedArrayBuffer; zero pages zeroed unless the target is known to be zero; progress and
 * cancel. Every result is compared byte for byte with the dump.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../src/errors';
import type { Progress } from '../../src/jobs';
import { createSnapshot, restoreSnapshot } from '../../src/snapshot';
import { StateFile } from '../../src/vmstate/reader';
import { makeRamDump } from '../helpers/ram';
import { withTmpfs } from '../helpers/tmpfs';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const cli = path.resolve(__dirname, '../../dist/cli/main.js');
let dir: string;
let ram: Buffer;
let child: Buffer;
let parentBundle: string;
let childBundle: string;

/** Pages that are DATA in the parent and ZERO in the child, and the reverse: what in-place zeroing must get right. */
function childOf(parent: Buffer): Buffer {
  const out = Buffer.from(parent);
  let zeroed = 0;
  let filled = 0;
  for (let p = 0; p < out.length / 4096; p++) {
    const page = out.subarray(p * 4096, (p + 1) * 4096);
    const isZero = page.every((b) => b === 0);
    if (!isZero && zeroed < 40 && p % 3 === 0) {
      page.fill(0);
      zeroed++;
    } else if (isZero && filled < 40 && p % 7 === 0) {
      page.fill(`child page ${p}\n`);
      filled++;
    }
  }
  expect([zeroed, filled]).toEqual([40, 40]);
  return out;
}

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-in-place-'));
  ram = makeRamDump(path.join(dir, 'ram.raw'), SIZE, 11);
  child = childOf(ram);
  fs.writeFileSync(path.join(dir, 'child.raw'), child);
  parentBundle = path.join(dir, 's1');
  childBundle = path.join(dir, 's2');
  await createSnapshot(parentBundle, { memory: path.join(dir, 'ram.raw') });
  await createSnapshot(childBundle, { memory: path.join(dir, 'child.raw'), parent: parentBundle });
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const garbage = (length: number) => Buffer.alloc(length, 'garbage that is not the guest ');

function mount(type: string, options: string, where: string): string | undefined {
  fs.mkdirSync(where, { recursive: true });
  const result = spawnSync('mount', ['-t', type, '-o', options, type, where], { encoding: 'utf8' });
  return result.status === 0 ? undefined : `mount -t ${type} failed: ${result.stderr.trim()}`;
}

describe('into a tmpfs too small for the dump', () => {
  it('is an IO_ERROR naming the memory file (not the state file) and saying why, as a new file (none left behind) and in place', async () => {
    const mnt = path.join(dir, 'small');
    await withTmpfs(mnt, '1m', async () => {
      const fresh = path.join(mnt, 'new.ram');
      const error = await restoreSnapshot(parentBundle, { memory: fresh }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect(error).toMatchObject({ code: 'IO_ERROR', path: fresh });
      expect((error as Error).message).toMatch(/cannot restore the RAM dump into it: .*No space left on device/);
      expect(fs.readdirSync(mnt)).toEqual([]);
      const sparse = path.join(mnt, 'sparse.ram');
      fs.closeSync(fs.openSync(sparse, 'w'));
      fs.truncateSync(sparse, SIZE);
      const inPlace = await restoreSnapshot(parentBundle, { memory: sparse, memoryInPlace: true }).catch((e: unknown) => e);
      expect(inPlace).toMatchObject({ code: 'IO_ERROR', path: sparse });
      expect((inPlace as Error).message).toMatch(/No space left on device/);
      const run = spawnSync(process.execPath, [cli, 'snapshot', 'restore', parentBundle, '--memory', sparse, '--in-place'], { encoding: 'utf8' });
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split('\n')).toEqual([expect.stringMatching(new RegExp(`^qcow2img: ${sparse}: cannot restore the RAM dump into it: .*No space left on device$`))]);
    });
  });
});

describe('into a file on tmpfs, in place', () => {
  let mnt: string;
  let mountError: string | undefined;
  beforeAll(() => {
    mnt = path.join(dir, 'tmpfs');
    mountError = mount('tmpfs', 'size=64m', mnt);
  });
  afterAll(() => {
    if (!mountError) execFileSync('umount', [mnt]);
  });

  it('rewrites an existing file full of other bytes where it stands (same inode), zero pages zeroed, through the parent chain', async () => {
    expect(mountError).toBeUndefined();
    const target = path.join(mnt, 'guest.ram');
    fs.writeFileSync(target, garbage(SIZE));
    const inode = fs.statSync(target).ino;
    const progress: Progress[] = [];
    const result = await restoreSnapshot(childBundle, { memory: target, memoryInPlace: true, onProgress: (p) => progress.push(p) });
    expect(result.memory).toMatchObject({ path: target, bytes: SIZE, method: 'write' });
    expect(fs.statSync(target).ino).toBe(inode);
    expect(fs.readFileSync(target).equals(child)).toBe(true);
    expect(progress.at(-1)).toMatchObject({ phase: 'done', bytesDone: SIZE, bytesTotal: SIZE });
    expect(fs.readdirSync(mnt)).toEqual(['guest.ram']);
  });

  it('--memory-is-zero is believed: the snapshot\'s zero pages are left as they were (so only say it when true)', async () => {
    const target = path.join(mnt, 'trusting.ram');
    fs.writeFileSync(target, garbage(SIZE));
    await restoreSnapshot(parentBundle, { memory: target, memoryInPlace: true, memoryZeroed: true });
    const got = fs.readFileSync(target);
    const firstZero = [...Array(SIZE / 4096).keys()].find((p) => ram.subarray(p * 4096, (p + 1) * 4096).every((b) => b === 0))!;
    expect(got.subarray(firstZero * 4096, firstZero * 4096 + 16).equals(garbage(16))).toBe(true);
    const firstData = [...Array(SIZE / 4096).keys()].find((p) => !ram.subarray(p * 4096, (p + 1) * 4096).every((b) => b === 0))!;
    expect(got.subarray(firstData * 4096, (firstData + 1) * 4096).equals(ram.subarray(firstData * 4096, (firstData + 1) * 4096))).toBe(true);
  });

  it('the CLI: --in-place into an existing file, an empty file sized to the dump; a file too small is refused in one line', () => {
    const target = path.join(mnt, 'cli.ram');
    fs.writeFileSync(target, garbage(SIZE));
    execFileSync(process.execPath, [cli, 'snapshot', 'restore', childBundle, '--memory', target, '--in-place']);
    expect(fs.readFileSync(target).equals(child)).toBe(true);
    const empty = path.join(mnt, 'empty.ram');
    fs.writeFileSync(empty, '');
    execFileSync(process.execPath, [cli, 'snapshot', 'restore', childBundle, '--memory', empty, '--in-place']);
    expect(fs.readFileSync(empty).equals(child)).toBe(true);
    const small = path.join(mnt, 'small.ram');
    fs.writeFileSync(small, garbage(SIZE / 2));
    const refused = spawnSync(process.execPath, [cli, 'snapshot', 'restore', childBundle, '--memory', small, '--in-place'], { encoding: 'utf8' });
    expect(refused.status).not.toBe(0);
    expect(refused.stderr.trim().split('\n')).toHaveLength(1);
    expect(refused.stderr).toContain(small);
    expect(refused.stderr).toMatch(/holds 4194304 bytes, the RAM dump 8388608/);
    expect(fs.readFileSync(small).equals(garbage(SIZE / 2))).toBe(true);
  });

  it('without --in-place an existing file is refused, and --memory-is-zero alone is a usage error', () => {
    const target = path.join(mnt, 'guest.ram');
    const exists = spawnSync(process.execPath, [cli, 'snapshot', 'restore', childBundle, '--memory', target], { encoding: 'utf8' });
    expect(exists.stderr).toMatch(/output exists; pass --overwrite to replace it, or --in-place/);
    const usage = spawnSync(process.execPath, [cli, 'snapshot', 'restore', childBundle, '--memory', target, '--memory-is-zero'], { encoding: 'utf8' });
    expect(usage.status).toBe(1);
    expect(usage.stderr).toMatch(/--memory-is-zero needs --in-place/);
  });

  it('into a caller\'s file descriptor', async () => {
    const target = path.join(mnt, 'fd.ram');
    fs.writeFileSync(target, garbage(SIZE + 4096));
    const fd = fs.openSync(target, 'r+');
    try {
      const result = await restoreSnapshot(childBundle, { memory: { fd } });
      expect(result.memory).toMatchObject({ bytes: SIZE, method: 'write' });
      expect(result.memory!.path).toBeUndefined();
    } finally {
      fs.closeSync(fd);
    }
    const got = fs.readFileSync(target);
    expect(got.subarray(0, SIZE).equals(child)).toBe(true);
    // Past the dump: untouched.
    expect(got.subarray(SIZE).equals(garbage(SIZE + 4096).subarray(SIZE))).toBe(true);
  });
});

describe('into a file on hugetlbfs (mmap: hugetlbfs takes no write())', () => {
  const hugePageKiB = Number(/Hugepagesize:\s+(\d+) kB/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
  const nrPath = '/proc/sys/vm/nr_hugepages';
  let oldPages = -1;
  let mnt = '';
  let skip: string | undefined;
  beforeAll(() => {
    if (!hugePageKiB || !fs.existsSync(nrPath)) {
      skip = 'the kernel has no huge pages';
      return;
    }
    oldPages = Number(fs.readFileSync(nrPath, 'utf8'));
    const needed = Math.ceil((3 * SIZE) / (hugePageKiB * 1024)) + 1;
    fs.writeFileSync(nrPath, String(oldPages + needed));
    const got = Number(fs.readFileSync(nrPath, 'utf8'));
    if (got < oldPages + needed) skip = `the kernel reserved ${got - oldPages} of ${needed} huge pages`;
    mnt = path.join(dir, 'hugetlbfs');
    skip ??= mount('hugetlbfs', `pagesize=${hugePageKiB}K`, mnt);
  });
  afterAll(() => {
    if (mnt && fs.existsSync(mnt)) {
      for (const name of fs.readdirSync(mnt)) fs.rmSync(path.join(mnt, name));
      spawnSync('umount', [mnt]);
    }
    if (oldPages >= 0) fs.writeFileSync(nrPath, String(oldPages));
  });

  it('an empty file is sized and restored; then restored over with another snapshot, zero pages zeroed', async (context) => {
    if (skip) {
      console.warn(`hugetlbfs test skipped: ${skip}`);
      context.skip();
    }
    const target = path.join(mnt, 'guest.ram');
    fs.writeFileSync(target, '');
    // write() is refused there: the reason restore maps the file.
    expect(() => fs.writeFileSync(target, Buffer.alloc(4096, 1), { flag: 'r+' })).toThrow();
    const first = await restoreSnapshot(childBundle, { memory: target, memoryInPlace: true });
    expect(first.memory).toMatchObject({ bytes: SIZE, method: 'mmap' });
    expect(fs.statSync(target).size).toBe(SIZE);
    expect(fs.readFileSync(target).equals(child)).toBe(true);
    // Over the child's bytes, the parent: pages the child filled and the parent has zero must be zeroed.
    const second = await restoreSnapshot(parentBundle, { memory: target, memoryInPlace: true });
    expect(second.memory!.method).toBe('mmap');
    expect(fs.readFileSync(target).equals(ram)).toBe(true);
  });
});

describe('through a mapping the file no longer fills (another process truncated it)', () => {
  it('is an IO_ERROR naming the memory file, not a SIGBUS that kills the process', async () => {
    // The mapping is as long as the dump; the file behind it one page: as if cut short mid-restore.
    const target = path.join(dir, 'cut-short.ram');
    fs.writeFileSync(target, Buffer.alloc(4096));
    const state = await StateFile.open(path.join(parentBundle, 'state.qvms'));
    const fd = fs.openSync(target, 'r+');
    try {
      const error = await state.restoreInto(fd, { fresh: false, mapOutput: { length: SIZE }, target }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect(error).toMatchObject({ code: 'IO_ERROR', path: target });
      expect((error as Error).message).toMatch(/writing it through its mapping failed \(SIGBUS\)/);
    } finally {
      fs.closeSync(fd);
      await state.close();
    }
  });

  it('a SIGBUS another process sends still reaches the app\'s own listener, and the guard works after it', () => {
    // In a child: the listener (node's handler) was there first, so the guard passes it on.
    const target = path.join(dir, 'cut-short-child.ram');
    const script = `
      const fs = require('node:fs');
      const { StateFile } = require(${JSON.stringify(path.resolve(__dirname, '../../dist/vmstate/reader.js'))});
      let heard = 0;
      process.on('SIGBUS', () => heard++);
      const restore = async () => {
        fs.writeFileSync(${JSON.stringify(target)}, Buffer.alloc(4096));
        const state = await StateFile.open(${JSON.stringify(path.join(parentBundle, 'state.qvms'))});
        const fd = fs.openSync(${JSON.stringify(target)}, 'r+');
        const outcome = await state.restoreInto(fd, { fresh: false, mapOutput: { length: ${SIZE} } }).then(() => 'restored', (e) => e.message);
        fs.closeSync(fd);
        await state.close();
        return outcome;
      };
      (async () => {
        const before = await restore();
        process.kill(process.pid, 'SIGBUS');
        await new Promise((resolve) => setTimeout(resolve, 200));
        console.log(JSON.stringify({ before, heard, after: await restore() }));
      })();`;
    const ran = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 30_000 });
    expect(ran.signal, ran.stderr).toBeNull();
    const seen = JSON.parse(ran.stdout) as { before: string; heard: number; after: string };
    expect(seen.before).toMatch(/mapping failed \(SIGBUS\)/);
    expect(seen.heard).toBe(1);
    expect(seen.after).toMatch(/mapping failed \(SIGBUS\)/);
  });
});

describe('into memory of this process', () => {
  it('an ArrayBuffer (fresh, so zeroed) and a SharedArrayBuffer full of other bytes', async () => {
    const buffer = new ArrayBuffer(SIZE);
    const a = await restoreSnapshot(childBundle, { memory: buffer, memoryZeroed: true });
    expect(a.memory).toMatchObject({ bytes: SIZE, method: 'memory' });
    expect(Buffer.from(buffer).equals(child)).toBe(true);

    const shared = new SharedArrayBuffer(SIZE);
    garbage(SIZE).copy(Buffer.from(shared));
    const progress: Progress[] = [];
    await restoreSnapshot(childBundle, { memory: shared, onProgress: (p) => progress.push(p) });
    expect(Buffer.from(shared).equals(child)).toBe(true);
    expect(progress.at(-1)).toMatchObject({ phase: 'done', bytesDone: SIZE });
  });

  it('a Uint8Array view, larger than the dump: bytes past it untouched', async () => {
    const shared = new SharedArrayBuffer(SIZE + 8192);
    const view = new Uint8Array(shared, 4096, SIZE + 4096);
    view.fill(7);
    await restoreSnapshot(parentBundle, { memory: view });
    expect(Buffer.from(shared, 4096, SIZE).equals(ram)).toBe(true);
    expect(new Uint8Array(shared, 0, 4096).every((b) => b === 0)).toBe(true);
    expect(new Uint8Array(shared, 4096 + SIZE, 4096).every((b) => b === 7)).toBe(true);
  });

  it('a buffer too small is refused before anything is written; an aborted signal cancels', async () => {
    const small = new ArrayBuffer(SIZE - 4096);
    const error = await restoreSnapshot(parentBundle, { memory: small }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).code).toBe('INVALID_ARGUMENT');
    expect((error as Qcow2Error).message).toMatch(/the memory buffer holds 8384512 bytes, the RAM dump 8388608/);
    expect(new Uint8Array(small).every((b) => b === 0)).toBe(true);

    const controller = new AbortController();
    controller.abort();
    const buffer = new ArrayBuffer(SIZE);
    const cancelled = await restoreSnapshot(parentBundle, { memory: buffer, signal: controller.signal }).catch((e: unknown) => e);
    expect((cancelled as Qcow2Error).code).toBe('CANCELLED');
    expect(new Uint8Array(buffer).every((b) => b === 0)).toBe(true);
  });
});

/**
 * What `writeState` and `snapshot create` refuse rather than store a snapshot that restores
 * something else: RAM dumps that are not whole pages, empty or not a file, an incremental
 * dump laid out differently from its parent, two device blobs of one name.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshot, Qcow2Error, StateFile, writeState } from '../../src/index';
import { makeRamDump } from '../helpers/ram';
import { cliDuring } from '../helpers/signals';

const MiB = 1024 * 1024;
let dir: string;
let ramPath: string;
let ram: Buffer;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-vmstate-input-'));
  ramPath = path.join(dir, 'ram.raw');
  ram = makeRamDump(ramPath, 8 * MiB, 3);
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function refused(promise: Promise<unknown>, pattern: RegExp, file: string, code = 'INVALID_ARGUMENT'): Promise<void> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(Qcow2Error);
  expect((error as Qcow2Error).code).toBe(code);
  expect((error as Qcow2Error).message).toMatch(pattern);
  expect((error as Qcow2Error).path).toBe(file);
}

describe('the RAM dump', () => {
  it('a size that is not a whole number of pages is refused, not cut', async () => {
    const odd = path.join(dir, 'odd.raw');
    fs.writeFileSync(odd, Buffer.concat([ram, Buffer.alloc(1392, 1)]));
    await refused(writeState(path.join(dir, 'odd.qvms'), { memory: odd }), /not a whole number of 4096-byte pages/, odd);
    expect(fs.existsSync(path.join(dir, 'odd.qvms'))).toBe(false);
  });

  it('an empty file is refused', async () => {
    const empty = path.join(dir, 'empty.raw');
    fs.writeFileSync(empty, '');
    await refused(writeState(path.join(dir, 'empty.qvms'), { memory: empty }), /is empty/, empty);
  });

  it('a pipe is refused (pages are mapped, not streamed)', async () => {
    const fifo = path.join(dir, 'ram.fifo');
    execFileSync('mkfifo', [fifo]);
    // Opening a FIFO for reading waits for a writer: keep one open meanwhile.
    const writer = fs.createWriteStream(fifo);
    try {
      await refused(writeState(path.join(dir, 'fifo.qvms'), { memory: fifo }), /regular file or a block device/, fifo, 'NOT_A_REGULAR_FILE');
    } finally {
      writer.destroy();
    }
  });

  it('a memory map must cover the whole dump: bytes left out are refused, and named', async () => {
    const headed = path.join(dir, 'headed.raw');
    fs.writeFileSync(headed, Buffer.concat([Buffer.alloc(100, 7), ram]));
    const out = path.join(dir, 'headed.qvms');
    await refused(writeState(out, { memory: headed, regions: [{ guestBase: 0, size: 4 * MiB, dumpOffset: 0 }] }), /memory map leaves bytes 0x400000-0x800064 of the RAM dump \(0x800064 bytes\) uncovered/, headed);
    expect(fs.existsSync(out)).toBe(false);
  });
});

describe('an incremental dump', () => {
  it('is refused when its regions lie elsewhere in the RAM dump than its parent’s', async () => {
    const parentPath = path.join(dir, 'parent.qvms');
    await writeState(parentPath, { memory: ramPath });
    const headed = path.join(dir, 'page-headed.raw');
    fs.writeFileSync(headed, Buffer.concat([Buffer.alloc(4096, 9), ram]));
    const parent = await StateFile.open(parentPath);
    try {
      const child = path.join(dir, 'child.qvms');
      await refused(
        writeState(child, { memory: headed, regions: [{ guestBase: 0, size: ram.length, dumpOffset: 4096 }, { guestBase: 0x10000000, size: 4096, dumpOffset: 0 }], parent }),
        /same memory regions as its parent, at the same places of the RAM dump/,
        child,
      );
      expect(fs.existsSync(child)).toBe(false);
    } finally {
      await parent.close();
    }
  });
});

/** Bytes of every file under `folder`, recursively (0 while it changes under the walk). */
function bytesUnder(folder: string): number {
  try {
    return fs.readdirSync(folder, { recursive: true, withFileTypes: true }).reduce((n, entry) => (entry.isFile() ? n + fs.statSync(path.join(entry.parentPath ?? entry.path, entry.name)).size : n), 0);
  } catch {
    return 0;
  }
}

describe('a RAM dump cut short by another process while it is read', () => {
  it('is one error naming the dump, not a crash (SIGBUS through the mapping), and nothing is left', async () => {
    // Four batches of incompressible pages at deflate's level 6: the second batch is still being
    // compressed (its pages still read through the mapping) when the first one's chunks land.
    const dump = path.join(dir, 'shrinking.raw');
    fs.writeFileSync(dump, randomBytes(256 * MiB));
    const outDir = path.join(dir, 'shrinking');
    fs.mkdirSync(outDir);
    const out = path.join(outDir, 'snap');
    const ran = await cliDuring(
      ['snapshot', 'create', out, '--memory', dump, '--compress', 'deflate', '--level', '6'],
      () => fs.existsSync(outDir) && bytesUnder(outDir) > 4 * MiB,
      () => fs.truncateSync(dump, 64 * MiB),
    );
    expect(ran.signal, ran.stderr).toBeNull();
    expect(ran.status, ran.stderr).toBe(1);
    expect(ran.stderr.trim().split('\n')).toHaveLength(1);
    expect(ran.stderr).toContain(dump);
    // The second batch is under way (its size checked, its pages mapped) when the file shrinks.
    expect(ran.stderr).toMatch(/reading the RAM dump through its mapping failed \(SIGBUS\): was it cut short by another process\?/);
    expect(fs.readdirSync(outDir)).toEqual([]);
  });
});

describe('device blobs', () => {
  it('two of one name are refused', async () => {
    const out = path.join(dir, 'devices');
    await refused(
      createSnapshot(out, { memory: ramPath, devices: [{ name: 'nic', data: Buffer.from('a') }, { name: 'nic', data: Buffer.from('b') }] }),
      /device name "nic" is given twice/,
      out,
    );
    expect(fs.existsSync(out)).toBe(false);
  });
});

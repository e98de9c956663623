/**
 * A guest's RAM file (QEMU's memory-backend-file on tmpfs) has holes where the guest never wrote:
 * writeState takes the pages inside them as zero pages without reading them. The state file is the
 * one reading the zeros gives (a fully allocated copy of the same dump makes the same bytes but for
 * the snapshot id and the digest over it), incremental dumps included; the holes of a tmpfs file
 * stay holes (a read through the mapping would allocate them); and the hole map is built from what
 * SEEK_DATA/SEEK_HOLE say, in file system blocks smaller or larger than a page, trusting no odd answer.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { Codec, native } from '../../src/native';
import { PageState } from '../../src/vmstate/format';
import { restoreMemory, StateFile } from '../../src/vmstate/reader';
import { holeUnits, type Seek, seekOf } from '../../src/files';
import { writeState } from '../../src/vmstate/writer';
import { mulberry32 } from '../helpers/prng';

const PAGE = 4096;
const MiB = 1024 * 1024;
const TMPFS_MAGIC = 0x01021994;

const folders: string[] = [];
afterAll(() => {
  for (const folder of folders) fs.rmSync(folder, { recursive: true, force: true });
});
function scratch(parent: string): string {
  const folder = fs.mkdtempSync(path.join(parent, 'qcow2img-holes-'));
  folders.push(folder);
  return folder;
}

/** Page contents: text (compressible), unique to `n`. */
function textPage(n: number): Buffer {
  return Buffer.alloc(PAGE, `page ${n} of a guest that wrote here\n`);
}

/** Writes the non-zero pages of `bytes` (and the pages listed in `zeros`, as written zeros) into a file of its size: every other page is a hole. */
function writeSparse(file: string, bytes: Buffer, zeros: number[] = []): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, bytes.length);
    const zero = Buffer.alloc(PAGE);
    for (let p = 0; p < bytes.length / PAGE; p++) {
      const page = bytes.subarray(p * PAGE, (p + 1) * PAGE);
      if (!page.equals(zero) || zeros.includes(p)) fs.writeSync(fd, page, 0, PAGE, p * PAGE);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * 96 MiB of guest RAM (two writer batches of 64 MiB) as a guest leaves it: scattered text pages,
 * duplicates, a run of data, data on both sides of the batch boundary, never-touched stretches
 * (the end of the dump among them) and pages of zeros the guest wrote (`zeros`, allocated).
 */
function guestRam(seed: number): { bytes: Buffer; zeros: number[] } {
  const next = mulberry32(seed);
  const pages = (96 * MiB) / PAGE;
  const bytes = Buffer.alloc(pages * PAGE);
  const written: number[] = [];
  const put = (p: number, page: Buffer) => {
    page.copy(bytes, p * PAGE);
    written.push(p);
  };
  for (let p = 0; p < pages - 512; p++) {
    if (p >= 18000 && p < 23000) continue;
    const r = next() / 2 ** 32;
    if (r < 0.03) put(p, textPage(p + seed));
    else if (r < 0.036 && written.length > 0) put(p, bytes.subarray(written[0]! * PAGE, (written[0]! + 1) * PAGE));
  }
  for (let p = 1000; p < 1300; p++) put(p, textPage(p + seed));
  put(16383, textPage(16383 + seed));
  put(16384, textPage(16384 + seed));
  const zeros = [5, 1300, 1301, 16385, ...Array.from({ length: 256 }, (_, i) => 2000 + i)].filter((p) => !written.includes(p));
  return { bytes, zeros };
}

/** The same dump twice: sparse, and fully allocated (cp --sparse=never), each checked to be what it is meant to be. */
function twoCopies(folder: string, name: string, ram: { bytes: Buffer; zeros: number[] }): { sparse: string; full: string } {
  const sparse = path.join(folder, `${name}.sparse.raw`);
  const full = path.join(folder, `${name}.full.raw`);
  writeSparse(sparse, ram.bytes, ram.zeros);
  execFileSync('cp', ['--sparse=never', sparse, full]);
  expect(fs.statSync(sparse).blocks * 512).toBeLessThan(ram.bytes.length / 8);
  expect(fs.statSync(full).blocks * 512).toBeGreaterThanOrEqual(ram.bytes.length);
  return { sparse, full };
}

/** A state file without what differs between two writes of the same pages: the random snapshot id, and the footer's digest over it. */
function withoutIdentity(file: string): Buffer {
  const bytes = fs.readFileSync(file);
  bytes.fill(0, 16, 32);
  bytes.fill(0, bytes.length - 64 + 24, bytes.length - 64 + 40);
  return bytes;
}

async function restored(statePath: string, out: string, parentPath?: string): Promise<Buffer> {
  const parent = parentPath ? await StateFile.open(parentPath) : undefined;
  const state = await StateFile.open(statePath, parent ? { parent } : {});
  try {
    expect(await state.verify()).toEqual([]);
    await restoreMemory(state, out);
  } finally {
    await state.close();
    await parent?.close();
  }
  return fs.readFileSync(out);
}

for (const [where, parent] of [['on tmpfs (/dev/shm)', '/dev/shm'], ['in the temporary folder', os.tmpdir()]] as const) {
  describe(`a sparse RAM file ${where}`, () => {
    let folder: string;
    let ram: { bytes: Buffer; zeros: number[] };
    let dump: { sparse: string; full: string };
    beforeAll(() => {
      folder = scratch(parent);
      ram = guestRam(1);
      dump = twoCopies(folder, 'ram', ram);
    });

    it('makes the state file its fully allocated copy makes, and restores byte for byte', async () => {
      const blocks = fs.statSync(dump.sparse).blocks;
      const fromSparse = await writeState(path.join(folder, 'sparse.qvms'), { memory: dump.sparse });
      const fromFull = await writeState(path.join(folder, 'full.qvms'), { memory: dump.full });
      expect(fromSparse.pages).toEqual(fromFull.pages);
      expect(fromSparse.pages.duplicate).toBeGreaterThan(0);
      expect(fromSparse.snapshotId).not.toBe(fromFull.snapshotId);
      expect(withoutIdentity(fromSparse.path).equals(withoutIdentity(fromFull.path))).toBe(true);
      expect((await restored(fromSparse.path, path.join(folder, 'sparse.out'))).equals(ram.bytes)).toBe(true);
      // tmpfs allocates a hole that is read through a mapping: a hole read would show here.
      if (parent === '/dev/shm') {
        expect(fs.statfsSync(parent).type).toBe(TMPFS_MAGIC);
        expect(fs.statSync(dump.sparse).blocks).toBe(blocks);
      }
    });

    it('and so do incremental dumps over it, compared with the parent or by a dirty bitmap', async () => {
      const parentState = (await writeState(path.join(folder, 'parent.qvms'), { memory: dump.full })).path;
      // The child: some pages rewritten, some zeroed (holes of the child's file), the rest as they were.
      const child = { bytes: Buffer.from(ram.bytes), zeros: [7, 1302] };
      const dirty = Buffer.alloc(ram.bytes.length / PAGE / 8);
      const touch = (p: number, page: Buffer) => {
        page.copy(child.bytes, p * PAGE);
        dirty[p >> 3] = dirty[p >> 3]! | (1 << (p & 7));
      };
      for (let p = 1000; p < 1100; p++) touch(p, Buffer.alloc(PAGE));
      for (let p = 1100; p < 1120; p++) touch(p, textPage(p + 777));
      for (const p of [3, 4, 7, 16383, 20000, 1302]) touch(p, Buffer.alloc(PAGE));
      const childDump = twoCopies(folder, 'child', child);
      const blocks = fs.statSync(childDump.sparse).blocks;
      const parentFile = await StateFile.open(parentState);
      try {
        for (const [mode, extra] of [['compared', {}], ['dirty bitmap', { dirtyBitmap: dirty }]] as const) {
          const fromSparse = await writeState(path.join(folder, `child-sparse-${mode}.qvms`), { memory: childDump.sparse, parent: parentFile, ...extra });
          const fromFull = await writeState(path.join(folder, `child-full-${mode}.qvms`), { memory: childDump.full, parent: parentFile, ...extra });
          expect(fromSparse.pages).toEqual(fromFull.pages);
          expect(fromSparse.pages.parent).toBeGreaterThan(0);
          expect(fromSparse.pages.zero).toBeGreaterThan(0);
          expect(withoutIdentity(fromSparse.path).equals(withoutIdentity(fromFull.path))).toBe(true);
          expect((await restored(fromSparse.path, path.join(folder, `child-${mode}.out`), parentState)).equals(child.bytes)).toBe(true);
        }
      } finally {
        await parentFile.close();
      }
      if (parent === '/dev/shm') expect(fs.statSync(childDump.sparse).blocks).toBe(blocks);
    });
  });
}

describe('the native batch, given a hole map', () => {
  let folder: string;
  let fd: number;
  // Eight pages, every one with data: the map below says otherwise for pages 1, 2 and 5.
  const pages = Buffer.concat(Array.from({ length: 8 }, (_, p) => textPage(p)));
  const holes = Uint8Array.from([0, 1, 1, 0, 0, 1, 0, 0]);
  const batch = (extra: Record<string, unknown>) => native().processDumpBatch({
    sourceFd: fd, dumpOffset: 0, firstPage: 0, pageCount: 8, pageSize: PAGE, spanPages: 512, firstSpan: 0,
    incremental: false, holes, codec: Codec.None, level: 1, chunkTargetBytes: MiB, threads: 2, ...extra,
  });
  beforeAll(() => {
    folder = scratch(os.tmpdir());
    fs.writeFileSync(path.join(folder, 'pages.raw'), pages);
    fd = fs.openSync(path.join(folder, 'pages.raw'), 'r');
  });
  afterAll(() => fs.closeSync(fd));

  it('takes the pages it marks as zero pages without reading them (their data is not stored)', async () => {
    const result = await batch({});
    const { zero, data } = PageState;
    expect([...result.states]).toEqual([data, zero, zero, data, data, zero, data, data]);
    expect(result.chunks).toHaveLength(1);
    const stored = [0, 3, 4, 6, 7].map((p) => textPage(p));
    expect(result.chunks[0]!.stored.equals(Buffer.concat(stored))).toBe(true);
  });

  it('over a parent: a hole is unchanged where the parent page is zero, else a ZERO page; a dirty bitmap decides alone', async () => {
    // The parent: pages 0 and 2 as they are, the rest zero.
    const parent = Buffer.alloc(8 * PAGE);
    pages.copy(parent, 0, 0, PAGE);
    pages.copy(parent, 2 * PAGE, 2 * PAGE, 3 * PAGE);
    const { zero, data, parent: unchanged } = PageState;
    expect([...(await batch({ incremental: true, parent })).states]).toEqual([unchanged, unchanged, zero, data, data, unchanged, data, data]);
    // Dirty: pages 1, 2, 3 (a hole read as zero is ZERO, whatever the parent); clean pages are PARENT unread.
    expect([...(await batch({ incremental: true, dirty: Uint8Array.from([0b1110]) })).states]).toEqual([unchanged, zero, zero, data, unchanged, unchanged, unchanged, unchanged]);
  });
});

/** A file of `blocks` file system blocks of `blockSize` bytes, data where `data[b]`: SEEK_DATA and SEEK_HOLE as Linux answers them (the end of the file is a hole; -1 for ENXIO). */
function fakeFile(blockSize: number, data: boolean[]): Seek {
  const size = data.length * blockSize;
  return (what, offset) => {
    if (offset >= size) return -1;
    let b = Math.floor(offset / blockSize);
    if (what === 'data') {
      while (b < data.length && !data[b]) b++;
      return b === data.length ? -1 : Math.max(offset, b * blockSize);
    }
    while (b < data.length && data[b]) b++;
    return Math.max(offset, b * blockSize);
  };
}

/** The pages of [start, start + pageCount pages) no data block touches: what the hole map must say. */
function expectedHoles(blockSize: number, data: boolean[], start: number, pageCount: number): number[] {
  return Array.from({ length: pageCount }, (_, p) => {
    const first = Math.floor((start + p * PAGE) / blockSize);
    const last = Math.floor((start + (p + 1) * PAGE - 1) / blockSize);
    for (let b = first; b <= last; b++) if (data[b]) return 0;
    return 1;
  });
}

describe('the hole map of a batch', () => {
  it('marks exactly the pages wholly inside holes, in blocks smaller or larger than a page, anywhere in the file', () => {
    const next = mulberry32(7);
    let holesSeen = 0;
    let partialPages = 0;
    for (const blockSize of [512, 1024, 2048, 4096, 16384, 65536]) {
      for (let round = 0; round < 40; round++) {
        const fileBytes = 256 * PAGE;
        // Runs of data and holes of a few blocks each, so that pages are whole holes, whole data, or both.
        const data: boolean[] = [];
        while (data.length < fileBytes / blockSize) {
          const value = next() % 3 === 0;
          for (let n = 1 + (next() % 12); n > 0 && data.length < fileBytes / blockSize; n--) data.push(value);
        }
        const start = (next() % 128) * PAGE;
        const pageCount = 1 + (next() % (256 - start / PAGE));
        const want = expectedHoles(blockSize, data, start, pageCount);
        const got = holeUnits(fakeFile(blockSize, data), start, pageCount, PAGE);
        expect(got ? [...got] : want.map(() => 0)).toEqual(want);
        holesSeen += want.filter((h) => h === 1).length;
        const blocksOf = (p: number) => data.slice((start + p * PAGE) / blockSize, (start + (p + 1) * PAGE) / blockSize);
        if (blockSize < PAGE) partialPages += want.filter((_, p) => blocksOf(p).includes(true) && blocksOf(p).includes(false)).length;
      }
    }
    // The rounds did meet holes, and pages that are partly hole (which must be read).
    expect(holesSeen).toBeGreaterThan(1000);
    expect(partialPages).toBeGreaterThan(100);
  });

  it('takes the end of the file after the last data (ENXIO) as a hole, and says nothing when there is no hole', () => {
    const blocks = [false, false, true, ...Array.from({ length: 13 }, () => false)];
    expect([...holeUnits(fakeFile(PAGE, blocks), 0, 16, PAGE)!]).toEqual([1, 1, 0, ...Array.from({ length: 13 }, () => 1)]);
    expect(holeUnits(fakeFile(PAGE, blocks.map(() => true)), 0, 16, PAGE)).toBeUndefined();
    expect(holeUnits(fakeFile(1024, [false, false, false, true, true, false, false, false]), 0, 2, PAGE)).toBeUndefined();
  });

  it('reads the rest of the batch after an answer it cannot trust: an error, no hole after data, an offset going back', () => {
    // Data in page 2 only; the holes before it were found before the odd answer, and stay.
    const file = fakeFile(PAGE, [false, false, true, false, false, false, false, false]);
    const odd = (answer: (what: 'data' | 'hole', offset: number) => number): Seek => (what, offset) => (what === 'hole' ? answer(what, offset) : file(what, offset));
    const before = [1, 1, 0, 0, 0, 0, 0, 0];
    expect([...holeUnits(odd(() => { throw new Error('Invalid argument'); }), 0, 8, PAGE)!]).toEqual(before);
    expect([...holeUnits(odd(() => -1), 0, 8, PAGE)!]).toEqual(before);
    expect([...holeUnits(odd((_, offset) => offset), 0, 8, PAGE)!]).toEqual(before);
    // SEEK_DATA answering before where it was asked: nothing after it is trusted.
    const backwards: Seek = (what, offset) => (what === 'data' ? (offset === 0 ? 2 * PAGE : 0) : 3 * PAGE);
    expect([...holeUnits(backwards, 0, 8, PAGE)!]).toEqual(before);
  });
});

describe('seekOf', () => {
  it('answers as the system does, and asks SEEK_HOLE once a data range when batches walk the file in order', () => {
    // tmpfs, where a SEEK_HOLE from inside a data range walks the page cache to its end.
    const dir = scratch(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir());
    const file = path.join(dir, 'ram.raw');
    const bytes = Buffer.alloc(8 * MiB);
    for (let p = 0; p < bytes.length / PAGE; p++) if (p < 1024 || p >= 1280) textPage(p).copy(bytes, p * PAGE);
    writeSparse(file, bytes); // data, a 1 MiB hole at 4 MiB, data
    const fd = fs.openSync(file, 'r');
    const system: Seek = (what, offset) => (what === 'data' ? native().seekData(fd, offset) : native().seekHole(fd, offset));
    try {
      const batches = Array.from({ length: 16 }, (_, b) => b * 128 * PAGE);
      const want = batches.map((start) => holeUnits(system, start, 128, PAGE));
      const seek = seekOf(fd);
      const seekHole = vi.spyOn(native(), 'seekHole');
      try {
        expect(batches.map((start) => holeUnits(seek, start, 128, PAGE))).toEqual(want);
        // Once for the data before the hole, once for the data after it.
        expect(seekHole).toHaveBeenCalledTimes(2);
      } finally {
        seekHole.mockRestore();
      }
      const next = mulberry32(3);
      for (let i = 0; i < 200; i++) {
        const what = next() % 2 === 0 ? 'data' : 'hole';
        const offset = (next() % (bytes.length / 512)) * 512;
        expect(seek(what, offset), `${what} at ${offset}`).toBe(system(what, offset));
      }
    } finally {
      fs.closeSync(fd);
    }
  });
});

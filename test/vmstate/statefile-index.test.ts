/**
 * The state file's section rules and duplicate pairs, on files whose INDEX is edited and sealed
 * again (new INDEX checksum, new digest) as docs/formats/vmstate.md lays them out: an unknown
 * optional section is skipped, an unknown required one (or a known type at an unknown version)
 * is an error that names it, and duplicate pairs that break the format's promise are refused
 * before a restore could rely on them.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error, restoreMemory, StateFile, writeState } from '../../src/index';
import { SPAN_PAGES } from '../../src/vmstate/format';
import { native } from '../../src/native';
import { sampleCpuState as cpu } from '../helpers/cpu';
import { makeRamDump } from '../helpers/ram';

const MiB = 1024 * 1024;
const HEADER = 64;
const SECTION_HEADER = 32;
const FOOTER = 64;
const SECTION_ENTRY = 32;
const TYPE_CPU = 2;

let dir: string;
let ram: Buffer;
let original: string;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-stateindex-'));
  ram = makeRamDump(path.join(dir, 'ram.raw'), 16 * MiB, 7);
  original = path.join(dir, 'original.qvms');
  const written = await writeState(original, { memory: path.join(dir, 'ram.raw'), cpu: cpu as never });
  expect(written.pages.duplicate, 'the dump has duplicate pages to test with').toBeGreaterThan(1);
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/**
 * A copy of the original (or of `from`) whose INDEX payload `edit` rewrote, sealed again. With
 * `insert`, those bytes are placed before the INDEX, and `edit` is told where they start.
 */
function withIndex(name: string, edit: (index: Buffer, insertedAt: number) => Buffer, from = original, insert = Buffer.alloc(0)): string {
  const bytes = fs.readFileSync(from);
  const footer = bytes.subarray(bytes.length - FOOTER);
  const oldIndexOffset = Number(footer.readBigUInt64LE(8));
  const indexOffset = oldIndexOffset + insert.length;
  const indexLength = Number(footer.readBigUInt64LE(16));
  const sectionHeader = Buffer.from(bytes.subarray(oldIndexOffset, oldIndexOffset + SECTION_HEADER));
  const index = edit(Buffer.from(bytes.subarray(oldIndexOffset + SECTION_HEADER, oldIndexOffset + SECTION_HEADER + indexLength)), oldIndexOffset);
  sectionHeader.writeBigUInt64LE(BigInt(index.length), 8);
  sectionHeader.writeBigUInt64LE(native().hash64(index), 16);
  const padding = Buffer.alloc((8 - (index.length % 8)) % 8);
  const newFooter = Buffer.from(footer);
  newFooter.writeBigUInt64LE(BigInt(indexOffset), 8);
  newFooter.writeBigUInt64LE(BigInt(index.length), 16);
  native().hash128(Buffer.concat([bytes.subarray(0, HEADER), index])).copy(newFooter, 24);
  newFooter.writeBigUInt64LE(BigInt(indexOffset + SECTION_HEADER + index.length + padding.length), 40);
  const file = path.join(dir, name);
  fs.writeFileSync(file, Buffer.concat([bytes.subarray(0, oldIndexOffset), insert, sectionHeader, index, padding, newFooter]));
  return file;
}

const sectionCount = (index: Buffer) => Number(index.readBigUInt64LE(0));

/** A copy of the original with one more section (8 payload bytes) of this type, version and flags. */
function withSection(name: string, type: number, version: number, required: boolean): string {
  const payload = Buffer.from('extra!!!');
  const header = Buffer.alloc(SECTION_HEADER);
  header.writeUInt32LE(type, 0);
  header.writeUInt16LE(version, 4);
  header.writeUInt16LE(required ? 1 : 0, 6);
  header.writeBigUInt64LE(BigInt(payload.length), 8);
  header.writeBigUInt64LE(native().hash64(payload), 16);
  return withIndex(
    name,
    (index, at) => {
      const count = sectionCount(index);
      const entry = Buffer.alloc(SECTION_ENTRY);
      entry.writeUInt32LE(type, 0);
      entry.writeUInt16LE(required ? 1 : 0, 4);
      entry.writeUInt16LE(version, 6);
      entry.writeBigUInt64LE(BigInt(at), 8);
      entry.writeBigUInt64LE(BigInt(payload.length), 16);
      entry.writeBigUInt64LE(native().hash64(payload), 24);
      const out = Buffer.concat([index.subarray(0, 32 + count * SECTION_ENTRY), entry, index.subarray(32 + count * SECTION_ENTRY)]);
      out.writeBigUInt64LE(BigInt(count + 1), 0);
      return out;
    },
    original,
    Buffer.concat([header, payload]),
  );
}

/** Sets the version and required flag of the CPU section's table entry. */
function setCpuSection(index: Buffer, version: number, required: boolean): Buffer {
  for (let i = 0; i < sectionCount(index); i++) {
    const at = 32 + i * SECTION_ENTRY;
    if (index.readUInt32LE(at) !== TYPE_CPU) continue;
    index.writeUInt16LE(required ? 1 : 0, at + 4);
    index.writeUInt16LE(version, at + 6);
    return index;
  }
  throw new Error('no CPU section in the test file');
}

/** The duplicate pairs: the last 16·D bytes of the INDEX. */
function pairsOf(index: Buffer): { at: number; count: number } {
  const count = Number(index.readBigUInt64LE(24));
  return { at: index.length - 16 * count, count };
}

async function refusal(file: string): Promise<Qcow2Error> {
  const error = await StateFile.open(file).then(
    async (state) => {
      await state.close();
      return undefined;
    },
    (e: unknown) => e,
  );
  expect(error, `${file} was opened`).toBeInstanceOf(Qcow2Error);
  expect((error as Qcow2Error).path).toBe(file);
  return error as Qcow2Error;
}

describe('sections a reader does not understand', () => {
  it('the file sealed again without a change opens, verifies and restores (the test helper is right)', async () => {
    const file = withIndex('same.qvms', (index) => index);
    const state = await StateFile.open(file);
    try {
      expect(await state.verify()).toEqual([]);
      expect(await state.cpu()).toEqual(cpu);
    } finally {
      await state.close();
    }
  });

  it('an unknown optional section is skipped: open, verify, CPU state and restore as before', async () => {
    const file = withSection('optional.qvms', 77, 1, false);
    const state = await StateFile.open(file);
    try {
      expect(await state.verify()).toEqual([]);
      expect(await state.cpu()).toEqual(cpu);
      const out = path.join(dir, 'optional.raw');
      await restoreMemory(state, out);
      expect(fs.readFileSync(out).equals(ram)).toBe(true);
    } finally {
      await state.close();
    }
  });

  it('an unknown required section is an error that names its type', async () => {
    const error = await refusal(withSection('required.qvms', 77, 1, true));
    expect(error.code).toBe('UNKNOWN_INCOMPATIBLE_FEATURE');
    expect(error.message).toMatch(/section type 77/);
  });

  it('a known type at an unknown version: skipped when optional, an error naming it when required', async () => {
    const optional = await StateFile.open(withIndex('cpu-v2-optional.qvms', (index) => setCpuSection(index, 2, false)));
    try {
      expect(await optional.cpu()).toBeUndefined();
    } finally {
      await optional.close();
    }
    const error = await refusal(withIndex('cpu-v2-required.qvms', (index) => setCpuSection(index, 2, true)));
    expect(error.code).toBe('UNKNOWN_INCOMPATIBLE_FEATURE');
    expect(error.message).toMatch(/CPU section of unknown version 2/);
  });
});

describe('duplicate pairs', () => {
  it('a pair whose source is not below its page is refused', async () => {
    const file = withIndex('dup-upward.qvms', (index) => {
      const { at } = pairsOf(index);
      index.writeBigUInt64LE(index.readBigUInt64LE(at), at + 8); // source = the page itself
      return index;
    });
    const error = await refusal(file);
    expect(error.code).toBe('BAD_HEADER_FIELD');
    expect(error.message).toMatch(/duplicate 0 .*not a DUPLICATE of a lower DATA page/);
  });

  it('a pair whose source is a ZERO page below it is refused', async () => {
    const file = withIndex('dup-zero-source.qvms', (index) => {
      const { at } = pairsOf(index);
      const page = Number(index.readBigUInt64LE(at));
      let zeroPage = 0;
      while (zeroPage < page && !ram.subarray(zeroPage * 4096, (zeroPage + 1) * 4096).every((v) => v === 0)) zeroPage++;
      expect(zeroPage, 'a zero page below the first duplicate').toBeLessThan(page);
      index.writeBigUInt64LE(BigInt(zeroPage), at + 8);
      return index;
    });
    expect((await refusal(file)).message).toMatch(/not a DUPLICATE of a lower DATA page/);
  });

  it('pairs out of order are refused', async () => {
    const file = withIndex('dup-order.qvms', (index) => {
      const { at, count } = pairsOf(index);
      expect(count).toBeGreaterThan(1);
      const first = Buffer.from(index.subarray(at, at + 16));
      index.copy(index, at, at + 16, at + 32);
      first.copy(index, at + 16);
      return index;
    });
    expect((await refusal(file)).message).toMatch(/out of order/);
  });

  it('a DUPLICATE page without a pair is refused', async () => {
    const file = withIndex('dup-missing.qvms', (index) => {
      const { at, count } = pairsOf(index);
      const shorter = Buffer.concat([index.subarray(0, at), index.subarray(at + 16)]);
      shorter.writeBigUInt64LE(BigInt(count - 1), 24);
      return shorter;
    });
    const error = await refusal(file);
    expect(error.code).toBe('BAD_HEADER_FIELD');
    expect(error.message).toMatch(/DUPLICATE pages but/);
  });
});

/** Where the INDEX keeps its chunk map and page states. */
function indexLayout(index: Buffer): { chunksAt: number; chunkCount: number; statesAt: number } {
  const chunksAt = 32 + SECTION_ENTRY * sectionCount(index);
  const chunkCount = Number(index.readBigUInt64LE(16));
  return { chunksAt, chunkCount, statesAt: chunksAt + 16 * chunkCount };
}

const stateAt = (index: Buffer, slot: number) => (index[indexLayout(index).statesAt + (slot >> 2)]! >> ((slot & 3) * 2)) & 3;
function setState(index: Buffer, slot: number, state: number): void {
  const at = indexLayout(index).statesAt + (slot >> 2);
  index[at] = (index[at]! & ~(3 << ((slot & 3) * 2))) | (state << ((slot & 3) * 2));
}

describe('page states restore must be able to trust', () => {
  it('DATA pages in a span no chunk holds are refused (restore would leave them zero)', async () => {
    const file = withIndex('chunk-dropped.qvms', (index) => {
      const { chunksAt, chunkCount } = indexLayout(index);
      expect(chunkCount).toBeGreaterThan(1);
      const shorter = Buffer.concat([index.subarray(0, chunksAt), index.subarray(chunksAt + 16)]);
      shorter.writeBigUInt64LE(BigInt(chunkCount - 1), 16);
      return shorter;
    });
    const error = await refusal(file);
    expect(error.code).toBe('BAD_HEADER_FIELD');
    expect(error.message).toMatch(/DATA pages that no chunk holds/);
  });

  it('a PARENT page in a dump without a parent is refused', async () => {
    const file = withIndex('stray-parent.qvms', (index) => {
      let slot = 0;
      while (stateAt(index, slot) !== 0) slot++;
      setState(index, slot, 3);
      return index;
    });
    expect((await refusal(file)).message).toMatch(/PARENT pages in a dump without a parent/);
  });

  it('a page state past the end of a region is refused', async () => {
    // 3 pages in the last span: slots 3.. of that span hold nothing.
    const shortRam = path.join(dir, 'short.raw');
    fs.writeFileSync(shortRam, Buffer.concat([ram, ram.subarray(0, 3 * 4096)]));
    const short = path.join(dir, 'short.qvms');
    await writeState(short, { memory: shortRam });
    const pages = ram.length / 4096 + 3;
    const file = withIndex(
      'past-region.qvms',
      (index) => {
        expect(pages % SPAN_PAGES).toBe(3);
        setState(index, pages, 1);
        return index;
      },
      short,
    );
    expect((await refusal(file)).message).toMatch(/page state past the end of region 0/);
  });
});

describe('a chunk whose raw length disagrees with its spans', () => {
  it('restore refuses it before allocating what it claims', async () => {
    // The first CHUNK's header says one page more; its checksums are sealed again.
    const bytes = fs.readFileSync(original);
    const footer = bytes.subarray(bytes.length - FOOTER);
    const indexOffset = Number(footer.readBigUInt64LE(8));
    const indexLength = Number(footer.readBigUInt64LE(16));
    const index = bytes.subarray(indexOffset + SECTION_HEADER, indexOffset + SECTION_HEADER + indexLength);
    const { chunksAt } = indexLayout(index);
    const sectionIndex = index.readUInt32LE(chunksAt + 8);
    const entryAt = 32 + sectionIndex * SECTION_ENTRY;
    const sectionOffset = Number(index.readBigUInt64LE(entryAt + 8));
    const sectionLength = Number(index.readBigUInt64LE(entryAt + 16));
    const edited = Buffer.from(bytes);
    const payloadAt = sectionOffset + SECTION_HEADER;
    edited.writeUInt32LE(edited.readUInt32LE(payloadAt + 16) + 4096, payloadAt + 16);
    const checksum = native().hash64(edited.subarray(payloadAt, payloadAt + sectionLength));
    edited.writeBigUInt64LE(checksum, sectionOffset + 16);
    const source = path.join(dir, 'raw-length-source.qvms');
    fs.writeFileSync(source, edited);
    const file = withIndex(
      'raw-length.qvms',
      (copy) => {
        copy.writeBigUInt64LE(checksum, entryAt + 24);
        return copy;
      },
      source,
    );
    const state = await StateFile.open(file);
    try {
      const error = await restoreMemory(state, path.join(dir, 'raw-length.raw')).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect((error as Qcow2Error).message).toMatch(/chunk holds more pages than its spans need/);
      expect(fs.existsSync(path.join(dir, 'raw-length.raw'))).toBe(false);
    } finally {
      await state.close();
    }
  });
});

describe('section headers', () => {
  it('verify reports a section header that no longer matches the INDEX (the digest does not cover it)', async () => {
    const bytes = fs.readFileSync(original);
    const footer = bytes.subarray(bytes.length - FOOTER);
    const indexOffset = Number(footer.readBigUInt64LE(8));
    const index = bytes.subarray(indexOffset + SECTION_HEADER);
    const { chunksAt } = indexLayout(index);
    const sectionOffset = Number(index.readBigUInt64LE(32 + index.readUInt32LE(chunksAt + 8) * SECTION_ENTRY + 8));
    const edited = Buffer.from(bytes);
    edited[sectionOffset + 27] = 0x5a; // a reserved byte of the first CHUNK's header
    const file = path.join(dir, 'section-header.qvms');
    fs.writeFileSync(file, edited);
    const state = await StateFile.open(file);
    try {
      const problems = await state.verify();
      expect(problems).toHaveLength(1);
      expect(problems[0]!.part).toBe('CHUNK 0');
      expect(problems[0]!.message).toMatch(/section header at \d+ does not match the INDEX/);
    } finally {
      await state.close();
    }
  });
});

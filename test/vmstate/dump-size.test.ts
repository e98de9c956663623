/**
 * Issue #20 item 2: the state file records the RAM dump's size (REGIONS, since 1.1), restore makes
 * exactly that size, 1.0 files stay readable, and a map that does not tile the dump is refused at
 * create with its ranges named.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../src/errors';
import { native } from '../../src/native';
import { createSnapshot, restoreSnapshot } from '../../src/snapshot';
import { decodeIndex, encodeFooter, encodeIndex, encodeSectionHeader, FOOTER_BYTES, SECTION_HEADER_BYTES } from '../../src/vmstate/format';
import { restoreMemory, StateFile } from '../../src/vmstate/reader';
import { writeState } from '../../src/vmstate/writer';
import { makeRamDump } from '../helpers/ram';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
let dir: string;
let ramPath: string;
let ram: Buffer;
const cli = path.resolve(__dirname, '../../dist/cli/main.js');

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-dump-size-'));
  ramPath = path.join(dir, 'ram.raw');
  ram = makeRamDump(ramPath, 6 * MiB, 5);
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A q35-like split: the first 4 MiB of the dump at guest 0, the rest at 4 GiB, listed high first. */
const split = [
  { guestBase: 4 * GiB, size: 2 * MiB, dumpOffset: 4 * MiB },
  { guestBase: 0, size: 4 * MiB, dumpOffset: 0 },
];

async function refusedAtCreate(regions: { guestBase: number; size: number; dumpOffset: number }[], pattern: RegExp): Promise<void> {
  const out = path.join(dir, `refused-${Math.random().toString(36).slice(2)}`);
  const error = await createSnapshot(out, { memory: ramPath, memoryRegions: regions }).then(() => undefined, (e: unknown) => e);
  expect(error).toBeInstanceOf(Qcow2Error);
  expect((error as Qcow2Error).code).toBe('INVALID_ARGUMENT');
  expect((error as Qcow2Error).message).toMatch(pattern);
  expect((error as Qcow2Error).message).not.toContain('\n');
  expect((error as Qcow2Error).path).toBe(ramPath);
  expect(fs.existsSync(out)).toBe(false);
  expect(fs.readdirSync(dir).filter((n) => n.includes('.tmp'))).toEqual([]);
}

/** The same state file as a 1.0 writer made it: REGIONS without the dump size, every later offset 8 bytes lower. */
function asVersion10(bytes: Buffer): Buffer {
  const addon = native();
  const header = Buffer.from(bytes.subarray(0, 64));
  header.writeUInt16LE(0, 10);
  const footer = bytes.subarray(bytes.length - FOOTER_BYTES);
  const indexOffset = Number(footer.readBigUInt64LE(8));
  const indexLength = Number(footer.readBigUInt64LE(16));
  const index = decodeIndex(bytes.subarray(indexOffset + SECTION_HEADER_BYTES, indexOffset + SECTION_HEADER_BYTES + indexLength), 'x', 0);
  const regions = index.sections[0]!;
  expect(regions.offset).toBe(64);
  const payload = bytes.subarray(64 + SECTION_HEADER_BYTES, 64 + SECTION_HEADER_BYTES + regions.length - 8);
  const checksum = addon.hash64(payload);
  const rest = bytes.subarray(64 + SECTION_HEADER_BYTES + regions.length, indexOffset);
  index.sections = index.sections.map((s, i) => (i === 0 ? { ...s, length: payload.length, checksum } : { ...s, offset: s.offset - 8 }));
  const newIndex = encodeIndex(index);
  const newIndexOffset = indexOffset - 8;
  const body = Buffer.concat([header, encodeSectionHeader(1, payload.length, checksum), payload, rest, encodeSectionHeader(5, newIndex.length, addon.hash64(newIndex)), newIndex]);
  const digest = addon.hash128(Buffer.concat([header, newIndex]));
  return Buffer.concat([body, encodeFooter({ indexOffset: newIndexOffset, indexLength: newIndex.length, digest, dataEnd: body.length })]);
}

describe('the RAM dump size', () => {
  it('is recorded in REGIONS, and restore makes a file of exactly that size, byte for byte', async () => {
    const bundle = path.join(dir, 'split');
    await createSnapshot(bundle, { memory: ramPath, memoryRegions: split });
    const state = await StateFile.open(path.join(bundle, 'state.qvms'));
    try {
      expect(state.dumpSize).toBe(ram.length);
      expect(state.dumpSizeRecorded).toBe(true);
    } finally {
      await state.close();
    }
    const out = path.join(dir, 'split.ram');
    const result = await restoreSnapshot(bundle, { memory: out });
    expect(result.memory!.bytes).toBe(ram.length);
    expect(fs.statSync(out).size).toBe(ram.length);
    expect(fs.readFileSync(out).equals(ram)).toBe(true);
  });

  it('a 1.0 state file (no size after the table) is still read: its dump ends where its last region does', async () => {
    const modern = path.join(dir, 'modern.qvms');
    await writeState(modern, { memory: ramPath, regions: split });
    const oldPath = path.join(dir, 'old.qvms');
    fs.writeFileSync(oldPath, asVersion10(fs.readFileSync(modern)));
    const state = await StateFile.open(oldPath);
    try {
      expect(state.header.minor).toBe(0);
      expect(state.dumpSizeRecorded).toBe(false);
      expect(state.dumpSize).toBe(6 * MiB);
      expect(await state.verify()).toEqual([]);
      const out = path.join(dir, 'old.ram');
      await restoreMemory(state, out);
      expect(fs.readFileSync(out).equals(ram)).toBe(true);
    } finally {
      await state.close();
    }
  });

  it('a recorded size below the end of a region is refused on open', async () => {
    // The size field is the REGIONS payload's last 8 bytes: rewrite it (and the checksums over it) via a 1.0 copy plus a wrong size.
    const modern = path.join(dir, 'small.qvms');
    await writeState(modern, { memory: ramPath, regions: split });
    const bytes = fs.readFileSync(modern);
    const { decodeRegions } = await import('../../src/vmstate/format.js');
    const payload = Buffer.from(bytes.subarray(64 + SECTION_HEADER_BYTES, 64 + SECTION_HEADER_BYTES + 16 + 32 * 2 + 8));
    expect(decodeRegions(payload, 'p').dumpSize).toBe(6 * MiB);
    payload.writeBigUInt64LE(BigInt(5 * MiB), 16 + 32 * 2);
    expect(() => decodeRegions(payload, 'p')).toThrow(/RAM dump size 5242880 is smaller than the end of a region in the dump \(6291456\)/);
  });
});

describe('a memory map that does not tile the dump is refused at create', () => {
  it('one that leaves bytes of the dump uncovered (a gap, and the tail)', async () => {
    await refusedAtCreate([{ guestBase: 0, size: 1 * MiB, dumpOffset: 0 }, { guestBase: 4 * GiB, size: 1 * MiB, dumpOffset: 2 * MiB }], /memory map leaves bytes 0x100000-0x200000, 0x300000-0x600000 of the RAM dump \(0x600000 bytes\) uncovered/);
  });

  it('one that overlaps itself in guest space', async () => {
    await refusedAtCreate([{ guestBase: 0, size: 4 * MiB, dumpOffset: 0 }, { guestBase: 3 * MiB, size: 2 * MiB, dumpOffset: 4 * MiB }], /region 0 \(guest 0x0-0x400000, dump 0x0-0x400000\) and region 1 \(guest 0x300000-0x500000, dump 0x400000-0x600000\) overlap in guest space/);
  });

  it('one that overlaps itself in the dump', async () => {
    await refusedAtCreate([{ guestBase: 4 * GiB, size: 4 * MiB, dumpOffset: 2 * MiB }, { guestBase: 0, size: 3 * MiB, dumpOffset: 0 }], /region 0 \(guest 0x100000000-0x100400000, dump 0x200000-0x600000\) and region 1 \(guest 0x0-0x300000, dump 0x0-0x300000\) overlap in the RAM dump/);
  });

  it('one that runs past the end of the dump', async () => {
    await refusedAtCreate([{ guestBase: 0, size: 8 * MiB, dumpOffset: 0 }], /region 0 \(guest 0x0-0x800000, dump 0x0-0x800000\) runs past the end of the RAM dump \(0x600000 bytes\)/);
  });

  it('the CLI says so in one line naming the dump', () => {
    const map = path.join(dir, 'gap.json');
    fs.writeFileSync(map, JSON.stringify([{ guestBase: 0, size: 1 * MiB, dumpOffset: 0 }]));
    let stderr = '';
    let status = 0;
    try {
      execFileSync(process.execPath, [cli, 'snapshot', 'create', path.join(dir, 'cli-gap'), '--memory', ramPath, '--memory-map', map], { stdio: 'pipe' });
    } catch (error) {
      status = (error as { status: number }).status;
      stderr = String((error as { stderr: Buffer }).stderr);
    }
    expect(status).not.toBe(0);
    expect(stderr.trim().split('\n')).toHaveLength(1);
    expect(stderr).toContain(ramPath);
    expect(stderr).toMatch(/leaves bytes 0x100000-0x600000 of the RAM dump \(0x600000 bytes\) uncovered/);
    expect(fs.existsSync(path.join(dir, 'cli-gap'))).toBe(false);
  });
});

/**
 * Edge cases where qcow2img must read as Linux, sfdisk, libblkid and QEMU read: EBRs of type 0,
 * protective MBRs of size 0, LUKS headers QEMU refuses, a multi-device root, an image opened only
 * to be described, CPU JSON deeper than a reader takes. Only files and loop devices this file makes
 * are touched (loop devices are detached in finally blocks).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { load, open, Qcow2Error } from '../src/index';
import { findPartition } from '../src/load/partitions';
import { decodeCpuState, encodeCpuState, parseCpuState } from '../src/vmstate/cpu';
import { sampleCpuState } from './helpers/cpu';
import { attachLoop, loopUnavailable, partition, readRange } from './helpers/loop';

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
const SECTOR = 512;
let dir: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-layouts-'));
});
afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function failure(promise: Promise<unknown>): Promise<Qcow2Error> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error, 'expected a refusal').toBeInstanceOf(Qcow2Error);
  return error as Qcow2Error;
}

function patch(file: string, offset: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

/** Partitions as sfdisk numbers them: number -> start and size in bytes. */
function sfdiskPartitions(target: string): Map<number, { start: number; size: number }> {
  const out = execFileSync('sfdisk', ['--json', target], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  const dump = JSON.parse(out.slice(out.indexOf('{'))) as { partitiontable: { label: string; partitions: { node: string; start: number; size: number }[] } };
  return new Map(dump.partitiontable.partitions.map((p) => [Number(/(\d+)$/.exec(p.node)![1]), { start: p.start * SECTOR, size: p.size * SECTOR }]));
}

/** Partitions as libblkid (partx) numbers them. */
function partxPartitions(target: string): Map<number, { start: number; size: number }> {
  const out = execFileSync('partx', ['-g', '-b', '-o', 'NR,START,SIZE', target], { encoding: 'utf8' });
  return new Map(
    out
      .trim()
      .split('\n')
      .map((line) => line.trim().split(/\s+/).map(Number))
      .map(([nr, start, size]) => [nr!, { start: start! * SECTOR, size: size! }]),
  );
}

async function partitionOf(disk: string, number: number) {
  const handle = await fs.promises.open(disk, 'r');
  try {
    return await findPartition(handle, (await handle.stat()).size, number, disk);
  } finally {
    await handle.close();
  }
}

function mbrEntry(type: number, start: number, sectors: number): Buffer {
  const entry = Buffer.alloc(16);
  entry[4] = type;
  entry.writeUInt32LE(start, 8);
  entry.writeUInt32LE(sectors, 12);
  return entry;
}

function signedSector(entries: Buffer[]): Buffer {
  const sector = Buffer.alloc(SECTOR);
  entries.forEach((e, i) => e.copy(sector, 446 + 16 * i));
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

describe('partition tables (src/load/partitions.ts)', () => {
  it('numbers an EBR whose data entry has type 0 but a size, as sfdisk, libblkid and Linux do (they test the size, not the type)', async () => {
    // block/partitions/msdos.c parse_extended: `if (!nr_sects(p) || is_extended_partition(p)) continue;`
    // libblkid (dos.c) the same. Skipping such an EBR would put --partition 5 in what every
    // other tool calls partition 6.
    const disk = path.join(dir, 'ebr-type0.img');
    fs.writeFileSync(disk, Buffer.alloc(16 * MiB, 0x5c));
    patch(disk, 0, signedSector([mbrEntry(0x83, 2048, 2048), mbrEntry(0x05, 8192, 16384)]));
    // EBR 1 at 8192: data entry of type 0 with 2047 sectors; link to EBR 2 at 8192 + 4096.
    patch(disk, 8192 * SECTOR, signedSector([mbrEntry(0x00, 1, 2047), mbrEntry(0x05, 4096, 4096)]));
    patch(disk, (8192 + 4096) * SECTOR, signedSector([mbrEntry(0x83, 2048, 2048)]));
    const sfdisk = sfdiskPartitions(disk);
    expect([...sfdisk.keys()]).toEqual([1, 2, 5, 6]);
    expect(partxPartitions(disk).get(6)).toEqual({ start: 14336 * SECTOR, size: 2048 * SECTOR });

    const six = await partitionOf(disk, 6).catch((e: unknown) => e);
    expect(six, 'partition 6 of sfdisk and partx is missing').not.toBeInstanceOf(Error);
    expect((six as { start: number }).start).toBe(sfdisk.get(6)!.start);
    // Partition 5 must not be the partition sfdisk calls 6.
    const five = await partitionOf(disk, 5).catch(() => undefined);
    expect(five?.start).not.toBe(sfdisk.get(6)!.start);
  });

  it('reads the GPT behind a protective MBR whose 0xEE entry has size 0, as Linux, libblkid and sfdisk do', async () => {
    // efi.c is_pmbr_valid() takes type 0xEE starting at LBA 1 and only logs a size mismatch;
    // a test on readMbr()'s list, which drops 0-sector entries, would make it "an MBR with no
    // partitions".
    const disk = path.join(dir, 'pmbr-size0.img');
    fs.writeFileSync(disk, '');
    fs.truncateSync(disk, 32 * MiB);
    partition(disk, 'label: gpt\n,8M\n,\n');
    const entry = readRange(disk, 446, 16);
    expect(entry[4]).toBe(0xee);
    entry.writeUInt32LE(0, 12);
    patch(disk, 446, entry);
    const sfdisk = sfdiskPartitions(disk);
    expect(execFileSync('blkid', ['-p', '-o', 'value', '-s', 'PTTYPE', disk], { encoding: 'utf8' }).trim()).toBe('gpt');

    const found = await partitionOf(disk, 2).catch((e: unknown) => e);
    expect(found, String(found)).not.toBeInstanceOf(Error);
    expect(found).toMatchObject({ scheme: 'gpt', start: sfdisk.get(2)!.start, sizeBytes: sfdisk.get(2)!.size });
  });
});

describe('encrypted images (src/qcow2/luks.ts, load with metadataOnly)', () => {
  let luks: string;
  beforeAll(() => {
    luks = path.join(dir, 'luks.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '--object', 'secret,id=sec0,data=abc', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', luks, '1M']);
  });

  /** A copy of luks.qcow2 with its LUKS header changed. */
  function damaged(name: string, change: (bytes: Buffer, luksAt: number) => void): string {
    const bytes = fs.readFileSync(luks);
    let at = bytes.readUInt32BE(100);
    while (bytes.readUInt32BE(at) !== 0x0537be77) at += 8 + Math.ceil(bytes.readUInt32BE(at + 4) / 8) * 8;
    change(bytes, Number(bytes.readBigUInt64BE(at + 8)));
    const file = path.join(dir, name);
    fs.writeFileSync(file, bytes);
    return file;
  }

  // qcrypto_block_luks_check_header() refuses these; qemu-img info fails on each, qcow2img info
  // printed them as a sound header.
  const cases: [string, (bytes: Buffer, luksAt: number) => void][] = [
    ['master key iterations 0', (b, at) => b.writeUInt32BE(0, at + 164)],
    ['an inactive key slot with 3999 stripes', (b, at) => b.writeUInt32BE(3999, at + 208 + 3 * 48 + 44)],
    ['a payload offset inside the header', (b, at) => b.writeUInt32BE(1, at + 104)],
    ['two key slots at the same offset', (b, at) => b.writeUInt32BE(b.readUInt32BE(at + 208 + 40), at + 208 + 48 + 40)],
  ];
  for (const [what, change] of cases) {
    it(`a LUKS header with ${what} is BAD_ENCRYPTION_HEADER, as qemu-img info refuses it`, async () => {
      const file = damaged(`luks-${what.replace(/\W+/g, '-')}.qcow2`, change);
      expect(spawnSync('qemu-img', ['info', file]).status).not.toBe(0);
      const error = await failure(open(file, { metadataOnly: true }).then((image) => image.close()));
      expect(error.code).toBe('BAD_ENCRYPTION_HEADER');
    });
  }

  it('a LUKS header at an offset that is not a multiple of the cluster size is refused, as qemu-img info refuses it', async () => {
    // qcow2_read_extensions(): "Encryption header offset ... is not a multiple of cluster size".
    const file = damaged('luks-unaligned.qcow2', () => {});
    const bytes = fs.readFileSync(file);
    let at = bytes.readUInt32BE(100);
    while (bytes.readUInt32BE(at) !== 0x0537be77) at += 8 + Math.ceil(bytes.readUInt32BE(at + 4) / 8) * 8;
    const luksAt = Number(bytes.readBigUInt64BE(at + 8));
    const moved = luksAt + 4 * 4096 + 512;
    bytes.copy(bytes, moved, luksAt, luksAt + 592);
    bytes.writeBigUInt64BE(BigInt(moved), at + 8);
    fs.writeFileSync(file, bytes);
    expect(spawnSync('qemu-img', ['info', file]).status).not.toBe(0);
    const error = await failure(open(file, { metadataOnly: true }).then((image) => image.close()));
    expect(['BAD_ENCRYPTION_HEADER', 'BAD_EXTENSION']).toContain(error.code);
  });

  it('load of an image opened with metadataOnly leaves an existing target file as it was (docs/architecture.md: every refusal before the first byte)', async () => {
    const target = path.join(dir, 'region-target.bin');
    const original = Buffer.alloc(4096, 0x5c);
    fs.writeFileSync(target, original);
    const image = await open(luks, { metadataOnly: true });
    try {
      const error = await failure(load(image, target, { offset: 0 }));
      expect(error.code).toBe('ENCRYPTED');
    } finally {
      await image.close();
    }
    // The file was extended to offset + virtual size (1 MiB) by openFileRegion before the refusal.
    expect(fs.statSync(target).size).toBe(original.length);
  });
});

describe.skipIf(loopUnavailable() !== undefined)('device safety (src/load/safety.ts)', () => {
  it('--force still refuses a member of a multi-device bcachefs root (mount source "/dev/A:/dev/B")', async () => {
    // safety.ts names bcachefs among the 0:N filesystems found by their mount source, but a
    // multi-device bcachefs lists its members joined by ":" there, and stat() of that string fails.
    const image = path.join(dir, 'safety.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 1M', image], { stdio: 'ignore' });
    const files = ['member-a.img', 'member-b.img'].map((name) => {
      const file = path.join(dir, name);
      fs.writeFileSync(file, Buffer.alloc(8 * MiB, 0x5c));
      return file;
    });
    const a = attachLoop(files[0]!);
    try {
      const b = attachLoop(files[1]!);
      try {
        const real = fs.readFileSync('/proc/self/mountinfo', 'utf8');
        mountinfo.fake = `${real.trimEnd()}\n4243 1 0:4243 / / rw,relatime shared:1 - bcachefs ${a.device}:${b.device} rw\n`;
        const before = readRange(b.device, 0, 8 * MiB);
        try {
          const error = await failure(load(image, b.device, { force: true }));
          expect(error.code).toBe('TARGET_IN_USE');
          expect(error.message).toContain('root filesystem');
        } finally {
          mountinfo.fake = undefined;
        }
        expect(readRange(b.device, 0, 8 * MiB).equals(before), 'a member of the root filesystem was written').toBe(true);
      } finally {
        b.detach();
      }
    } finally {
      a.detach();
    }
  });
});

describe('CPU state (src/vmstate/cpu.ts, docs/formats/vmstate.md)', () => {
  it('CPU JSON nested deeper than the 64 levels the reader takes is refused when written, not stored unreadable', () => {
    // docs/formats/vmstate.md: "Nesting is limited to 64 levels". decodeCpuState refuses depth
    // > 64: a writer that took more would make a state.qvms whose restore fails.
    let deep: unknown = '0x1';
    for (let i = 0; i < 80; i++) deep = { inner: deep };
    const json = structuredClone(sampleCpuState) as { vcpus: Record<string, unknown>[] };
    json.vcpus[0]!.vendorBlob = deep;
    let stored: Buffer;
    try {
      stored = encodeCpuState(parseCpuState(json, 'cpu.json'), 'cpu.json');
    } catch (error) {
      expect((error as Qcow2Error).code).toBe('INVALID_ARGUMENT');
      return;
    }
    expect(() => decodeCpuState(stored, 'state.qvms')).not.toThrow();
  });
});

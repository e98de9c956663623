/**
 * Hostile input to `load --partition` (partition tables of disk image files: GPT, MBR, EBR chains),
 * each case a bug a review found, and the behaviour Linux, sfdisk and libblkid show for the same
 * input. Only files this file makes are touched. Block-device safety cases are in
 * test/safety/devices.test.ts, snapshot archives in test/snapshot/hostile-archives.test.ts.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { load, Qcow2Error } from '../../src/index';
import { findPartition } from '../../src/load/partitions';
import { partition, partitionsOf, readRange } from '../helpers/loop';
import { cliPath } from '../helpers/qemu';
import { abBytes, abImage, failure, oldDisk, sha } from '../helpers/fixtures';

const MiB = 1024 * 1024;
const SECTOR = 512;
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

function patch(file: string, offset: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

/** Partitions as sfdisk numbers them (its JSON, past the notes it prints before it on stdout). */
function sfdiskPartitions(target: string): Map<number, { start: number; size: number }> {
  const out = execFileSync('sfdisk', ['--json', target], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  const dump = JSON.parse(out.slice(out.indexOf('{'))) as { partitiontable: { partitions: { node: string; start: number; size: number }[] } };
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

// ---------------------------------------------------------------------------------------------
// GPT, built byte by byte so that every field can lie.

const LINUX_FS = Buffer.from('af3dc60f838472478e793d69d8477de4', 'hex');

interface GptPart {
  first: number;
  last: number;
}

interface GptLayout {
  sector: number;
  lastLba: number;
  entries: Buffer;
  primary: Buffer;
  backup: Buffer;
  /** LBA of the backup entry array. */
  backupEntriesLba: number;
}

/** Recomputes the header CRC after a field was changed. */
function seal(header: Buffer): Buffer {
  header.writeUInt32LE(0, 16);
  header.writeUInt32LE(crc32(header.subarray(0, header.readUInt32LE(12))), 16);
  return header;
}

function gptLayout(size: number, parts: readonly GptPart[], sector = SECTOR): GptLayout {
  const count = 128;
  const entrySize = 128;
  const lastLba = size / sector - 1;
  const entrySectors = (count * entrySize) / sector;
  const entries = Buffer.alloc(count * entrySize);
  parts.forEach((p, i) => {
    LINUX_FS.copy(entries, i * entrySize);
    randomBytes(16).copy(entries, i * entrySize + 16);
    entries.writeBigUInt64LE(BigInt(p.first), i * entrySize + 32);
    entries.writeBigUInt64LE(BigInt(p.last), i * entrySize + 40);
  });
  const diskGuid = randomBytes(16);
  const header = (my: number, alternate: number, entriesLba: number) => {
    const h = Buffer.alloc(sector);
    h.write('EFI PART', 0, 'latin1');
    h.writeUInt32LE(0x10000, 8);
    h.writeUInt32LE(92, 12);
    h.writeBigUInt64LE(BigInt(my), 24);
    h.writeBigUInt64LE(BigInt(alternate), 32);
    h.writeBigUInt64LE(BigInt(2 + entrySectors), 40);
    h.writeBigUInt64LE(BigInt(lastLba - 1 - entrySectors), 48);
    diskGuid.copy(h, 56);
    h.writeBigUInt64LE(BigInt(entriesLba), 72);
    h.writeUInt32LE(count, 80);
    h.writeUInt32LE(entrySize, 84);
    h.writeUInt32LE(crc32(entries), 88);
    return seal(h);
  };
  const backupEntriesLba = lastLba - entrySectors;
  return { sector, lastLba, entries, primary: header(1, lastLba, 2), backup: header(lastLba, 1, backupEntriesLba), backupEntriesLba };
}

function protectiveMbr(lastLba: number): Buffer {
  const mbr = Buffer.alloc(SECTOR);
  mbr[446 + 4] = 0xee;
  mbr.writeUInt32LE(1, 446 + 8);
  mbr.writeUInt32LE(Math.min(lastLba, 0xffffffff), 446 + 12);
  mbr[510] = 0x55;
  mbr[511] = 0xaa;
  return mbr;
}

/** Writes protective MBR, primary and backup GPT (either may be left out) into `file`. */
function writeGpt(file: string, layout: GptLayout, what: { pmbr?: boolean; primary?: boolean; backup?: boolean } = {}): void {
  const { sector } = layout;
  if (what.pmbr !== false) patch(file, 0, protectiveMbr(layout.lastLba));
  if (what.primary !== false) {
    patch(file, sector, layout.primary);
    patch(file, 2 * sector, layout.entries);
  }
  if (what.backup !== false) {
    patch(file, layout.backupEntriesLba * sector, layout.entries);
    patch(file, layout.lastLba * sector, layout.backup);
  }
}

/** Sector 0 of a disk of `size` bytes partitioned by sfdisk with `script` (a DOS label). */
function dosMbr(size: number, script: string): Buffer {
  const scratch = path.join(dir, `mbr-${randomBytes(4).toString('hex')}.img`);
  fs.writeFileSync(scratch, '');
  fs.truncateSync(scratch, size);
  try {
    partition(scratch, script);
    return readRange(scratch, 0, SECTOR);
  } finally {
    fs.rmSync(scratch);
  }
}

// ---------------------------------------------------------------------------------------------

describe('partition tables of disk image files', () => {
  it('numbers a logical partition after an EBR with an empty data entry as sfdisk and Linux do, and writes only that one', async () => {
    // Linux (block/partitions/msdos.c parse_extended), libblkid (partx, lsblk) and sfdisk give a
    // number only to an EBR that holds a data partition; qcow2img counts every EBR visited.
    const disk = oldDisk(dir, 'ebr-gap.img', 64 * MiB);
    partition(disk, `label: dos\n${disk}1 : size=4M, type=83\n${disk}2 : size=40M, type=5\n${disk}5 : size=2M, type=83\n${disk}6 : size=3M, type=83\n${disk}7 : size=24M, type=83\n`);
    // Empty the data entry of the first EBR (as after deleting the first logical partition
    // with some tools); its link to the next EBR stays.
    const mbr = readRange(disk, 0, SECTOR);
    const extendedStart = mbr.readUInt32LE(446 + 16 + 8);
    expect(mbr[446 + 16 + 4]).toBe(0x05);
    patch(disk, extendedStart * SECTOR + 446, Buffer.alloc(16));
    const parts = sfdiskPartitions(disk);
    expect([...parts.keys()]).toEqual([1, 2, 5, 6]);
    const p5 = parts.get(5)!;
    const p6 = parts.get(6)!;
    const before = fs.readFileSync(disk);

    await load(image, disk, { partition: 6 });
    const after = fs.readFileSync(disk);
    // Counting every EBR put the 1 MiB at the start of what sfdisk calls partition 5.
    expect(sha(after.subarray(p5.start, p5.start + p5.size)), 'partition 5 (sfdisk numbering) was written').toBe(sha(before.subarray(p5.start, p5.start + p5.size)));
    expect(sha(after.subarray(p6.start, p6.start + MiB))).toBe(sha(expected));
    expect(sha(after.subarray(p6.start + MiB))).toBe(sha(before.subarray(p6.start + MiB)));
    expect(sha(after.subarray(0, p6.start))).toBe(sha(before.subarray(0, p6.start)));
    // And there is no partition 7.
    const seven = await failure(load(image, disk, { partition: 7 }));
    expect(seven.code).toBe('INVALID_ARGUMENT');
    expect(seven.message).toContain('no partition 7');
  });

  for (const primary of ['damaged', 'intact'] as const) {
    it(`uses the MBR, not a leftover GPT (${primary} primary, valid backup), when sector 0 has no protective 0xEE entry`, async () => {
      // The kernel (efi.c find_valid_gpt: is_pmbr_valid), libblkid and libfdisk accept a GPT only
      // behind a protective MBR. A disk re-labelled DOS by a tool (or dd of an MBR image) that left
      // the GPT at the end of the disk is an MBR disk to all of them.
      const size = 64 * MiB;
      const disk = oldDisk(dir, `stale-gpt-${primary}.img`, size);
      writeGpt(disk, gptLayout(size, [{ first: 2048, last: 18431 }, { first: 18432, last: 79871 }]), { primary: primary === 'intact' });
      patch(disk, 0, dosMbr(size, 'label: dos\n,20M,83\n,30M,83\n'));
      const parts = partitionsOf(disk);
      expect(parts.get(2)).toEqual({ start: 43008 * SECTOR, size: 61440 * SECTOR });
      const before = fs.readFileSync(disk);

      await load(image, disk, { partition: 2 });
      const after = fs.readFileSync(disk);
      // The stale GPT's partition 2 (18432 * 512) lies inside MBR partition 1.
      expect(sha(after.subarray(0, 43008 * SECTOR)), 'bytes before MBR partition 2 changed').toBe(sha(before.subarray(0, 43008 * SECTOR)));
      expect(sha(after.subarray(43008 * SECTOR, 43008 * SECTOR + MiB))).toBe(sha(expected));
      expect(sha(after.subarray(43008 * SECTOR + MiB))).toBe(sha(before.subarray(43008 * SECTOR + MiB)));
    });
  }

  /** A load into `number` of a 64 MiB GPT disk of `parts`: INVALID_ARGUMENT naming the disk, the disk unchanged. */
  async function refusedGptLoad(name: string, parts: readonly GptPart[], number: number): Promise<Qcow2Error> {
    const size = 64 * MiB;
    const disk = oldDisk(dir, name, size);
    writeGpt(disk, gptLayout(size, parts));
    const before = sha(fs.readFileSync(disk));
    const error = await failure(load(image, disk, { partition: number }));
    expect(error.code).toBe('INVALID_ARGUMENT');
    expect(error.message).toContain(disk);
    expect(sha(fs.readFileSync(disk)), 'the disk was written').toBe(before);
    return error;
  }

  it('refuses a GPT entry outside the header\'s usable LBAs: the load would overwrite the partition table', async () => {
    // Partition 1 claims LBA 0-16383: the MBR, the primary header and its entry array.
    // libblkid (partx, lsblk) ignores such an entry ("overflows usable area").
    await refusedGptLoad('gpt-covers-itself.img', [{ first: 0, last: 16383 }, { first: 18432, last: 79871 }], 1);
  });

  it('refuses a partition that overlaps another one of the table (proposed policy: safety checks see only its own node)', async () => {
    const error = await refusedGptLoad('gpt-overlap.img', [{ first: 2048, last: 40959 }, { first: 20480, last: 61439 }], 2);
    expect(error.message).toMatch(/overlap/);
  });

  it('rejects a GPT header whose entry array lies past the end of the disk (docs: "cannot be read in full"), using the backup', async () => {
    // Node's FileHandle.read treats a position that is not a safe integer >= 0 as "the current
    // file position": the array is then read from offset 0 of a fresh handle, where a forged
    // entry can sit in the protective MBR's boot code.
    const size = 64 * MiB;
    const disk = oldDisk(dir, 'gpt-far-array.img', size);
    const layout = gptLayout(size, [{ first: 2048, last: 18431 }, { first: 18432, last: 79871 }]);
    writeGpt(disk, layout);
    const forged = Buffer.alloc(128);
    LINUX_FS.copy(forged, 0);
    forged.writeBigUInt64LE(18432n, 32);
    forged.writeBigUInt64LE(79871n, 40);
    const sector0 = protectiveMbr(layout.lastLba);
    forged.copy(sector0, 0);
    patch(disk, 0, sector0);
    const primary = Buffer.from(layout.primary);
    primary.writeBigUInt64LE(1n << 60n, 72);
    primary.writeUInt32LE(1, 80);
    primary.writeUInt32LE(crc32(forged), 88);
    patch(disk, SECTOR, seal(primary));

    const handle = await fs.promises.open(disk, 'r');
    try {
      const found = await findPartition(handle, size, 1, disk);
      // The backup's partition 1 (the kernel's read_lba refuses an LBA past the disk, too).
      expect(found.start, 'partition 1 came from the forged entry at offset 0').toBe(2048 * SECTOR);
    } finally {
      await handle.close();
    }
  });
});

describe('more partition tables of disk image files', () => {
  it('falls back to the backup GPT when the primary header CRC is wrong, as sfdisk does', async () => {
    const size = 64 * MiB;
    const disk = oldDisk(dir, 'gpt-backup.img', size);
    writeGpt(disk, gptLayout(size, [{ first: 2048, last: 18431 }, { first: 18432, last: 79871 }]));
    patch(disk, SECTOR + 24, Buffer.from([0x7f])); // my_lba changed, CRC not updated
    expect(partitionsOf(disk).get(2)).toEqual({ start: 18432 * SECTOR, size: 61440 * SECTOR });
    const handle = await fs.promises.open(disk, 'r');
    try {
      expect(await findPartition(handle, size, 2, disk)).toMatchObject({ start: 18432 * SECTOR, sizeBytes: 61440 * SECTOR, scheme: 'gpt' });
    } finally {
      await handle.close();
    }
  });

  it('hostile entry counts and sizes, a looping EBR chain and a protective MBR alone end at once with a result or INVALID_ARGUMENT', async () => {
    const size = 64 * MiB;
    const disk = oldDisk(dir, 'gpt-hostile-counts.img', size);
    const layout = gptLayout(size, [{ first: 2048, last: 18431 }]);
    writeGpt(disk, layout);
    for (const [count, entrySize] of [
      [0xffffffff, 128],
      [4096, 0xffffff80],
      [1, 0],
      [1, 129],
    ] as const) {
      const primary = Buffer.from(layout.primary);
      primary.writeUInt32LE(count, 80);
      primary.writeUInt32LE(entrySize, 84);
      patch(disk, SECTOR, seal(primary));
      const handle = await fs.promises.open(disk, 'r');
      try {
        // The primary is skipped, the backup read.
        expect(await findPartition(handle, size, 1, disk)).toMatchObject({ start: 2048 * SECTOR });
      } finally {
        await handle.close();
      }
    }
    // Both headers bad and a protective MBR: refused.
    patch(disk, layout.lastLba * SECTOR, Buffer.alloc(SECTOR));
    const handle = await fs.promises.open(disk, 'r');
    try {
      const error = await failure(findPartition(handle, size, 1, disk));
      expect(error.code).toBe('INVALID_ARGUMENT');
      expect(error.message).toContain('protective MBR without a valid GPT');
    } finally {
      await handle.close();
    }

    // An EBR whose link points back at itself.
    const looping = oldDisk(dir, 'ebr-loop.img', 64 * MiB);
    partition(looping, `label: dos\n${looping}1 : size=4M, type=83\n${looping}2 : size=40M, type=5\n${looping}5 : size=2M, type=83\n${looping}6 : size=3M, type=83\n`);
    const extendedStart = readRange(looping, 0, SECTOR).readUInt32LE(446 + 16 + 8);
    // The second (last) EBR gets a link to itself.
    const secondLba = extendedStart + readRange(looping, extendedStart * SECTOR + 462, 16).readUInt32LE(8);
    const selfLink = Buffer.alloc(16);
    selfLink[4] = 0x05;
    selfLink.writeUInt32LE(secondLba - extendedStart, 8);
    selfLink.writeUInt32LE(2048, 12);
    patch(looping, secondLba * SECTOR + 462, selfLink);
    const loopHandle = await fs.promises.open(looping, 'r');
    try {
      expect(await findPartition(loopHandle, 64 * MiB, 6, looping)).toMatchObject({ scheme: 'mbr' });
      expect((await failure(findPartition(loopHandle, 64 * MiB, 7, looping))).code).toBe('INVALID_ARGUMENT');
    } finally {
      await loopHandle.close();
    }
  });
});

describe('partition tables as Linux, sfdisk and libblkid number them', () => {
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

describe('CLI', () => {
  it('a negative --partition is refused in one line', () => {
    const target = oldDisk(dir, 'cli-target.img', 8 * MiB);
    const ran = spawnSync(process.execPath, [cliPath, 'load', image, target, '--partition', '-1'], { encoding: 'utf8' });
    expect(ran.status).toBe(1);
    expect(ran.stderr.trim().split('\n'), ran.stderr).toHaveLength(1);
  });
});

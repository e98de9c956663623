/**
 * Issue #20 item 5, disks: incremental snapshots with a disk as archives (.tar.zst, .tar, and
 * mixed with folders). Each child's disk.qcow2 names its parent's disk where it lies once the
 * archives are unpacked (`../s1/disk.qcow2`); restore finds it in the chain instead.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../src/errors';
import { createSnapshot, restoreSnapshot, verifySnapshot } from '../../src/snapshot';
import { cliPath, MiB, randomBytes, run } from '../helpers/qemu';
import { makeRamDump } from '../helpers/ram';

const DISK_SIZE = 24 * MiB;
let dir: string;
/** The disk after each generation (1, 2, 3): raw files to snapshot and to compare with. */
const disks: string[] = [];
let ram: string;
/** Where the library extracts archive members (tempDir, and TMPDIR for anything else): must end empty. */
let temp: string;
let savedTmpdir: string | undefined;

/** Writes `length` random bytes at `at` of a raw file. */
function writeAt(file: string, at: number, length: number, seed: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, randomBytes(seed, length), 0, length, at);
  } finally {
    fs.closeSync(fd);
  }
}

function sameBytes(a: string, b: string): boolean {
  return run('cmp', ['-s', a, b]).status === 0;
}

function tempLeft(): string[] {
  return fs.readdirSync(temp);
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-incremental-disk-'));
  temp = path.join(dir, 'temp');
  fs.mkdirSync(temp);
  // Nothing may go to the system's temporary folder either.
  savedTmpdir = process.env.TMPDIR;
  process.env.TMPDIR = temp;
  const disk = path.join(dir, 'disk.raw');
  fs.writeFileSync(disk, '');
  fs.truncateSync(disk, DISK_SIZE);
  writeAt(disk, 0, 4 * MiB, 'generation 1 start');
  writeAt(disk, 16 * MiB + 12345, 3 * MiB, 'generation 1 middle');
  const copy = (g: number) => {
    const file = path.join(dir, `disk${g}.raw`);
    fs.copyFileSync(disk, file);
    disks.push(file);
  };
  copy(1);
  // Generation 2: new data where there was none, and data rewritten inside generation 1's.
  writeAt(disk, 6 * MiB + 4096, 3 * MiB, 'generation 2 a');
  writeAt(disk, 1 * MiB + 777, 1 * MiB, 'generation 2 b');
  copy(2);
  // Generation 3: more, over both, and zeros over data of generation 1 (the child must hide its parent's).
  writeAt(disk, 7 * MiB, 2 * MiB, 'generation 3 a');
  writeAt(disk, 20 * MiB, 4 * MiB, 'generation 3 b');
  const fd = fs.openSync(disk, 'r+');
  fs.writeSync(fd, Buffer.alloc(MiB), 0, MiB, 17 * MiB);
  fs.closeSync(fd);
  copy(3);
  for (let g = 1; g < 3; g++) expect(sameBytes(disks[g - 1]!, disks[g]!), `generations ${g} and ${g + 1} differ`).toBe(false);
  ram = path.join(dir, 'ram.raw');
  makeRamDump(ram, 2 * MiB, 5);
});
afterAll(() => {
  if (savedTmpdir === undefined) delete process.env.TMPDIR;
  else process.env.TMPDIR = savedTmpdir;
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Snapshots generations 1 to 3 as the three bundles named, each over the one before; returns their ids. */
async function makeChain(bundles: readonly string[], withMemory = false): Promise<string[]> {
  const ids: string[] = [];
  for (const [i, bundle] of bundles.entries()) {
    const metadata = await createSnapshot(bundle, {
      disk: disks[i]!,
      ...(withMemory ? { memory: ram } : {}),
      ...(i > 0 ? { parent: bundles[i - 1]!, tempDir: temp } : {}),
    });
    ids.push(metadata.id);
  }
  return ids;
}

/** Restores the disk of each bundle and compares it byte for byte with its generation. */
async function expectRestored(bundles: readonly string[], label: string): Promise<void> {
  for (const [i, bundle] of bundles.entries()) {
    const out = path.join(dir, `${label}-restored${i + 1}.raw`);
    const result = await restoreSnapshot(bundle, { disk: out, tempDir: temp });
    expect(result.disk!.virtualSize).toBe(DISK_SIZE);
    expect(sameBytes(out, disks[i]!), `${label}: ${path.basename(bundle)} restores generation ${i + 1}`).toBe(true);
    fs.rmSync(out);
  }
  expect(tempLeft(), 'extraction folders removed').toEqual([]);
}

describe('incremental disks in archives', () => {
  it('three .tar.zst archives, each disk over the last: restored byte for byte, moved elsewhere, the children holding only what changed', async () => {
    const snaps = path.join(dir, 'zst');
    fs.mkdirSync(snaps);
    const bundles = ['s1', 's2', 's3'].map((name) => path.join(snaps, `${name}.tar.zst`));
    await makeChain(bundles, true);
    expect(tempLeft(), 'create removes what it extracted').toEqual([]);

    // Moved together: parents and backing files are named relative to the archives.
    const moved = path.join(dir, 'zst-moved');
    fs.renameSync(snaps, moved);
    const movedBundles = bundles.map((b) => path.join(moved, path.basename(b)));
    await expectRestored(movedBundles, 'zst');

    // Disk and memory together (the archive is streamed once for each).
    const both = path.join(dir, 'zst-both');
    fs.mkdirSync(both);
    await restoreSnapshot(movedBundles[2]!, { disk: path.join(both, 'disk.raw'), memory: path.join(both, 'ram.raw'), tempDir: temp });
    expect(sameBytes(path.join(both, 'disk.raw'), disks[2]!)).toBe(true);
    expect(sameBytes(path.join(both, 'ram.raw'), ram)).toBe(true);
    expect(tempLeft()).toEqual([]);

    // The children hold only the clusters that changed: far less than generation 1's 7 MiB.
    const diskBytes = movedBundles.map((b) => run('tar', ['-tvf', b, '--zstd']).stdout);
    const sizeOf = (listing: string) => Number(/\s(\d+)\s+\S+\s+\S+\s+\S*disk\.qcow2\n/.exec(listing)![1]);
    expect(sizeOf(diskBytes[0]!)).toBeGreaterThan(7 * MiB);
    expect(sizeOf(diskBytes[1]!)).toBeLessThan(5 * MiB);
    expect(sizeOf(diskBytes[2]!)).toBeLessThan(8 * MiB);

    expect(await verifySnapshot(movedBundles[2]!, { tempDir: temp })).toEqual([]);
    expect(tempLeft()).toEqual([]);

    // create extracts the parents' disks under its tempDir: one that does not exist is named.
    const nowhere = path.join(dir, 'no-such-temp');
    const child = path.join(moved, 's4.tar.zst');
    const error = await createSnapshot(child, { disk: disks[2]!, parent: movedBundles[2]!, tempDir: nowhere }).catch((e: unknown) => e);
    expect((error as Qcow2Error).path).toBe(nowhere);
    expect(fs.existsSync(child)).toBe(false);
  });

  it('unpacked with tar -xf, the chain is one qemu-img accepts: each disk equals its generation', async () => {
    const snaps = path.join(dir, 'unpack');
    fs.mkdirSync(snaps);
    const bundles = ['u1', 'u2', 'u3'].map((name) => path.join(snaps, `${name}.tar.zst`));
    await makeChain(bundles);
    const folder = path.join(dir, 'unpacked');
    fs.mkdirSync(folder);
    for (const bundle of bundles) {
      const untar = run('tar', ['-xf', bundle, '--zstd', '-C', folder]);
      expect(untar.status, untar.stderr).toBe(0);
    }
    expect(fs.readdirSync(folder).sort()).toEqual(['u1', 'u2', 'u3']);
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', path.join(folder, 'u3', 'disk.qcow2')]).stdout) as Record<string, unknown>;
    expect(info['backing-filename']).toBe('../u2/disk.qcow2');
    expect(info['backing-filename-format']).toBe('qcow2');
    for (let g = 1; g <= 3; g++) {
      const image = path.join(folder, `u${g}`, 'disk.qcow2');
      const check = run('qemu-img', ['check', image]);
      expect(check.status, check.stdout + check.stderr).toBe(0);
      const compare = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, disks[g - 1]!]);
      expect(compare.status, `u${g}: ${compare.stdout}${compare.stderr}`).toBe(0);
    }
    // And the comparison does tell generations apart.
    expect(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', path.join(folder, 'u3', 'disk.qcow2'), disks[1]!]).status).toBe(1);
  });

  it('plain .tar archives, read in place (the backing disk a byte range of its archive)', async () => {
    const bundles = ['t1', 't2', 't3'].map((name) => path.join(dir, `${name}.tar`));
    await makeChain(bundles);
    expect(tempLeft()).toEqual([]);
    await expectRestored(bundles, 'tar');
    expect(await verifySnapshot(bundles[2]!)).toEqual([]);
  });

  it('mixed chains: a folder under an archive, and an archive under a folder', async () => {
    const first = [path.join(dir, 'm1'), path.join(dir, 'm2.tar.zst'), path.join(dir, 'm3')];
    await makeChain(first);
    await expectRestored(first, 'folder-zst-folder');
    const second = [path.join(dir, 'n1.tar.gz'), path.join(dir, 'n2'), path.join(dir, 'n3.tar')];
    await makeChain(second);
    await expectRestored(second, 'gz-folder-tar');
    // The folder's disk names the archive's as it lies unpacked beside it.
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', path.join(dir, 'm3', 'disk.qcow2')]).stdout) as Record<string, unknown>;
    expect(info['backing-filename']).toBe('../m2/disk.qcow2');
  });

  it('through the CLI: create and restore a chain of archives with a disk', () => {
    const bundles = ['c1', 'c2', 'c3'].map((name) => path.join(dir, `${name}.tar.zst`));
    for (const [i, bundle] of bundles.entries()) {
      const args = ['snapshot', 'create', bundle, '--disk', disks[i]!, ...(i > 0 ? ['--parent', bundles[i - 1]!, '--temp-dir', temp] : [])];
      const made = run(process.execPath, [cliPath, ...args]);
      expect(made.status, made.stderr).toBe(0);
    }
    const out = path.join(dir, 'cli-restored.raw');
    const restored = run(process.execPath, [cliPath, 'snapshot', 'restore', bundles[2]!, '--disk', out, '--temp-dir', temp]);
    expect(restored.status, restored.stderr).toBe(0);
    expect(sameBytes(out, disks[2]!)).toBe(true);
    expect(tempLeft()).toEqual([]);
  });
});

describe('refusals', () => {
  it('a missing parent archive: one line naming it, non-zero exit, nothing written, nothing left', async () => {
    const bundles = ['x1', 'x2', 'x3'].map((name) => path.join(dir, `${name}.tar.zst`));
    await makeChain(bundles);
    fs.rmSync(bundles[0]!);
    const out = path.join(dir, 'missing.raw');
    const error = await restoreSnapshot(bundles[2]!, { disk: out, tempDir: temp }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).path).toBe(bundles[0]);
    expect((error as Qcow2Error).message).toMatch(/^\S*x1\.tar\.zst: parent snapshot not found \(\S*x2\.tar\.zst names it as its parent\)$/);
    expect(fs.existsSync(out)).toBe(false);
    expect(tempLeft(), 'the extracted members of x3 and x2 removed').toEqual([]);

    const cli = run(process.execPath, [cliPath, 'snapshot', 'restore', bundles[2]!, '--disk', out, '--temp-dir', temp]);
    expect(cli.status).not.toBe(0);
    expect(cli.status).not.toBeNull();
    expect(cli.stderr.trim().split('\n')).toHaveLength(1);
    expect(cli.stderr).toMatch(/x1\.tar\.zst: parent snapshot not found/);
    expect(fs.existsSync(out)).toBe(false);
    expect(tempLeft()).toEqual([]);

    // Creating over it fails the same way.
    const child = path.join(dir, 'x4.tar.zst');
    const created = await createSnapshot(child, { disk: disks[2]!, parent: bundles[2]!, tempDir: temp }).catch((e: unknown) => e);
    expect((created as Qcow2Error).path).toBe(bundles[0]);
    expect(fs.existsSync(child)).toBe(false);
    expect(tempLeft()).toEqual([]);
  });

  it('a parent replaced by another snapshot under its name is refused, naming it', async () => {
    const bundles = ['r1', 'r2', 'r3'].map((name) => path.join(dir, `${name}.tar.zst`));
    await makeChain(bundles);
    // Another snapshot of the same disk, put where r2 was.
    const other = path.join(dir, 'other', 'r2.tar.zst');
    fs.mkdirSync(path.dirname(other));
    await createSnapshot(other, { disk: disks[1]!, parent: bundles[0]! });
    fs.renameSync(other, bundles[1]!);
    const out = path.join(dir, 'replaced.raw');
    const error = await restoreSnapshot(bundles[2]!, { disk: out, tempDir: temp }).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('PARENT_MISMATCH');
    expect((error as Qcow2Error).path).toBe(bundles[1]);
    expect(fs.existsSync(out)).toBe(false);
    expect(tempLeft()).toEqual([]);
    const cli = run(process.execPath, [cliPath, 'snapshot', 'restore', bundles[2]!, '--disk', out]);
    expect(cli.status).toBe(1);
    expect(cli.stderr.trim().split('\n')).toHaveLength(1);
    expect(cli.stderr).toContain('r2.tar.zst');
  });

  it('a parent archive whose disk was altered is refused by restore and by create, naming the member', async () => {
    const bundles = ['d1', 'd2'].map((name) => path.join(dir, `${name}.tar`));
    await makeChain(bundles);
    // A plain tar: the folder entry, then disk.qcow2's header, then its data from byte 1024.
    const listing = run('tar', ['-tvf', bundles[0]!]).stdout.split('\n');
    expect(listing[1]).toMatch(/ d1\/disk\.qcow2$/);
    const fd = fs.openSync(bundles[0]!, 'r+');
    const at = 1024 + 2 * MiB + 17;
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, at);
    fs.writeSync(fd, Buffer.from([byte[0]! ^ 0x5a]), 0, 1, at);
    fs.closeSync(fd);
    const out = path.join(dir, 'altered.raw');
    const error = await restoreSnapshot(bundles[1]!, { disk: out, tempDir: temp }).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('CHECKSUM_MISMATCH');
    expect((error as Qcow2Error).path).toBe(`${bundles[0]}:disk.qcow2`);
    expect(fs.existsSync(out)).toBe(false);
    const child = path.join(dir, 'd3.tar.zst');
    const created = await createSnapshot(child, { disk: disks[2]!, parent: bundles[1]!, tempDir: temp }).catch((e: unknown) => e);
    expect((created as Qcow2Error).code).toBe('CHECKSUM_MISMATCH');
    expect((created as Qcow2Error).path).toBe(`${bundles[0]}:disk.qcow2`);
    expect(fs.existsSync(child)).toBe(false);
    expect(tempLeft()).toEqual([]);
  });

  it('a disk naming another backing file than its parent snapshot\'s disk is refused, naming the disk', async () => {
    // A folder over an archive, then moved into a subfolder with its parent path fixed by hand:
    // its disk still names ../p1/disk.qcow2, which is no longer where the parent unpacks.
    const p1 = path.join(dir, 'p1.tar.zst');
    const p2 = path.join(dir, 'p2');
    await makeChain([p1, p2]);
    const moved = path.join(dir, 'sub', 'p2');
    fs.mkdirSync(path.dirname(moved));
    fs.renameSync(p2, moved);
    const metadataFile = path.join(moved, 'snapshot.json');
    const metadata = JSON.parse(fs.readFileSync(metadataFile, 'utf8')) as { parent: { path: string } };
    expect(metadata.parent.path).toBe('../p1.tar.zst');
    metadata.parent.path = '../../p1.tar.zst';
    fs.writeFileSync(metadataFile, JSON.stringify(metadata));
    const out = path.join(dir, 'renamed.raw');
    const error = await restoreSnapshot(moved, { disk: out, tempDir: temp }).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('PARENT_MISMATCH');
    expect((error as Qcow2Error).path).toBe(path.join(moved, 'disk.qcow2'));
    expect((error as Qcow2Error).message).toContain('"../p1/disk.qcow2"');
    expect(fs.existsSync(out)).toBe(false);
    expect(tempLeft()).toEqual([]);
  });

  it('an archive that would unpack into its parent folder\'s place is refused', async () => {
    const parent = path.join(dir, 'same');
    await createSnapshot(parent, { disk: disks[0]! });
    const child = path.join(dir, 'same.tar.zst');
    const error = await createSnapshot(child, { disk: disks[1]!, parent }).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('INVALID_ARGUMENT');
    expect((error as Qcow2Error).path).toBe(child);
    expect((error as Qcow2Error).message).toMatch(/would unpack into the folder of the parent snapshot/);
    expect(fs.existsSync(child)).toBe(false);
  });
});

/**
 * QEMU 7.2's rules for odd and damaged images, one test per rule, each against qemu-img on the
 * same image: images are made with qemu-img and qemu-io and damaged as QEMU's iotests damage them
 * (a byte patch), then qcow2img and qemu-img are asked the same questions: whether the image opens
 * (info), what it reads as (load vs convert -O raw, byte for byte), its map, and its check (exit
 * status and counts). Nothing here says what the answer should be: qemu-img does.
 * The rules are listed in docs/formats/qcow2.md ("QEMU's rules for odd images").
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { type L2Kind, type Layout, parseLayout } from '../helpers/damage';
import { ExtensionType } from '../../src/qcow2/header';
import { checkCountKeys, cliPath, expectSameFile, headerExtensions, parseJsonOutput, qemuImg, qemuIo, type Ran, runAsync, u64 } from '../helpers/qemu';

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-rules-'));
afterAll(() => fs.rmSync(scratch, { recursive: true, force: true }));

interface Recipe {
  /** qemu-img create options (-o), and the virtual size. */
  options?: string;
  size?: string;
  /** A raw backing file of this many bytes of 0xff is made first and named by the image. */
  backing?: number;
  /** qemu-io commands run on the new image. */
  io?: readonly string[];
  /** Persistent dirty bitmaps added after the qemu-io commands (qemu-img bitmap --add). */
  bitmaps?: readonly string[];
  /** Internal snapshots taken after the qemu-io commands (qemu-img snapshot -c), with more commands after each. */
  snapshots?: readonly { name: string; io?: readonly string[] }[];
  /** The damage: patches the image's bytes in place (or returns new bytes). */
  damage(bytes: Buffer, layout: Layout): Buffer | void;
}

let images = 0;
/** Makes an image from a recipe in a folder of its own; returns its path. */
function make(recipe: Recipe): string {
  const dir = path.join(scratch, `image-${++images}`);
  fs.mkdirSync(dir);
  const image = path.join(dir, 'image.qcow2');
  const args = ['create', '-q', '-f', 'qcow2'];
  if (recipe.backing !== undefined) {
    fs.writeFileSync(path.join(dir, 'base.raw'), Buffer.alloc(recipe.backing, 0xff));
    args.push('-b', 'base.raw', '-F', 'raw');
  }
  if (recipe.options) args.push('-o', recipe.options);
  args.push(image, recipe.size ?? '1M');
  qemuImg(args, dir);
  if (recipe.io?.length) qemuIo(image, recipe.io, { cwd: dir });
  for (const bitmap of recipe.bitmaps ?? []) qemuImg(['bitmap', '--add', image, bitmap], dir);
  for (const snapshot of recipe.snapshots ?? []) {
    qemuImg(['snapshot', '-c', snapshot.name, image], dir);
    if (snapshot.io?.length) qemuIo(image, snapshot.io, { cwd: dir });
  }
  const bytes = fs.readFileSync(image);
  fs.writeFileSync(image, recipe.damage(bytes, parseLayout(bytes)) ?? bytes);
  return image;
}

const put64 = (bytes: Buffer, at: number, value: bigint): void => {
  u64(value).copy(bytes, at);
};
const put32 = (bytes: Buffer, at: number, value: number): void => {
  bytes.writeUInt32BE(value, at);
};

/** `load` of the image, or of one of its internal snapshots (against qemu-img convert -l snapshot.name=NAME). */
type Question = 'info' | 'load' | 'map' | 'check' | { snapshot: string };

const ours = (args: readonly string[], cwd: string) => runAsync(process.execPath, [cliPath, ...args], cwd);
const why = (ran: Ran) => ran.stderr.trim().split('\n')[0] ?? '';

/** Asks qemu-img and qcow2img the same questions about an image, and expects the same answers. */
async function expectQemuAnswers(image: string, questions: readonly Question[] = ['info', 'load', 'map', 'check']): Promise<void> {
  const dir = path.dirname(image);
  for (const question of questions) {
    if (typeof question === 'object') {
      const expected = path.join(dir, 'qemu-snapshot.raw');
      const actual = path.join(dir, 'ours-snapshot.raw');
      const [q, o] = await Promise.all([
        runAsync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', '-l', `snapshot.name=${question.snapshot}`, image, expected], dir),
        ours(['load', image, actual, '--snapshot', question.snapshot, '--overwrite', '--progress=none'], dir),
      ]);
      expect(o.status === 0, `load --snapshot reads it as qemu-img convert -l does (qemu-img: ${why(q) || 'ok'}; ours: ${why(o) || 'ok'})`).toBe(q.status === 0);
      if (q.status === 0) expectSameFile(actual, expected);
      fs.rmSync(expected, { force: true });
      fs.rmSync(actual, { force: true });
      continue;
    }
    switch (question) {
      case 'info': {
        const [q, o] = await Promise.all([runAsync('qemu-img', ['info', '--output=json', image], dir), ours(['info', '--json', image], dir)]);
        expect(o.status === 0, `info opens the image as qemu-img info does (qemu-img: ${why(q) || 'ok'}; ours: ${why(o) || 'ok'})`).toBe(q.status === 0);
        break;
      }
      case 'load': {
        const expected = path.join(dir, 'qemu.raw');
        const actual = path.join(dir, 'ours.raw');
        const [q, o] = await Promise.all([
          runAsync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, expected], dir),
          ours(['load', image, actual, '--overwrite', '--progress=none'], dir),
        ]);
        expect(o.status === 0, `load reads the image as qemu-img convert does (qemu-img: ${why(q) || 'ok'}; ours: ${why(o) || 'ok'})`).toBe(q.status === 0);
        if (q.status === 0) expectSameFile(actual, expected);
        fs.rmSync(expected, { force: true });
        fs.rmSync(actual, { force: true });
        break;
      }
      case 'map': {
        const [q, o] = await Promise.all([runAsync('qemu-img', ['map', '--output=json', image], dir), ours(['map', '--json', image], dir)]);
        expect(o.status === 0, `map succeeds where qemu-img map does (qemu-img: ${why(q) || 'ok'}; ours: ${why(o) || 'ok'})`).toBe(q.status === 0);
        if (q.status === 0) {
          const entries = (parseJsonOutput(o.stdout) as unknown as Record<string, unknown>[]).map(({ filename: _, ...entry }) => entry);
          expect(entries, 'map').toEqual(parseJsonOutput(q.stdout));
        }
        break;
      }
      case 'check': {
        const [q, o] = await Promise.all([runAsync('qemu-img', ['check', '--output=json', image], dir), ours(['check', '--json', image], dir)]);
        expect(o.status, `check exit status (qemu-img: ${why(q) || '-'}; ours: ${why(o) || '-'})`).toBe(q.status);
        const qemuJson = parseJsonOutput(q.stdout);
        const ourJson = parseJsonOutput(o.stdout);
        expect(ourJson !== undefined, 'check printed JSON as qemu-img did').toBe(qemuJson !== undefined);
        if (qemuJson && ourJson) {
          const counts = (json: Record<string, unknown>, key: 0 | 1) => Object.fromEntries(checkCountKeys.map((keys) => [keys[0], json[keys[key]] ?? 0]));
          expect(counts(ourJson, 1), 'check counts').toEqual(counts(qemuJson, 0));
        }
        break;
      }
    }
  }
}

/** Where the first entry of the active image's first L2 table lies in the file. */
const firstL2EntryAt = (layout: Layout) => layout.l1.find((entry) => entry.offset !== 0)!.offset;

/** The first L2 entry of a kind in the active image. */
const l2Entry = (layout: Layout, kind: L2Kind) => layout.l2.flatMap((table) => table.entries).find((entry) => entry.kind === kind)!;
/** A cluster-aligned offset `clusters` clusters past the end of the file. */
const pastEnd = (layout: Layout, clusters: number) => Math.ceil(layout.fileSize / layout.clusterSize) * layout.clusterSize + clusters * layout.clusterSize;
const COPIED = 1n << 63n;

/** Where the data of the bitmaps extension starts (count u32, reserved u32, directory size u64, directory offset u64). */
const bitmapsData = (layout: Layout) => layout.bitmaps!.extensionAt + 8;
const withBitmap = { io: ['write -q -P 0x5a 0 64k'], bitmaps: ['b0'] };

/** The header extension of a type: where its header (type, length) starts, and its length. */
function extension(bytes: Buffer, type: number): { at: number; length: number } {
  const found = headerExtensions(bytes).find((e) => e.type === type);
  if (!found) throw new Error(`no header extension 0x${type.toString(16)}`);
  return { at: found.dataOffset - 8, length: found.length };
}

describe('extended L2: bit 0 of the standard entry (qcow2_get_cluster_type ignores it with subclusters)', () => {
  it('allocated cluster with bit 0 set reads, maps and checks as qemu-img (iotest 271)', async () => {
    const image = make({
      options: 'extended_l2=on',
      io: ['write -q -P 0x11 0 2k'],
      damage(b, l) {
        b[firstL2EntryAt(l) + 7]! |= 1;
      },
    });
    await expectQemuAnswers(image);
  });

  it('unallocated cluster with bit 0 set, over a backing file, reads, maps and checks as qemu-img (iotest 271)', async () => {
    const image = make({
      options: 'extended_l2=on',
      backing: 1024 * 1024,
      io: ['write -q -P 0x11 256k 1k'],
      damage(b, l) {
        b[firstL2EntryAt(l) + 7]! |= 1;
      },
    });
    await expectQemuAnswers(image);
  });
});

describe('no refcount table (qcow2_do_open accepts it under BDRV_O_CHECK)', () => {
  it('check of an image whose refcount table has 0 clusters exits and counts as qemu-img check', async () => {
    const image = make({ io: ['write -q -P 0x11 0 64k'], damage: (b) => put32(b, 56, 0) });
    await expectQemuAnswers(image);
  });

  it('check of an image with no refcount table (offset 0, 0 clusters) exits and counts as qemu-img check', async () => {
    const image = make({
      io: ['write -q -P 0x11 0 64k'],
      damage(b) {
        put64(b, 48, 0n);
        put32(b, 56, 0);
      },
    });
    await expectQemuAnswers(image);
  });
});

describe('past the end of the file, reads return zeros (bdrv_aligned_preadv)', () => {
  it('an image cut inside its last data cluster (qemu-img check: clean) reads, maps and checks as qemu-img', async () => {
    const image = make({ io: ['write -q -P 0x5a 0 192k'], damage: (b) => b.subarray(0, b.length - 1000) });
    await expectQemuAnswers(image);
  });

  it('a data cluster 16 clusters past the end of the file reads as zeros, as qemu-img reads it', async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 192k'],
      damage(b, l) {
        put64(b, l2Entry(l, 'normal').at, BigInt(pastEnd(l, 16)) | COPIED);
      },
    });
    await expectQemuAnswers(image);
  });

  it('a compressed cluster past the end of the file maps as qemu-img maps it, and fails to load as qemu-img convert fails', async () => {
    const image = make({
      io: ['write -q -c -P 0x5a 0 64k', 'write -q -c -P 0x6b 64k 64k'],
      damage(b, l) {
        const entry = l2Entry(l, 'compressed');
        const offsetMask = (1n << BigInt(62 - (l.clusterBits - 8))) - 1n;
        put64(b, entry.at, (entry.raw & ~offsetMask) | BigInt(pastEnd(l, 2) + 100));
      },
    });
    await expectQemuAnswers(image);
  });
});

describe('entries as QEMU reads them (qcow2_get_host_offset, qcow2_get_cluster_type)', () => {
  it('reserved bits 1-8 of a data cluster entry: read and mapped as qemu-img does, checked as corrupt as qemu-img check does', async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 128k'],
      damage(b, l) {
        put64(b, l2Entry(l, 'normal').at, l2Entry(l, 'normal').raw | 0x100n);
      },
    });
    await expectQemuAnswers(image);
  });

  it('reserved bits 56-61 of a data cluster entry, extended L2: read, mapped and checked as qemu-img does', async () => {
    const image = make({
      options: 'extended_l2=on',
      io: ['write -q -P 0x5a 0 128k'],
      damage(b, l) {
        put64(b, l2Entry(l, 'normal').at, l2Entry(l, 'normal').raw | (1n << 57n));
      },
    });
    await expectQemuAnswers(image);
  });

  it('reserved bits of a zero cluster entry without a host cluster: read, mapped and checked as qemu-img does', async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 64k', 'write -q -z 64k 64k'],
      damage(b, l) {
        put64(b, l2Entry(l, 'zero-plain').at, l2Entry(l, 'zero-plain').raw | 0x1fen | (0x3fn << 56n));
      },
    });
    await expectQemuAnswers(image);
  });

  it('reserved bits 0-8 and 56-62 of an L1 entry: read and mapped as qemu-img does, checked as corrupt as qemu-img check does', async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 64k'],
      damage(b, l) {
        const entry = l.l1.find((e) => e.offset !== 0)!;
        put64(b, entry.at, entry.raw | 0x1ffn | (0x7fn << 56n));
      },
    });
    await expectQemuAnswers(image);
  });

  it('an L1 entry pointing 1 GiB past the end of the file: its L2 table reads as zeros, as in qemu-img', async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 64k'],
      damage(b, l) {
        put64(b, l.l1.find((e) => e.offset !== 0)!.at, BigInt(pastEnd(l, 2 ** 30 / l.clusterSize)) | COPIED);
      },
    });
    await expectQemuAnswers(image);
  });

  it('a compressed cluster with a subcluster bitmap, extended L2: read and mapped as qemu-img does, checked as corrupt (iotest 271)', async () => {
    const image = make({
      options: 'extended_l2=on',
      io: ['write -q -c -P 11 0 64k'],
      damage(b, l) {
        b[l2Entry(l, 'compressed').at + 11] = 0x01;
        b[l2Entry(l, 'compressed').at + 12] = 0x80;
      },
    });
    await expectQemuAnswers(image);
  });

  it('a zero cluster in a version 2 image: qemu-img refuses to read and map it (corruption), check finds it clean', async () => {
    const image = make({
      options: 'compat=0.10',
      io: ['write -q -P 0x5a 0 128k'],
      damage(b, l) {
        put64(b, l2Entry(l, 'normal').at, l2Entry(l, 'normal').raw | 1n);
      },
    });
    await expectQemuAnswers(image);
  });
});

describe("where the header's tables lie (qcow2_do_open, qcow2_validate_table: only their alignment is checked)", () => {
  it('an L1 table at offset 0 (the header read as L1 entries) opens, reads, maps and checks as in qemu-img', async () => {
    const image = make({ io: ['write -q -P 0x5a 0 64k'], damage: (b) => put64(b, 40, 0n) });
    await expectQemuAnswers(image);
  });

  it('an L1 table 1 GiB past the end of the file reads as zeros: opens, reads, maps and checks as in qemu-img', async () => {
    const image = make({ io: ['write -q -P 0x5a 0 64k'], damage: (b, l) => put64(b, 40, BigInt(pastEnd(l, 2 ** 30 / l.clusterSize))) });
    await expectQemuAnswers(image);
  });

  it('a refcount table 16 clusters past the end of the file: opens, reads, maps and checks as in qemu-img', async () => {
    const image = make({ io: ['write -q -P 0x5a 0 64k'], damage: (b, l) => put64(b, 48, BigInt(pastEnd(l, 16))) });
    await expectQemuAnswers(image);
  });

  it('a refcount table at offset 0 (the header read as refcount block offsets): opens, reads, maps and checks as in qemu-img', async () => {
    const image = make({ io: ['write -q -P 0x5a 0 64k'], damage: (b) => put64(b, 48, 0n) });
    await expectQemuAnswers(image);
  });

  it('a snapshot table offset off a cluster boundary with no snapshots: refused as qemu-img refuses it, check fails as qemu-img check does', async () => {
    const image = make({ damage: (b) => put64(b, 64, 512n) });
    await expectQemuAnswers(image);
  });

  it('a snapshot table that runs past the end of the file (a 65535-byte name) reads as zeros there, as in qemu-img', async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 64k'],
      snapshots: [{ name: 'one', io: ['write -q -P 0x6b 0 64k'] }],
      damage(b, l) {
        b.writeUInt16BE(65535, l.snapshots[0]!.at + 14);
      },
    });
    await expectQemuAnswers(image);
  });

  it("a snapshot's L1 table 16 clusters past the end of the file: its disk reads as zeros, as qemu-img convert -l reads it", async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 64k'],
      snapshots: [{ name: 'one', io: ['write -q -P 0x6b 0 64k'] }],
      damage(b, l) {
        put64(b, l.snapshots[0]!.at, BigInt(pastEnd(l, 16)));
      },
    });
    await expectQemuAnswers(image, ['info', 'load', 'map', 'check', { snapshot: 'one' }]);
  });
});

describe('header extensions and autoclear bits (qcow2_read_extensions, qcow2_do_open)', () => {
  it('bitmaps extension with a non-zero reserved field: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => put32(b, bitmapsData(l) + 4, 1) }));
  });

  it('bitmaps extension with no bitmaps: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => put32(b, bitmapsData(l), 0) }));
  });

  it('bitmaps extension with more bitmaps than QCOW2_MAX_BITMAPS: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => put32(b, bitmapsData(l), 65536) }));
  });

  it('bitmap directory offset off a cluster boundary: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => put64(b, bitmapsData(l) + 16, BigInt(l.bitmaps!.directoryOffset + 512)) }));
  });

  it('bitmap directory one byte over QCOW2_MAX_BITMAP_DIRECTORY_SIZE (1 KiB a bitmap, not 64 MiB): refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => put64(b, bitmapsData(l) + 8, BigInt(1024 * 65535 + 1)) }));
  });

  it('a damaged bitmaps extension while autoclear bit 0 is clear is ignored, as qemu-img ignores it (check: leaks)', async () => {
    const image = make({
      ...withBitmap,
      damage(b, l) {
        put32(b, bitmapsData(l) + 4, 1);
        put64(b, 88, b.readBigUInt64BE(88) & ~1n);
      },
    });
    await expectQemuAnswers(image);
  });

  it('a full disk encryption header extension in an image that is not LUKS-encrypted: refused as qemu-img refuses it', async () => {
    const image = make({
      ...withBitmap,
      damage(b, l) {
        // The bitmaps extension becomes an encryption header extension of 16 bytes.
        put32(b, l.bitmaps!.extensionAt, ExtensionType.fullDiskEncryption);
        put32(b, l.bitmaps!.extensionAt + 4, 16);
        put64(b, 88, b.readBigUInt64BE(88) & ~1n);
      },
    });
    await expectQemuAnswers(image);
  });

  it('the data-file-raw bit without an external data file: described by info, refused by load, map and check as by qemu-img', async () => {
    const image = make({ io: ['write -q -P 0x5a 0 64k'], damage: (b) => put64(b, 88, b.readBigUInt64BE(88) | 2n) });
    await expectQemuAnswers(image);
  });
});

describe('names in the header, as QEMU reads them (qcow2_do_open, qcow2_read_extensions)', () => {
  it('a backing file name with a NUL byte in it ends there (a C string): the backing file is found, as by qemu-img', async () => {
    const image = make({
      backing: 1024 * 1024,
      io: ['write -q -P 0x5a 0 64k'],
      damage(b) {
        const offset = Number(b.readBigUInt64BE(8));
        const size = b.readUInt32BE(16);
        Buffer.from('\0junk').copy(b, offset + size);
        put32(b, 16, size + 5);
      },
    });
    await expectQemuAnswers(image);
  });

  it('a backing file name offset inside the header, with no name: no backing file and no extensions, as in qemu-img', async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 64k'],
      damage(b) {
        put64(b, 8, 104n);
        put32(b, 16, 0);
      },
    });
    await expectQemuAnswers(image);
  });

  it('an empty backing format name records no format: the backing file is probed, as by qemu-img', async () => {
    const image = make({
      backing: 1024 * 1024,
      io: ['write -q -P 0x5a 0 64k'],
      damage: (b) => put32(b, extension(b, ExtensionType.backingFormat).at + 4, 0),
    });
    await expectQemuAnswers(image);
  });

  it('a backing format name that starts with a NUL records no format either, as in qemu-img', async () => {
    const image = make({
      backing: 1024 * 1024,
      io: ['write -q -P 0x5a 0 64k'],
      damage(b) {
        b[extension(b, ExtensionType.backingFormat).at + 8] = 0;
      },
    });
    await expectQemuAnswers(image);
  });

  it('a backing format extension that appears twice: the later one holds, as in qemu-img', async () => {
    const image = make({
      backing: 1024 * 1024,
      io: ['write -q -P 0x5a 0 64k'],
      damage(b) {
        // The feature name table makes room: "xyz" (unsupported), then "raw", then the end.
        const first = extension(b, ExtensionType.backingFormat);
        const table = extension(b, ExtensionType.featureNameTable);
        expect(table.at).toBe(first.at + 16);
        b.fill(0, table.at, table.at + 8 + table.length);
        Buffer.from('xyz').copy(b, first.at + 8);
        put32(b, table.at, ExtensionType.backingFormat);
        put32(b, table.at + 4, 3);
        Buffer.from('raw').copy(b, table.at + 8);
      },
    });
    await expectQemuAnswers(image);
  });
});

describe('external data files (qcow2_get_host_offset, qcow2_get_cluster_type)', () => {
  it('the zero flag on a cluster at host offset 0 with COPIED is a plain zero cluster: mapped and counted as qemu-img does', async () => {
    const image = make({
      options: 'data_file=image.data',
      io: ['write -q -P 0x5a 0 64k', 'write -q -P 0x6b 128k 64k'],
      damage(b, l) {
        const entry = l.l2[0]!.entries.find((e) => e.index === 0)!;
        put64(b, entry.at, entry.raw | 1n);
      },
    });
    await expectQemuAnswers(image);
  });

  it('a cluster whose host offset is not its guest offset: refused when read or mapped, as qemu-img refuses it', async () => {
    const image = make({
      options: 'data_file=image.data',
      io: ['write -q -P 0x5a 0 64k', 'write -q -P 0x6b 128k 64k'],
      damage(b, l) {
        const table = l.l2[0]!;
        put64(b, table.offset, table.entries.find((e) => e.index === 2)!.raw);
      },
    });
    await expectQemuAnswers(image);
  });

  it('extended L2: unallocated subclusters of a cluster whose host offset is not its guest offset, as qemu-img', async () => {
    const image = make({
      options: 'data_file=image.data,extended_l2=on',
      io: ['write -q -P 0x5a 0 2k', 'write -q -P 0x6b 128k 64k'],
      damage(b, l) {
        const table = l.l2[0]!;
        // Cluster 0 takes cluster 2's host offset, with no subcluster allocated.
        put64(b, table.offset, table.entries.find((e) => e.index === 2)!.raw);
        put64(b, table.offset + 8, 0n);
      },
    });
    await expectQemuAnswers(image);
  });
});

describe('internal snapshots (qcow2_snapshot_load_tmp)', () => {
  it("a snapshot whose L1 table is too small for its disk (l1_size 0): what lies past it reads as unallocated, as qemu-img convert -l reads it", async () => {
    const image = make({
      io: ['write -q -P 0x5a 0 64k'],
      snapshots: [{ name: 'one', io: ['write -q -P 0x6b 0 64k'] }],
      damage(b, l) {
        put32(b, l.snapshots[0]!.at + 8, 0);
      },
    });
    await expectQemuAnswers(image, ['info', 'load', 'map', 'check', { snapshot: 'one' }]);
  });
});

describe('persistent bitmaps, loaded when QEMU opens an image (bitmap_list_load, check_dir_entry, load_bitmap)', () => {
  /** Byte `field` of the first directory entry: 8 table size, 12 flags, 16 type, 17 granularity, 18 name size, 20 extra size. */
  const entry = (l: Layout, field: number) => l.bitmaps!.directoryOffset + field;

  it('a directory entry with granularity bits above 31: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => void (b[entry(l, 17)] = 32) }));
  });

  it('a directory entry of another type than dirty tracking: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => void (b[entry(l, 16)] = 2) }));
  });

  it('a directory entry whose table has no entries: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => put32(b, entry(l, 8), 0) }));
  });

  it('a directory entry with a reserved flag: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => put32(b, entry(l, 12), b.readUInt32BE(entry(l, 12)) | 4) }));
  });

  it('a bitmap table with more entries than the disk needs: refused as qemu-img refuses it, unless the bitmap is in use', async () => {
    const damage = (inUse: boolean) => (b: Buffer, l: Layout) => {
      put32(b, entry(l, 8), 2);
      put32(b, entry(l, 12), inUse ? b.readUInt32BE(entry(l, 12)) | 1 : b.readUInt32BE(entry(l, 12)) & ~1);
    };
    await expectQemuAnswers(make({ ...withBitmap, damage: damage(false) }));
    await expectQemuAnswers(make({ ...withBitmap, damage: damage(true) }));
  });

  it('a bitmap table entry with a reserved bit: refused as qemu-img refuses it', async () => {
    await expectQemuAnswers(make({ ...withBitmap, damage: (b, l) => put64(b, l.bitmaps!.tableOffset, b.readBigUInt64BE(l.bitmaps!.tableOffset) | 2n) }));
  });

  it('a bitmap with an empty name: accepted as qemu-img accepts it (check had refused it)', async () => {
    const image = make({
      ...withBitmap,
      damage(b, l) {
        b.writeUInt16BE(0, entry(l, 18));
        // The directory shrinks to the one 24-byte entry.
        put64(b, bitmapsData(l) + 8, 24n);
      },
    });
    await expectQemuAnswers(image);
  });

  it('two bitmaps of one name: refused as qemu-img refuses it', async () => {
    const image = make({
      ...withBitmap,
      bitmaps: ['b0', 'b1'],
      damage(b, l) {
        // The second entry follows the first (24 bytes and a 2-byte name, padded to 32).
        const second = l.bitmaps!.directoryOffset + 32;
        expect(b.toString('utf8', second + 24, second + 26)).toBe('b1');
        b.write('b0', second + 24);
      },
    });
    await expectQemuAnswers(image);
  });
});

describe('an empty disk', () => {
  it('a disk of 0 bytes maps as qemu-img map maps it (one empty entry), and opens, reads and checks as in qemu-img', async () => {
    await expectQemuAnswers(make({ size: '0', damage: () => undefined }));
  });

  it('with l1_size 0, the L1 table offset must still be cluster aligned (qcow2_validate_table), as in qemu-img', async () => {
    await expectQemuAnswers(make({ size: '0', damage: (b) => put64(b, 40, 512n) }));
  });
});

describe('cluster 0 cut short or overrun (qcow2_do_open, qcow2_read_extensions)', () => {
  it('an end-of-extensions marker whose length runs past the header cluster: refused as qemu-img refuses it', async () => {
    const image = make({
      damage(b) {
        const last = headerExtensions(b).at(-1)!;
        put32(b, last.dataOffset + Math.ceil(last.length / 8) * 8 + 4, 0x10000);
      },
    });
    await expectQemuAnswers(image);
  });

  it('a version 2 image cut after its 72-byte header: cluster 0 reads as zeros past the end, as in qemu-img', async () => {
    await expectQemuAnswers(make({ options: 'compat=0.10', io: ['write -q -P 0x5a 0 64k'], damage: (b) => b.subarray(0, 74) }));
  });

  it('an image with a backing file cut inside its header extensions: opens and reads as in qemu-img', async () => {
    await expectQemuAnswers(make({ backing: 1024 * 1024, io: ['write -q -P 0x5a 0 64k'], damage: (b) => b.subarray(0, 276) }));
  });
});

/**
 * Mutants of QEMU-made images, for the hardening tests (test/qcow2/hardening.test.ts, in-process with
 * fast-check) and the mutant runs (test/qcow2/mutants.test.ts, the CLI in separate processes).
 *
 * Seeds are real images made with qemu-img and qemu-io in a scratch folder (v2, v3 with 4 KiB
 * clusters and 1-bit refcounts, zstd and zlib compressed, extended L2 with 64-bit refcounts, internal
 * snapshots, an overlay with a backing file and its format extension, an external data file, a
 * persistent bitmap, a dirty image with lazy refcounts). Each seed comes with a map of its metadata
 * (header, extensions, backing name, L1, L2, refcount table and blocks, snapshot table, bitmap
 * directory), read by a parser of this file's own (independent of src/), so that mutations can be
 * aimed at metadata and at the header's fields with boundary values.
 *
 * A mutant is a seed plus a list of patches, printable as JSON so that a failure reproduces.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Random } from './prng';

// ---------------------------------------------------------------------------------------------
// Randomness

/** A 32-bit seed derived from any string (the run seed and the mutant's index). */
export function seedOf(text: string): number {
  return createHash('sha256').update(text).digest().readUInt32BE(0);
}

// ---------------------------------------------------------------------------------------------
// Patches

export type Patch =
  /** Write bytes (hex) at an offset; bytes past the end of the file are dropped. */
  | { op: 'set'; at: number; hex: string; why?: string }
  /** Cut the file to this length. */
  | { op: 'truncate'; length: number }
  /** Append this many pseudo-random bytes made from `seed` (or zeros with seed 0). */
  | { op: 'append'; length: number; seed: number };

export function applyPatches(original: Buffer, patches: readonly Patch[]): Buffer {
  let bytes = Buffer.from(original);
  for (const patch of patches) {
    switch (patch.op) {
      case 'set': {
        const data = Buffer.from(patch.hex, 'hex');
        if (patch.at < bytes.length) data.copy(bytes, patch.at, 0, Math.min(data.length, bytes.length - patch.at));
        break;
      }
      case 'truncate':
        bytes = bytes.subarray(0, Math.min(bytes.length, patch.length));
        break;
      case 'append':
        bytes = Buffer.concat([bytes, patch.seed === 0 ? Buffer.alloc(patch.length) : new Random(patch.seed).bytes(patch.length)]);
        break;
    }
  }
  return bytes;
}

export function formatPatches(patches: readonly Patch[]): string {
  return patches.map((p) => JSON.stringify(p)).join('\n');
}

/** Big-endian bytes of `value` (masked to `width` bytes), as hex. */
export function beHex(value: bigint, width: 1 | 2 | 4 | 8): string {
  const masked = BigInt.asUintN(width * 8, value);
  return masked.toString(16).padStart(width * 2, '0');
}

// ---------------------------------------------------------------------------------------------
// Layout of a (valid) image: where its metadata is

export type RegionName =
  | 'header'
  | 'extensions'
  | 'backingName'
  | 'l1'
  | 'l2'
  | 'refcountTable'
  | 'refblock'
  | 'snapshotTable'
  | 'snapshotL1'
  | 'bitmapDirectory'
  | 'bitmapTable'
  | 'data';

export interface Region {
  name: RegionName;
  start: number;
  end: number;
}

/** A field that can be replaced by a boundary value. */
export interface Field {
  name: string;
  at: number;
  width: 1 | 2 | 4 | 8;
}

/**
 * A name stored in the image: the backing file name, the backing format and data file
 * extensions, snapshot ids and names. `capacity` is how many bytes a replacement may take there
 * without moving anything else; `lengthField`, when set, is rewritten with the new length
 * (otherwise a shorter replacement is padded with NULs, which readers strip).
 */
export interface StringField {
  name: string;
  at: number;
  length: number;
  capacity: number;
  lengthField?: Field;
  /** A shorter replacement keeps the length and is padded with NULs (header extensions: what follows stays in place). */
  padShorter?: boolean;
}

export interface Layout {
  version: number;
  clusterSize: number;
  headerLength: number;
  fileSize: number;
  regions: Region[];
  fields: Field[];
  strings: StringField[];
}

const u32 = (b: Buffer, at: number) => b.readUInt32BE(at);
const u64 = (b: Buffer, at: number) => Number(b.readBigUInt64BE(at));
const entryOffset = (b: Buffer, at: number) => Number(b.readBigUInt64BE(at) & 0x00fffffffffffe00n);

/** Reads the metadata layout of a QEMU-made image (trusted input: a seed, not a mutant). */
export function describeImage(bytes: Buffer): Layout {
  const version = u32(bytes, 4);
  const clusterBits = u32(bytes, 20);
  const C = 2 ** clusterBits;
  const headerLength = version >= 3 ? u32(bytes, 100) : 72;
  const regions: Region[] = [];
  const fields: Field[] = [];
  const strings: StringField[] = [];
  const region = (name: RegionName, start: number, length: number) => {
    const end = Math.min(bytes.length, start + length);
    if (length > 0 && start < end) regions.push({ name, start, end });
  };
  const field = (name: string, at: number, width: Field['width']) => {
    if (at + width <= bytes.length) fields.push({ name, at, width });
  };

  region('header', 0, headerLength);
  const headerFields: [string, number, Field['width']][] = [
    ['magic', 0, 4],
    ['version', 4, 4],
    ['backing_file_offset', 8, 8],
    ['backing_file_size', 16, 4],
    ['cluster_bits', 20, 4],
    ['size', 24, 8],
    ['crypt_method', 32, 4],
    ['l1_size', 36, 4],
    ['l1_table_offset', 40, 8],
    ['refcount_table_offset', 48, 8],
    ['refcount_table_clusters', 56, 4],
    ['nb_snapshots', 60, 4],
    ['snapshots_offset', 64, 8],
  ];
  if (version >= 3) {
    headerFields.push(
      ['incompatible_features', 72, 8],
      ['compatible_features', 80, 8],
      ['autoclear_features', 88, 8],
      ['refcount_order', 96, 4],
      ['header_length', 100, 4],
    );
    if (headerLength > 104) headerFields.push(['compression_type', 104, 1]);
  }
  for (const [name, at, width] of headerFields) field(name, at, width);

  // Extensions
  const backingOffset = u64(bytes, 8);
  const backingSize = u32(bytes, 16);
  const extensionsEnd = backingOffset !== 0 ? backingOffset : C;
  let at = headerLength;
  let bitmaps: { count: number; dirSize: number; dirOffset: number } | undefined;
  while (at + 8 <= extensionsEnd) {
    const type = u32(bytes, at);
    const length = u32(bytes, at + 4);
    const name = `ext 0x${type.toString(16)}`;
    field(`${name} type`, at, 4);
    field(`${name} length`, at + 4, 4);
    if (type === 0) {
      at += 8;
      break;
    }
    const data = at + 8;
    if (type === 0x6803f857) {
      // Feature name table: type and bit of each 48-byte entry.
      for (let entry = data; entry + 48 <= data + length; entry += 48) {
        field(`feature ${bytes[entry]}/${bytes[entry + 1]} type`, entry, 1);
        field(`feature ${bytes[entry]}/${bytes[entry + 1]} bit`, entry + 1, 1);
      }
    } else if (type === 0xe2792aca) {
      strings.push({ name: 'backing format', at: data, length, capacity: Math.ceil(length / 8) * 8, lengthField: { name: `${name} length`, at: at + 4, width: 4 }, padShorter: true });
    } else if (type === 0x44415441) {
      strings.push({ name: 'data file name', at: data, length, capacity: Math.ceil(length / 8) * 8, lengthField: { name: `${name} length`, at: at + 4, width: 4 }, padShorter: true });
    } else if (type === 0x23852875 && length >= 24) {
      field('bitmaps nb_bitmaps', data, 4);
      field('bitmaps directory_size', data + 8, 8);
      field('bitmaps directory_offset', data + 16, 8);
      bitmaps = { count: u32(bytes, data), dirSize: u64(bytes, data + 8), dirOffset: u64(bytes, data + 16) };
    }
    at = data + Math.ceil(length / 8) * 8;
  }
  region('extensions', headerLength, at - headerLength);
  if (backingOffset !== 0) {
    region('backingName', backingOffset, backingSize);
    strings.push({ name: 'backing file name', at: backingOffset, length: backingSize, capacity: Math.min(1023, C - backingOffset), lengthField: { name: 'backing_file_size', at: 16, width: 4 } });
  }

  const l2Fields = (table: number, what: string) => {
    // The first allocated entries of the table, and its first entry whatever it is.
    field(`${what} entry 0`, table, 8);
    let count = 0;
    const entryBytes = version >= 3 && (bytes.readBigUInt64BE(72) & 16n) !== 0n ? 16 : 8;
    for (let e = table; e + entryBytes <= Math.min(bytes.length, table + C) && count < 6; e += entryBytes) {
      if (bytes.readBigUInt64BE(e) === 0n) continue;
      field(`${what} entry ${(e - table) / entryBytes}`, e, 8);
      if (entryBytes === 16) {
        field(`${what} entry ${(e - table) / entryBytes} zero bitmap`, e + 8, 4);
        field(`${what} entry ${(e - table) / entryBytes} alloc bitmap`, e + 12, 4);
      }
      count++;
    }
  };
  const l1Tables = (offset: number, size: number, l1Name: RegionName, what: string) => {
    region(l1Name, offset, size * 8);
    const seen = new Set<number>();
    for (let i = 0; i < size && offset + i * 8 + 8 <= bytes.length; i++) {
      const l2 = entryOffset(bytes, offset + i * 8);
      if (i < 4 || l2 !== 0) field(`${what} L1 entry ${i}`, offset + i * 8, 8);
      if (l2 === 0 || seen.has(l2)) continue;
      seen.add(l2);
      region('l2', l2, C);
      l2Fields(l2, `${what} L2 ${l2}`);
    }
  };
  l1Tables(u64(bytes, 40), u32(bytes, 36), 'l1', 'active');

  // Refcounts
  const reftable = u64(bytes, 48);
  const reftableClusters = u32(bytes, 56);
  region('refcountTable', reftable, reftableClusters * C);
  for (let i = 0; i < (reftableClusters * C) / 8 && reftable + i * 8 + 8 <= bytes.length; i++) {
    const block = entryOffset(bytes, reftable + i * 8);
    if (i < 2 || block !== 0) field(`reftable entry ${i}`, reftable + i * 8, 8);
    if (block !== 0) region('refblock', block, C);
  }

  // Snapshots
  const count = u32(bytes, 60);
  const snapshots = u64(bytes, 64);
  let entry = snapshots;
  for (let n = 0; n < count; n++) {
    entry = Math.ceil(entry / 8) * 8;
    const what = `snapshot ${n + 1}`;
    field(`${what} l1_table_offset`, entry, 8);
    field(`${what} l1_size`, entry + 8, 4);
    field(`${what} id_size`, entry + 12, 2);
    field(`${what} name_size`, entry + 14, 2);
    field(`${what} date_sec`, entry + 16, 4);
    field(`${what} vm_clock_nsec`, entry + 24, 8);
    field(`${what} vm_state_size`, entry + 32, 4);
    field(`${what} extra_data_size`, entry + 36, 4);
    const extra = u32(bytes, entry + 36);
    if (extra >= 8) field(`${what} vm_state_size_large`, entry + 40, 8);
    if (extra >= 16) field(`${what} disk_size`, entry + 48, 8);
    if (extra >= 24) field(`${what} icount`, entry + 56, 8);
    l1Tables(u64(bytes, entry), u32(bytes, entry + 8), 'snapshotL1', what);
    const idSize = bytes.readUInt16BE(entry + 12);
    const nameSize = bytes.readUInt16BE(entry + 14);
    strings.push({ name: `${what} id`, at: entry + 40 + extra, length: idSize, capacity: idSize });
    strings.push({ name: `${what} name`, at: entry + 40 + extra + idSize, length: nameSize, capacity: nameSize });
    entry += 40 + extra + idSize + nameSize;
  }
  if (count > 0) region('snapshotTable', snapshots, entry - snapshots);

  // Bitmaps
  if (bitmaps) {
    region('bitmapDirectory', bitmaps.dirOffset, bitmaps.dirSize);
    let d = bitmaps.dirOffset;
    for (let n = 0; n < bitmaps.count && d + 24 <= bytes.length; n++) {
      field(`bitmap ${n} table_offset`, d, 8);
      field(`bitmap ${n} table_size`, d + 8, 4);
      field(`bitmap ${n} granularity_bits`, d + 17, 1);
      field(`bitmap ${n} name_size`, d + 18, 2);
      field(`bitmap ${n} extra_data_size`, d + 20, 4);
      region('bitmapTable', u64(bytes, d), u32(bytes, d + 8) * 8);
      d += Math.ceil((24 + u32(bytes, d + 20) + bytes.readUInt16BE(d + 18)) / 8) * 8;
    }
  }
  region('data', 0, bytes.length);
  return { version, clusterSize: C, headerLength, fileSize: bytes.length, regions, fields, strings };
}

/**
 * Hostile names: paths out of the folder, protocols, json: names, newlines and NULs (which must
 * not break a one-line error message), invalid UTF-8, the longest name, the image itself (a
 * loop), and the other files of the seed folder (a raw file declared qcow2, a chain).
 */
export function hostileNames(selfName: string): Buffer[] {
  const names: (string | Buffer)[] = [
    '',
    '.',
    '..',
    '/',
    '/etc/passwd',
    '../base.qcow2',
    'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}',
    'nbd://127.0.0.1:1/x',
    'file:base.qcow2',
    'base.qcow2\n',
    'bad\nname',
    'carriage\rreturn',
    'a\0b',
    Buffer.from([0x62, 0xff, 0xfe, 0x73, 0x65]),
    'x'.repeat(1023),
    selfName,
    'base.qcow2',
    'overlay.qcow2',
    'text.raw',
    'datafile.data',
    'missing.qcow2',
    'qcow2',
    'raw',
    'vmdk',
    'qcow2\n',
  ];
  return names.map((n) => (typeof n === 'string' ? Buffer.from(n, 'utf8') : n));
}

/** Patches that put `value` in place of a stored name (cut to its capacity). */
export function stringPatches(f: StringField, value: Buffer): Patch[] {
  const text = value.subarray(0, f.capacity);
  const shown = JSON.stringify(text.toString('latin1'));
  if (f.lengthField && !(f.padShorter && text.length <= f.length)) {
    return [fieldPatch(f.lengthField, BigInt(text.length)), { op: 'set', at: f.at, hex: text.toString('hex'), why: `${f.name} = ${shown}` }];
  }
  const padded = Buffer.alloc(f.lengthField ? f.length : f.capacity);
  text.copy(padded);
  return [{ op: 'set', at: f.at, hex: padded.toString('hex'), why: `${f.name} = ${shown}` }];
}

/**
 * Boundary values for a field. 'all': the brief's list (0, 1, 2^31, 2^32-1, 2^53, 2^63, 2^64-1,
 * cluster size and ±1), 2^56 - C, the file size, a cluster past it and before it, and the original
 * ± 1, + C and × 2. 'brief': the brief's list, the file size and the original ± 1.
 * Values are masked to the field's width.
 */
export function boundaryValues(width: Field['width'], original: bigint, layout: Pick<Layout, 'clusterSize' | 'fileSize'>, set: 'all' | 'brief' = 'all'): bigint[] {
  if (width === 1) return [0n, 1n, 2n, 3n, 0x7fn, 0x80n, 0xffn, original + 1n, original - 1n];
  if (width === 2) return [0n, 1n, 0x7fffn, 0x8000n, 0xffffn, original + 1n, original - 1n];
  const C = BigInt(layout.clusterSize);
  const F = BigInt(layout.fileSize);
  const brief = [0n, 1n, 2n ** 31n, 2n ** 32n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n, C - 1n, C, C + 1n, F, original + 1n, original - 1n];
  if (set === 'brief') return brief;
  return [...brief, 2n ** 56n - C, F - C, F + C, original + C, original * 2n];
}

export function readField(bytes: Buffer, f: Field): bigint {
  switch (f.width) {
    case 1:
      return BigInt(bytes[f.at]!);
    case 2:
      return BigInt(bytes.readUInt16BE(f.at));
    case 4:
      return BigInt(bytes.readUInt32BE(f.at));
    case 8:
      return bytes.readBigUInt64BE(f.at);
  }
}

export function fieldPatch(f: Field, value: bigint): Patch {
  return { op: 'set', at: f.at, hex: beHex(value, f.width), why: `${f.name} = ${BigInt.asUintN(f.width * 8, value)}` };
}

// ---------------------------------------------------------------------------------------------
// Seeds

export interface Seed {
  name: string;
  /** Absolute path of the image. */
  path: string;
  bytes: Buffer;
  layout: Layout;
  /** Snapshot names, for opening at a snapshot. */
  snapshots: string[];
}

interface Recipe {
  name: string;
  /** Commands run in the seed folder, in order; the image is `${name}.qcow2`. */
  steps: (string[] | { qemuIo: string[]; kill?: boolean; image?: string })[];
  snapshots?: string[];
}

const recipes: Recipe[] = [
  {
    name: 'v2',
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '4M'],
      { qemuIo: ['write -P 0x21 0 96k', 'write -P 0x22 1M 64k', 'write -P 0x23 3248128 4k'] },
    ],
  },
  {
    name: 'v3-4k',
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=1', 'v3-4k.qcow2', '8M'],
      { qemuIo: ['write -P 0x31 0 20k', 'write -z 64k 16k', 'write -P 0x32 2M 8k', 'write -P 0x33 6M 12k', 'write -z 7M 4k', 'discard 2M 4k'] },
    ],
  },
  {
    name: 'zstd',
    steps: [['qemu-img', 'convert', '-q', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=16k', 'text.raw', 'zstd.qcow2']],
  },
  {
    name: 'zlib-512',
    steps: [['qemu-img', 'convert', '-q', '-c', '-O', 'qcow2', '-o', 'cluster_size=512', 'text.raw', 'zlib-512.qcow2']],
  },
  {
    name: 'extl2',
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=32k,refcount_bits=64', 'extl2.qcow2', '4M'],
      { qemuIo: ['write -P 0x41 0 4k', 'write -P 0x42 33k 2k', 'write -z 40k 1k', 'write -P 0x43 1M 32k', 'write -z 1049600 1k'] },
    ],
  },
  {
    name: 'snapshots',
    // Long names, so that hostile names fit in their place.
    snapshots: ['first-snapshot-with-a-long-name', 'second-snapshot-with-a-long-name'],
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', 'snapshots.qcow2', '4M'],
      { qemuIo: ['write -P 0x51 0 128k'] },
      ['qemu-img', 'snapshot', '-c', 'first-snapshot-with-a-long-name', 'snapshots.qcow2'],
      { qemuIo: ['write -P 0x52 64k 128k'] },
      ['qemu-img', 'snapshot', '-c', 'second-snapshot-with-a-long-name', 'snapshots.qcow2'],
      { qemuIo: ['write -P 0x53 1M 64k', 'write -z 0 64k'] },
    ],
  },
  {
    name: 'overlay',
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'],
      { qemuIo: ['write -P 0x61 0 1M'], image: 'base.qcow2' },
      ['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2'],
      { qemuIo: ['write -P 0x62 512k 128k', 'write -z 64k 64k'] },
    ],
  },
  {
    name: 'overlay-raw',
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'text.raw', '-F', 'raw', '-o', 'cluster_size=8k', 'overlay-raw.qcow2'],
      { qemuIo: ['write -P 0x63 100k 40k', 'write -z 1M 16k'] },
    ],
  },
  {
    name: 'datafile',
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'data_file=datafile.data', 'datafile.qcow2', '4M'],
      { qemuIo: ['write -P 0x71 0 200k', 'write -P 0x72 2M 64k'] },
    ],
  },
  {
    name: 'bitmaps',
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', 'bitmaps.qcow2', '4M'],
      ['qemu-img', 'bitmap', '--add', 'bitmaps.qcow2', 'b0'],
      { qemuIo: ['write -P 0x81 0 256k', 'write -P 0x82 3M 64k'] },
    ],
  },
  {
    name: 'dirty',
    steps: [
      ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'dirty.qcow2', '4M'],
      { qemuIo: ['write -P 0x91 0 64k', 'write -P 0x92 2M 128k', 'sigraise 9'], kill: true },
    ],
  },
];

export const seedNames = recipes.map((r) => r.name);

/** Deterministic compressible text, for the compressed seeds and the raw backing file. */
function textBytes(length: number): Buffer {
  const parts: string[] = [];
  let total = 0;
  for (let line = 0; total < length; line++) {
    const text = `line ${String(line).padStart(7, '0')} ${'abcdefgh'.slice(line % 8)}${(line * 2654435761) >>> 0}\n`;
    parts.push(text);
    total += text.length;
  }
  return Buffer.from(parts.join('')).subarray(0, length);
}

function runStep(dir: string, image: string, step: Recipe['steps'][number]): void {
  const [command, args] = Array.isArray(step) ? [step[0]!, step.slice(1)] : ['qemu-io', ['-f', 'qcow2', ...step.qemuIo.flatMap((c) => ['-c', c]), step.image ?? image]];
  const result = spawnSync(command, args, { cwd: dir, encoding: 'utf8' });
  if (result.error) throw result.error;
  const killed = !Array.isArray(step) && step.kill;
  const ok = killed ? result.signal === 'SIGKILL' : result.status === 0 && !/failed|error/i.test(result.stderr + result.stdout);
  if (!ok) throw new Error(`${command} ${args.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr} ${result.stdout}`);
}

/**
 * Makes the seed images in `dir` (a fresh scratch folder; a few hundred milliseconds).
 * Mutants must be written into the same folder: the overlays name their backing files
 * and the data-file image its data file relative to it.
 */
export function buildSeeds(dir: string, names: readonly string[] = seedNames): Seed[] {
  fs.writeFileSync(path.join(dir, 'text.raw'), textBytes(2 * 1024 * 1024 + 3 * 512));
  const seeds: Seed[] = [];
  for (const recipe of recipes) {
    if (!names.includes(recipe.name)) continue;
    const image = `${recipe.name}.qcow2`;
    for (const step of recipe.steps) runStep(dir, image, step);
    const file = path.join(dir, image);
    const bytes = fs.readFileSync(file);
    seeds.push({ name: recipe.name, path: file, bytes, layout: describeImage(bytes), snapshots: recipe.snapshots ?? [] });
  }
  return seeds;
}

// ---------------------------------------------------------------------------------------------
// Random mutants (for the CLI runs)

const regionWeights: Record<RegionName, number> = {
  header: 4,
  extensions: 2,
  backingName: 1,
  l1: 3,
  l2: 3,
  refcountTable: 1.5,
  refblock: 1,
  snapshotTable: 3,
  snapshotL1: 1.5,
  bitmapDirectory: 1.5,
  bitmapTable: 0.5,
  data: 0.5,
};

function pickRegion(random: Random, layout: Layout): Region {
  return random.weighted(layout.regions.map((r) => [r, regionWeights[r.name]] as const));
}

function byteFlip(random: Random, bytes: Buffer, layout: Layout): Patch {
  const r = pickRegion(random, layout);
  const at = random.int(r.start, r.end - 1);
  const old = bytes[at] ?? 0;
  const value = random.chance(0.5) ? old ^ (1 << random.int(0, 7)) : random.int(0, 255);
  return { op: 'set', at, hex: beHex(BigInt(value), 1), why: `${r.name} byte` };
}

function fieldReplacement(random: Random, bytes: Buffer, layout: Layout): Patch {
  const f = random.pick(layout.fields);
  return fieldPatch(f, random.pick(boundaryValues(f.width, readField(bytes, f), layout)));
}

/** A random list of patches for a seed, weighted toward metadata. `selfName`: the mutant's file name. */
export function randomPatches(random: Random, seed: Seed, selfName: string): Patch[] {
  const { bytes, layout } = seed;
  const patches: Patch[] = [];
  const kind = random.weighted([
    ['flips', 50],
    ['fields', 28],
    ['truncate', 12],
    ['append', 10],
    ['names', layout.strings.length > 0 ? 8 : 0],
  ] as const);
  switch (kind) {
    case 'flips':
      for (let n = random.int(1, 6); n > 0; n--) patches.push(byteFlip(random, bytes, layout));
      break;
    case 'fields':
      for (let n = random.int(1, 2); n > 0; n--) patches.push(fieldReplacement(random, bytes, layout));
      if (random.chance(0.3)) patches.push(byteFlip(random, bytes, layout));
      break;
    case 'truncate': {
      // Cut inside a metadata region half of the time, anywhere otherwise.
      const r = random.chance(0.5) ? pickRegion(random, layout) : { start: 0, end: bytes.length };
      patches.push({ op: 'truncate', length: random.int(r.start, r.end) });
      if (random.chance(0.3)) patches.push(byteFlip(random, bytes, layout));
      break;
    }
    case 'append':
      patches.push({ op: 'append', length: random.int(1, 128 * 1024), seed: random.chance(0.2) ? 0 : random.int(1, 2 ** 31) });
      if (random.chance(0.6)) patches.push(random.chance(0.5) ? fieldReplacement(random, bytes, layout) : byteFlip(random, bytes, layout));
      break;
    case 'names':
      patches.push(...stringPatches(random.pick(layout.strings), random.pick(hostileNames(selfName))));
      if (random.chance(0.3)) patches.push(byteFlip(random, bytes, layout));
      break;
  }
  return patches;
}

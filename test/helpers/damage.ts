/**
 * Damaged qcow2 images for the checker (and for hardening `info` and `load`): small
 * QEMU-made base images, each defect a named byte patch over one of them.
 *
 * Self-contained on purpose (node: modules only, no test framework): the committed
 * generator scripts/make-damaged-images.mjs transpiles this file and runs it, so the
 * defects exist in one copy only.
 *
 * A defect is `apply(bytes, layout) -> bytes`, where `layout` is this file's own parse of
 * the base image (header, active L1/L2 tables, refcount table, snapshots, bitmaps).
 * Nothing here decides what the damage means: qemu-img check is the oracle.
 */
import { spawnSync } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
const OFFSET_MASK = 0x00fffffffffffe00n;

// ---------------------------------------------------------------------------------------------
// Processes and data

function mustRun(command: string, args: readonly string[], cwd: string): string {
  const result = spawnSync(command, args, { cwd, encoding: 'utf8', maxBuffer: 64 * MiB });
  if (result.error) throw result.error;
  if (result.status !== 0 || /failed:|error/i.test(result.stderr)) {
    throw new Error(`${command} ${args.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr.trim()} ${result.stdout.trim()}`);
  }
  return result.stdout;
}

const img = (dir: string, ...args: string[]) => mustRun('qemu-img', args, dir);
const io = (dir: string, image: string, ...commands: string[]) =>
  mustRun('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image], dir);

/** Deterministic incompressible bytes. */
export function noise(seed: string, length: number): Buffer {
  const key = createHash('sha256').update(seed).digest();
  const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(length)), cipher.final()]);
}

/** Deterministic compressible text. */
export function text(seed: string, length: number): Buffer {
  const words = ['qcow2', 'cluster', 'refcount', 'table', 'snapshot', 'backing', 'sector', 'guest', 'host', 'offset'];
  const random = noise(seed, Math.ceil(length / 4) + 16);
  const parts: string[] = [];
  let size = 0;
  for (let i = 0; size < length; i++) {
    const word = `${words[random[i % random.length]! % words.length]}${i % 7 === 0 ? '\n' : ' '}`;
    parts.push(word);
    size += word.length;
  }
  return Buffer.from(parts.join('')).subarray(0, length);
}

/** A sparse raw file with `parts` written at their offsets. */
function writeRaw(file: string, size: number, parts: readonly [number, Buffer][]): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, 'r+');
  try {
    for (const [at, data] of parts) fs.writeSync(fd, data, 0, data.length, at);
  } finally {
    fs.closeSync(fd);
  }
}

// ---------------------------------------------------------------------------------------------
// Images made by QEMU

export interface ImageRecipe {
  name: string;
  description: string;
  /** Writes `${name}.qcow2` (and any companion files) into `dir`. */
  build(dir: string): void;
}

/** The images the defects patch. All check clean with qemu-img. */
export const baseImages: readonly ImageRecipe[] = [
  {
    name: 'v2',
    description: 'compat 0.10 (version 2), 64 KiB clusters, 4 MiB',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '4M');
      io(dir, 'v2.qcow2', 'write -P 0x11 0 320k', 'write -P 0x12 1M 64k', 'write -P 0x13 3968k 128k');
    },
  },
  {
    name: 'v3',
    description: 'compat 1.1 (version 3), 64 KiB clusters, 4 MiB, with zero clusters (plain and allocated)',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', 'v3.qcow2', '4M');
      io(dir, 'v3.qcow2', 'write -P 0x21 0 320k', 'write -P 0x22 1M 128k', 'write -z 1M 64k', 'write -z 2M 128k', 'write -P 0x23 3968k 128k');
    },
  },
  {
    name: 'v3-4k',
    description: 'version 3, 4 KiB clusters, 8 MiB: four L1 entries, three L2 tables (L1 entry 2 unused)',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'v3-4k.qcow2', '8M');
      io(dir, 'v3-4k.qcow2', 'write -P 0x31 0 40k', 'write -P 0x32 2M 24k', 'write -P 0x33 6M 36k', 'write -P 0x34 8188k 4k');
    },
  },
  {
    name: 'xl2',
    description: 'extended L2 entries, 128 KiB clusters (4 KiB subclusters), partly written and zeroed subclusters',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', 'xl2.qcow2', '4M');
      io(dir, 'xl2.qcow2', 'write -P 0x41 0 200k', 'write -P 0x42 1M 4k', 'write -z 1032k 8k', 'write -P 0x43 2M 256k', 'write -z 3M 128k');
    },
  },
  {
    name: 'xl2-compressed',
    description: 'extended L2 entries, 128 KiB clusters, compressed by qemu-img convert -c',
    build(dir) {
      writeRaw(path.join(dir, 'xl2-compressed.raw'), 2 * MiB, [[0, text('xl2c', 512 * KiB)], [1 * MiB, noise('xl2c', 256 * KiB)]]);
      img(dir, 'convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', 'xl2-compressed.raw', 'xl2-compressed.qcow2');
      fs.rmSync(path.join(dir, 'xl2-compressed.raw'));
    },
  },
  {
    name: 'zlib',
    description: 'version 3, zlib-compressed clusters (qemu-img convert -c) and some stored uncompressed',
    build(dir) {
      writeRaw(path.join(dir, 'zlib.raw'), 2 * MiB, [[0, text('zlib', 640 * KiB)], [1 * MiB, noise('zlib', 192 * KiB)], [1792 * KiB, text('zlib2', 100 * KiB)]]);
      img(dir, 'convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', 'zlib.raw', 'zlib.qcow2');
      fs.rmSync(path.join(dir, 'zlib.raw'));
    },
  },
  {
    name: 'zstd',
    description: 'version 3, zstd-compressed clusters (qemu-img convert -c -o compression_type=zstd)',
    build(dir) {
      writeRaw(path.join(dir, 'zstd.raw'), 2 * MiB, [[0, text('zstd', 640 * KiB)], [1 * MiB, noise('zstd', 192 * KiB)]]);
      img(dir, 'convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', 'zstd.raw', 'zstd.qcow2');
      fs.rmSync(path.join(dir, 'zstd.raw'));
    },
  },
  {
    name: 'snap',
    description: 'version 3, 4 KiB clusters, an internal snapshot: shared L2 tables and data (refcount 2) next to copied ones',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'snap.qcow2', '8M');
      io(dir, 'snap.qcow2', 'write -P 0x51 0 100k', 'write -P 0x52 2M 60k', 'write -P 0x53 6M 40k');
      img(dir, 'snapshot', '-c', 'first', 'snap.qcow2');
      io(dir, 'snap.qcow2', 'write -P 0x54 0 12k', 'write -P 0x55 4M 8k');
    },
  },
  {
    name: 'rc1',
    description: 'version 3, refcount_bits=1',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', 'rc1.qcow2', '4M');
      io(dir, 'rc1.qcow2', 'write -P 0x61 0 320k', 'write -P 0x62 1M 64k', 'write -P 0x63 3968k 128k');
    },
  },
  {
    name: 'rc64',
    description: 'version 3, refcount_bits=64',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=64', 'rc64.qcow2', '4M');
      io(dir, 'rc64.qcow2', 'write -P 0x71 0 320k', 'write -P 0x72 1M 64k', 'write -P 0x73 3968k 128k');
    },
  },
  {
    name: 'bitmaps',
    description: 'version 3 with a persistent dirty bitmap (qemu-img bitmap --add) that holds a data cluster',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', 'bitmaps.qcow2', '4M');
      io(dir, 'bitmaps.qcow2', 'write -P 0x81 0 256k');
      img(dir, 'bitmap', '--add', 'bitmaps.qcow2', 'b0');
      io(dir, 'bitmaps.qcow2', 'write -P 0x82 1M 64k');
    },
  },
];

/** More clean images of other kinds, for "clean checks clean" (not patched). */
export const extraCleanImages: readonly ImageRecipe[] = [
  {
    name: 'empty',
    description: 'nothing written (no cluster allocated)',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', 'empty.qcow2', '4M');
    },
  },
  {
    name: 'lazy-refcounts',
    description: 'lazy_refcounts=on, closed cleanly',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'lazy-refcounts.qcow2', '4M');
      io(dir, 'lazy-refcounts.qcow2', 'write -P 0x91 0 300k', 'write -z 1M 64k');
    },
  },
  {
    name: 'prealloc-metadata',
    description: 'preallocation=metadata (every cluster allocated, zero-flagged)',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'prealloc-metadata.qcow2', '4M');
      io(dir, 'prealloc-metadata.qcow2', 'write -P 0x92 64k 64k');
    },
  },
  {
    name: 'prealloc-falloc',
    description: 'preallocation=falloc',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'preallocation=falloc', 'prealloc-falloc.qcow2', '2M');
    },
  },
  {
    name: 'data-file',
    description: 'external data file (data_file=), data_file_raw off',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'data_file=data-file.raw', 'data-file.qcow2', '4M');
      io(dir, 'data-file.qcow2', 'write -P 0x93 0 200k', 'write -P 0x94 2M 64k', 'write -z 3M 64k');
    },
  },
  {
    name: 'data-file-raw',
    description: 'external data file with data_file_raw=on',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'data_file=data-file-raw.raw,data_file_raw=on', 'data-file-raw.qcow2', '4M');
      io(dir, 'data-file-raw.qcow2', 'write -P 0x95 64k 200k');
    },
  },
  {
    name: 'v2-snapshots',
    description: 'version 2 with two internal snapshots',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2-snapshots.qcow2', '4M');
      io(dir, 'v2-snapshots.qcow2', 'write -P 0x96 0 256k');
      img(dir, 'snapshot', '-c', 'one', 'v2-snapshots.qcow2');
      io(dir, 'v2-snapshots.qcow2', 'write -P 0x97 64k 64k');
      img(dir, 'snapshot', '-c', 'two', 'v2-snapshots.qcow2');
      io(dir, 'v2-snapshots.qcow2', 'write -P 0x98 1M 64k');
    },
  },
  {
    name: 'xl2-snapshot',
    description: 'extended L2 (64 KiB clusters) with an internal snapshot and later subcluster writes',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'xl2-snapshot.qcow2', '4M');
      io(dir, 'xl2-snapshot.qcow2', 'write -P 0x99 0 100k');
      img(dir, 'snapshot', '-c', 's', 'xl2-snapshot.qcow2');
      io(dir, 'xl2-snapshot.qcow2', 'write -P 0x9a 4k 2k', 'write -z 64k 8k');
    },
  },
  {
    name: 'overlay',
    description: 'version 3 overlay on a qcow2 backing file',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', 'overlay-base.qcow2', '4M');
      io(dir, 'overlay-base.qcow2', 'write -P 0x9b 0 4M');
      img(dir, 'create', '-q', '-f', 'qcow2', '-b', 'overlay-base.qcow2', '-F', 'qcow2', 'overlay.qcow2');
      io(dir, 'overlay.qcow2', 'write -P 0x9c 100k 10k', 'write -z 1M 128k', 'discard 2M 128k');
    },
  },
  {
    name: 'small-clusters',
    description: '512-byte clusters',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'small-clusters.qcow2', '2M');
      io(dir, 'small-clusters.qcow2', 'write -P 0x9d 0 40k', 'write -P 0x9e 1M 3k');
    },
  },
  {
    name: 'big-clusters',
    description: '2 MiB clusters, zstd-compressed and plain',
    build(dir) {
      writeRaw(path.join(dir, 'big.raw'), 8 * MiB, [[0, text('big', 3 * MiB)], [5 * MiB, noise('big', 2 * MiB)]]);
      img(dir, 'convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=2M,compression_type=zstd', 'big.raw', 'big-clusters.qcow2');
      fs.rmSync(path.join(dir, 'big.raw'));
      io(dir, 'big-clusters.qcow2', 'write -P 0x9f 6M 4k');
    },
  },
  {
    name: 'refcount-bits-8',
    description: 'refcount_bits=8',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=8', 'refcount-bits-8.qcow2', '4M');
      io(dir, 'refcount-bits-8.qcow2', 'write -P 0xa1 0 300k');
    },
  },
  {
    name: 'refcount-bits-2-snapshot',
    description: 'refcount_bits=2 with a snapshot (refcounts of 2 packed two bits wide)',
    build(dir) {
      img(dir, 'create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=2', 'refcount-bits-2-snapshot.qcow2', '4M');
      io(dir, 'refcount-bits-2-snapshot.qcow2', 'write -P 0xa2 0 300k');
      img(dir, 'snapshot', '-c', 's', 'refcount-bits-2-snapshot.qcow2');
      io(dir, 'refcount-bits-2-snapshot.qcow2', 'write -P 0xa3 0 64k');
    },
  },
];

/** Builds recipes into `dir` (one file `${name}.qcow2` each, plus companions); returns name -> path. */
export function buildImages(dir: string, recipes: readonly ImageRecipe[]): Map<string, string> {
  fs.mkdirSync(dir, { recursive: true });
  const built = new Map<string, string>();
  for (const recipe of recipes) {
    recipe.build(dir);
    const file = path.join(dir, `${recipe.name}.qcow2`);
    if (!fs.existsSync(file)) throw new Error(`recipe ${recipe.name} made no ${file}`);
    built.set(recipe.name, file);
  }
  return built;
}

// ---------------------------------------------------------------------------------------------
// Layout: what the defects patch

export type L2Kind = 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';

export interface L1Entry {
  index: number;
  /** Byte position of the entry in the file. */
  at: number;
  raw: bigint;
  offset: number;
}

export interface L2Entry {
  /** Offset of the L2 table holding the entry. */
  table: number;
  index: number;
  at: number;
  raw: bigint;
  /** Extended L2 bitmap word (0 without extended L2). */
  bitmap: bigint;
  kind: L2Kind;
  /** Host offset (a byte offset for compressed entries). */
  host: number;
  /** Compressed entries: 512-byte sectors the stream may span. */
  sectors: number;
}

export interface L2Table {
  offset: number;
  l1Index: number;
  /** Entries that are not all zero. */
  entries: L2Entry[];
  /** Indexes of all-zero entries. */
  free: number[];
}

export interface SnapshotEntry {
  /** Byte position of the snapshot table entry in the file. */
  at: number;
  id: string;
  name: string;
  l1Offset: number;
  l1Size: number;
}

export interface Layout {
  fileSize: number;
  version: number;
  clusterBits: number;
  clusterSize: number;
  virtualSize: number;
  l1Offset: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountBits: number;
  snapshotsOffset: number;
  extendedL2: boolean;
  l2EntryBytes: number;
  /** Every entry of the active L1 table. */
  l1: L1Entry[];
  /** L2 tables of the active L1, in L1 order. */
  l2: L2Table[];
  /** Non-zero refcount table entries. */
  reftable: { index: number; at: number; raw: bigint; offset: number }[];
  snapshots: SnapshotEntry[];
  /** Bitmaps extension: where its fields are, and the first bitmap's table. */
  bitmaps?: { extensionAt: number; directoryOffset: number; directorySize: number; tableOffset: number; tableSize: number };
}

const u64 = (b: Buffer, at: number) => (at + 8 <= b.length ? b.readBigUInt64BE(at) : 0n);
const u32 = (b: Buffer, at: number) => (at + 4 <= b.length ? b.readUInt32BE(at) : 0);

export function parseLayout(b: Buffer): Layout {
  if (u32(b, 0) !== 0x514649fb) throw new Error('not a qcow2 image');
  const version = u32(b, 4);
  const clusterBits = u32(b, 20);
  const clusterSize = 2 ** clusterBits;
  const incompatible = version >= 3 ? u64(b, 72) : 0n;
  const extendedL2 = ((incompatible >> 4n) & 1n) === 1n;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const layout: Layout = {
    fileSize: b.length,
    version,
    clusterBits,
    clusterSize,
    virtualSize: Number(u64(b, 24)),
    l1Offset: Number(u64(b, 40)),
    l1Size: u32(b, 36),
    refcountTableOffset: Number(u64(b, 48)),
    refcountTableClusters: u32(b, 56),
    refcountBits: version >= 3 ? 2 ** u32(b, 96) : 16,
    snapshotsOffset: Number(u64(b, 64)),
    extendedL2,
    l2EntryBytes,
    l1: [],
    l2: [],
    reftable: [],
    snapshots: [],
  };
  const x = 62 - (clusterBits - 8);
  for (let i = 0; i < layout.l1Size; i++) {
    const at = layout.l1Offset + i * 8;
    const raw = u64(b, at);
    const offset = Number(raw & OFFSET_MASK);
    layout.l1.push({ index: i, at, raw, offset });
    if (offset === 0) continue;
    const table: L2Table = { offset, l1Index: i, entries: [], free: [] };
    for (let j = 0; j < clusterSize / l2EntryBytes; j++) {
      const entryAt = offset + j * l2EntryBytes;
      const entry = u64(b, entryAt);
      const bitmap = extendedL2 ? u64(b, entryAt + 8) : 0n;
      if (entry === 0n && bitmap === 0n) {
        table.free.push(j);
        continue;
      }
      let kind: L2Kind;
      let host = Number(entry & OFFSET_MASK);
      let sectors = 0;
      if (entry & COMPRESSED) {
        kind = 'compressed';
        host = Number(entry & ((1n << BigInt(x)) - 1n));
        sectors = Number((entry >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
      } else if (!extendedL2 && entry & 1n) {
        kind = host === 0 ? 'zero-plain' : 'zero-alloc';
      } else {
        kind = host === 0 ? 'unallocated' : 'normal';
      }
      table.entries.push({ table: offset, index: j, at: entryAt, raw: entry, bitmap, kind, host, sectors });
    }
    layout.l2.push(table);
  }
  const reftableEntries = (layout.refcountTableClusters * clusterSize) / 8;
  for (let i = 0; i < reftableEntries; i++) {
    const at = layout.refcountTableOffset + i * 8;
    const raw = u64(b, at);
    if (raw !== 0n) layout.reftable.push({ index: i, at, raw, offset: Number(raw & ~0x1ffn) });
  }
  let at = layout.snapshotsOffset;
  for (let i = 0; i < u32(b, 60); i++) {
    const idLength = b.readUInt16BE(at + 12);
    const nameLength = b.readUInt16BE(at + 14);
    const extra = u32(b, at + 36);
    const idAt = at + 40 + extra;
    layout.snapshots.push({
      at,
      id: b.toString('utf8', idAt, idAt + idLength),
      name: b.toString('utf8', idAt + idLength, idAt + idLength + nameLength),
      l1Offset: Number(u64(b, at)),
      l1Size: u32(b, at + 8),
    });
    at += Math.ceil((40 + extra + idLength + nameLength) / 8) * 8;
  }
  // Header extensions (v2 has them too, from byte 72).
  let ext = version >= 3 ? u32(b, 100) : 72;
  while (ext + 8 <= clusterSize) {
    const type = u32(b, ext);
    const length = u32(b, ext + 4);
    if (type === 0) break;
    if (type === 0x23852875) {
      const directorySize = Number(u64(b, ext + 16));
      const directoryOffset = Number(u64(b, ext + 24));
      layout.bitmaps = {
        extensionAt: ext,
        directoryOffset,
        directorySize,
        tableOffset: Number(u64(b, directoryOffset)),
        tableSize: u32(b, directoryOffset + 8),
      };
    }
    ext += 8 + Math.ceil(length / 8) * 8;
  }
  return layout;
}

/** Where the refcount of host cluster `cluster` lives. */
function refcountSlot(b: Buffer, layout: Layout, cluster: number): { at: number; shift: number; bits: number } {
  const bits = layout.refcountBits;
  const perBlock = (layout.clusterSize * 8) / bits;
  const tableAt = layout.refcountTableOffset + Math.floor(cluster / perBlock) * 8;
  const block = Number(u64(b, tableAt) & ~0x1ffn);
  if (block === 0) throw new Error(`no refcount block covers cluster ${cluster}`);
  const index = cluster % perBlock;
  if (bits >= 8) return { at: block + (index * bits) / 8, shift: 0, bits };
  const perByte = 8 / bits;
  return { at: block + Math.floor(index / perByte), shift: (index % perByte) * bits, bits };
}

export function getRefcount(b: Buffer, layout: Layout, cluster: number): bigint {
  const { at, shift, bits } = refcountSlot(b, layout, cluster);
  switch (bits) {
    case 64:
      return b.readBigUInt64BE(at);
    case 32:
      return BigInt(b.readUInt32BE(at));
    case 16:
      return BigInt(b.readUInt16BE(at));
    case 8:
      return BigInt(b[at]!);
    default:
      return BigInt((b[at]! >> shift) & ((1 << bits) - 1));
  }
}

export function setRefcount(b: Buffer, layout: Layout, cluster: number, value: bigint): void {
  const { at, shift, bits } = refcountSlot(b, layout, cluster);
  if (value >= 1n << BigInt(bits)) throw new Error(`refcount ${value} does not fit ${bits} bits`);
  switch (bits) {
    case 64:
      b.writeBigUInt64BE(value, at);
      break;
    case 32:
      b.writeUInt32BE(Number(value), at);
      break;
    case 16:
      b.writeUInt16BE(Number(value), at);
      break;
    case 8:
      b[at] = Number(value);
      break;
    default: {
      const mask = ((1 << bits) - 1) << shift;
      b[at] = (b[at]! & ~mask) | (Number(value) << shift);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Picking what to damage

const alignUp = (value: number, to: number) => Math.ceil(value / to) * to;
const clusterOf = (layout: Layout, offset: number) => Math.floor(offset / layout.clusterSize);

function need<T>(value: T | undefined, what: string): T {
  if (value === undefined) throw new Error(`defect not applicable: the base has no ${what}`);
  return value;
}

function allEntries(layout: Layout, kind?: L2Kind): L2Entry[] {
  return layout.l2.flatMap((t) => t.entries).filter((e) => kind === undefined || e.kind === kind);
}

/** Normal data entries of the active tables whose cluster has refcount 1 (COPIED set). */
function ownedData(b: Buffer, layout: Layout): L2Entry[] {
  return allEntries(layout, 'normal').filter((e) => getRefcount(b, layout, clusterOf(layout, e.host)) === 1n);
}

function sharedData(b: Buffer, layout: Layout): L2Entry[] {
  return allEntries(layout, 'normal').filter((e) => getRefcount(b, layout, clusterOf(layout, e.host)) > 1n);
}

function usedL1(layout: Layout): L1Entry[] {
  return layout.l1.filter((e) => e.offset !== 0);
}

/** A cluster-aligned offset `clusters` clusters past the end of the file. */
function pastEnd(layout: Layout, clusters: number): number {
  return alignUp(layout.fileSize, layout.clusterSize) + clusters * layout.clusterSize;
}

function put(b: Buffer, at: number, value: bigint): void {
  b.writeBigUInt64BE(BigInt.asUintN(64, value), at);
}

function setL2(b: Buffer, layout: Layout, entry: L2Entry, raw: bigint, bitmap?: bigint): void {
  put(b, entry.at, raw);
  if (layout.extendedL2 && bitmap !== undefined) put(b, entry.at + 8, bitmap);
}

// ---------------------------------------------------------------------------------------------
// Defects

export interface Defect {
  name: string;
  /** One line: what the patch does. */
  description: string;
  /** Names of the base images it is applied to. */
  bases: readonly string[];
  /** Patches a copy of the base image (may return a new buffer: truncation, growth). */
  apply(image: Buffer, layout: Layout): Buffer;
}


export const defects: readonly Defect[] = [
  // --- L1 entries
  {
    name: 'l1-entry-zeroed',
    description: 'an active L1 entry zeroed: the dropped L2 table and its data clusters leak',
    bases: ['v2', 'v3', 'v3-4k', 'xl2', 'zlib', 'rc1', 'snap'],
    apply(b, l) {
      put(b, need(usedL1(l)[0], 'used L1 entry').at, 0n);
      return b;
    },
  },
  {
    name: 'l1-entry-past-eof',
    description: 'an L1 entry points at an L2 table 1 GiB past the end of the file',
    bases: ['v3', 'xl2'],
    apply(b, l) {
      put(b, need(usedL1(l)[0], 'used L1 entry').at, BigInt(pastEnd(l, GiB / l.clusterSize)) | COPIED);
      return b;
    },
  },
  {
    name: 'l1-entry-unaligned',
    description: 'an L1 entry’s L2 table offset moved by 512 bytes (not cluster aligned)',
    bases: ['v3', 'v3-4k', 'xl2'],
    apply(b, l) {
      const e = need(usedL1(l)[0], 'used L1 entry');
      put(b, e.at, e.raw + 512n);
      return b;
    },
  },
  {
    name: 'l1-entry-copied-only',
    description: 'an L1 entry with only COPIED set (offset 0): QEMU walks the header cluster as an L2 table',
    bases: ['v3', 'v3-4k'],
    apply(b, l) {
      const e = l.l1.find((entry) => entry.raw === 0n) ?? need(l.l1[0], 'L1 entry');
      put(b, e.at, COPIED);
      return b;
    },
  },
  {
    name: 'l1-reserved-high',
    description: 'reserved bit 57 set in an L1 entry',
    bases: ['v3', 'xl2'],
    apply(b, l) {
      const e = need(usedL1(l)[0], 'used L1 entry');
      put(b, e.at, e.raw | (1n << 57n));
      return b;
    },
  },
  {
    name: 'l1-reserved-low',
    description: 'reserved bit 0 set in an L1 entry',
    bases: ['v3', 'rc1'],
    apply(b, l) {
      const e = need(usedL1(l)[0], 'used L1 entry');
      put(b, e.at, e.raw | 1n);
      return b;
    },
  },
  {
    name: 'l1-copied-cleared',
    description: 'COPIED cleared on an L1 entry whose L2 table has refcount 1',
    bases: ['v3', 'rc1', 'rc64'],
    apply(b, l) {
      const e = need(usedL1(l).find((entry) => getRefcount(b, l, clusterOf(l, entry.offset)) === 1n), 'L2 table with refcount 1');
      put(b, e.at, e.raw & ~COPIED);
      return b;
    },
  },
  {
    name: 'l1-copied-set-shared',
    description: 'COPIED set on an L1 entry whose L2 table is shared with a snapshot (refcount 2)',
    bases: ['snap'],
    apply(b, l) {
      const e = need(usedL1(l).find((entry) => getRefcount(b, l, clusterOf(l, entry.offset)) > 1n), 'shared L2 table');
      put(b, e.at, e.raw | COPIED);
      return b;
    },
  },
  {
    name: 'l1-duplicate-l2',
    description: 'two L1 entries point at the same L2 table (the other table and its data leak)',
    bases: ['v3-4k', 'snap'],
    apply(b, l) {
      const used = usedL1(l);
      const [first, second] = [need(used[0], 'L1 entry'), need(used[1], 'second L1 entry')];
      put(b, second.at, first.raw);
      return b;
    },
  },
  {
    name: 'l1-points-at-data',
    description: 'an L1 entry points at a data cluster, whose bytes QEMU then walks as an L2 table',
    bases: ['v3', 'v2'],
    apply(b, l) {
      const data = need(ownedData(b, l)[0], 'data cluster');
      put(b, need(usedL1(l)[0], 'L1 entry').at, BigInt(data.host) | COPIED);
      return b;
    },
  },
  {
    name: 'l1-points-at-refblock',
    description: 'an L1 entry points at the first refcount block',
    bases: ['v3', 'rc1', 'rc64'],
    apply(b, l) {
      put(b, need(usedL1(l)[0], 'L1 entry').at, BigInt(need(l.reftable[0], 'refcount block').offset) | COPIED);
      return b;
    },
  },
  {
    name: 'l1-points-at-l1',
    description: 'an L1 entry points at the L1 table itself',
    bases: ['v3'],
    apply(b, l) {
      put(b, need(usedL1(l)[0], 'L1 entry').at, BigInt(l.l1Offset) | COPIED);
      return b;
    },
  },
  {
    name: 'l1-points-at-reftable',
    description: 'an L1 entry points at the refcount table',
    bases: ['v3'],
    apply(b, l) {
      put(b, need(usedL1(l)[0], 'L1 entry').at, BigInt(l.refcountTableOffset) | COPIED);
      return b;
    },
  },
  // --- L2 entries
  {
    name: 'l2-entry-zeroed',
    description: 'the L2 entry of a data cluster zeroed: the cluster leaks',
    bases: ['v3', 'xl2', 'rc1'],
    apply(b, l) {
      setL2(b, l, need(ownedData(b, l)[0], 'data cluster'), 0n, 0n);
      return b;
    },
  },
  {
    name: 'l2-shared-data',
    description: 'two L2 entries point at the same data cluster (the other cluster leaks)',
    bases: ['v3', 'xl2', 'rc1', 'rc64'],
    apply(b, l) {
      const owned = ownedData(b, l);
      const [first, second] = [need(owned[0], 'data cluster'), need(owned[1], 'second data cluster')];
      setL2(b, l, second, first.raw, first.bitmap);
      return b;
    },
  },
  {
    name: 'l2-data-past-eof',
    description: 'a data cluster offset 16 clusters past the end of the file',
    bases: ['v3', 'xl2'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, BigInt(pastEnd(l, 16)) | COPIED);
      return b;
    },
  },
  {
    name: 'l2-data-at-eof',
    description: 'a data cluster offset exactly at the (cluster-aligned) end of the file',
    bases: ['v3', 'v3-4k'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, BigInt(pastEnd(l, 0)) | COPIED);
      return b;
    },
  },
  {
    name: 'l2-data-unaligned',
    description: 'a data cluster offset moved by 512 bytes (not cluster aligned)',
    bases: ['v3', 'v3-4k', 'xl2'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, e.raw + 512n);
      return b;
    },
  },
  {
    name: 'l2-zero-alloc-unaligned',
    description: 'an allocated zero cluster (ZERO_ALLOC) whose offset is moved by 512 bytes',
    bases: ['v3'],
    apply(b, l) {
      const e = need(allEntries(l, 'zero-alloc')[0], 'allocated zero cluster');
      setL2(b, l, e, e.raw + 512n);
      return b;
    },
  },
  {
    name: 'l2-zero-offset-copied',
    description: 'a data entry replaced by COPIED with offset 0 (the header): unallocated to QEMU, its cluster leaks',
    bases: ['v2', 'v3'],
    apply(b, l) {
      setL2(b, l, need(ownedData(b, l)[0], 'data cluster'), COPIED);
      return b;
    },
  },
  {
    name: 'l2-into-header',
    description: 'a data entry pointing at byte 512, inside the header cluster',
    bases: ['v3', 'v2'],
    apply(b, l) {
      setL2(b, l, need(ownedData(b, l)[0], 'data cluster'), 512n | COPIED);
      return b;
    },
  },
  {
    name: 'l2-points-at-l1',
    description: 'a data entry pointing at the L1 table',
    bases: ['v3', 'v2', 'rc1'],
    apply(b, l) {
      setL2(b, l, need(ownedData(b, l)[0], 'data cluster'), BigInt(l.l1Offset) | COPIED);
      return b;
    },
  },
  {
    name: 'l2-points-at-reftable',
    description: 'a data entry pointing at the refcount table',
    bases: ['v3'],
    apply(b, l) {
      setL2(b, l, need(ownedData(b, l)[0], 'data cluster'), BigInt(l.refcountTableOffset) | COPIED);
      return b;
    },
  },
  {
    name: 'l2-points-at-refblock',
    description: 'a data entry pointing at the first refcount block',
    bases: ['v3', 'rc1', 'rc64'],
    apply(b, l) {
      setL2(b, l, need(ownedData(b, l)[0], 'data cluster'), BigInt(need(l.reftable[0], 'refcount block').offset) | COPIED);
      return b;
    },
  },
  {
    name: 'l2-points-at-own-table',
    description: 'a data entry pointing at the L2 table that holds it',
    bases: ['v3', 'xl2'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, BigInt(e.table) | COPIED);
      return b;
    },
  },
  {
    name: 'l2-reserved-high',
    description: 'reserved bit 57 set in an L2 data entry',
    bases: ['v2', 'v3', 'xl2'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, e.raw | (1n << 57n));
      return b;
    },
  },
  {
    name: 'l2-reserved-low',
    description: 'reserved bit 1 set in an L2 data entry',
    bases: ['v3', 'xl2'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, e.raw | 2n);
      return b;
    },
  },
  {
    name: 'l2-reserved-on-zero-plain',
    description: 'reserved bit 2 set on a plain zero cluster entry (offset 0)',
    bases: ['v3'],
    apply(b, l) {
      const e = need(allEntries(l, 'zero-plain')[0], 'plain zero cluster');
      setL2(b, l, e, e.raw | 4n);
      return b;
    },
  },
  {
    name: 'l2-copied-cleared',
    description: 'COPIED cleared on an L2 entry whose data cluster has refcount 1',
    bases: ['v3', 'xl2', 'rc1', 'rc64'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, e.raw & ~COPIED);
      return b;
    },
  },
  {
    name: 'l2-copied-set-shared',
    description: 'COPIED set on an L2 entry whose data cluster is shared with a snapshot (refcount 2)',
    bases: ['snap'],
    apply(b, l) {
      const e = need(sharedData(b, l)[0], 'shared data cluster');
      setL2(b, l, e, e.raw | COPIED);
      return b;
    },
  },
  {
    name: 'l2-zero-flag-v2',
    description: 'bit 0 (the zero flag of version 3) set on a data entry of a version 2 image',
    bases: ['v2'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, e.raw | 1n);
      return b;
    },
  },
  {
    name: 'l2-compressed-flag-on-data',
    description: 'bit 62 (compressed) set on a normal data entry that also has COPIED',
    bases: ['v3', 'v3-4k'],
    apply(b, l) {
      const e = need(ownedData(b, l)[0], 'data cluster');
      setL2(b, l, e, e.raw | COMPRESSED);
      return b;
    },
  },
  // --- compressed clusters
  {
    name: 'compressed-copied',
    description: 'a compressed cluster entry with COPIED set',
    bases: ['zlib', 'zstd'],
    apply(b, l) {
      const e = need(allEntries(l, 'compressed')[0], 'compressed cluster');
      setL2(b, l, e, e.raw | COPIED);
      return b;
    },
  },
  {
    name: 'compressed-past-eof',
    description: 'a compressed cluster whose stream starts 2 clusters past the end of the file',
    bases: ['zlib', 'zstd'],
    apply(b, l) {
      const e = need(allEntries(l, 'compressed').at(-1), 'compressed cluster');
      const x = 62 - (l.clusterBits - 8);
      const offsetMask = (1n << BigInt(x)) - 1n;
      setL2(b, l, e, (e.raw & ~offsetMask) | BigInt(pastEnd(l, 2) + 100));
      return b;
    },
  },
  {
    name: 'compressed-into-header',
    description: 'a compressed cluster whose stream starts at byte 8 of the header',
    bases: ['zlib'],
    apply(b, l) {
      const e = need(allEntries(l, 'compressed')[0], 'compressed cluster');
      const x = 62 - (l.clusterBits - 8);
      setL2(b, l, e, (e.raw & ~((1n << BigInt(x)) - 1n)) | 8n);
      return b;
    },
  },
  {
    name: 'compressed-max-sectors',
    description: 'a compressed entry’s sector count raised to its maximum, spanning the clusters after it',
    bases: ['zlib', 'zstd'],
    apply(b, l) {
      const e = need(allEntries(l, 'compressed')[0], 'compressed cluster');
      const x = BigInt(62 - (l.clusterBits - 8));
      const field = (1n << BigInt(l.clusterBits - 8)) - 1n;
      setL2(b, l, e, (e.raw & ~(field << x)) | (field << x));
      return b;
    },
  },
  {
    name: 'compressed-shared',
    description: 'two compressed entries point at the same stream',
    bases: ['zlib'],
    apply(b, l) {
      const all = allEntries(l, 'compressed');
      const first = need(all[0], 'compressed cluster');
      // One whose stream lies in another host cluster, so that the sharing shows in a refcount.
      const other = need(all.find((e) => clusterOf(l, e.host) !== clusterOf(l, first.host)), 'compressed cluster in another host cluster');
      setL2(b, l, other, first.raw);
      return b;
    },
  },
  {
    name: 'compressed-bitmap',
    description: 'a compressed extended L2 entry with a non-zero subcluster bitmap',
    bases: ['xl2-compressed'],
    apply(b, l) {
      const e = need(allEntries(l, 'compressed')[0], 'compressed cluster');
      setL2(b, l, e, e.raw, 1n);
      return b;
    },
  },
  {
    name: 'compressed-refcount-zeroed',
    description: 'the refcount of a host cluster holding compressed streams zeroed',
    bases: ['zlib', 'zstd'],
    apply(b, l) {
      const e = need(allEntries(l, 'compressed')[0], 'compressed cluster');
      setRefcount(b, l, clusterOf(l, e.host), 0n);
      return b;
    },
  },
  // --- extended L2
  {
    name: 'xl2-alloc-and-zero',
    description: 'an extended L2 subcluster marked both allocated and zero',
    bases: ['xl2'],
    apply(b, l) {
      const e = need(allEntries(l, 'normal').find((entry) => (entry.bitmap & 0xffffffffn) !== 0n), 'allocated subclusters');
      const alloc = e.bitmap & 0xffffffffn;
      setL2(b, l, e, e.raw, e.bitmap | ((alloc & -alloc) << 32n));
      return b;
    },
  },
  {
    name: 'xl2-unallocated-alloc-bit',
    description: 'an unallocated extended L2 entry (offset 0) with an allocated-subcluster bit',
    bases: ['xl2'],
    apply(b, l) {
      const table = need(l.l2[0], 'L2 table');
      const index = need(table.free[0], 'free L2 entry');
      put(b, table.offset + index * l.l2EntryBytes + 8, 1n);
      return b;
    },
  },
  {
    name: 'xl2-bit0',
    description: 'bit 0 (the zero flag without extended L2; ignored with it) set on an extended L2 data entry',
    bases: ['xl2'],
    apply(b, l) {
      const e = need(allEntries(l, 'normal')[0], 'data cluster');
      setL2(b, l, e, e.raw | 1n);
      return b;
    },
  },
  {
    name: 'xl2-zero-bits-unallocated',
    description: 'zero-subcluster bits set on an unallocated entry (valid: reads as zero)',
    bases: ['xl2-compressed'],
    apply(b, l) {
      const table = need(l.l2[0], 'L2 table');
      const index = need(table.free[0], 'free L2 entry');
      put(b, table.offset + index * l.l2EntryBytes + 8, 0xffffffffn << 32n);
      return b;
    },
  },
  // --- refcounts
  {
    name: 'refcount-zeroed',
    description: 'the stored refcount of a used data cluster zeroed',
    bases: ['v2', 'v3', 'xl2', 'rc1', 'rc64'],
    apply(b, l) {
      setRefcount(b, l, clusterOf(l, need(ownedData(b, l)[0], 'data cluster').host), 0n);
      return b;
    },
  },
  {
    name: 'refcount-raised',
    description: 'the refcount of a data cluster raised from 1 to 2 (a leak; its COPIED flag is now wrong)',
    bases: ['v2', 'v3', 'rc64'],
    apply(b, l) {
      setRefcount(b, l, clusterOf(l, need(ownedData(b, l)[0], 'data cluster').host), 2n);
      return b;
    },
  },
  {
    name: 'refcount-max',
    description: 'the refcount of a data cluster set to the largest value its width holds',
    bases: ['v3', 'rc64'],
    apply(b, l) {
      setRefcount(b, l, clusterOf(l, need(ownedData(b, l)[0], 'data cluster').host), (1n << BigInt(l.refcountBits)) - 1n);
      return b;
    },
  },
  {
    name: 'refcount-header-zeroed',
    description: 'the refcount of cluster 0 (the header) zeroed',
    bases: ['v3', 'rc1'],
    apply(b, l) {
      setRefcount(b, l, 0, 0n);
      return b;
    },
  },
  {
    name: 'refcount-l2-zeroed',
    description: 'the refcount of an active L2 table zeroed (its COPIED flag is now wrong too)',
    bases: ['v3', 'rc64'],
    apply(b, l) {
      setRefcount(b, l, clusterOf(l, need(l.l2[0], 'L2 table').offset), 0n);
      return b;
    },
  },
  {
    name: 'refcount-free-cluster',
    description: 'refcount 1 on a cluster past the last one in use but inside the grown file (a leak)',
    bases: ['v3', 'rc1'],
    apply(b, l) {
      const grown = Buffer.concat([b, Buffer.alloc(2 * l.clusterSize)]);
      setRefcount(grown, l, Math.ceil(b.length / l.clusterSize), 1n);
      return grown;
    },
  },
  {
    name: 'refcount-past-eof',
    description: 'refcount 1 on a cluster past the end of the file (QEMU compares only clusters inside it)',
    bases: ['v3'],
    apply(b, l) {
      setRefcount(b, l, Math.ceil(b.length / l.clusterSize) + 3, 1n);
      return b;
    },
  },
  {
    name: 'reftable-entry-unaligned',
    description: 'a refcount table entry moved by 512 bytes (the refcount block is not cluster aligned)',
    bases: ['v3', 'rc1', 'rc64'],
    apply(b, l) {
      const e = need(l.reftable[0], 'refcount block');
      put(b, e.at, e.raw + 512n);
      return b;
    },
  },
  {
    name: 'reftable-entry-past-eof',
    description: 'a refcount table entry pointing 64 clusters past the end of the file (refblock outside the image)',
    bases: ['v3', 'rc1', 'rc64'],
    apply(b, l) {
      put(b, need(l.reftable[0], 'refcount block').at, BigInt(pastEnd(l, 64)));
      return b;
    },
  },
  {
    name: 'reftable-entry-zeroed',
    description: 'the refcount table entry of the only refcount block zeroed: every refcount reads 0',
    bases: ['v3'],
    apply(b, l) {
      put(b, need(l.reftable[0], 'refcount block').at, 0n);
      return b;
    },
  },
  {
    name: 'reftable-reserved-bits',
    description: 'reserved bits (bit 0) set in a refcount table entry',
    bases: ['v3', 'rc64'],
    apply(b, l) {
      const e = need(l.reftable[0], 'refcount block');
      put(b, e.at, e.raw | 1n);
      return b;
    },
  },
  {
    name: 'reftable-duplicate-refblock',
    description: 'a second refcount table entry pointing at the first refcount block',
    bases: ['v3'],
    apply(b, l) {
      const e = need(l.reftable[0], 'refcount block');
      put(b, e.at + 8, e.raw);
      return b;
    },
  },
  {
    name: 'reftable-points-at-data',
    description: 'a refcount table entry pointing at a data cluster, whose bytes become refcounts',
    bases: ['v3'],
    apply(b, l) {
      put(b, need(l.reftable[0], 'refcount block').at, BigInt(need(ownedData(b, l)[0], 'data cluster').host));
      return b;
    },
  },
  // --- header
  {
    name: 'header-l1-at-header',
    description: 'the header’s L1 table offset set to 0 (the header itself)',
    bases: ['v2', 'v3'],
    apply(b) {
      put(b, 40, 0n);
      return b;
    },
  },
  {
    name: 'header-l1-unaligned',
    description: 'the header’s L1 table offset moved by 512 bytes',
    bases: ['v3'],
    apply(b, l) {
      put(b, 40, BigInt(l.l1Offset + 512));
      return b;
    },
  },
  {
    name: 'header-l1-past-eof',
    description: 'the header’s L1 table offset 1 GiB past the end of the file',
    bases: ['v3'],
    apply(b, l) {
      put(b, 40, BigInt(pastEnd(l, GiB / l.clusterSize)));
      return b;
    },
  },
  {
    name: 'header-l1-size-zero',
    description: 'the header’s L1 size set to 0 for a non-empty disk',
    bases: ['v3'],
    apply(b) {
      b.writeUInt32BE(0, 36);
      return b;
    },
  },
  {
    name: 'header-reftable-unaligned',
    description: 'the header’s refcount table offset moved by 512 bytes',
    bases: ['v3'],
    apply(b, l) {
      put(b, 48, BigInt(l.refcountTableOffset + 512));
      return b;
    },
  },
  {
    name: 'header-reftable-past-eof',
    description: 'the header’s refcount table offset 16 clusters past the end of the file',
    bases: ['v3'],
    apply(b, l) {
      put(b, 48, BigInt(pastEnd(l, 16)));
      return b;
    },
  },
  {
    name: 'header-reftable-at-header',
    description: 'the header’s refcount table offset set to 0: header bytes read as refcount block offsets',
    bases: ['v3'],
    apply(b) {
      put(b, 48, 0n);
      return b;
    },
  },
  {
    name: 'header-refcount-order-7',
    description: 'refcount_order 7 (128-bit refcounts) in the header',
    bases: ['v3'],
    apply(b) {
      b.writeUInt32BE(7, 96);
      return b;
    },
  },
  {
    name: 'header-dirty-bit',
    description: 'the dirty bit set on an image whose refcounts are right',
    bases: ['v3'],
    apply(b) {
      put(b, 72, b.readBigUInt64BE(72) | 1n);
      return b;
    },
  },
  {
    name: 'header-corrupt-bit',
    description: 'the corrupt bit set on an image that is consistent',
    bases: ['v3'],
    apply(b) {
      put(b, 72, b.readBigUInt64BE(72) | 2n);
      return b;
    },
  },
  {
    name: 'header-snapshot-count-plus-one',
    description: 'the header counts one snapshot more than the table holds',
    bases: ['snap'],
    apply(b) {
      b.writeUInt32BE(b.readUInt32BE(60) + 1, 60);
      return b;
    },
  },
  {
    name: 'header-l1-size-too-large',
    description: 'the header’s L1 size above QEMU’s limit (32 MiB of entries)',
    bases: ['v3'],
    apply(b) {
      b.writeUInt32BE(0x400001, 36);
      return b;
    },
  },
  {
    name: 'header-reftable-clusters-huge',
    description: 'the header’s refcount table size set to 2^31 clusters',
    bases: ['v3'],
    apply(b) {
      b.writeUInt32BE(0x80000000, 56);
      return b;
    },
  },
  {
    name: 'header-size-shrunk',
    description: 'the header’s virtual size cut to 1 MiB: clusters mapped beyond it stay referenced',
    bases: ['v3', 'v3-4k'],
    apply(b) {
      put(b, 24, BigInt(MiB));
      return b;
    },
  },
  {
    name: 'header-snapshots-unaligned',
    description: 'the header’s snapshot table offset moved by 8 bytes',
    bases: ['snap'],
    apply(b, l) {
      put(b, 64, BigInt(l.snapshotsOffset + 8));
      return b;
    },
  },
  {
    name: 'header-snapshot-count-huge',
    description: 'the header counts 65537 snapshots (QEMU’s limit is 65536)',
    bases: ['snap'],
    apply(b) {
      b.writeUInt32BE(65537, 60);
      return b;
    },
  },
  // --- snapshots
  {
    name: 'snapshot-extra-data-short',
    description: 'a version 3 snapshot entry whose extra data is 8 bytes (no disk size): QEMU calls it incomplete',
    bases: ['snap'],
    apply(b, l) {
      const s = need(l.snapshots[0], 'snapshot');
      const extra = b.readUInt32BE(s.at + 36);
      if (extra < 16) throw new Error('defect not applicable: the snapshot has short extra data already');
      // Keep id and name readable: move them down to follow 8 bytes of extra data.
      const idLength = b.readUInt16BE(s.at + 12);
      const nameLength = b.readUInt16BE(s.at + 14);
      const names = Buffer.from(b.subarray(s.at + 40 + extra, s.at + 40 + extra + idLength + nameLength));
      b.fill(0, s.at + 48, s.at + 40 + extra + idLength + nameLength);
      names.copy(b, s.at + 48);
      b.writeUInt32BE(8, s.at + 36);
      return b;
    },
  },
  {
    name: 'snapshot-name-past-eof',
    description: 'a snapshot name length of 65535 bytes, running the table past the end of the file',
    bases: ['snap'],
    apply(b, l) {
      b.writeUInt16BE(0xffff, need(l.snapshots[0], 'snapshot').at + 14);
      return b;
    },
  },
  {
    name: 'snapshot-l1-unaligned',
    description: 'a snapshot’s L1 table offset moved by 512 bytes',
    bases: ['snap'],
    apply(b, l) {
      const s = need(l.snapshots[0], 'snapshot');
      put(b, s.at, BigInt(s.l1Offset + 512));
      return b;
    },
  },
  {
    name: 'snapshot-l1-past-eof',
    description: 'a snapshot’s L1 table offset 16 clusters past the end of the file',
    bases: ['snap'],
    apply(b, l) {
      put(b, need(l.snapshots[0], 'snapshot').at, BigInt(pastEnd(l, 16)));
      return b;
    },
  },
  {
    name: 'snapshot-l1-too-large',
    description: 'a snapshot’s L1 size above QEMU’s limit (32 MiB of entries)',
    bases: ['snap'],
    apply(b, l) {
      b.writeUInt32BE(0x400001, need(l.snapshots[0], 'snapshot').at + 8);
      return b;
    },
  },
  {
    name: 'snapshot-l1-entry-zeroed',
    description: 'an entry of a snapshot’s L1 table zeroed: clusters only that snapshot used leak',
    bases: ['snap'],
    apply(b, l) {
      const s = need(l.snapshots[0], 'snapshot');
      // The snapshot's first L2 table was copied for the active L1 after the snapshot: it is the snapshot's alone.
      put(b, s.l1Offset, 0n);
      return b;
    },
  },
  // --- file size
  {
    name: 'truncated-last-cluster',
    description: 'the file cut by its last cluster',
    bases: ['v3', 'zlib', 'snap'],
    apply(b, l) {
      return b.subarray(0, alignUp(b.length, l.clusterSize) - l.clusterSize);
    },
  },
  {
    name: 'truncated-half',
    description: 'the file cut to half its clusters',
    bases: ['v3', 'rc64'],
    apply(b, l) {
      return b.subarray(0, Math.floor(b.length / 2 / l.clusterSize) * l.clusterSize);
    },
  },
  {
    name: 'truncated-partial-cluster',
    description: 'the file cut by 1000 bytes, inside its last cluster',
    bases: ['v3', 'zlib'],
    apply(b) {
      return b.subarray(0, b.length - 1000);
    },
  },
  {
    name: 'trailing-garbage',
    description: 'three clusters of random bytes appended, with no refcount',
    bases: ['v3'],
    apply(b, l) {
      return Buffer.concat([b, noise('trailing', 3 * l.clusterSize)]);
    },
  },
  // --- bitmaps
  {
    name: 'bitmap-table-past-eof',
    description: 'a bitmap table entry pointing 8 clusters past the end of the file',
    bases: ['bitmaps'],
    apply(b, l) {
      const bitmaps = need(l.bitmaps, 'bitmap');
      put(b, bitmaps.tableOffset, BigInt(pastEnd(l, 8)));
      return b;
    },
  },
  {
    name: 'bitmap-data-shared',
    description: 'a bitmap data cluster pointer aimed at a guest data cluster',
    bases: ['bitmaps'],
    apply(b, l) {
      const bitmaps = need(l.bitmaps, 'bitmap');
      put(b, bitmaps.tableOffset, BigInt(need(ownedData(b, l)[0], 'data cluster').host));
      return b;
    },
  },
  {
    name: 'bitmap-directory-past-eof',
    description: 'the bitmap directory offset 8 clusters past the end of the file',
    bases: ['bitmaps'],
    apply(b, l) {
      const bitmaps = need(l.bitmaps, 'bitmap');
      put(b, bitmaps.extensionAt + 8 + 16, BigInt(pastEnd(l, 8)));
      return b;
    },
  },
];

// ---------------------------------------------------------------------------------------------
// The damaged set

export interface ManifestEntry {
  /** File name in the output folder. */
  file: string;
  defect: string;
  description: string;
  /** Base image name; its file is bases/NAME.qcow2 in the output folder. */
  base: string;
}

/** The damaged images makeDamagedImages writes, in order (without writing anything). */
export function plannedImages(): ManifestEntry[] {
  return defects.flatMap((defect) =>
    defect.bases.map((base) => ({ file: `${base}--${defect.name}.qcow2`, defect: defect.name, description: defect.description, base })),
  );
}

/**
 * Builds the base images into DIR/bases/ and writes every damaged image into DIR,
 * with DIR/manifest.json listing them. Returns the manifest.
 */
export function makeDamagedImages(dir: string, options: { only?: (defect: Defect, base: string) => boolean } = {}): ManifestEntry[] {
  const defectNames = new Set<string>();
  for (const defect of defects) {
    if (defectNames.has(defect.name)) throw new Error(`defect ${defect.name} is defined twice`);
    defectNames.add(defect.name);
    for (const base of defect.bases) {
      if (!baseImages.some((b) => b.name === base)) throw new Error(`defect ${defect.name} uses an unknown base ${base}`);
    }
  }
  const byName = new Map(defects.map((d) => [d.name, d]));
  const planned = plannedImages().filter((entry) => !options.only || options.only(byName.get(entry.defect)!, entry.base));
  const needed = new Set(planned.map((entry) => entry.base));
  const built = buildImages(path.join(dir, 'bases'), baseImages.filter((b) => needed.has(b.name)));
  fs.mkdirSync(dir, { recursive: true });
  for (const entry of planned) {
    const original = fs.readFileSync(built.get(entry.base)!);
    let damaged: Buffer;
    try {
      damaged = byName.get(entry.defect)!.apply(Buffer.from(original), parseLayout(original));
    } catch (error) {
      throw new Error(`defect ${entry.defect} on base ${entry.base}: ${(error as Error).message}`);
    }
    if (damaged.equals(original)) throw new Error(`defect ${entry.defect} on base ${entry.base} changed nothing`);
    fs.writeFileSync(path.join(dir, entry.file), damaged);
  }
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(planned, null, 2) + '\n');
  return planned;
}

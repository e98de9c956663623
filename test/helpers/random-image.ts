/**
 * Seeded random qcow2 images for the differential test (test/qcow2/differential.test.ts).
 *
 * From a seed, randomImage() picks qcow2 creation options (compat, cluster size, compression type,
 * extended L2, refcount width, lazy refcounts, preallocation=metadata, external data file with or
 * without data_file_raw) and an optional backing chain of 1 to 3 qcow2 or raw files (each of its
 * own size), builds every file with qemu-img create, then runs a random sequence of qemu-io
 * commands on each: pattern, random and text writes at unaligned offsets, zero writes with and
 * without unmap, discards, compressed writes, concurrent aio writes; on the top image also
 * internal snapshots (qemu-img snapshot -c) and resizes. Now and then a layer is amended (refcount
 * width, compat), the chain committed or rebased, or the top image left dirty by a killed qemu-io.
 * Only combinations QEMU 7.2 accepts are generated. Every command is recorded in repro.sh in the
 * image's folder.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Random as SeededRandom } from './prng';
import { KiB, MiB, qemuImg, qemuIo, randomBytes, textBytes } from './qemu';

/** The generator of a seed: mulberry32 from seed * 2654435761 (Knuth's multiplicative hash spreads small seeds). */
class Random extends SeededRandom {
  constructor(seed: number) {
    super(seed * 2654435761);
  }
}

export interface RandomLayer {
  /** File name in the folder. */
  file: string;
  format: 'qcow2' | 'raw';
  virtualSize: number;
  clusterSize?: number;
  version?: 2 | 3;
  /** The -o options of qemu-img create (qcow2). */
  options: string[];
  dataFile?: string;
  /** Commands run on this layer, for the summary. */
  operations: number;
  snapshots: string[];
  /** qemu-img resize/amend/commit/rebase run on this layer, for the summary. */
  changes: string[];
}

export interface RandomImage {
  seed: number;
  dir: string;
  /** Absolute path of the top image. */
  image: string;
  /** Bottom first; the last one is the top image. */
  layers: RandomLayer[];
  /** Internal snapshots of the top image, by name, oldest first. */
  snapshots: string[];
  /** Compressed clusters were written (somewhere in the chain). */
  compressed: boolean;
  /** The top image was left dirty by a killed qemu-io (lazy refcounts). */
  dirty: boolean;
  /** A shell script (run in an empty folder) that rebuilds the image with the same commands. */
  script: string;
  /** One line per layer. */
  summary: string;
}

/** Sources for `write -s`: incompressible and compressible bytes. */
const sourceSize = 4 * MiB;
const sources = { rand: 'rand.bin', text: 'text.bin' } as const;

/** The same for every seed: made once per process. */
let sourceBytes: { rand: Buffer; text: Buffer } | undefined;

function shellQuote(word: string): string {
  return /^[A-Za-z0-9_.,=/:+-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

interface Qcow2Choice {
  version: 2 | 3;
  clusterSize: number;
  options: string[];
  dataFile?: string;
  dataFileRaw: boolean;
  preallocated: boolean;
  refcountBits: number;
  extendedL2: boolean;
}

/** Creation options QEMU accepts, for a qcow2 file with or without a backing file. */
function chooseQcow2(r: Random, dir: string, name: string, hasBacking: boolean): Qcow2Choice {
  const version = r.chance(0.25) ? 2 : 3;
  const clusterSize = r.weighted([
    [512, 2],
    [4 * KiB, 3],
    [64 * KiB, 4],
    [2 * MiB, 1.5],
  ] as const);
  const options = [`compat=${version === 2 ? '0.10' : '1.1'}`, `cluster_size=${clusterSize}`];
  let refcountBits = 16;
  let extendedL2 = false;
  let dataFile: string | undefined;
  let dataFileRaw = false;
  if (version === 3) {
    const compression = r.weighted([
      ['', 2],
      ['zlib', 1],
      ['zstd', 2],
    ] as const);
    if (compression) options.push(`compression_type=${compression}`);
    if (clusterSize >= 16 * KiB && r.chance(0.35)) {
      extendedL2 = true;
      options.push('extended_l2=on');
    }
    refcountBits = r.weighted([
      [16, 5],
      [1, 1.5],
      [64, 1.5],
      [2, 0.5],
      [8, 0.5],
      [32, 0.5],
    ] as const);
    if (refcountBits !== 16 || r.chance(0.2)) options.push(`refcount_bits=${refcountBits}`);
    if (r.chance(0.25)) options.push('lazy_refcounts=on');
    if (r.chance(0.2)) {
      const dataName = `${name}.data`;
      // Mostly a relative name; sometimes the absolute path (still in the same folder).
      dataFile = r.chance(0.25) ? path.join(dir, dataName) : dataName;
      options.push(`data_file=${dataFile}`);
      // QEMU refuses data_file_raw with a backing file.
      if (!hasBacking && r.chance(0.5)) {
        dataFileRaw = true;
        options.push('data_file_raw=on');
      }
    }
  }
  // QEMU refuses preallocation with a backing file unless extended L2 entries are on.
  let preallocated = false;
  if ((!hasBacking || extendedL2) && r.chance(0.15)) {
    preallocated = true;
    options.push('preallocation=metadata');
  }
  return { version, clusterSize, options, ...(dataFile !== undefined ? { dataFile } : {}), dataFileRaw, preallocated, refcountBits, extendedL2 };
}

/** A virtual size for a cluster size: small, a multiple of 512, often not of the cluster size. */
function chooseSize(r: Random, clusterSize: number): number {
  const [lo, hi] =
    clusterSize <= 512 ? [256 * KiB, 2 * MiB] : clusterSize <= 4 * KiB ? [1 * MiB, 8 * MiB] : clusterSize <= 64 * KiB ? [1 * MiB, 32 * MiB] : [4 * MiB, 64 * MiB];
  const size = r.int(lo / KiB, hi / KiB) * KiB;
  return r.chance(0.5) ? size + r.int(0, 63) * 512 : Math.ceil(size / clusterSize) * clusterSize;
}

export function randomImage(seed: number, dir: string): RandomImage {
  const r = new Random(seed);
  const script: string[] = ['#!/bin/sh', `# qcow2img differential test, seed ${seed}`, 'set -e'];
  // Written as it goes: when QEMU refuses a command, repro.sh shows how far it got.
  const scriptFile = path.join(dir, 'repro.sh');
  const log = (words: readonly string[]) => {
    script.push(words.map(shellQuote).join(' '));
    fs.writeFileSync(scriptFile, script.join('\n') + '\n');
  };
  /** qemu-img in the folder; `guarded`: in its own time limit, for commands QEMU has been seen to hang on. */
  const img = (args: string[], guarded = false) => {
    log(['qemu-img', ...args]);
    if (!guarded) {
      qemuImg(args, dir);
      return;
    }
    const result = spawnSync('qemu-img', args, { cwd: dir, encoding: 'utf8', timeout: 30_000 });
    if (result.error || result.status !== 0) {
      throw new Error(`qemu-img ${args.join(' ')} failed (${result.error?.message ?? result.status ?? result.signal}): ${result.stderr}`);
    }
  };

  fs.mkdirSync(dir, { recursive: true });
  sourceBytes ??= { rand: randomBytes('random-image source', sourceSize), text: textBytes('random-image source', sourceSize) };
  fs.writeFileSync(path.join(dir, sources.rand), sourceBytes.rand);
  fs.writeFileSync(path.join(dir, sources.text), sourceBytes.text);
  // The test's rand.bin and text.bin are in the seed's folder (DIFF_KEEP=1); other bytes do as well.
  script.push(
    `[ -f ${sources.rand} ] || head -c ${sourceSize} /dev/urandom > ${sources.rand}`,
    `[ -f ${sources.text} ] || base64 -w 77 < ${sources.rand} | head -c ${sourceSize} > ${sources.text}`,
  );

  // amend, commit and rebase draw from a stream of their own: adding them left the images of
  // every seed otherwise as they were.
  const extra = new Random(seed ^ 0x5a5a5a);
  const depth = r.chance(0.4) ? r.int(1, 3) : 0;
  const layers: RandomLayer[] = [];
  let compressed = false;

  for (let level = 0; level <= depth; level++) {
    const isTop = level === depth;
    const below = layers[layers.length - 1];
    const name = isTop ? 'image' : `base${level}`;
    const raw = !isTop && r.chance(0.35);
    if (raw) {
      // A raw backing file of any length, even not a multiple of 512.
      const size = r.int(128, 24 * 1024) * KiB + (r.chance(0.5) ? r.int(1, 4095) : 0);
      const file = `${name}.raw`;
      fs.writeFileSync(path.join(dir, file), '');
      fs.truncateSync(path.join(dir, file), size);
      log(['truncate', '-s', String(size), file]);
      const layer: RandomLayer = { file, format: 'raw', virtualSize: size, options: [], operations: 0, snapshots: [], changes: [] };
      layers.push(layer);
      runOperations(r, dir, layer, { clusterSize: 64 * KiB, compressedAllowed: false, snapshotsAllowed: false, preallocated: false, backingSize: below?.virtualSize, resizeAllowed: false, version: 3 }, log, () => undefined);
      continue;
    }
    const choice = chooseQcow2(r, dir, name, below !== undefined);
    let size = chooseSize(r, choice.clusterSize);
    if (isTop && layers.length > 0 && r.chance(0.3)) size = Math.ceil(below!.virtualSize / 512) * 512;
    // Now and then a disk smaller than a cluster (or just over one).
    if (isTop && extra.chance(0.06)) size = extra.int(1, 16) * 512 + (extra.chance(0.3) ? choice.clusterSize : 0);
    const file = `${name}.qcow2`;
    const args = ['create', '-q', '-f', 'qcow2'];
    if (below) {
      // Mostly a relative backing name; sometimes the absolute path (in the same folder).
      args.push('-b', r.chance(0.2) ? path.join(dir, below.file) : below.file, '-F', below.format);
    }
    args.push('-o', choice.options.join(','), file, String(size));
    img(args);
    const layer: RandomLayer = {
      file,
      format: 'qcow2',
      virtualSize: size,
      clusterSize: choice.clusterSize,
      version: choice.version,
      options: choice.options,
      ...(choice.dataFile !== undefined ? { dataFile: choice.dataFile } : {}),
      operations: 0,
      snapshots: [],
      changes: [],
    };
    layers.push(layer);
    const wroteCompressed = runOperations(
      r,
      dir,
      layer,
      {
        clusterSize: choice.clusterSize,
        // QEMU writes no compressed clusters to an external data file, and compressed writes
        // need clusters without a host cluster (preallocation gives every cluster one).
        compressedAllowed: choice.dataFile === undefined && !choice.preallocated,
        // No internal snapshots with an external data file; narrow refcounts overflow.
        snapshotsAllowed: isTop && choice.dataFile === undefined && choice.refcountBits >= 8,
        preallocated: choice.preallocated,
        backingSize: below?.virtualSize,
        resizeAllowed: choice.version === 3 || below === undefined,
        version: choice.version,
      },
      log,
      (args2) => img(args2),
    );
    compressed ||= wroteCompressed;
    if (extra.chance(0.15)) amend(extra, layer, choice, wroteCompressed, img);
  }
  chainChange(extra, layers, img);

  // A top image with lazy refcounts left as a killed QEMU leaves it: dirty, refcounts stale.
  const last = layers[layers.length - 1]!;
  let dirty = false;
  const lazy = last.options.includes('lazy_refcounts=on') && !last.changes.some((c) => c.includes('lazy_refcounts=off'));
  if (lazy && extra.chance(0.4)) {
    const c = last.clusterSize!;
    const commands: string[] = [];
    for (let i = extra.int(1, 4); i > 0; i--) {
      const at = extra.int(0, last.virtualSize - 1);
      const length = Math.min(last.virtualSize - at, extra.int(1, 3 * c), sourceSize);
      commands.push(extra.chance(0.7) ? `write -q -P ${extra.int(1, 255)} ${at} ${length}` : `write -q -z ${at} ${length}`);
    }
    commands.push('sigraise 9');
    log(['qemu-io', '-f', 'qcow2', ...commands.flatMap((command) => ['-c', command]), last.file]);
    qemuIo(last.file, commands, { cwd: dir, kill: true });
    last.changes.push('writes, then killed (dirty)');
    dirty = true;
  }

  const top = layers[layers.length - 1]!;
  const summary = layers
    .map((l, i) => {
      const role = i === layers.length - 1 ? 'top' : `backing ${layers.length - 1 - i}`;
      const what = l.format === 'raw' ? 'raw' : `qcow2 ${l.options.join(',')}`;
      return `${role}: ${l.file} ${what}, ${l.virtualSize} bytes, ${l.operations} ops${l.snapshots.length ? `, snapshots ${l.snapshots.join(' ')}` : ''}${l.changes.length ? `, then ${l.changes.join('; ')}` : ''}`;
    })
    .join('\n');
  return { seed, dir, image: path.join(dir, top.file), layers, snapshots: top.snapshots, compressed, dirty, script: script.join('\n'), summary };
}

/**
 * qemu-img amend of a finished qcow2 layer: another refcount width (QEMU rebuilds the refcount
 * structures), or a version change (a downgrade writes zero clusters out as zeros).
 */
function amend(r: Random, layer: RandomLayer, choice: Qcow2Choice, wroteCompressed: boolean, img: (args: string[], guarded?: boolean) => void): void {
  const zstd = choice.options.includes('compression_type=zstd');
  const lazy = choice.options.includes('lazy_refcounts=on');
  const kinds: string[] = [];
  if (choice.version === 3) {
    // QEMU 7.2's refcount width change spins forever on 2 MiB clusters, and on 64 KiB clusters
    // from widths below 8 (qemu-img amend never returns).
    if (choice.clusterSize <= 4 * KiB || (choice.clusterSize === 64 * KiB && choice.refcountBits >= 8)) kinds.push('refcount');
    // QEMU downgrades only what compat 0.10 can describe.
    if (!choice.extendedL2 && choice.dataFile === undefined && choice.refcountBits === 16 && !(zstd && wroteCompressed) && layer.snapshots.length === 0) {
      kinds.push('downgrade');
    }
  } else {
    kinds.push('upgrade');
  }
  if (kinds.length === 0) return;
  const kind = r.pick(kinds);
  let options: string;
  if (kind === 'refcount') {
    // Snapshots and compressed clusters share host clusters: keep room for their refcounts.
    const shared = layer.snapshots.length > 0 || wroteCompressed;
    options = `refcount_bits=${r.pick(shared ? [8, 16, 32, 64] : [1, 2, 4, 8, 16, 32, 64])}`;
  } else if (kind === 'downgrade') {
    // Zero clusters, which compat 0.10 lacks, are written out as zeros.
    options = lazy ? 'compat=0.10,lazy_refcounts=off' : 'compat=0.10';
  } else {
    options = 'compat=1.1';
  }
  img(['amend', '-f', 'qcow2', '-o', options, layer.file], true);
  layer.changes.push(`amend -o ${options}`);
}

/**
 * Changes to the finished chain: qemu-img commit of the top into its backing file (emptying the
 * top or not), or qemu-img rebase of the top (safe or unsafe) past its backing file or onto none.
 */
function chainChange(r: Random, layers: RandomLayer[], img: (args: string[], guarded?: boolean) => void): void {
  const top = layers[layers.length - 1]!;
  const below = layers[layers.length - 2];
  if (!below) return;
  const choice = r.weighted([
    ['none', 6],
    ['commit', 1],
    ['rebase', layers.length >= 3 ? 1 : 0],
    ['flatten', 0.4],
  ] as const);
  if (choice === 'commit') {
    // A base shorter than the top grows; a v2 base with a backing file cannot zero what it then exposes.
    if (below.format === 'qcow2' && below.virtualSize < top.virtualSize && below.version === 2 && layers.length >= 3) return;
    // QEMU empties a top image only without an external data file.
    const keep = top.dataFile !== undefined || r.chance(0.4);
    img(['commit', '-q', '-f', 'qcow2', ...(keep ? ['-d'] : []), top.file], true);
    below.changes.push(`committed into${keep ? '' : ', the top emptied'}`);
    below.virtualSize = Math.max(below.virtualSize, top.virtualSize);
  } else if (choice === 'rebase') {
    const target = layers[layers.length - 3]!;
    const unsafe = r.chance(0.4);
    img(['rebase', '-f', 'qcow2', ...(unsafe ? ['-u'] : []), '-b', target.file, '-F', target.format, top.file], true);
    top.changes.push(`rebase${unsafe ? ' -u' : ''} onto ${target.file}`);
    layers.splice(layers.length - 2, 1);
  } else if (choice === 'flatten') {
    img(['rebase', '-f', 'qcow2', '-b', '', top.file], true);
    top.changes.push('rebase onto no backing file');
    layers.splice(0, layers.length - 1);
  }
}

interface OperationContext {
  clusterSize: number;
  compressedAllowed: boolean;
  snapshotsAllowed: boolean;
  preallocated: boolean;
  backingSize: number | undefined;
  /** A grown v2 overlay would have to zero what its backing file shows there, which it cannot. */
  resizeAllowed: boolean;
  version: 2 | 3;
}

/**
 * Runs a random sequence of qemu-io commands (batched into one qemu-io run between snapshots) on
 * `layer`. Returns whether compressed writes were made.
 */
function runOperations(
  r: Random,
  dir: string,
  layer: RandomLayer,
  context: OperationContext,
  log: (words: readonly string[]) => void,
  img: (args: string[]) => void,
): boolean {
  const c = context.clusterSize;
  const format = layer.format;
  let size = layer.virtualSize;
  /** Clusters any command touched: compressed writes go only to clusters without a host cluster. */
  const touched = new Set<number>();
  const touch = (offset: number, length: number) => {
    for (let k = Math.floor(offset / c); k * c < offset + length; k++) touched.add(k);
  };
  let batch: string[] = [];
  let compressed = false;
  const flush = () => {
    if (batch.length === 0) return;
    const args = ['-f', format];
    for (const command of batch) args.push('-c', command);
    log(['qemu-io', ...args, layer.file]);
    qemuIo(layer.file, batch, { cwd: dir, format });
    batch = [];
  };

  const offset = (): number => {
    const kind = r.weighted([
      ['uniform', 4],
      ['cluster', 3],
      ['end', 1.5],
      ['backing-end', context.backingSize !== undefined ? 1 : 0],
      ['l2', 1],
    ] as const);
    let at: number;
    if (kind === 'uniform') at = r.int(0, size - 1);
    else if (kind === 'cluster') at = r.int(0, Math.floor(size / c)) * c + r.pick([0, 0, r.int(-600, 600), r.int(-c, c)]);
    else if (kind === 'end') at = size - r.int(1, 3 * c);
    else if (kind === 'backing-end') at = context.backingSize! + r.int(-2 * c, 2 * c);
    else at = r.int(1, 4) * (c / 8) * c + r.int(-c, c);
    return Math.min(size - 1, Math.max(0, at));
  };
  const length = (at: number): number => {
    const kind = r.weighted([
      ['small', 4],
      ['clusters', 3],
      ['big', 1.5],
    ] as const);
    let n = kind === 'small' ? r.int(1, 2 * c) : kind === 'clusters' ? r.int(1, 4) * c : r.int(c, Math.max(c, Math.min(3 * MiB, 8 * c)));
    n = Math.min(n, sourceSize, size - at);
    return Math.max(1, n);
  };

  // Now and then a long sequence, for fragmented tables.
  const count = r.chance(0.12) ? r.int(20, 50) : r.int(3, 16);
  for (let i = 0; i < count; i++) {
    const op = r.weighted([
      ['pattern', 4],
      ['source', 3],
      ['zero', 2],
      ['zero-unmap', 1.5],
      ['discard', 2],
      ['compressed', context.compressedAllowed ? 2.5 : 0],
      ['aio', 1.2],
      ['snapshot', context.snapshotsAllowed && layer.snapshots.length < 3 ? 1.2 : 0],
      // Also after snapshots: a snapshot then records a smaller disk than the image has.
      // QEMU resizes no v2 image with snapshots.
      ['resize', context.resizeAllowed && context.snapshotsAllowed && (context.version === 3 || layer.snapshots.length === 0) ? 0.3 : 0],
    ] as const);
    layer.operations++;
    if (op === 'snapshot') {
      flush();
      const name = `snap-${layer.snapshots.length + 1}${r.pick(['', 'a', '.x'])}`;
      img(['snapshot', '-c', name, layer.file]);
      layer.snapshots.push(name);
      // Every cluster now has a host cluster shared with the snapshot.
      for (let k = 0; k * c < size; k++) touched.add(k);
      continue;
    }
    if (op === 'resize') {
      flush();
      const grown = size + r.int(1, 64) * 512 + (r.chance(0.5) ? r.int(1, 4) * c : 0);
      img(['resize', '-q', '-f', 'qcow2', layer.file, String(grown)]);
      size = grown;
      layer.virtualSize = grown;
      layer.changes.push(`resized to ${grown}${layer.snapshots.length ? ` after snapshot ${layer.snapshots[layer.snapshots.length - 1]}` : ''}`);
      continue;
    }
    if (op === 'compressed') {
      // Cluster-aligned, whole clusters (or the tail cluster up to the end), none touched before.
      const clusters = Math.ceil(size / c);
      const first = r.int(0, clusters - 1);
      let n = r.int(1, Math.max(1, Math.min(4, Math.floor((2 * MiB) / c))));
      while (n > 0 && Array.from({ length: n }, (_, j) => first + j).some((k) => k >= clusters || touched.has(k))) n--;
      if (n === 0) {
        layer.operations--;
        continue;
      }
      const at = first * c;
      const len = Math.min(n * c, size - at);
      if (len > sourceSize) continue;
      const data = r.weighted([
        ['-P', 2],
        ['text', 3],
        ['rand', 1],
      ] as const);
      const fill = data === '-P' ? `-P ${r.int(0, 255)}` : `-s ${data === 'text' ? sources.text : sources.rand}`;
      batch.push(`write -q -c ${fill} ${at} ${len}`);
      touch(at, len);
      compressed = true;
      continue;
    }
    if (op === 'aio') {
      // Concurrent writes, disjoint but often into the same clusters: allocations that wait on
      // each other. The bytes do not depend on the order they complete in; host offsets may.
      let at = offset();
      for (let n = r.int(2, 5); n > 0 && at < size; n--) {
        const len = Math.min(size - at, r.int(1, 2 * c));
        batch.push(r.chance(0.8) ? `aio_write -q -P ${r.int(0, 255)} ${at} ${len}` : `aio_write -q -z ${at} ${len}`);
        touch(at, len);
        at += len + r.pick([0, r.int(1, 512), r.int(1, c)]);
      }
      batch.push('aio_flush');
      continue;
    }
    const at = offset();
    const len = length(at);
    touch(at, len);
    if (op === 'pattern') batch.push(`write -q -P ${r.int(0, 255)} ${at} ${len}`);
    else if (op === 'source') batch.push(`write -q -s ${r.chance(0.5) ? sources.text : sources.rand} ${at} ${len}`);
    else if (op === 'zero') batch.push(`write -q -z ${at} ${len}`);
    else if (op === 'zero-unmap') batch.push(`write -q -z -u ${at} ${len}`);
    else batch.push(`discard -q ${at} ${len}`);
  }
  flush();
  return compressed;
}

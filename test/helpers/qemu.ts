/**
 * Test fixtures made with qemu-img and qemu-io, and qemu-img as the oracle.
 *
 * Every fixture is built at test time into its own folder under .cache/test-fixtures/ (gitignored),
 * named after a hash of this file and of its recipe, so a changed recipe rebuilds it and an unchanged
 * one is reused. Nothing here hard-codes expected bytes: expectations come from `qemu-img convert`,
 * `qemu-img info` and `qemu-img map`.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'vitest';
import type { ImageInfo, MapEntry } from '../../src/index';
import { prng } from './prng';

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** How a command ended, with its output as text. */
export interface Ran {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a command without blocking the event loop, so several can run at once. */
export function runAsync(command: string, args: readonly string[], cwd?: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => out.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => err.push(chunk));
    child.on('error', reject);
    child.on('close', (status, signal) => resolve({ status, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') }));
  });
}

/** `qemu-img check --output=json` count keys (absent means 0), each with ours. */
export const checkCountKeys: readonly [string, string][] = [
  ['corruptions', 'corruptions'],
  ['leaks', 'leaks'],
  ['check-errors', 'checkErrors'],
  ['image-end-offset', 'imageEndOffset'],
  ['total-clusters', 'totalClusters'],
  ['allocated-clusters', 'allocatedClusters'],
  ['fragmented-clusters', 'fragmentedClusters'],
  ['compressed-clusters', 'compressedClusters'],
];

/** A command's JSON output, or undefined where it printed none. */
export function parseJsonOutput(text: string): Record<string, unknown> | undefined {
  try {
    return JSON.parse(text) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

export const repoRoot = path.resolve(__dirname, '..', '..');
export const fixtureRoot = path.join(repoRoot, '.cache', 'test-fixtures');
export const cliPath = path.join(repoRoot, 'dist', 'cli', 'main.js');

// ---------------------------------------------------------------------------------------------
// Processes

export interface RunResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export function run(command: string, args: readonly string[], options: { cwd?: string } = {}): RunResult {
  const result = spawnSync(command, args, { cwd: options.cwd, encoding: 'utf8', maxBuffer: 256 * MiB });
  if (result.error) throw result.error;
  return { status: result.status, signal: result.signal, stdout: result.stdout, stderr: result.stderr };
}

function mustRun(command: string, args: readonly string[], cwd?: string): string {
  const result = run(command, args, cwd !== undefined ? { cwd } : {});
  if (result.status !== 0) {
    throw new Error(`${command} ${args.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr.trim()}`);
  }
  return result.stdout;
}

/** Runs qemu-img in `cwd` (the fixture folder, so that backing names stay relative). */
export function qemuImg(args: readonly string[], cwd?: string): string {
  return mustRun('qemu-img', args, cwd);
}

/**
 * qemu-img create of an encrypted image. Debian 12's qemu-img sizes LUKS key derivation by timing
 * 32768 PBKDF2 iterations with the thread's CPU time from getrusage, which the kernel updates in
 * steps, and gives up with "Unable to get accurate CPU usage" when that reads 0 ms. Here, on a
 * busy 2-core host, that is one create in ten with a 64-byte key and nearly one in two with a
 * 16-byte key (cast5-128, aes-128). That failure, and only it, is tried again, up to 20 times (a
 * failed try costs at most what a create does): the chance that all fail is about 1e-7.
 */
export function qemuImgCreateEncrypted(args: readonly string[], cwd?: string): string {
  for (let attempt = 1; ; attempt += 1) {
    const result = run('qemu-img', ['create', ...args], cwd !== undefined ? { cwd } : {});
    if (result.status === 0) return result.stdout;
    if (attempt === 20 || !result.stderr.includes('Unable to get accurate CPU usage')) {
      throw new Error(`qemu-img create ${args.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr.trim()}`);
    }
  }
}

/**
 * Runs qemu-io commands on an image. With `kill`, the last command is expected to kill
 * qemu-io (`sigraise 9`), leaving the image as a crashed QEMU would.
 */
export function qemuIo(image: string, commands: readonly string[], options: { cwd?: string; format?: 'qcow2' | 'raw'; kill?: boolean } = {}): void {
  const args = ['-f', options.format ?? 'qcow2'];
  for (const command of commands) args.push('-c', command);
  args.push(image);
  const result = run('qemu-io', args, options.cwd !== undefined ? { cwd: options.cwd } : {});
  const failed = options.kill ? result.signal !== 'SIGKILL' : result.status !== 0;
  // qemu-io prints failed commands on stderr or as "... failed: ..." on stdout.
  if (failed || /failed|error/i.test(result.stderr) || /failed:/i.test(result.stdout)) {
    throw new Error(`qemu-io ${args.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr.trim()} ${result.stdout.trim()}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Data

/** Deterministic incompressible bytes. */
export function randomBytes(seed: string, length: number): Buffer {
  const key = createHash('sha256').update(seed).digest();
  const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(length)), cipher.final()]);
}

/** Deterministic compressible bytes: text lines with some entropy. */
export function textBytes(seed: string, length: number): Buffer {
  const noise = randomBytes(`${seed}/text`, length);
  const out = Buffer.alloc(length);
  let at = 0;
  for (let line = 0; at < length; line++) {
    const prefix = `${seed} record ${String(line).padStart(7, '0')}: `;
    const text = Buffer.from(prefix + Array.from(noise.subarray(line * 24, line * 24 + 24), (b) => 'abcdefgh'[b & 7]).join('') + '\n');
    at += text.copy(out, at);
  }
  return out;
}

export interface Region {
  at: number;
  length: number;
  kind: 'random' | 'text' | 'fill' | 'zeros';
  byte?: number;
}

/** Writes a sparse raw file of `size` bytes holding `regions` (clipped to the size). */
export function writeRaw(file: string, size: number, seed: string, regions: readonly Region[]): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, 'r+');
  try {
    regions.forEach((region, index) => {
      const at = Math.max(0, Math.floor(region.at));
      const length = Math.min(Math.floor(region.length), size - at);
      if (length <= 0) return;
      const tag = `${seed}/${index}`;
      const data =
        region.kind === 'random'
          ? randomBytes(tag, length)
          : region.kind === 'text'
            ? textBytes(tag, length)
            : Buffer.alloc(length, region.kind === 'fill' ? (region.byte ?? 0xa5) : 0);
      fs.writeSync(fd, data, 0, length, at);
    });
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A mix of random, compressible, single-byte and explicitly zero regions at unaligned offsets,
 * placed relative to the cluster size near the start and relative to the disk size further on,
 * with data up to the last byte.
 */
export function mixedRegions(size: number, cluster: number): Region[] {
  const c = cluster;
  return [
    { at: 0, length: 3 * c + 123, kind: 'text' },
    { at: 5 * c - 700, length: 2 * c + 1400, kind: 'random' },
    { at: 9 * c + 17, length: 1, kind: 'fill', byte: 0x5a },
    { at: 11 * c, length: 4 * c, kind: 'zeros' },
    { at: 12 * c + 100, length: 50, kind: 'text' },
    { at: size * 0.21 + 4097, length: size * 0.05, kind: 'text' },
    { at: size * 0.3 - 3, length: size * 0.04, kind: 'random' },
    { at: size * 0.45, length: size * 0.02, kind: 'fill', byte: 0x6b },
    { at: size * 0.5 + 511, length: size * 0.03, kind: 'text' },
    { at: size * 0.6 + 1, length: 3, kind: 'fill', byte: 0xff },
    { at: size * 0.7 - 5000, length: size * 0.05, kind: 'random' },
    { at: size * 0.85, length: size * 0.02, kind: 'zeros' },
    { at: size - 2 * c - 333, length: 2 * c + 333, kind: 'text' },
    { at: size - 777, length: 777, kind: 'random' },
  ];
}

/** Patches big-endian bytes of a file in place. */
/**
 * A 10 MiB image with 128 KiB written, whose first data cluster's refcount is then set to 0:
 * a corruption, and its COPIED flag wrong (qemu-img check exits 2).
 */
export function makeCorruptRefcountImage(image: string): void {
  qemuImg(['create', '-q', '-f', 'qcow2', image, '10M']);
  qemuIo(image, ['write 0 128k']);
  const bytes = fs.readFileSync(image);
  const refcountBlock = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
  bytes.writeUInt16BE(0, refcountBlock + 2 * 4);
  fs.writeFileSync(image, bytes);
}

export function patchFile(file: string, offset: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

export function u64(value: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  return b;
}

/** ORs `mask` into the 64-bit header field at `offset` (72 incompatible, 80 compatible, 88 autoclear). */
export function setFeatureBits(file: string, offset: number, mask: bigint): void {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(8);
  fs.readSync(fd, b, 0, 8, offset);
  fs.closeSync(fd);
  patchFile(file, offset, u64(b.readBigUInt64BE(0) | mask));
}

/** Header extensions of a qcow2 file (or of its bytes) as [type, dataOffset, length]. */
export function headerExtensions(file: string | Buffer): { type: number; dataOffset: number; length: number }[] {
  let head: Buffer;
  if (typeof file === 'string') {
    head = Buffer.alloc(64 * KiB);
    const fd = fs.openSync(file, 'r');
    fs.readSync(fd, head, 0, head.length, 0);
    fs.closeSync(fd);
  } else {
    head = file;
  }
  const version = head.readUInt32BE(4);
  let at = version >= 3 ? head.readUInt32BE(100) : 72;
  const out: { type: number; dataOffset: number; length: number }[] = [];
  for (;;) {
    const type = head.readUInt32BE(at);
    const length = head.readUInt32BE(at + 4);
    if (type === 0) return out;
    out.push({ type, dataOffset: at + 8, length });
    at += 8 + Math.ceil(length / 8) * 8;
  }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

const helperHash = createHash('sha256').update(fs.readFileSync(__filename)).digest('hex');

/**
 * The folder of a fixture, built by `build(dir)` unless an identical recipe was built before.
 * Built in place (recipes may store absolute paths) and marked complete last.
 */
export function fixtureDir(name: string, build: (dir: string) => void): string {
  const key = createHash('sha256').update(helperHash).update(name).update(build.toString()).digest('hex').slice(0, 12);
  const dir = path.join(fixtureRoot, `${name}-${key}`);
  const marker = path.join(dir, '.complete');
  if (fs.existsSync(marker)) return dir;
  fs.mkdirSync(fixtureRoot, { recursive: true });
  for (const old of fs.readdirSync(fixtureRoot)) {
    if (old.startsWith(`${name}-`) && /^[0-9a-f]{12}$/.test(old.slice(name.length + 1))) {
      fs.rmSync(path.join(fixtureRoot, old), { recursive: true, force: true });
    }
  }
  fs.mkdirSync(dir, { recursive: true });
  build(dir);
  fs.writeFileSync(marker, new Date().toISOString());
  return dir;
}

export interface FixtureSpec {
  name: string;
  /** What the fixture covers. */
  title: string;
  /** The image's file name in its folder. */
  image: string;
  build: (dir: string) => void;
  /** Snapshots to load, each by the reference given (id or name). */
  snapshots?: readonly string[];
  /**
   * How qemu-img reads a snapshot: `convert -l` (which keeps the current disk size) or
   * `snapshot -a` on a copy (which also restores the size the snapshot recorded).
   */
  snapshotOracle?: 'convert' | 'apply';
  /** qemu-img info fields (dotted paths) that prove the fixture has its feature. */
  qemuInfo?: Record<string, unknown>;
  /** qemu-img check must count compressed clusters. */
  compressed?: boolean;
  /** Kinds of qemu-img map entries the fixture must have, each described by its name. */
  qemuMapHas?: Record<string, (entry: QemuMapEntry, clusterSize: number) => boolean>;
  /** A warning open() must give. */
  warning?: RegExp;
}

export interface Fixture {
  spec: FixtureSpec;
  dir: string;
  image: string;
}

export function prepare(spec: FixtureSpec): Fixture {
  const dir = fixtureDir(spec.name, spec.build);
  return { spec, dir, image: path.join(dir, spec.image) };
}

/**
 * qemu-img convert -O raw of an image (or of one of its snapshots), cached next to it; images are
 * never changed once built. Snapshots: `convert -l snapshot.id=N` or `snapshot.name=NAME`, or with
 * `oracle: 'apply'`, `qemu-img snapshot -a` on a copy and then convert.
 */
export function qemuConvert(image: string, snapshot?: string, oracle: 'convert' | 'apply' = 'convert'): string {
  const dir = path.dirname(image);
  const suffix = snapshot === undefined ? '' : `.snapshot-${oracle}-${snapshot.replace(/[^A-Za-z0-9_-]/g, '_')}`;
  const out = `${image}.qemu${suffix}.raw`;
  if (fs.existsSync(out)) return out;
  const temporary = `${out}.${process.pid}.tmp`;
  if (snapshot === undefined) {
    qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', image, temporary], dir);
  } else if (oracle === 'convert') {
    const param = /^\d+$/.test(snapshot) ? `snapshot.id=${snapshot}` : `snapshot.name=${snapshot}`;
    qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', '-l', param, image, temporary], dir);
  } else {
    const copy = `${temporary}.qcow2`;
    fs.copyFileSync(image, copy);
    try {
      qemuImg(['snapshot', '-a', snapshot, copy], dir);
      qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', copy, temporary], dir);
    } finally {
      fs.rmSync(copy, { force: true });
    }
  }
  fs.renameSync(temporary, out);
  return out;
}

/** qemuConvert of a catalog fixture, with the fixture's snapshot oracle. */
export function qemuRaw(fixture: Fixture, snapshot?: string): string {
  return qemuConvert(fixture.image, snapshot, fixture.spec.snapshotOracle ?? 'convert');
}

export type QemuInfo = Record<string, unknown>;

/** qemu-img info --output=json, run in the image's folder (see qemuMap). */
export function qemuInfo(image: string): QemuInfo {
  return JSON.parse(qemuImg(['info', '--output=json', image], path.dirname(image))) as QemuInfo;
}

export function qemuInfoChain(image: string): QemuInfo[] {
  return JSON.parse(qemuImg(['info', '--output=json', '--backing-chain', image], path.dirname(image))) as QemuInfo[];
}

export interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/**
 * qemu-img map --output=json. Run in the image's folder: QEMU 7.2 resolves a relative external
 * data file name against the current directory, not the image's.
 */
export function qemuMap(image: string, cwd: string): QemuMapEntry[] {
  return JSON.parse(qemuImg(['map', '--output=json', image], cwd)) as QemuMapEntry[];
}

/**
 * qemu-img map's human output: the data runs with host offsets, and the file holding each;
 * undefined where qemu-img refuses the human form (images with compressed clusters).
 */
export function qemuMapFiles(image: string, cwd: string): { start: number; length: number; offset: number; file: string }[] | undefined {
  const result = run('qemu-img', ['map', image], { cwd });
  if (result.status !== 0 && /compressed clusters/.test(result.stderr)) return undefined;
  if (result.status !== 0) throw new Error(`qemu-img map ${image} failed (${result.status}): ${result.stderr.trim()}`);
  const lines = result.stdout.trim().split('\n').slice(1);
  return lines
    .filter((line) => line.trim() !== '')
    .map((line) => {
      const match = /^(0x[0-9a-f]+|0)\s+(0x[0-9a-f]+|0)\s+(0x[0-9a-f]+|0)\s+(.+)$/.exec(line.trim());
      if (!match) throw new Error(`cannot parse qemu-img map line: ${line}`);
      return { start: Number(match[1]), length: Number(match[2]), offset: Number(match[3]), file: match[4]! };
    });
}

export function qemuCheck(image: string): Record<string, unknown> {
  // Exit status 3 means leaked clusters (a dirty image); the JSON is still printed.
  const result = run('qemu-img', ['check', '--output=json', image], { cwd: path.dirname(image) });
  if (result.status !== 0 && result.status !== 3) throw new Error(`qemu-img check ${image} failed (${result.status}): ${result.stderr}`);
  return JSON.parse(result.stdout) as Record<string, unknown>;
}

export function field(object: unknown, dotted: string): unknown {
  let value = object;
  for (const key of dotted.split('.')) value = (value as Record<string, unknown> | undefined)?.[key];
  return value;
}

// ---------------------------------------------------------------------------------------------
// Comparisons

/** Index of the first differing byte, -1 when equal (a length difference counts at the shorter end). */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  if (a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))) return -1;
  const step = 64 * KiB;
  for (let at = 0; at < n; at += step) {
    const end = Math.min(n, at + step);
    if (!Buffer.from(a.buffer, a.byteOffset + at, end - at).equals(Buffer.from(b.buffer, b.byteOffset + at, end - at))) {
      for (let i = at; i < end; i++) if (a[i] !== b[i]) return i;
    }
  }
  return n;
}

/** Asserts two files have the same length and bytes, naming the first difference. */
export function expectSameFile(actualPath: string, expectedPath: string): void {
  const actual = fs.readFileSync(actualPath);
  const expected = fs.readFileSync(expectedPath);
  expect(actual.length, `${actualPath} has the size of ${expectedPath}`).toBe(expected.length);
  expect(firstDifference(actual, expected), `first byte of ${actualPath} that differs from ${expectedPath}`).toBe(-1);
}

export function sha256File(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

const versionOfCompat: Record<string, number> = { '0.10': 2, '1.1': 3 };

/**
 * Asserts that qcow2img's ImageInfo agrees with `qemu-img info --output=json` on every field both
 * describe; a field qemu-img leaves out must be absent (or default) on our side too.
 * `cwd` is where qemu-img ran (its relative names resolve against it).
 */
export function expectInfoAgrees(ours: ImageInfo, qemu: QemuInfo, cwd: string): void {
  const what = `info of ${ours.filename}`;
  expect(fs.realpathSync(path.resolve(ours.filename)), `${what}: filename`).toBe(fs.realpathSync(path.resolve(cwd, qemu['filename'] as string)));
  expect(ours.format, `${what}: format`).toBe(qemu['format']);
  expect(ours.virtualSize, `${what}: virtual-size`).toBe(qemu['virtual-size']);
  expect(ours.allocatedBytes, `${what}: actual-size`).toBe(qemu['actual-size']);
  expect(ours.clusterSize, `${what}: cluster-size`).toBe(qemu['cluster-size']);
  expect(ours.dirty ?? false, `${what}: dirty-flag`).toBe(qemu['dirty-flag'] ?? false);
  expect(ours.backingFile, `${what}: backing-filename`).toBe(qemu['backing-filename']);
  expect(ours.backingFormat, `${what}: backing-filename-format`).toBe(qemu['backing-filename-format']);
  if (qemu['full-backing-filename'] !== undefined) {
    expect(ours.fullBackingFile, `${what}: full-backing-filename`).toBe(path.resolve(cwd, qemu['full-backing-filename'] as string));
  } else {
    expect(ours.fullBackingFile, `${what}: full-backing-filename`).toBeUndefined();
  }
  if (ours.format === 'qcow2') {
    const data = field(qemu, 'format-specific.data') as Record<string, unknown>;
    expect(field(qemu, 'format-specific.type'), `${what}: format-specific.type`).toBe('qcow2');
    expect(ours.version, `${what}: compat`).toBe(versionOfCompat[data['compat'] as string]);
    expect(ours.compressionType, `${what}: compression-type`).toBe(data['compression-type']);
    expect(ours.refcountBits, `${what}: refcount-bits`).toBe(data['refcount-bits']);
    if (ours.version === 3) {
      // qemu-img leaves these out for compat 0.10 only.
      expect(ours.lazyRefcounts, `${what}: lazy-refcounts`).toBe(data['lazy-refcounts']);
      expect(ours.corrupt, `${what}: corrupt`).toBe(data['corrupt']);
      expect(ours.extendedL2, `${what}: extended-l2`).toBe(data['extended-l2']);
    } else {
      expect(data['lazy-refcounts'], `${what}: qemu-img lazy-refcounts for compat 0.10`).toBeUndefined();
      expect([ours.lazyRefcounts, ours.corrupt, ours.extendedL2], `${what}: v2 feature flags`).toEqual([false, false, false]);
    }
    expect(ours.dataFile, `${what}: data-file`).toBe(data['data-file']);
    expect(ours.dataFileRaw, `${what}: data-file-raw`).toBe(data['data-file-raw']);
    expect(ours.encrypted ?? false, `${what}: encrypted`).toBe(qemu['encrypted'] ?? false);
    const snapshots = (qemu['snapshots'] ?? []) as Record<string, number | string>[];
    expect(
      (ours.snapshots ?? []).map((s) => ({
        id: s.id,
        name: s.name,
        vmStateSize: s.vmStateSize,
        dateSec: s.dateSec,
        dateNsec: s.dateNsec,
        vmClockNsec: s.vmClockNsec,
        icount: s.icount,
      })),
      `${what}: snapshots`,
    ).toEqual(
      snapshots.map((s) => ({
        id: s['id'],
        name: s['name'],
        vmStateSize: s['vm-state-size'],
        dateSec: s['date-sec'],
        dateNsec: s['date-nsec'],
        vmClockNsec: (s['vm-clock-sec'] as number) * 1e9 + (s['vm-clock-nsec'] as number),
        icount: s['icount'] ?? -1,
      })),
    );
  }
}

/** Our map entries in qemu-img map --output=json form (no filename: 7.2 does not print it in JSON). */
export function comparableMap(entries: readonly MapEntry[]): QemuMapEntry[] {
  return entries.map((e) => {
    const out: QemuMapEntry = { start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data };
    if (e.offset !== undefined) out.offset = e.offset;
    return out;
  });
}

/** Asserts our map equals qemu-img map entry by entry, and that data runs name the same files. */
export function expectMapAgrees(entries: readonly MapEntry[], image: string, cwd: string): void {
  const expected = qemuMap(image, cwd).map((e) => {
    const out: QemuMapEntry = { start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data };
    if (e.offset !== undefined) out.offset = e.offset;
    return out;
  });
  expect(comparableMap(entries), `map of ${image}`).toEqual(expected);
  // The human form names the file of each data run that has a host offset and is not known to be zero.
  const ours = entries.filter((e) => e.data && !e.zero && e.offset !== undefined);
  const files = qemuMapFiles(image, cwd);
  const real = (file: string | undefined) => (file === undefined ? '(none)' : fs.realpathSync(path.resolve(cwd, file)));
  if (files) {
    expect(
      ours.map((e) => ({ start: e.start, length: e.length, offset: e.offset, file: real(e.filename) })),
      `files of the data runs in the map of ${image}`,
    ).toEqual(files.map((f) => ({ start: f.start, length: f.length, offset: f.offset, file: real(f.file) })));
  } else {
    // qemu-img has no human map of images with compressed clusters: each run at depth d must
    // name the file qemu-img info --backing-chain gives for that depth.
    const chain = qemuInfoChain(image);
    for (const e of entries.filter((entry) => entry.offset !== undefined)) {
      const info = chain[e.depth]!;
      const dataFile = field(info, 'format-specific.data.data-file') as string | undefined;
      const dirOf = path.dirname(real(info['filename'] as string));
      expect(real(e.filename), `file of the map entry at ${e.start}`).toBe(dataFile !== undefined ? real(path.resolve(dirOf, dataFile)) : real(info['filename'] as string));
    }
  }
  // Every entry with an offset names a file, and only those.
  for (const e of entries) expect(e.filename !== undefined, `filename of the map entry at ${e.start}`).toBe(e.offset !== undefined);
}

/** Guest ranges worth reading on their own: unaligned, across clusters and L2 tables, at and past the end. */
export function interestingReads(virtualSize: number, clusterSize: number, l2Span: number, seed: number): { offset: number; length: number }[] {
  const c = clusterSize;
  const reads = [
    { offset: 0, length: 1 },
    { offset: 1, length: 511 },
    { offset: 511, length: 2 },
    { offset: c - 1, length: 2 },
    { offset: c - 7, length: c + 14 },
    { offset: 3 * c + 4097, length: 2 * c + 3 },
    { offset: Math.floor(virtualSize / 2) + 13, length: 100_003 },
    { offset: virtualSize - 1, length: 1 },
    { offset: virtualSize - c - 5, length: c + 5 },
  ];
  for (let boundary = l2Span; boundary < virtualSize && reads.length < 20; boundary += l2Span) {
    reads.push({ offset: boundary - 3, length: 10 }, { offset: boundary - c - 1, length: 2 * c + 2 });
  }
  const random = prng(seed);
  for (let i = 0; i < 12; i++) {
    const offset = Math.floor(random() * virtualSize);
    reads.push({ offset, length: 1 + Math.floor(random() * Math.min(3 * c, 2 * MiB)) });
  }
  return reads.filter((r) => r.offset < virtualSize && r.length > 0).map((r) => ({ offset: r.offset, length: Math.min(r.length, virtualSize - r.offset) }));
}

// ---------------------------------------------------------------------------------------------
// The catalog: one fixture per feature.

function convertMixed(dir: string, image: string, size: number, cluster: number, options: readonly string[], seed = image): void {
  const source = path.join(dir, `${image}.source.raw`);
  writeRaw(source, size, seed, mixedRegions(size, cluster));
  qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', ...options, source, image], dir);
  fs.rmSync(source);
}

/** A pattern file of random bytes for `write -s`. */
function patternFile(dir: string, name: string, length: number): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, randomBytes(name, length));
  return name;
}

/** qemu-img map entries worth having in a fixture. */
export const mapKinds = {
  data: (e: QemuMapEntry) => e.data && !e.zero && e.offset !== undefined,
  unallocated: (e: QemuMapEntry) => !e.present && e.zero,
  zeroPlain: (e: QemuMapEntry) => e.present && e.zero && !e.data && e.offset === undefined,
  zeroAllocated: (e: QemuMapEntry) => e.present && e.zero && !e.data && e.offset !== undefined,
  compressed: (e: QemuMapEntry) => e.data && e.offset === undefined,
  unalignedStart: (e: QemuMapEntry, c: number) => e.start % c !== 0,
} as const;

const basicMap = { data: mapKinds.data, unallocated: mapKinds.unallocated, 'zero cluster': mapKinds.zeroPlain, 'zero cluster with a host cluster': mapKinds.zeroAllocated };

export const catalog: readonly FixtureSpec[] = [
  {
    name: 'v3-64k',
    title: 'v3 (compat 1.1), 64 KiB clusters: converted random/text/zero regions, then pattern, random, zero and discard writes',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.compat': '1.1', 'cluster-size': 65536 },
    qemuMapHas: basicMap,
    build(dir) {
      const size = 40 * MiB + 4608;
      convertMixed(dir, 'image.qcow2', size, 64 * KiB, ['-o', 'compat=1.1']);
      const rand = patternFile(dir, 'rand.bin', 512 * KiB);
      qemuIo('image.qcow2', [
        'write -P 0xab 0 64k',
        'write -P 0x11 70001 3001',
        `write -s ${rand} 200000 300000`,
        'write -z 2M 192k',
        'write -z -u 3M 128k',
        'write -z 4195304 5000',
        'discard 5M 256k',
        'discard 6292480 3000',
        'write -P 0x5c 10M 1M',
        'write -z 10M 64k',
        'discard 10944k 64k',
        `write -P 0xee ${size - 4608} 4608`,
      ], { cwd: dir });
    },
  },
  {
    name: 'v2-16k',
    title: 'v2 (compat 0.10), 16 KiB clusters: writes, zero writes and discards straddling an L2 table boundary',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.compat': '0.10', 'cluster-size': 16384 },
    qemuMapHas: {
      data: mapKinds.data,
      unallocated: mapKinds.unallocated,
      'data up to the L2 boundary at 32 MiB': (e) => e.data && e.start < 32 * MiB && e.start + e.length >= 32 * MiB,
      'data from the L2 boundary at 32 MiB': (e) => e.data && e.start <= 32 * MiB && e.start + e.length > 32 * MiB,
    },
    build(dir) {
      const size = 48 * MiB + 512;
      convertMixed(dir, 'image.qcow2', size, 16 * KiB, ['-o', 'compat=0.10,cluster_size=16k']);
      const rand = patternFile(dir, 'rand.bin', 256 * KiB);
      qemuIo('image.qcow2', [
        `write -z ${32 * MiB - 16 * KiB} 48k`,
        `write -P 0x42 ${32 * MiB - 5000} 12000`,
        `write -z ${32 * MiB - 2000} 1000`,
        `write -s ${rand} ${32 * MiB + 100 * KiB + 3} 200000`,
        'write -z 16M 64k',
        'discard 20M 64k',
        'write -P 0x43 1000 20000',
        'write -z 2000 1000',
        `write -P 0x44 ${size - 512} 512`,
      ], { cwd: dir });
    },
  },
  {
    name: 'zlib',
    title: 'zlib-compressed clusters (convert -c), partly overwritten, zeroed and discarded, plus qemu-io compressed writes',
    image: 'image.qcow2',
    compressed: true,
    qemuInfo: { 'format-specific.data.compression-type': 'zlib' },
    qemuMapHas: { compressed: mapKinds.compressed, data: mapKinds.data, 'zero cluster': (e) => e.present && e.zero, unallocated: mapKinds.unallocated },
    build(dir) {
      const size = 30 * MiB + 3584;
      convertMixed(dir, 'image.qcow2', size, 64 * KiB, ['-c']);
      qemuIo('image.qcow2', [
        `write -P 0x77 ${3 * 64 * KiB + 1000} 2000`,
        `write -z ${10 * 64 * KiB} 64k`,
        `discard ${20 * 64 * KiB} 128k`,
        'write -c -P 0x33 25M 128k',
      ], { cwd: dir });
    },
  },
  {
    name: 'zstd',
    title: 'zstd-compressed clusters (convert -c -o compression_type=zstd), partly overwritten, zeroed and discarded',
    image: 'image.qcow2',
    compressed: true,
    qemuInfo: { 'format-specific.data.compression-type': 'zstd' },
    qemuMapHas: { compressed: mapKinds.compressed, data: mapKinds.data, 'zero cluster': (e) => e.present && e.zero, unallocated: mapKinds.unallocated },
    build(dir) {
      const size = 30 * MiB + 3584;
      convertMixed(dir, 'image.qcow2', size, 64 * KiB, ['-c', '-o', 'compression_type=zstd']);
      qemuIo('image.qcow2', [
        `write -P 0x77 ${3 * 64 * KiB + 1000} 2000`,
        `write -z ${10 * 64 * KiB} 64k`,
        `discard ${20 * 64 * KiB} 128k`,
        'write -c -P 0x33 25M 128k',
      ], { cwd: dir });
    },
  },
  {
    name: 'zstd-2m',
    title: '2 MiB clusters, zstd-compressed, one compressed cluster partly overwritten',
    image: 'image.qcow2',
    compressed: true,
    qemuInfo: { 'format-specific.data.compression-type': 'zstd', 'cluster-size': 2 * MiB },
    qemuMapHas: { compressed: mapKinds.compressed, data: mapKinds.data },
    build(dir) {
      const size = 21 * MiB + 512;
      convertMixed(dir, 'image.qcow2', size, 2 * MiB, ['-c', '-o', 'cluster_size=2M,compression_type=zstd']);
      qemuIo('image.qcow2', [`write -P 0x29 ${4 * MiB + 12345} 7000`], { cwd: dir });
    },
  },
  {
    name: 'extended-l2',
    title: 'extended L2 entries, 128 KiB clusters: subcluster writes, zero writes and discards',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.extended-l2': true, 'cluster-size': 128 * KiB },
    qemuMapHas: {
      'data in part of a cluster': (e, c) => mapKinds.data(e) && (e.start % c !== 0 || e.length % c !== 0),
      'zero subclusters without a host cluster': (e, c) => mapKinds.zeroPlain(e) && (e.start % c !== 0 || e.length % c !== 0),
      'zero subclusters with a host cluster': (e, c) => mapKinds.zeroAllocated(e) && (e.start % c !== 0 || e.length % c !== 0),
      'unallocated subclusters of an allocated cluster': (e) => !e.present && e.offset !== undefined,
      unallocated: mapKinds.unallocated,
    },
    build(dir) {
      const size = 24 * MiB + 2560;
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', 'image.qcow2', String(size)], dir);
      const rand = patternFile(dir, 'rand.bin', 512 * KiB);
      qemuIo('image.qcow2', [
        'write -P 0x10 0 4k',
        'write -P 0x11 12k 5000',
        `write -s ${rand} 100k 300k`,
        'write -z 104k 8k',
        'write -z 512k 8k',
        'write -z 1M 256k',
        'write -P 0x12 2M 128k',
        'discard 2M 128k',
        'write -P 0x13 3M 128k',
        'write -z -u 3104k 16k',
        'write -P 0x16 4M 128k',
        'discard 4M 64k',
        'write -z -u 5M 128k',
        'write -P 0x17 6000k 4k',
        'write -z 6004k 4k',
        'write -P 0x18 6008k 4k',
        `write -P 0x15 ${16 * MiB - 3000} 6000`,
        `write -P 0x14 ${size - 2560} 2560`,
      ], { cwd: dir });
    },
  },
  {
    name: 'extended-l2-backing',
    title: 'extended L2 overlay on a qcow2 backing file: unallocated subclusters read through, zero subclusters hide it',
    image: 'top.qcow2',
    qemuInfo: { 'format-specific.data.extended-l2': true, 'backing-filename': 'base.qcow2' },
    qemuMapHas: {
      'backing data between overlay subclusters': (e, c) => e.depth === 1 && e.data && e.start % c !== 0,
      'zero subclusters hiding backing data': (e, c) => e.depth === 0 && e.present && e.zero && e.start % c !== 0,
      'overlay data': (e) => e.depth === 0 && mapKinds.data(e),
    },
    build(dir) {
      const size = 8 * MiB;
      convertMixed(dir, 'base.qcow2', size, 64 * KiB, []);
      qemuIo('base.qcow2', ['write -P 0xb1 1M 2M', 'write -P 0xb2 5M 1M'], { cwd: dir });
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', 'top.qcow2', String(size + 4096)], dir);
      qemuIo('top.qcow2', [
        'write -P 0x01 0 4k',
        'write -P 0x02 1028k 5000',
        'write -z 1100k 12k',
        'write -z 1200k 4k',
        'write -z -u 2M 128k',
        'discard 2304k 128k',
        'write -P 0x03 5M 4k',
        'write -z 5124k 4k',
        'write -P 0x04 7M 300k',
        `write -P 0x05 ${size} 4096`,
      ], { cwd: dir });
    },
  },
  {
    name: 'cluster-512',
    title: '512-byte clusters (an L2 table covers 32 KiB): runs straddling many L2 tables',
    image: 'image.qcow2',
    qemuInfo: { 'cluster-size': 512 },
    qemuMapHas: {
      ...basicMap,
      'data up to an L2 boundary (every 32 KiB)': (e) => e.data && e.start % 32768 !== 0 && (e.start + e.length) % 32768 === 0,
      'data from an L2 boundary': (e) => e.data && e.start % 32768 === 0 && e.length % 32768 !== 0,
    },
    build(dir) {
      const size = 3 * MiB + 1536;
      convertMixed(dir, 'image.qcow2', size, 512, ['-o', 'cluster_size=512']);
      const rand = patternFile(dir, 'rand.bin', 128 * KiB);
      qemuIo('image.qcow2', [
        'write -P 0x21 32668 200',
        'write -z 64836 1400',
        'discard 98304 4096',
        `write -s ${rand} 100000 70000`,
        'write -z -u 200k 64k',
        'write -P 0x24 300k 8k',
        'write -z 300k 4k',
        'write -z 400k 4k',
        'write -P 0x22 2M 33000',
        `write -P 0x23 ${size - 1000} 1000`,
      ], { cwd: dir });
    },
  },
  {
    name: 'cluster-4k',
    title: '4 KiB clusters (an L2 table covers 2 MiB): writes and zeros across L2 boundaries',
    image: 'image.qcow2',
    qemuInfo: { 'cluster-size': 4096 },
    qemuMapHas: {
      ...basicMap,
      'data up to an L2 boundary (every 2 MiB)': (e) => e.data && e.start % (2 * MiB) !== 0 && (e.start + e.length) % (2 * MiB) === 0,
      'data from an L2 boundary': (e) => e.data && e.start % (2 * MiB) === 0 && e.length % (2 * MiB) !== 0,
    },
    build(dir) {
      const size = 9 * MiB + 512;
      convertMixed(dir, 'image.qcow2', size, 4 * KiB, ['-o', 'cluster_size=4k']);
      const rand = patternFile(dir, 'rand.bin', 256 * KiB);
      qemuIo('image.qcow2', [
        `write -P 0x31 ${2 * MiB - 3000} 6000`,
        `write -z ${4 * MiB - 8 * KiB} 16k`,
        `write -s ${rand} ${6 * MiB - 100 * KiB + 1} 200k`,
        `discard ${8 * MiB - 4 * KiB} 8k`,
        'write -P 0x33 1M 64k',
        'write -z 1M 16k',
        'write -z 1536k 16k',
        `write -P 0x32 ${size - 512} 512`,
      ], { cwd: dir });
    },
  },
  {
    name: 'cluster-2m',
    title: '2 MiB clusters, uncompressed: partial writes, zero writes, a size not a multiple of the cluster',
    image: 'image.qcow2',
    qemuInfo: { 'cluster-size': 2 * MiB },
    qemuMapHas: { data: mapKinds.data, 'zero cluster': (e) => e.present && e.zero, unallocated: mapKinds.unallocated },
    build(dir) {
      const size = 13 * MiB + 1024;
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', 'image.qcow2', String(size)], dir);
      const rand = patternFile(dir, 'rand.bin', 64 * KiB);
      qemuIo('image.qcow2', [
        'write -P 0x41 1000 5000',
        'write -z 2M 2M',
        'write -z 4100k 8k',
        `write -s ${rand} ${6 * MiB - 1000} 3000`,
        'write -P 0x42 8M 2M',
        'write -z 9M 4k',
        'discard 10M 2M',
        `write -P 0x43 ${size - 1024} 1024`,
      ], { cwd: dir });
    },
  },
  {
    name: 'refcount-1',
    title: 'refcount_bits=1',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.refcount-bits': 1 },
    qemuMapHas: { data: mapKinds.data, unallocated: mapKinds.unallocated, 'zero cluster with a host cluster': mapKinds.zeroAllocated },
    build(dir) {
      const size = 16 * MiB + 3072;
      convertMixed(dir, 'image.qcow2', size, 64 * KiB, ['-o', 'refcount_bits=1']);
      qemuIo('image.qcow2', ['write -P 0x51 1M 100k', 'write -P 0x52 2M 128k', 'write -z 2M 64k', 'write -z 4M 64k', 'discard 3M 128k'], { cwd: dir });
    },
  },
  {
    name: 'refcount-64',
    title: 'refcount_bits=64',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.refcount-bits': 64 },
    qemuMapHas: { data: mapKinds.data, unallocated: mapKinds.unallocated, 'zero cluster with a host cluster': mapKinds.zeroAllocated },
    build(dir) {
      const size = 16 * MiB + 3072;
      convertMixed(dir, 'image.qcow2', size, 64 * KiB, ['-o', 'refcount_bits=64']);
      qemuIo('image.qcow2', ['write -P 0x61 1M 100k', 'write -P 0x62 2M 128k', 'write -z 2M 64k', 'write -z 4M 64k', 'discard 3M 128k'], { cwd: dir });
    },
  },
  {
    name: 'lazy-refcounts',
    title: 'lazy_refcounts=on, closed cleanly',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.lazy-refcounts': true, 'dirty-flag': false },
    build(dir) {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'image.qcow2', String(16 * MiB)], dir);
      qemuIo('image.qcow2', ['write -P 0x71 100k 300k', 'write -z 1M 64k', 'write -P 0x72 15M 1M', 'discard 15M 64k'], { cwd: dir });
    },
  },
  {
    name: 'prealloc-metadata',
    title: 'preallocation=metadata (every cluster mapped, the file sparse), then writes',
    image: 'image.qcow2',
    qemuMapHas: { 'preallocated data reading as zero': (e) => e.data && e.zero, data: mapKinds.data },
    build(dir) {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'image.qcow2', String(16 * MiB)], dir);
      qemuIo('image.qcow2', ['write -P 0x81 100k 300k', 'write -z 1M 64k', 'write -P 0x82 8M 4k'], { cwd: dir });
    },
  },
  {
    name: 'prealloc-falloc',
    title: 'preallocation=falloc, then writes',
    image: 'image.qcow2',
    build(dir) {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=falloc', 'image.qcow2', String(16 * MiB)], dir);
      qemuIo('image.qcow2', ['write -P 0x83 100k 300k', 'write -z 1M 64k', 'write -P 0x84 8M 4k'], { cwd: dir });
    },
  },
  {
    name: 'prealloc-full',
    title: 'preallocation=full, then writes',
    image: 'image.qcow2',
    build(dir) {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=full', 'image.qcow2', String(16 * MiB)], dir);
      qemuIo('image.qcow2', ['write -P 0x85 100k 300k', 'write -z 1M 64k', 'write -P 0x86 8M 4k'], { cwd: dir });
    },
  },
  {
    name: 'data-file',
    title: 'external data file (data_file=image.data)',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.data-file': 'image.data', 'format-specific.data.data-file-raw': false },
    qemuMapHas: { data: mapKinds.data, 'zero cluster': (e) => e.present && e.zero },
    build(dir) {
      const size = 16 * MiB + 512;
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=image.data', 'image.qcow2', String(size)], dir);
      const rand = patternFile(dir, 'rand.bin', 256 * KiB);
      qemuIo('image.qcow2', [
        'write -P 0x91 0 100k',
        `write -s ${rand} 1000000 200000`,
        'write -z 2M 128k',
        'write -P 0x92 4M 1M',
        'write -z 4M 64k',
        'discard 4352k 64k',
        `write -P 0x93 ${size - 512} 512`,
      ], { cwd: dir });
    },
  },
  {
    name: 'data-file-raw',
    title: 'external data file with data_file_raw=on',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.data-file': 'image.data', 'format-specific.data.data-file-raw': true },
    qemuMapHas: { data: mapKinds.data },
    build(dir) {
      const size = 16 * MiB + 512;
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=image.data,data_file_raw=on', 'image.qcow2', String(size)], dir);
      const rand = patternFile(dir, 'rand.bin', 256 * KiB);
      qemuIo('image.qcow2', [
        'write -P 0xa1 0 100k',
        `write -s ${rand} 1000000 200000`,
        'write -z 2M 128k',
        'write -P 0xa2 4M 1M',
        'write -z 4M 64k',
        `write -P 0xa3 ${size - 512} 512`,
      ], { cwd: dir });
    },
  },
  {
    name: 'data-file-extended-l2',
    title: 'external data file with extended L2 entries: cluster 0 at host offset 0 (COPIED), subclusters',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.data-file': 'image.data', 'format-specific.data.extended-l2': true },
    qemuMapHas: {
      'data at host offset 0': (e) => mapKinds.data(e) && e.offset === 0,
      'unallocated subclusters of cluster 0': (e) => !e.present && e.offset !== undefined && e.offset < 128 * KiB,
      'zero subclusters with a host cluster': (e, c) => mapKinds.zeroAllocated(e) && e.start % c !== 0,
    },
    build(dir) {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=image.data,extended_l2=on,cluster_size=128k', 'image.qcow2', String(4 * MiB + 512)], dir);
      qemuIo('image.qcow2', ['write -P 0xb1 0 4k', 'write -P 0xb2 64k 8k', 'write -P 0xb3 1M 128k', 'write -z 1060k 8k', 'write -P 0xb4 3M 5000'], { cwd: dir });
    },
  },
  {
    name: 'chain-3',
    title: '3-deep backing chain base <- mid <- top (each -F qcow2) with writes, zero writes and discards at every level',
    image: 'top.qcow2',
    qemuInfo: { 'backing-filename': 'mid.qcow2', 'backing-filename-format': 'qcow2' },
    qemuMapHas: {
      'top data': (e) => e.depth === 0 && mapKinds.data(e),
      'mid data': (e) => e.depth === 1 && mapKinds.data(e),
      'base data': (e) => e.depth === 2 && mapKinds.data(e),
      'top zeros hiding the chain': (e) => e.depth === 0 && e.present && e.zero,
      'mid zeros hiding base': (e) => e.depth === 1 && e.present && e.zero,
      'base zeros': (e) => e.depth === 2 && e.present && e.zero,
      'past the end of base': (e) => e.depth === 1 && !e.present && e.start >= 24 * MiB,
    },
    build(dir) {
      const rand = patternFile(dir, 'rand.bin', 256 * KiB);
      convertMixed(dir, 'base.qcow2', 24 * MiB, 64 * KiB, []);
      qemuIo('base.qcow2', ['write -P 0xc1 1M 3M', `write -s ${rand} 6M 200k`, 'write -z 2M 64k', 'discard 3M 128k', 'write -P 0xc2 20M 2M'], { cwd: dir });
      // mid is larger than base and has other clusters.
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=16k', 'mid.qcow2', String(28 * MiB + 1024)], dir);
      qemuIo('mid.qcow2', [
        'write -P 0xd1 1500k 100k',
        'write -z 2500k 48k',
        'write -z -u 2600k 32k',
        'discard 1M 64k',
        'discard 20M 256k',
        'write -P 0xd2 23M 2M',
        `write -P 0xd3 ${28 * MiB} 1024`,
      ], { cwd: dir });
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', String(32 * MiB)], dir);
      qemuIo('top.qcow2', [
        'write -P 0xe1 1536k 64k',
        `write -s ${rand} 3000000 100000`,
        'write -z 1600k 64k',
        'write -z -u 6M 64k',
        'discard 20544k 64k',
        'discard 23M 128k',
        'write -P 0xe2 31M 100k',
      ], { cwd: dir });
    },
  },
  {
    name: 'raw-backing',
    title: 'raw backing file (sparse, size not a multiple of 512) shorter than its overlay',
    image: 'top.qcow2',
    qemuInfo: { 'backing-filename': 'base.raw', 'backing-filename-format': 'raw' },
    qemuMapHas: {
      'raw data': (e) => e.depth === 1 && mapKinds.data(e),
      'raw holes': (e) => e.depth === 1 && e.zero && e.offset !== undefined,
      'past the end of the raw file': (e) => e.depth === 0 && !e.present && e.start >= 5 * MiB,
      'overlay zeros hiding raw data': (e) => e.depth === 0 && e.present && e.zero,
    },
    build(dir) {
      const baseSize = 5 * MiB + 1000;
      writeRaw(path.join(dir, 'base.raw'), baseSize, 'raw-backing', [
        { at: 0, length: 100 * KiB, kind: 'random' },
        { at: 1 * MiB + 7, length: 300 * KiB, kind: 'text' },
        { at: 3 * MiB, length: 1 * MiB, kind: 'fill', byte: 0x3c },
        { at: baseSize - 3000, length: 3000, kind: 'random' },
      ]);
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'top.qcow2', String(16 * MiB)], dir);
      qemuIo('top.qcow2', [
        'write -P 0xf1 64k 64k',
        'write -z 1M 64k',
        'discard 3M 128k',
        `write -P 0xf2 ${5 * MiB - 100} 8000`,
        'write -P 0xf3 10M 1M',
      ], { cwd: dir });
    },
  },
  {
    name: 'v2-backing',
    title: 'v2 overlay on a qcow2 backing file: zero writes and discards written as real zeros',
    image: 'top.qcow2',
    qemuInfo: { 'format-specific.data.compat': '0.10', 'backing-filename': 'base.qcow2' },
    qemuMapHas: { 'overlay data': (e) => e.depth === 0 && mapKinds.data(e), 'backing data': (e) => e.depth === 1 && mapKinds.data(e) },
    build(dir) {
      convertMixed(dir, 'base.qcow2', 8 * MiB, 64 * KiB, []);
      qemuIo('base.qcow2', ['write -P 0x9b 0 8M'], { cwd: dir });
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'compat=0.10', 'top.qcow2', String(8 * MiB)], dir);
      qemuIo('top.qcow2', ['write -P 0x9c 100k 10k', 'write -z 1M 128k', 'discard 2M 128k', 'write -z 3000000 5000'], { cwd: dir });
    },
  },
  {
    name: 'snapshots',
    title: 'internal snapshots taken between writes, zero writes and discards',
    image: 'image.qcow2',
    snapshots: ['first', '1', 'second', '2'],
    qemuInfo: { 'snapshots.0.name': 'first', 'snapshots.1.name': 'second' },
    build(dir) {
      const size = 16 * MiB + 1536;
      convertMixed(dir, 'image.qcow2', size, 64 * KiB, []);
      qemuImg(['snapshot', '-c', 'first', 'image.qcow2'], dir);
      qemuIo('image.qcow2', ['write -P 0x1f 0 1M', 'write -z 2M 256k', 'discard 4M 1M', 'write -P 0x2f 7777777 3333'], { cwd: dir });
      qemuImg(['snapshot', '-c', 'second', 'image.qcow2'], dir);
      qemuIo('image.qcow2', ['write -P 0x3f 512k 1M', 'write -z 0 64k', 'discard 8M 2M', `write -P 0x4f ${size - 1536} 1536`], { cwd: dir });
    },
  },
  {
    name: 'snapshot-resized',
    title: 'a snapshot taken before the disk grew: read with the size it recorded (qemu-img snapshot -a)',
    image: 'image.qcow2',
    snapshots: ['small', 'grown'],
    snapshotOracle: 'apply',
    qemuInfo: { 'snapshots.0.name': 'small' },
    build(dir) {
      qemuImg(['create', '-q', '-f', 'qcow2', 'image.qcow2', String(4 * MiB)], dir);
      qemuIo('image.qcow2', ['write -P 0x1a 0 1M', `write -P 0x1b ${4 * MiB - 4096} 4096`], { cwd: dir });
      qemuImg(['snapshot', '-c', 'small', 'image.qcow2'], dir);
      qemuImg(['resize', '-q', 'image.qcow2', String(6 * MiB + 512)], dir);
      qemuIo('image.qcow2', ['write -P 0x1c 512k 64k', `write -P 0x1d ${5 * MiB} 1M`], { cwd: dir });
      qemuImg(['snapshot', '-c', 'grown', 'image.qcow2'], dir);
      qemuIo('image.qcow2', ['write -z 0 1M'], { cwd: dir });
    },
  },
  {
    name: 'dirty',
    title: 'dirty bit set: lazy refcounts and a qemu-io killed after writing',
    image: 'image.qcow2',
    qemuInfo: { 'dirty-flag': true, 'format-specific.data.lazy-refcounts': true },
    build(dir) {
      convertMixed(dir, 'image.qcow2', 8 * MiB, 64 * KiB, ['-o', 'lazy_refcounts=on']);
      qemuIo('image.qcow2', ['write -P 0x6d 100k 300k', 'write -z 1M 64k', 'write -P 0x6e 7M 512k', 'sigraise 9'], { cwd: dir, kill: true });
    },
  },
  {
    name: 'corrupt',
    title: 'corrupt bit set: read anyway, with a warning',
    image: 'image.qcow2',
    qemuInfo: { 'format-specific.data.corrupt': true },
    warning: /corrupt/,
    build(dir) {
      convertMixed(dir, 'image.qcow2', 8 * MiB, 64 * KiB, []);
      qemuIo('image.qcow2', ['write -P 0x6f 100k 300k', 'write -z 1M 64k'], { cwd: dir });
      setFeatureBits(path.join(dir, 'image.qcow2'), 72, 1n << 1n);
    },
  },
  {
    name: 'odd-size',
    title: 'header size not a multiple of 512 (QEMU rounds it down)',
    image: 'image.qcow2',
    build(dir) {
      const size = 3 * MiB + 4608;
      qemuImg(['create', '-q', '-f', 'qcow2', 'image.qcow2', String(size)], dir);
      qemuIo('image.qcow2', [`write -P 0x99 ${size - 64 * KiB} 64k`], { cwd: dir });
      patchFile(path.join(dir, 'image.qcow2'), 24, u64(BigInt(size + 300)));
    },
  },
];

// ---------------------------------------------------------------------------------------------
// Images that must be refused.

export interface RefusalFiles {
  dir: string;
  luks: string;
  aes: string;
  unknownBit: string;
  unknownBitNamed: string;
  /** The feature name written into unknownBitNamed's feature-name table for bit 10. */
  unknownBitName: string;
  loopA: string;
  loopB: string;
  loopSelf: string;
  missingBacking: string;
  /** A qcow2 image in outside/, next to inside/. */
  outsideBase: string;
  outsideDir: string;
  /** inside/ images whose backing (or data) file lies in outside/. */
  absoluteBacking: string;
  dotDotBacking: string;
  symlinkBacking: string;
  absoluteDataFile: string;
  badMagic: string;
  /** 50 bytes of a real image: the header is cut. */
  truncatedHeader: string;
  /** Cut after the header cluster: its tables lie beyond the end. */
  truncatedTables: string;
  /** Cut inside the data clusters. */
  truncatedData: string;
}

export function refusalFixtures(): RefusalFiles {
  const unknownBitName = 'qcow2img test feature';
  const build = (dir: string) => {
    const img = (...args: string[]) => qemuImg(args, dir);
    qemuImgCreateEncrypted(['-q', '-f', 'qcow2', '--object', 'secret,id=sec0,data=abc', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0', 'luks.qcow2', '1M'], dir);
    img('create', '-q', '-f', 'qcow2', '--object', 'secret,id=sec0,data=abc', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', 'aes.qcow2', '1M');

    img('create', '-q', '-f', 'qcow2', 'unknown-bit.qcow2', '1M');
    setFeatureBits(path.join(dir, 'unknown-bit.qcow2'), 72, 1n << 10n);
    img('create', '-q', '-f', 'qcow2', 'unknown-bit-named.qcow2', '1M');
    const named = path.join(dir, 'unknown-bit-named.qcow2');
    const table = headerExtensions(named).find((e) => e.type === 0x6803f857);
    if (!table) throw new Error('qemu-img wrote no feature name table');
    // Turn the table's first entry (incompatible bit 0, "dirty bit") into a name for bit 10.
    const entry = Buffer.alloc(48);
    entry[0] = 0;
    entry[1] = 10;
    entry.write(unknownBitName, 2, 'utf8');
    patchFile(named, table.dataOffset, entry);
    setFeatureBits(named, 72, 1n << 10n);

    img('create', '-q', '-f', 'qcow2', 'loop-a.qcow2', '1M');
    img('create', '-q', '-f', 'qcow2', '-b', 'loop-a.qcow2', '-F', 'qcow2', 'loop-b.qcow2');
    img('rebase', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', 'loop-a.qcow2');
    img('create', '-q', '-f', 'qcow2', 'loop-self.qcow2', '1M');
    img('rebase', '-u', '-b', 'loop-self.qcow2', '-F', 'qcow2', 'loop-self.qcow2');
    img('create', '-q', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'missing-backing.qcow2', '1M');

    const outside = path.join(dir, 'outside');
    const inside = path.join(dir, 'inside');
    fs.mkdirSync(outside);
    fs.mkdirSync(inside);
    convertMixed(outside, 'base.qcow2', 4 * MiB, 64 * KiB, []);
    const outsideBase = path.join(outside, 'base.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-b', outsideBase, '-F', 'qcow2', 'absolute.qcow2'], inside);
    qemuIo('absolute.qcow2', ['write -P 0x0a 1M 64k'], { cwd: inside });
    qemuImg(['create', '-q', '-f', 'qcow2', '-b', '../outside/base.qcow2', '-F', 'qcow2', 'dotdot.qcow2'], inside);
    fs.symlinkSync('../outside/base.qcow2', path.join(inside, 'link.qcow2'));
    qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'link.qcow2', '-F', 'qcow2', 'symlink.qcow2'], inside);
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(outside, 'data.raw')}`, 'absolute-data.qcow2', '1M'], inside);
    qemuIo('absolute-data.qcow2', ['write -P 0x0b 0 64k'], { cwd: inside });

    fs.writeFileSync(path.join(dir, 'bad-magic.qcow2'), randomBytes('bad magic', 128 * KiB));
    convertMixed(dir, 'whole.qcow2', 4 * MiB, 64 * KiB, []);
    const whole = fs.readFileSync(path.join(dir, 'whole.qcow2'));
    fs.writeFileSync(path.join(dir, 'truncated-header.qcow2'), whole.subarray(0, 50));
    fs.writeFileSync(path.join(dir, 'truncated-tables.qcow2'), whole.subarray(0, 64 * KiB));
    fs.writeFileSync(path.join(dir, 'truncated-data.qcow2'), whole.subarray(0, whole.length - 200 * KiB));
  };
  const dir = fixtureDir('refusals', build);
  const at = (name: string) => path.join(dir, name);
  return {
    dir,
    luks: at('luks.qcow2'),
    aes: at('aes.qcow2'),
    unknownBit: at('unknown-bit.qcow2'),
    unknownBitNamed: at('unknown-bit-named.qcow2'),
    unknownBitName,
    loopA: at('loop-a.qcow2'),
    loopB: at('loop-b.qcow2'),
    loopSelf: at('loop-self.qcow2'),
    missingBacking: at('missing-backing.qcow2'),
    outsideBase: at('outside/base.qcow2'),
    outsideDir: at('outside'),
    absoluteBacking: at('inside/absolute.qcow2'),
    dotDotBacking: at('inside/dotdot.qcow2'),
    symlinkBacking: at('inside/symlink.qcow2'),
    absoluteDataFile: at('inside/absolute-data.qcow2'),
    badMagic: at('bad-magic.qcow2'),
    truncatedHeader: at('truncated-header.qcow2'),
    truncatedTables: at('truncated-tables.qcow2'),
    truncatedData: at('truncated-data.qcow2'),
  };
}

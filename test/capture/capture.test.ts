/**
 * `capture` (raw file or block device -> qcow2) against QEMU: every capture must pass
 * `qemu-img check` with nothing reported, `qemu-img compare` with the source must say
 * identical, `qemu-img info` must agree with ours, and our own `load` of it must give the
 * source back byte for byte. Sources are made at test time; one is a loop device.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type CaptureOptions, type CaptureResult, Qcow2Error, capture, load, open } from '../../src/index';
import { noise, text } from '../helpers/damage';
import { type LoopDevice, attachLoop, loopUnavailable } from '../helpers/loop';

const KiB = 1024;
const MiB = 1024 * KiB;
const repoRoot = path.resolve(__dirname, '..', '..');
const cli = path.join(repoRoot, 'dist', 'cli', 'main.js');
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-capture-'));
const loopSkip = loopUnavailable();
const mountSkip = process.getuid?.() === 0 ? undefined : 'mounting a small tmpfs needs root';
if (loopSkip) console.warn(`capture tests: skipping the loop device source: ${loopSkip}`);
if (mountSkip) console.warn(`capture tests: skipping the out-of-space failure: ${mountSkip}`);

interface Ran {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function run(command: string, args: readonly string[], cwd?: string): Ran {
  const result = spawnSync(command, args, { cwd, encoding: 'utf8', maxBuffer: 256 * MiB });
  if (result.error) throw result.error;
  return { status: result.status, signal: result.signal, stdout: result.stdout, stderr: result.stderr };
}

function ourCli(args: readonly string[], cwd?: string): Ran {
  return run(process.execPath, [cli, ...args], cwd);
}

function qemuImg(args: readonly string[], cwd?: string): string {
  const ran = run('qemu-img', args, cwd);
  if (ran.status !== 0) throw new Error(`qemu-img ${args.join(' ')} failed (${ran.status ?? ran.signal}): ${ran.stderr.trim()}`);
  return ran.stdout;
}

const stderrLines = (ran: Ran) => ran.stderr.split('\n').filter((line) => line.trim() !== '');

// -------------------------------------------------------------------------------------------------
// Sources

function licenseText(length: number): Buffer {
  const dir = '/usr/share/common-licenses';
  const names = ['GPL-3', 'Apache-2.0', 'LGPL-2.1', 'MPL-2.0', 'Artistic', 'BSD'];
  const texts = names.map((n) => path.join(dir, n)).filter((f) => fs.existsSync(f)).map((f) => fs.readFileSync(f));
  if (texts.length === 0) return text('licenses', length);
  const out = Buffer.alloc(length);
  for (let at = 0, i = 0; at < length; i++) at += texts[i % texts.length]!.copy(out, at);
  return out;
}

/** Clusters of 28 KiB random bytes and 36 KiB text, which ISA-L's level 3 leaves at 59-82%. */
function halfText(size: number): Buffer {
  const b = Buffer.alloc(size);
  const prose = licenseText(size);
  for (let at = 0; at < size; at += 64 * KiB) {
    noise(`half-text/${at}`, 28 * KiB).copy(b, at);
    prose.copy(b, at + 28 * KiB, at, at + 36 * KiB);
  }
  return b;
}

interface SourceSpec {
  name: string;
  description: string;
  /** The source's bytes; written to a raw file (sparse where `holes` says) or onto a loop device. */
  make(): { bytes: Buffer; holes?: [number, number][] };
  /** Size of its older version (the backing file), when it differs. */
  oldSize?: (size: number) => number;
  /** Also captured through the CLI: for every variant (true) or for these. */
  cli?: true | string[];
  loop?: boolean;
  compressible?: boolean;
}

function mixed(size: number, seed: string): Buffer {
  const b = Buffer.alloc(size);
  noise(`${seed}/a`, 600 * KiB).copy(b, 0);
  licenseText(700 * KiB).copy(b, 1 * MiB + 333);
  b.fill(0x5a, 2 * MiB + 100, 2 * MiB + 70 * KiB);
  noise(`${seed}/b`, 5000).copy(b, Math.floor(size * 0.7) + 17);
  noise(`${seed}/c`, 777).copy(b, size - 777);
  return b;
}

const sources: SourceSpec[] = [
  {
    name: 'random',
    description: 'random data in every byte',
    make: () => ({ bytes: noise('random', 2 * MiB) }),
  },
  {
    name: 'zero-runs',
    description: 'random data with written (not sparse) zero runs: whole clusters, unaligned runs, a zero 4 KiB inside a data cluster',
    make: () => {
      const b = noise('zero-runs', 3 * MiB);
      b.fill(0, 512 * KiB, 1 * MiB + 100);
      b.fill(0, 2 * MiB - 3000, 2 * MiB + 64 * KiB + 5);
      b.fill(0, 2 * MiB + 200 * KiB, 2 * MiB + 204 * KiB);
      return { bytes: b };
    },
  },
  {
    name: 'sparse',
    description: 'a sparse file (truncate) with a few data islands, the last byte written',
    cli: true,
    make: () => {
      const size = 6 * MiB;
      const b = Buffer.alloc(size);
      noise('sparse/a', 100 * KiB).copy(b, 0);
      licenseText(20 * KiB).copy(b, 3 * MiB + 17);
      noise('sparse/b', 777).copy(b, size - 777);
      return { bytes: b, holes: [[100 * KiB, 3 * MiB + 17], [3 * MiB + 17 + 20 * KiB, size - 777]] };
    },
    // The backing file is larger than the disk.
    oldSize: (size) => size + MiB,
  },
  {
    name: 'text',
    description: 'repeated license texts (compressible) with one random cluster',
    compressible: true,
    make: () => {
      const b = licenseText(2 * MiB);
      noise('text', 64 * KiB).copy(b, 1 * MiB);
      return { bytes: b };
    },
  },
  {
    name: 'half-text',
    description: 'clusters of 28 KiB random bytes and 36 KiB text: ISA-L leaves them at 59-82%, where level 4 tries zlib too',
    compressible: true,
    make: () => ({ bytes: halfText(2 * MiB) }),
  },
  {
    name: 'odd-512',
    description: 'a size that is a multiple of 512 but not of 64 KiB (3 MiB + 4608)',
    make: () => ({ bytes: mixed(3 * MiB + 4608, 'odd-512') }),
  },
  {
    name: 'odd-byte',
    description: 'a size that is not even a multiple of 512 (3 MiB + 12345); its backing file is shorter',
    make: () => ({ bytes: mixed(3 * MiB + 12345, 'odd-byte') }),
    oldSize: (size) => size - 200 * KiB - 11,
  },
  {
    name: 'tiny',
    description: 'a 777-byte disk',
    make: () => ({ bytes: noise('tiny', 777) }),
  },
  {
    name: 'loop',
    description: 'a loop block device (losetup) over a 4 MiB file of mixed data',
    loop: true,
    cli: ['uncompressed', 'zstd', 'cluster 512 zlib', 'backing qcow2'],
    make: () => ({ bytes: mixed(4 * MiB, 'loop') }),
  },
];

/** The older version of a source: a few ranges rewritten, a zero range filled, maybe another size. */
function olderVersion(spec: SourceSpec, bytes: Buffer): Buffer {
  const size = spec.oldSize ? spec.oldSize(bytes.length) : bytes.length;
  const old = Buffer.alloc(size);
  bytes.copy(old, 0, 0, Math.min(size, bytes.length));
  for (const [i, at] of [0.1, 0.45, 0.8].map((f, j) => [j, Math.floor(bytes.length * f)] as const)) {
    if (at < size) noise(`${spec.name}/old/${i}`, Math.min(20 * KiB, size - at)).copy(old, at);
  }
  // Data in the old version where the source now has a zero cluster: the capture must hide it.
  for (let at = 0; at + 64 * KiB <= Math.min(size, bytes.length); at += 64 * KiB) {
    if (bytes.subarray(at, at + 64 * KiB).every((v) => v === 0)) {
      old.fill(0x77, at, at + 64 * KiB);
      break;
    }
  }
  return old;
}

interface Source {
  spec: SourceSpec;
  dir: string;
  /** What is captured: a raw file or a device. */
  path: string;
  bytes: Buffer;
  /** Older version as raw, and as qcow2 made by qemu-img. */
  oldRaw: string;
  oldQcow2: string;
}

function writeSource(file: string, bytes: Buffer, holes: [number, number][] = []): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, bytes.length);
  const fd = fs.openSync(file, 'r+');
  try {
    let at = 0;
    for (const [start, end] of [...holes, [bytes.length, bytes.length] as [number, number]]) {
      if (start > at) fs.writeSync(fd, bytes, at, start - at, at);
      at = end;
    }
  } finally {
    fs.closeSync(fd);
  }
}

const loops: LoopDevice[] = [];

function prepareSource(spec: SourceSpec): Source {
  const dir = path.join(work, spec.name);
  fs.mkdirSync(dir, { recursive: true });
  const { bytes, holes } = spec.make();
  const file = path.join(dir, 'source.raw');
  writeSource(file, bytes, holes);
  let sourcePath = file;
  if (spec.loop) {
    const loop = attachLoop(file);
    loops.push(loop);
    sourcePath = loop.device;
  }
  const oldRaw = path.join(dir, 'old.raw');
  fs.writeFileSync(oldRaw, olderVersion(spec, bytes));
  const oldQcow2 = path.join(dir, 'old.qcow2');
  qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', oldRaw, oldQcow2]);
  return { spec, dir, path: sourcePath, bytes, oldRaw, oldQcow2 };
}

// -------------------------------------------------------------------------------------------------
// Variants

interface Variant {
  name: string;
  options: CaptureOptions;
  args: string[];
  /** Capture over this version of the source. */
  backing?: 'qcow2' | 'raw';
}

const variants: Variant[] = [
  { name: 'uncompressed', options: {}, args: [] },
  { name: 'zlib', options: { compress: 'zlib' }, args: ['--compress', 'zlib'] },
  { name: 'zstd', options: { compress: 'zstd' }, args: ['--compress', 'zstd'] },
  { name: 'zlib level 3 (ISA-L alone)', options: { compress: 'zlib', level: 3 }, args: ['--compress', 'zlib', '--level', '3'] },
  { name: 'zlib level 6 (zlib encoder)', options: { compress: 'zlib', level: 6 }, args: ['--compress', 'zlib', '--level', '6'] },
  { name: 'compat 0.10', options: { compat: '0.10' }, args: ['--compat', '0.10'] },
  { name: 'cluster 4k', options: { clusterSize: 4 * KiB }, args: ['--cluster-size', '4k'] },
  { name: 'cluster 2M zstd', options: { clusterSize: 2 * MiB, compress: 'zstd' }, args: ['--cluster-size', '2M', '--compress', 'zstd'] },
  { name: 'cluster 512 zlib', options: { clusterSize: 512, compress: 'zlib' }, args: ['--cluster-size', '512', '--compress', 'zlib'] },
  { name: 'backing qcow2', options: {}, args: [], backing: 'qcow2' },
  { name: 'backing raw', options: {}, args: [], backing: 'raw' },
  { name: 'backing qcow2 compat 0.10', options: { compat: '0.10' }, args: ['--compat', '0.10'], backing: 'qcow2' },
  { name: 'backing qcow2 zstd', options: { compress: 'zstd' }, args: ['--compress', 'zstd'], backing: 'qcow2' },
];

for (const spec of sources) {
  for (const name of spec.cli === true ? [] : (spec.cli ?? [])) {
    if (!variants.some((v) => v.name === name)) throw new Error(`source ${spec.name} names an unknown variant ${name}`);
  }
}

type Via = 'library' | 'cli';

interface Captured {
  out: string;
  result?: CaptureResult;
  /** qemu-img check --output=json */
  check: Record<string, unknown>;
}

/** qemu-img check's allocated clusters of each source's full (uncompressed, no backing) capture. */
const fullAllocated = new Map<string, { allocated: number; fileSize: number }>();
const backingAllocated = new Map<string, { allocated: number; fileSize: number }>();

async function captureVia(via: Via, source: Source, variant: Variant, out: string): Promise<CaptureResult> {
  const base = variant.backing === 'raw' ? source.oldRaw : variant.backing === 'qcow2' ? source.oldQcow2 : undefined;
  if (via === 'library') {
    return capture(source.path, out, { ...variant.options, ...(base ? { backing: base } : {}) });
  }
  const ran = ourCli(['capture', source.path, out, ...variant.args, ...(base ? ['--backing', base] : []), '--progress=json']);
  expect(ran.signal).toBeNull();
  expect(ran.status, ran.stderr).toBe(0);
  const lines = ran.stdout.trim().split('\n');
  const done = JSON.parse(lines.at(-1)!) as { phase: string } & CaptureResult;
  expect(done.phase).toBe('done');
  return done;
}

async function captureAndVerify(via: Via, source: Source, variant: Variant): Promise<Captured> {
  const out = path.join(source.dir, `${variant.name.replace(/[^a-z0-9]+/gi, '-')}-${via}.qcow2`);
  fs.rmSync(out, { force: true });
  const result = await captureVia(via, source, variant, out);
  const cwd = source.dir;
  const virtualSize = Math.ceil(source.bytes.length / 512) * 512;
  const clusterSize = variant.options.clusterSize ?? 64 * KiB;
  const compression = variant.options.compress === 'zstd' ? 'zstd' : 'zlib';
  const baseName = variant.backing === 'raw' ? 'old.raw' : variant.backing === 'qcow2' ? 'old.qcow2' : undefined;

  // qemu-img check: exit 0, nothing reported (its ERROR and Leaked lines go to stderr in either output mode).
  const jsonRun = run('qemu-img', ['check', '--output=json', out], cwd);
  expect(jsonRun.status, jsonRun.stderr).toBe(0);
  expect(jsonRun.stderr).toBe('');
  const check = JSON.parse(jsonRun.stdout) as Record<string, unknown>;
  expect(check['check-errors']).toBe(0);
  expect(check.corruptions ?? 0).toBe(0);
  expect(check.leaks ?? 0).toBe(0);

  // qemu-img compare: identical to the source.
  const compared = run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', source.path, out], cwd);
  expect(compared.status, compared.stdout + compared.stderr).toBe(0);
  expect(compared.stdout).toMatch(/Images are identical/);

  // qemu-img info and ours agree, and say what was asked for.
  const qemu = JSON.parse(qemuImg(['info', '--output=json', out], cwd)) as Record<string, unknown>;
  const data = (qemu['format-specific'] as { data: Record<string, unknown> }).data;
  let ours: Record<string, unknown>;
  if (via === 'cli') {
    const info = ourCli(['info', '--json', out], cwd);
    expect(info.status, info.stderr).toBe(0);
    ours = JSON.parse(info.stdout) as Record<string, unknown>;
  } else {
    const image = await open(out);
    ours = { ...image.info };
    await image.close();
  }
  expect({
    virtualSize: ours.virtualSize,
    clusterSize: ours.clusterSize,
    compressionType: ours.compressionType,
    backingFile: ours.backingFile,
    backingFormat: ours.backingFormat,
  }).toEqual({
    virtualSize: qemu['virtual-size'],
    clusterSize: qemu['cluster-size'],
    compressionType: data['compression-type'],
    backingFile: qemu['backing-filename'],
    backingFormat: qemu['backing-filename-format'],
  });
  expect(qemu['virtual-size']).toBe(virtualSize);
  expect(qemu['cluster-size']).toBe(clusterSize);
  expect(data.compat).toBe(variant.options.compat ?? '1.1');
  expect(data['compression-type']).toBe(compression);
  expect(qemu['backing-filename']).toBe(baseName);
  expect(qemu['backing-filename-format']).toBe(variant.backing);

  // The capture's own counts agree with qemu-img check (zero clusters are not allocated there).
  expect(result.virtualSize).toBe(virtualSize);
  expect(result.fileSize).toBe(fs.statSync(out).size);
  expect(result.dataClusters + result.compressedClusters).toBe(check['allocated-clusters'] ?? 0);
  expect(result.compressedClusters).toBe(check['compressed-clusters'] ?? 0);
  if (source.spec.compressible && variant.options.compress) expect(result.compressedClusters).toBeGreaterThan(0);
  if (!variant.options.compress) expect(result.compressedClusters).toBe(0);

  // Our own load gives the source back, padded with zeros to whole sectors.
  const loaded = path.join(source.dir, `${path.basename(out)}.loaded.raw`);
  await load(out, loaded, { overwrite: true });
  const back = fs.readFileSync(loaded);
  fs.rmSync(loaded);
  expect(back.length).toBe(virtualSize);
  expect(firstDifference(back.subarray(0, source.bytes.length), source.bytes)).toBe(-1);
  expect(back.subarray(source.bytes.length).every((v) => v === 0)).toBe(true);
  return { out, result, check };
}

function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

// -------------------------------------------------------------------------------------------------

afterAll(() => {
  for (const loop of loops) {
    try {
      loop.detach();
    } catch (error) {
      console.warn(`could not detach ${loop.device}: ${(error as Error).message}`);
    }
  }
  fs.rmSync(work, { recursive: true, force: true });
});

for (const spec of sources) {
  const skip = spec.loop ? loopSkip : undefined;
  describe.skipIf(skip !== undefined)(`capture of ${spec.name}: ${spec.description}`, () => {
    let source: Source;
    beforeAll(() => {
      source = prepareSource(spec);
    });

    const viaCli = (variant: Variant) => spec.cli === true || (spec.cli ?? []).includes(variant.name);
    const cases = variants.flatMap((variant) => (viaCli(variant) ? (['library', 'cli'] as const) : (['library'] as const)).map((via) => ({ variant, via, label: `${variant.name} (${via})` })));
    it.each(cases)('$label: qemu-img check clean, compare identical, info agrees, load equals the source', async ({ variant, via }) => {
      const captured = await captureAndVerify(via, source, variant);
      const counts = { allocated: Number(captured.check['allocated-clusters'] ?? 0), fileSize: fs.statSync(captured.out).size };
      if (via === 'library' && variant.name === 'uncompressed') fullAllocated.set(spec.name, counts);
      if (via === 'library' && variant.name === 'backing qcow2') backingAllocated.set(spec.name, counts);
    });

    it.skipIf(spec.name === 'tiny')('a capture over a backing file stores fewer clusters than a full one', () => {
      const full = fullAllocated.get(spec.name);
      const over = backingAllocated.get(spec.name);
      expect(full, 'the full capture ran').toBeDefined();
      expect(over, 'the capture over a backing file ran').toBeDefined();
      expect(over!.allocated).toBeLessThan(full!.allocated);
      expect(over!.fileSize).toBeLessThan(full!.fileSize);
    });
  });
}

describe('zlib levels over clusters ISA-L leaves at 59-82% of their size (16 MiB)', () => {
  let dir: string;
  let source: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(work, 'levels-'));
    source = path.join(dir, 'half-text.raw');
    fs.writeFileSync(source, halfText(16 * MiB));
  });

  const verified = (out: string) => {
    const checked = run('qemu-img', ['check', out]);
    expect(checked.status, checked.stdout + checked.stderr).toBe(0);
    const compared = run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', source, out]);
    expect(compared.status, compared.stdout + compared.stderr).toBe(0);
  };

  it('the default level 4 re-encodes them with zlib: smaller than level 3 (ISA-L alone), and QEMU reads both', async () => {
    const level3 = path.join(dir, 'level3.qcow2');
    const level4 = path.join(dir, 'level4.qcow2');
    await capture(source, level3, { compress: 'zlib', level: 3 });
    await capture(source, level4, { compress: 'zlib' });
    verified(level3);
    verified(level4);
    expect(fs.statSync(level4).size).toBeLessThan(fs.statSync(level3).size);
  });

  it('levels 5-9 are zlib\'s own encoder, through the CLI: smaller than ISA-L\'s 3, 9 no larger than 5, and QEMU reads them', () => {
    const sizes = new Map<string, number>();
    for (const level of ['3', '5', '6', '9']) {
      const out = path.join(dir, `cli-level${level}.qcow2`);
      const ran = spawnSync(process.execPath, [cli, 'capture', source, out, '--compress', 'zlib', '--level', level, '--progress=none'], { encoding: 'utf8' });
      expect(ran.status, ran.stderr).toBe(0);
      verified(out);
      sizes.set(level, fs.statSync(out).size);
    }
    for (const level of ['5', '6', '9']) expect(sizes.get(level), `level ${level}`).toBeLessThan(sizes.get('3')!);
    expect(sizes.get('9')).toBeLessThanOrEqual(sizes.get('5')!);
  });
});

describe('capture over a raw base whose first bytes are a qcow2 header', () => {
  it('with backing format raw: the base is read as raw, the image says raw, qemu-img agrees', async () => {
    const dir = path.join(work, 'qcow2-looking-base');
    fs.mkdirSync(dir);
    // A guest disk that holds a qcow2 image at its start.
    qemuImg(['create', '-q', '-f', 'qcow2', path.join(dir, 'inner.qcow2'), '1M']);
    const base = Buffer.concat([fs.readFileSync(path.join(dir, 'inner.qcow2')), noise('looks-like-qcow2', MiB)]);
    fs.writeFileSync(path.join(dir, 'base.raw'), base);
    const sourceBytes = Buffer.from(base);
    noise('looks-like-qcow2/new', 64 * KiB).copy(sourceBytes, 512 * KiB);
    const source = path.join(dir, 'disk.raw');
    fs.writeFileSync(source, sourceBytes);
    const out = path.join(dir, 'out.qcow2');
    const result = await capture(source, out, { backing: path.join(dir, 'base.raw'), backingFormat: 'raw' });
    expect(result.dataClusters).toBe(1);
    const info = JSON.parse(qemuImg(['info', '--output=json', out], dir)) as Record<string, unknown>;
    expect(info['backing-filename-format']).toBe('raw');
    expect(run('qemu-img', ['check', out], dir).status).toBe(0);
    expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', source, out], dir).status).toBe(0);
  });
});

// -------------------------------------------------------------------------------------------------
// Refusals and failures: nothing under the final name, no temporary file left.

/** Names in `dir` (including dot files). */
const listing = (dir: string) => fs.readdirSync(dir).sort();
const temporaryOf = (name: string) => new RegExp(`^\\.${name.replace(/[.]/g, '\\.')}\\.qcow2img-.*\\.tmp$`);

describe('capture refusals and failures', () => {
  let dir: string;
  let source: string;
  let sourceBytes: Buffer;
  beforeAll(() => {
    dir = path.join(work, 'failures');
    fs.mkdirSync(dir);
    source = path.join(dir, 'disk.raw');
    sourceBytes = Buffer.concat([noise('failures', 3 * MiB), licenseText(MiB)]);
    fs.writeFileSync(source, sourceBytes);
  });

  it('refuses an existing output without overwrite (TARGET_EXISTS) and leaves it intact; --overwrite replaces it', async () => {
    const out = path.join(dir, 'exists.qcow2');
    fs.writeFileSync(out, 'precious');
    const before = listing(dir);
    const error = await capture(source, out).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).code).toBe('TARGET_EXISTS');
    expect(fs.readFileSync(out, 'utf8')).toBe('precious');
    expect(listing(dir)).toEqual(before);

    const ran = ourCli(['capture', source, out, '--progress=none']);
    expect(ran.status).toBe(1);
    expect(stderrLines(ran)).toHaveLength(1);
    expect(ran.stderr).toMatch(/overwrite/);
    expect(fs.readFileSync(out, 'utf8')).toBe('precious');
    expect(listing(dir)).toEqual(before);

    const replaced = ourCli(['capture', source, out, '--overwrite', '--progress=none']);
    expect(replaced.status, replaced.stderr).toBe(0);
    expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', source, out]).status).toBe(0);
    expect(listing(dir)).toEqual(before);
    fs.rmSync(out);
  });

  it('refuses to capture a file onto itself (TARGET_IS_SOURCE), even with overwrite', async () => {
    const copy = path.join(dir, 'self.raw');
    fs.copyFileSync(source, copy);
    const before = listing(dir);
    const error = await capture(copy, copy, { overwrite: true }).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('TARGET_IS_SOURCE');
    expect(fs.readFileSync(copy).equals(sourceBytes)).toBe(true);
    expect(listing(dir)).toEqual(before);
    fs.rmSync(copy);
  });

  it.each([
    { what: 'a cluster size that is not a power of two', options: { clusterSize: 3000 } as CaptureOptions, code: 'INVALID_ARGUMENT' },
    { what: 'a cluster size above 2 MiB', options: { clusterSize: 4 * MiB } as CaptureOptions, code: 'INVALID_ARGUMENT' },
    { what: 'zstd with compat 0.10', options: { compress: 'zstd', compat: '0.10' } as CaptureOptions, code: 'INVALID_ARGUMENT' },
    { what: 'a zlib level out of range', options: { compress: 'zlib', level: 10 } as CaptureOptions, code: 'INVALID_ARGUMENT' },
    { what: 'a missing backing file', options: { backing: path.join(work, 'no-such-base.qcow2') } as CaptureOptions, code: 'IO_ERROR' },
  ])('fails on $what ($code), leaving nothing behind', async ({ options, code }) => {
    const out = path.join(dir, 'refused.qcow2');
    const before = listing(dir);
    const error = await capture(source, out, options).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).code).toBe(code);
    expect(listing(dir)).toEqual(before);
  });

  it('fails on a source that is a directory (NOT_A_REGULAR_FILE, as open() says it), leaving nothing behind', async () => {
    const before = listing(dir);
    const error = await capture(work, path.join(dir, 'dir.qcow2')).catch((e: unknown) => e);
    expect((error as Qcow2Error).code).toBe('NOT_A_REGULAR_FILE');
    expect(listing(dir)).toEqual(before);
  });

  it('with an already aborted signal: rejects CANCELLED, writes nothing', async () => {
    const out = path.join(dir, 'aborted.qcow2');
    const before = listing(dir);
    const controller = new AbortController();
    controller.abort();
    const error = await capture(source, out, { signal: controller.signal }).catch((e: unknown) => e);
    fs.rmSync(out, { force: true }); // so that a failure here does not break the next tests
    expect(error).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).code).toBe('CANCELLED');
    expect(listing(dir)).toEqual(before);
  });

  describe.skipIf(mountSkip !== undefined)('out of space (a 1 MiB tmpfs)', () => {
    let full: string;
    let mounted = false;
    beforeAll(() => {
      full = path.join(work, 'full');
      fs.mkdirSync(full);
      const ran = run('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', full]);
      if (ran.status !== 0) throw new Error(`cannot mount a tmpfs on ${full}: ${ran.stderr.trim()}`);
      mounted = true;
    });
    afterAll(() => {
      if (mounted) run('umount', [full]);
    });

    it('library: IO_ERROR naming the output, no file under the final name, no temporary file', async () => {
      const out = path.join(full, 'disk.qcow2');
      const error = await capture(source, out).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect((error as Qcow2Error).code).toBe('IO_ERROR');
      expect((error as Qcow2Error).path).toBe(out);
      expect(listing(full)).toEqual([]);
    });

    it('CLI: exit 1 with one line, nothing left', () => {
      const out = path.join(full, 'disk.qcow2');
      const ran = ourCli(['capture', source, out, '--progress=none']);
      expect(ran.signal).toBeNull();
      expect(ran.status).toBe(1);
      expect(stderrLines(ran)).toHaveLength(1);
      expect(ran.stderr).toContain(out);
      expect(listing(full)).toEqual([]);
    });

    it('with --overwrite, the file it would have replaced stays as it was', async () => {
      const out = path.join(full, 'old.qcow2');
      fs.writeFileSync(out, 'the previous image');
      const error = await capture(source, out, { overwrite: true }).catch((e: unknown) => e);
      expect((error as Qcow2Error).code).toBe('IO_ERROR');
      expect(fs.readFileSync(out, 'utf8')).toBe('the previous image');
      expect(listing(full)).toEqual(['old.qcow2']);
      expect(listing(full).some((name) => temporaryOf('old.qcow2').test(name))).toBe(false);
    });
  });
});

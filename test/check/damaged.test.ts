/**
 * `check` against `qemu-img check`: the damaged set of test/helpers/damage.ts (byte patches
 * of small QEMU-made images) and clean QEMU-made images of every kind. qemu-img is the oracle
 * for the exit status and the counts; nothing here decides what a defect should mean.
 *
 * Also records, for the hardening work, what `info` and `load` do with each defect (CLI exit
 * status and message, library error code) in .cache/damage-report.json; the library's codes are
 * held to test/helpers/damage-expectations.ts, and each expectation whose oracle is qemu-img to
 * qemu-img's verdict on the same image (`qemu-img info` for open, `qemu-img convert` for load).
 */
import { expectedCodes } from '../helpers/damage-expectations';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { baseImages, buildImages, defects, extraCleanImages, makeDamagedImages, type ManifestEntry, plannedImages } from '../helpers/damage';
import { checkCountKeys, parseJsonOutput, type Ran, runAsync } from '../helpers/qemu';

const repoRoot = path.resolve(__dirname, '..', '..');
const cli = path.join(repoRoot, 'dist', 'cli', 'main.js');
const reportFile = path.join(repoRoot, '.cache', 'damage-report.json');

async function pool<T>(items: readonly T[], limit: number, job: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await job(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

interface CheckPair {
  qemu: { status: number | null; signal: string | null; json?: Record<string, unknown>; firstError?: string };
  ours: { status: number | null; signal: string | null; json?: Record<string, unknown>; firstError?: string };
}

async function checkBoth(image: string): Promise<CheckPair> {
  // In the image's folder: QEMU 7.2 resolves a relative external data file against the current directory.
  const cwd = path.dirname(image);
  const [qemu, ours] = await Promise.all([
    runAsync('qemu-img', ['check', '--output=json', image], cwd),
    runAsync(process.execPath, [cli, 'check', '--json', image], cwd),
  ]);
  const firstLine = (text: string) => text.split('\n').find((line) => line.trim() !== '');
  return {
    qemu: { status: qemu.status, signal: qemu.signal, json: parseJsonOutput(qemu.stdout), firstError: firstLine(qemu.stderr) },
    ours: { status: ours.status, signal: ours.signal, json: parseJsonOutput(ours.stdout), firstError: firstLine(ours.stderr) },
  };
}

/** The counts both report, as {key: [qemu, ours]} where they differ. */
function countDifferences(pair: CheckPair): Record<string, [unknown, unknown]> {
  const differences: Record<string, [unknown, unknown]> = {};
  if (!pair.qemu.json || !pair.ours.json) return differences;
  for (const [qemuKey, ourKey] of checkCountKeys) {
    const q = pair.qemu.json[qemuKey] ?? 0;
    const o = pair.ours.json[ourKey];
    if (q !== o) differences[qemuKey] = [q, o];
  }
  return differences;
}

interface CliRun {
  status: number | null;
  signal: string | null;
  stderrLines: string[];
}

const cliRun = (ran: Ran): CliRun => ({ status: ran.status, signal: ran.signal, stderrLines: ran.stderr.split('\n').filter((line) => line.trim() !== '') });

/** Lines that are not warnings: an error is one line; a successful load prints one summary line. */
const nonWarningLines = (run: CliRun) => run.stderrLines.filter((line) => !line.startsWith('qcow2img: warning:'));

// -------------------------------------------------------------------------------------------------

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-check-'));
const damagedDir = path.join(work, 'damaged');
const cleanDir = path.join(work, 'clean');
const outDir = path.join(work, 'out');

const planned = plannedImages();
/** info and load run on the first image of each defect. */
const probed = defects.map((d) => planned.find((entry) => entry.defect === d.name)!);
const cleanImages = [
  ...baseImages.map((r) => ({ name: r.name, description: r.description, file: path.join(damagedDir, 'bases', `${r.name}.qcow2`) })),
  ...extraCleanImages.map((r) => ({ name: r.name, description: r.description, file: path.join(cleanDir, `${r.name}.qcow2`) })),
];

let manifest: ManifestEntry[] = [];
const checks = new Map<string, CheckPair>();
const cleanHuman = new Map<string, { qemu: string; ours: string }>();
const infos = new Map<string, CliRun>();
const loads = new Map<string, CliRun>();
/** qemu-img's verdict on the first image of each defect: info for open(), convert -O raw for load(). */
const qemuReads = new Map<string, { info: Ran; convert: Ran }>();
let library: { status: number | null; signal: string | null; stderr: string; results: Map<string, { open: string; load: string }> } | undefined;

/** Runs the library on every damaged image in one child process: open() and load(), each 'ok' or the error code. */
const libraryProbe = `
const { open, load } = require(${JSON.stringify(path.join(repoRoot, 'dist', 'index.js'))});
const fs = require('node:fs');
const [list, out] = process.argv.slice(1);
(async () => {
  for (const file of JSON.parse(fs.readFileSync(list, 'utf8'))) {
    const result = { file };
    try {
      const image = await open(file);
      await image.close();
      result.open = 'ok';
    } catch (error) {
      result.open = error.code ?? 'no code: ' + String(error.message).split('\\n')[0];
    }
    const target = out + '/library.raw';
    try {
      await load(file, target, { overwrite: true });
      result.load = 'ok';
    } catch (error) {
      result.load = error.code ?? 'no code: ' + String(error.message).split('\\n')[0];
    }
    fs.rmSync(target, { force: true });
    process.stdout.write(JSON.stringify(result) + '\\n');
  }
})();
`;

beforeAll(async () => {
  manifest = makeDamagedImages(damagedDir);
  buildImages(cleanDir, extraCleanImages);
  fs.mkdirSync(outDir);

  const images = [...cleanImages.map((c) => c.file), ...manifest.map((m) => path.join(damagedDir, m.file))];
  const parallel = Math.max(2, Math.min(4, os.availableParallelism()));
  await pool(images, parallel, async (image) => {
    checks.set(image, await checkBoth(image));
  });
  await pool(cleanImages, parallel, async (clean) => {
    const cwd = path.dirname(clean.file);
    const [qemu, ours] = await Promise.all([runAsync('qemu-img', ['check', clean.file], cwd), runAsync(process.execPath, [cli, 'check', clean.file], cwd)]);
    cleanHuman.set(clean.name, { qemu: qemu.stdout, ours: ours.stdout });
  });
  await pool(probed, parallel, async (entry) => {
    const image = path.join(damagedDir, entry.file);
    const target = path.join(outDir, `${entry.file}.raw`);
    infos.set(entry.file, cliRun(await runAsync(process.execPath, [cli, 'info', '--json', image])));
    loads.set(entry.file, cliRun(await runAsync(process.execPath, [cli, 'load', image, target, '--overwrite', '--progress=none'])));
    fs.rmSync(target, { force: true });
    // In the image's folder, as checkBoth: a relative external data file resolves against it.
    const cwd = path.dirname(image);
    const info = await runAsync('qemu-img', ['info', '--output=json', image], cwd);
    const convert = await runAsync('qemu-img', ['convert', '-O', 'raw', image, target], cwd);
    fs.rmSync(target, { force: true });
    qemuReads.set(entry.file, { info, convert });
  });
  const list = path.join(work, 'library-list.json');
  fs.writeFileSync(list, JSON.stringify(probed.map((entry) => path.join(damagedDir, entry.file))));
  const ran = await runAsync(process.execPath, ['-e', libraryProbe, list, outDir]);
  const results = new Map<string, { open: string; load: string }>();
  for (const line of ran.stdout.split('\n').filter(Boolean)) {
    const row = JSON.parse(line) as { file: string; open: string; load: string };
    results.set(path.basename(row.file), { open: row.open, load: row.load });
  }
  library = { status: ran.status, signal: ran.signal, stderr: ran.stderr, results };
}, 600_000);

afterAll(() => {
  // The record for the hardening work (gitignored): every damaged image, what qemu-img check and ours said,
  // and for one image per defect what info and load did.
  const rows = manifest.map((entry) => {
    const pair = checks.get(path.join(damagedDir, entry.file));
    return {
      ...entry,
      qemuCheck: pair && { status: pair.qemu.status, json: pair.qemu.json, firstError: pair.qemu.firstError },
      ourCheck: pair && { status: pair.ours.status, json: pair.ours.json, firstError: pair.ours.firstError },
      checkDifferences: pair && { ...(pair.qemu.status !== pair.ours.status ? { status: [pair.qemu.status, pair.ours.status] } : {}), ...countDifferences(pair) },
      info: infos.get(entry.file),
      load: loads.get(entry.file),
      library: library?.results.get(entry.file),
      qemuReads: qemuReads.has(entry.file)
        ? { info: qemuReads.get(entry.file)!.info.status, convert: qemuReads.get(entry.file)!.convert.status }
        : undefined,
    };
  });
  fs.mkdirSync(path.dirname(reportFile), { recursive: true });
  fs.writeFileSync(reportFile, JSON.stringify({ generated: new Date().toISOString(), images: rows }, null, 2) + '\n');
  fs.rmSync(work, { recursive: true, force: true });
});

describe('the damaged-image generator', () => {
  it('has at least 40 distinct defects, each with a one-line description and a known base', () => {
    const names = defects.map((d) => d.name);
    expect(new Set(names).size).toBe(names.length);
    expect(names.length).toBeGreaterThanOrEqual(40);
    const bases = new Set(baseImages.map((b) => b.name));
    for (const defect of defects) {
      expect(defect.description, defect.name).toMatch(/^[^\n]{10,200}$/);
      expect(defect.bases.length, defect.name).toBeGreaterThan(0);
      for (const base of defect.bases) expect(bases.has(base), `${defect.name} on ${base}`).toBe(true);
    }
    // Every base image is damaged by something.
    for (const base of bases) expect(planned.some((entry) => entry.base === base), base).toBe(true);
  });

  it('wrote every planned image, each different from its base, and a manifest listing them', () => {
    expect(manifest).toEqual(planned);
    expect(JSON.parse(fs.readFileSync(path.join(damagedDir, 'manifest.json'), 'utf8'))).toEqual(planned);
    for (const entry of manifest) {
      const damaged = fs.readFileSync(path.join(damagedDir, entry.file));
      const base = fs.readFileSync(path.join(damagedDir, 'bases', `${entry.base}.qcow2`));
      expect(damaged.equals(base), entry.file).toBe(false);
    }
  });

  it('scripts/make-damaged-images.mjs writes the chosen defects and their manifest, and lists all defects', async () => {
    const dir = path.join(work, 'script');
    const script = path.join(repoRoot, 'scripts', 'make-damaged-images.mjs');
    const ran = await runAsync(process.execPath, [script, dir, '--defect', 'l2-shared-data', '--defect', 'reftable-entry-unaligned', '--base', 'v3', '--base', 'rc64']);
    expect(ran.status, ran.stderr).toBe(0);
    const written = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as ManifestEntry[];
    expect(written).toEqual(
      planned.filter((e) => ['l2-shared-data', 'reftable-entry-unaligned'].includes(e.defect) && ['v3', 'rc64'].includes(e.base)),
    );
    expect(written).toHaveLength(4);
    for (const entry of written) {
      expect(fs.existsSync(path.join(dir, entry.file)), entry.file).toBe(true);
      expect(fs.existsSync(path.join(dir, 'bases', `${entry.base}.qcow2`)), entry.base).toBe(true);
      // Same patch as the in-process generator: the same qemu-img check verdict.
      const script = await checkBoth(path.join(dir, entry.file));
      expect(script.qemu.status, entry.file).toBe(checks.get(path.join(damagedDir, entry.file))?.qemu.status);
    }
    const list = await runAsync(process.execPath, [script, '--list']);
    expect(list.status).toBe(0);
    for (const defect of defects) expect(list.stdout).toContain(defect.name);
    const bad = await runAsync(process.execPath, [script, dir, '--defect', 'no-such-defect']);
    expect(bad.status).toBe(2);
  });
});

describe('clean QEMU-made images check clean in qemu-img and in ours', () => {
  it.each(cleanImages)('$name: $description', ({ file }) => {
    const pair = checks.get(file)!;
    expect(pair.qemu.status, pair.qemu.firstError).toBe(0);
    expect(pair.ours.status, pair.ours.firstError).toBe(0);
    expect(pair.ours.signal).toBeNull();
    expect(pair.qemu.json).toBeDefined();
    expect(pair.ours.json).toBeDefined();
    expect(countDifferences(pair)).toEqual({});
  });

  it('print the same summary as qemu-img check (allocated/fragmented/compressed line, image end offset)', () => {
    const summary = (text: string) =>
      text
        .split('\n')
        .filter((line) => /allocated, .* fragmented, .* compressed clusters$|^Image end offset: |^No errors were found/.test(line))
        .join('\n');
    const mismatches: string[] = [];
    for (const clean of cleanImages) {
      const { qemu, ours } = cleanHuman.get(clean.name)!;
      expect(summary(qemu), clean.name).not.toBe('');
      if (summary(qemu) !== summary(ours)) mismatches.push(`${clean.name}:\n  qemu-img: ${summary(qemu).replace(/\n/g, ' | ')}\n  ours:     ${summary(ours).replace(/\n/g, ' | ')}`);
    }
    expect(mismatches.join('\n')).toBe('');
  });
});

describe('damaged images: check exits like qemu-img check, with the same counts', () => {
  it.each(planned)('$file: $description', ({ file }) => {
    const pair = checks.get(path.join(damagedDir, file))!;
    expect(pair.qemu.signal, 'qemu-img check was killed').toBeNull();
    expect(pair.ours.signal, 'our check was killed').toBeNull();
    expect([0, 1, 2, 3]).toContain(pair.qemu.status);
    expect(pair.ours.status, `exit status; qemu-img: ${pair.qemu.firstError ?? '-'}; ours: ${pair.ours.firstError ?? '-'}`).toBe(pair.qemu.status);
    expect(countDifferences(pair)).toEqual({});
    // JSON from both or from neither (qemu-img prints none when it cannot open the image).
    expect(pair.ours.json !== undefined, 'ours printed JSON').toBe(pair.qemu.json !== undefined);
  });
});

describe('damaged images: info and load do not crash (one image per defect)', () => {
  it.each(probed)('$defect ($file)', ({ file }) => {
    for (const [what, run] of [
      ['info', infos.get(file)],
      ['load', loads.get(file)],
    ] as const) {
      expect(run, what).toBeDefined();
      expect(run!.signal, `${what} killed by a signal`).toBeNull();
      expect([0, 1], `${what} exit status (${run!.stderrLines.join(' | ')})`).toContain(run!.status);
      expect(nonWarningLines(run!).length, `${what} stderr: ${run!.stderrLines.join(' | ')}`).toBeLessThanOrEqual(1);
      if (run!.status === 1) expect(nonWarningLines(run!), `${what} explains its failure`).toHaveLength(1);
    }
  });

  it('the library gives a Qcow2Error code or succeeds, for open() and load() alike', () => {
    expect(library).toBeDefined();
    expect(library!.signal, library!.stderr).toBeNull();
    expect(library!.status, library!.stderr).toBe(0);
    expect(library!.results.size).toBe(probed.length);
    for (const [file, result] of library!.results) {
      expect(result.open, file).toMatch(/^(ok|[A-Z0-9_]+)$/);
      expect(result.load, file).toMatch(/^(ok|[A-Z0-9_]+)$/);
      // A load never succeeds where open failed.
      if (result.open !== 'ok') expect(result.load, file).not.toBe('ok');
    }
  });

  it.each(probed)('$defect gives its expected codes', ({ defect, file }) => {
    const expected = expectedCodes[defect];
    expect(expected, `no expectation recorded for defect ${defect}`).toBeDefined();
    expect(library?.results.get(file)).toEqual({ open: expected!.open, load: expected!.load });
  });

  it.each(probed)('$defect: its expectation reads where qemu-img reads and refuses where it refuses (oracle qemu-img)', ({ defect, file }) => {
    const expected = expectedCodes[defect];
    expect(expected, `no expectation recorded for defect ${defect}`).toBeDefined();
    // An entry qemu-img cannot answer says so (oracle "none: ..."): only review holds it.
    if (expected!.oracle !== 'qemu-img') return;
    const qemu = qemuReads.get(file);
    expect(qemu, 'qemu-img was not run').toBeDefined();
    const firstLine = (ran: Ran) => ran.stderr.split('\n').find((line) => line.trim() !== '') ?? '';
    expect(expected!.open === 'ok', `open "${expected!.open}"; qemu-img info exit ${qemu!.info.status}: ${firstLine(qemu!.info)}`).toBe(qemu!.info.status === 0);
    expect(expected!.load === 'ok', `load "${expected!.load}"; qemu-img convert exit ${qemu!.convert.status}: ${firstLine(qemu!.convert)}`).toBe(qemu!.convert.status === 0);
  });
});

describe('a file too large to check', () => {
  it('more clusters than an int counts: exit 1 with one check error, as qemu-img, without counting them', () => {
    const image = path.join(work, 'huge-sparse.qcow2');
    const made = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', image, '1M'], { encoding: 'utf8' });
    expect(made.status, made.stderr).toBe(0);
    fs.truncateSync(image, 1100 * 2 ** 30);
    const qemu = spawnSync('qemu-img', ['check', image], { encoding: 'utf8' });
    const ours = spawnSync(process.execPath, [cli, 'check', '--json', image], { encoding: 'utf8', timeout: 60_000 });
    expect(ours.signal).toBeNull();
    expect(ours.status).toBe(qemu.status);
    const report = JSON.parse(ours.stdout) as { checkErrors: number; issues: { message: string }[] };
    expect(report.checkErrors).toBe(1);
    expect(report.issues[0]!.message).toMatch(/too large to check/);
    fs.rmSync(image);
  });
});

/**
 * Differential test: seeded random images (test/helpers/random-image.ts) read by qcow2img and by
 * QEMU, compared byte for byte (load, read, load --snapshot), entry for entry (map), field for
 * field (info) and verdict for verdict (check).
 *
 * DIFF_SEEDS=N runs seeds 1..N instead of the fixed list (DIFF_SEED_START=S: S..S+N-1);
 * DIFF_SEED=S runs only seed S; DIFF_KEEP=1 keeps the images (their folder is printed), each with
 * a repro.sh that rebuilds it; DIFF_CLI=path/to/dist/cli/main.js runs another build's CLI.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ImageInfo, MapEntry } from '../../src/index';
import { open } from '../../src/index';
import { MiB, type Ran, checkCountKeys, cliPath, expectInfoAgrees, expectMapAgrees, firstDifference, interestingReads, parseJsonOutput, qemuInfoChain, qemuMap, runAsync } from '../helpers/qemu';
import { prng } from '../helpers/prng';
import { type RandomImage, randomImage } from '../helpers/random-image';

/**
 * Seeds 1-30, then seeds for what those lack (commit, rebase, a dirty image, resizes after a
 * snapshot): together they cover every generator feature (asserted below) in well under a minute.
 *
 * Seeds 18, 31, 85 and 87 sit exactly on QEMU's preallocation=metadata threshold (clusters in use
 * >= threshold, as qcow2_detect_metadata_preallocation counts them): its map then reports data
 * clusters over holes of the file as zeros, and so must ours.
 */
const fixedSeeds = [...Array.from({ length: 30 }, (_, i) => i + 1), 31, 33, 34, 37, 70, 83, 85, 87, 90, 120];

function seedsToRun(): { seeds: number[]; fixed: boolean } {
  if (process.env['DIFF_SEED']) return { seeds: [Number(process.env['DIFF_SEED'])], fixed: false };
  if (process.env['DIFF_SEEDS']) {
    const start = Number(process.env['DIFF_SEED_START'] ?? 1);
    return { seeds: Array.from({ length: Number(process.env['DIFF_SEEDS']) }, (_, i) => start + i), fixed: false };
  }
  return { seeds: fixedSeeds, fixed: true };
}
const { seeds, fixed } = seedsToRun();

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-differential-'));
afterAll(() => {
  if (process.env['DIFF_KEEP']) console.log(`differential test images kept in ${root}`);
  else fs.rmSync(root, { recursive: true, force: true });
});

/** DIFF_CLI: another build's dist/cli/main.js, to try a fix against the same seeds. */
const cliUnderTest = process.env['DIFF_CLI'] ?? cliPath;
const cli = (args: readonly string[], cwd: string) => runAsync(process.execPath, [cliUnderTest, ...args], cwd);

async function mustRun(command: string, args: readonly string[], cwd: string): Promise<Ran> {
  const ran = await runAsync(command, args, cwd);
  if (ran.status !== 0) throw new Error(`${command} ${args.join(' ')} failed (${ran.status ?? ran.signal}): ${ran.stderr.trim()}`);
  return ran;
}



/** What both tools made of one image. */
interface Outcome {
  image: RandomImage;
  reference: string;
  load: Ran;
  loaded: string;
  /** How map --json disagreed with qemu-img map (compared before the loads: see evaluate). */
  mapFailure: Error | undefined;
  info: Ran;
  check: { qemu: Ran; ours: Ran };
  /** qemu: convert -l; applied: snapshot -a and convert, where the snapshot recorded another size. */
  snapshots: { ref: string; qemu: string; applied: string | undefined; ours: Ran; loaded: string }[];
}

/** Builds the image, then runs qemu-img and qcow2img on it side by side. */
async function evaluate(seed: number): Promise<Outcome> {
  const dir = path.join(root, `seed-${seed}`);
  const image = randomImage(seed, dir);
  const file = image.image;
  const reference = path.join(dir, 'qemu.raw');
  const loaded = path.join(dir, 'ours.raw');
  // The first snapshot also by its id.
  const snapshotRefs = image.snapshots.length ? [...image.snapshots, '1'] : [];
  const snapshots = snapshotRefs.map((ref, index) => ({ ref, index, qemu: path.join(dir, `qemu-snapshot-${index}.raw`), loaded: path.join(dir, `ours-snapshot-${index}.raw`) }));
  // The maps first, both before anything reads the image's data: on ext4, SEEK_DATA (which both
  // ask for images QEMU takes for preallocation=metadata) reports unwritten extents as data once
  // their pages are in the page cache, so a read in between would change qemu-img map's answer.
  const [map, info] = await Promise.all([cli(['map', file, '--json'], dir), cli(['info', file, '--json', '--backing-chain'], dir)]);
  let mapFailure: Error | undefined;
  const blocksBefore = fs.statSync(file).blocks;
  try {
    expect(map.status, `qcow2img map: ${map.stderr.trim()}`).toBe(0);
    expectMapAgrees(JSON.parse(map.stdout) as MapEntry[], file, dir);
  } catch (error) {
    mapFailure = error as Error;
    // QEMU's preallocation=metadata heuristic weighs the refcounted clusters against these.
    mapFailure.message += `\nst_blocks of the image before our map: ${blocksBefore}, after qemu-img map: ${fs.statSync(file).blocks}`;
  }
  const [, load, qemuCheck, ourCheck, ...snapshotLoads] = await Promise.all([
    mustRun('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, reference], dir),
    cli(['load', file, loaded, '--progress=none'], dir),
    runAsync('qemu-img', ['check', '--output=json', file], dir),
    cli(['check', file, '--json'], dir),
    ...snapshots.map(async (s) => {
      const param = /^\d+$/.test(s.ref) ? `snapshot.id=${s.ref}` : `snapshot.name=${s.ref}`;
      const [, ours] = await Promise.all([
        mustRun('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', '-l', param, file, s.qemu], dir),
        cli(['load', file, s.loaded, '--snapshot', s.ref, '--progress=none'], dir),
      ]);
      // convert -l reads a snapshot at the image's current size; load reads it at the size it
      // recorded, as qemu-img snapshot -a (on a copy, in the same folder for its backing name) does.
      let applied: string | undefined;
      if (ours.status === 0 && fs.statSync(s.loaded).size !== fs.statSync(s.qemu).size) {
        const copy = path.join(dir, `apply-${s.index}.qcow2`);
        applied = path.join(dir, `qemu-apply-${s.index}.raw`);
        fs.copyFileSync(file, copy);
        await mustRun('qemu-img', ['snapshot', '-a', s.ref, copy], dir);
        await mustRun('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', copy, applied], dir);
        fs.rmSync(copy);
      }
      return { ours, applied };
    }),
  ]);
  return {
    image,
    reference,
    load,
    loaded,
    mapFailure,
    info,
    check: { qemu: qemuCheck, ours: ourCheck },
    snapshots: snapshots.map((s, i) => ({ ...s, ...(snapshotLoads[i] as { ours: Ran; applied: string | undefined }) })),
  };
}

/** Where a guest offset lies in qemu-img's map, for messages. */
function mapAt(image: string, dir: string, offset: number): string {
  const entry = qemuMap(image, dir).find((e) => e.start <= offset && offset < e.start + e.length);
  return entry ? JSON.stringify(entry) : 'no qemu-img map entry';
}

function expectSameBytes(what: string, outcome: Outcome, ours: string, expected: string): void {
  const a = fs.readFileSync(ours);
  const b = fs.readFileSync(expected);
  const at = firstDifference(a, b);
  const context = at < 0 ? '' : `: ours ${a[at] ?? 'EOF'} vs qemu ${b[at] ?? 'EOF'}; qemu-img map there: ${mapAt(outcome.image.image, outcome.image.dir, at)}`;
  expect(a.length, `${what}: size\n${outcome.image.summary}`).toBe(b.length);
  expect(at, `${what}: first differing byte${context}\n${outcome.image.summary}`).toBe(-1);
}

const outcomes = new Map<number, Outcome>();

/**
 * The outcome of a seed, evaluating the next one meanwhile: its image is built (synchronously)
 * while this one's qemu-img and qcow2img processes run, which keeps two cores busy.
 */
const pending = new Map<number, Promise<Outcome>>();
function outcomeOf(seed: number): Promise<Outcome> {
  const index = seeds.indexOf(seed);
  for (const s of seeds.slice(index, index + 2)) {
    if (!pending.has(s)) {
      const promise = evaluate(s);
      promise.catch(() => undefined); // reported by the seed's own beforeAll
      pending.set(s, promise);
    }
  }
  return pending.get(seed)!;
}

for (const seed of seeds) {
  describe(`seed ${seed}`, () => {
    let outcome: Outcome;
    beforeAll(async () => {
      outcome = await outcomeOf(seed);
      outcomes.set(seed, outcome);
    });
    const where = () => `seed ${seed} in ${outcome.image.dir}\n${outcome.image.summary}`;

    it('load writes what qemu-img convert -O raw writes', () => {
      expect(outcome.load.status, `qcow2img load: ${outcome.load.stderr.trim()}\n${where()}`).toBe(0);
      expectSameBytes(`load of seed ${seed}`, outcome, outcome.loaded, outcome.reference);
    });

    it('map --json equals qemu-img map --output=json', () => {
      if (outcome.mapFailure) {
        outcome.mapFailure.message += `\n${where()}`;
        throw outcome.mapFailure;
      }
    });

    it('info --json --backing-chain agrees with qemu-img info --backing-chain', () => {
      expect(outcome.info.status, `qcow2img info: ${outcome.info.stderr.trim()}\n${where()}`).toBe(0);
      const ours = JSON.parse(outcome.info.stdout) as ImageInfo[];
      const qemu = qemuInfoChain(outcome.image.image);
      expect(ours.length, `backing chain length\n${where()}`).toBe(qemu.length);
      try {
        ours.forEach((info, i) => expectInfoAgrees(info, qemu[i]!, outcome.image.dir));
      } catch (error) {
        (error as Error).message += `\n${where()}`;
        throw error;
      }
      expect(ours[0]!.snapshots?.length ?? 0, `snapshot count\n${where()}`).toBe(outcome.image.snapshots.length);
    });

    it('check --json exits as qemu-img check does (0 where it finds the image clean), with the same counts', () => {
      const { qemu, ours } = outcome.check;
      expect(qemu.signal, where()).toBeNull();
      expect([0, 2, 3], `qemu-img check: ${qemu.stderr.trim()}\n${where()}`).toContain(qemu.status);
      // Only an image left dirty by a killed qemu-io may have stale refcounts.
      if (!outcome.image.dirty) expect(qemu.status, `qemu-img check: ${qemu.stderr.trim()}\n${where()}`).toBe(0);
      expect(ours.signal, where()).toBeNull();
      const ourJson = parseJsonOutput(ours.stdout) as Record<string, unknown> | undefined;
      expect(ours.status, `qcow2img check: ${ours.stderr.trim()} ${JSON.stringify(ourJson?.['issues'] ?? []).slice(0, 600)}\n${where()}`).toBe(qemu.status);
      const qemuJson = parseJsonOutput(qemu.stdout) as Record<string, unknown>;
      const differences: Record<string, [unknown, unknown]> = {};
      for (const [qemuKey, ourKey] of checkCountKeys) {
        if ((qemuJson[qemuKey] ?? 0) !== ourJson?.[ourKey]) differences[qemuKey] = [qemuJson[qemuKey] ?? 0, ourJson?.[ourKey]];
      }
      expect(differences, `check counts [qemu-img, ours]\n${where()}`).toEqual({});
    });

    it('load --snapshot equals qemu-img convert -l (or snapshot -a where the disk has grown since), for every internal snapshot', () => {
      for (const s of outcome.snapshots) {
        expect(s.ours.status, `load --snapshot ${s.ref}: ${s.ours.stderr.trim()}\n${where()}`).toBe(0);
        if (s.applied === undefined) {
          expectSameBytes(`load --snapshot ${s.ref} of seed ${seed}`, outcome, s.loaded, s.qemu);
          continue;
        }
        expectSameBytes(`load --snapshot ${s.ref} of seed ${seed} (qemu-img snapshot -a)`, outcome, s.loaded, s.applied);
        // convert -l: the same bytes, then up to the current size what the snapshot's tables do not
        // cover: the backing file's bytes, or zeros without one.
        const ours = fs.readFileSync(s.loaded);
        const converted = fs.readFileSync(s.qemu);
        expect(ours.length, where()).toBeLessThan(converted.length);
        expect(firstDifference(ours, converted.subarray(0, ours.length)), `load --snapshot ${s.ref} against convert -l\n${where()}`).toBe(-1);
        if (outcome.image.layers.length === 1) expect(converted.subarray(ours.length).every((b) => b === 0), `convert -l past the snapshot's size\n${where()}`).toBe(true);
      }
    });

    it('open().read() at random unaligned offsets equals qemu-img', async () => {
      const expected = fs.readFileSync(outcome.reference);
      const random = prng(seed ^ 0x5eed);
      const image = await open(outcome.image.image);
      try {
        const size = image.virtualSize;
        expect(size).toBe(expected.length);
        const cluster = image.info.clusterSize!;
        const l2Span = (cluster / (image.info.extendedL2 ? 16 : 8)) * cluster;
        // interestingReads() gives negative offsets for disks smaller than a cluster: those are dropped.
        const reads = interestingReads(size, cluster, l2Span, seed).filter((r) => r.offset >= 0);
        // Across the boundaries between qemu-img map entries, where the kind of data changes.
        const boundaries = qemuMap(outcome.image.image, outcome.image.dir).slice(1).map((e) => e.start);
        for (const b of boundaries.filter((_, i) => i % Math.max(1, Math.floor(boundaries.length / 30)) === 0)) {
          const offset = Math.max(0, b - 700 - (b % 3));
          reads.push({ offset, length: Math.min(1401, size - offset) });
        }
        for (let i = 0; i < 16; i++) {
          const offset = Math.floor(random() * size);
          reads.push({ offset, length: Math.min(size - offset, 1 + Math.floor(random() * Math.min(4 * cluster, 3 * MiB))) });
        }
        for (const { offset, length } of reads) {
          const buffer = Buffer.alloc(length, 0x5a);
          expect(await image.read(buffer, offset), `bytes read at ${offset}\n${where()}`).toBe(length);
          const at = firstDifference(buffer, expected.subarray(offset, offset + length));
          expect(at, `read(${offset}, ${length}): first wrong byte (guest ${offset + at}; qemu-img map: ${at < 0 ? '' : mapAt(outcome.image.image, outcome.image.dir, offset + at)})\n${where()}`).toBe(-1);
        }
      } finally {
        await image.close();
      }
      for (const s of outcome.snapshots.slice(0, 1)) {
        const bytes = fs.readFileSync(s.applied ?? s.qemu);
        const snap = await open(outcome.image.image, { snapshot: s.ref });
        try {
          for (let i = 0; i < 12; i++) {
            const offset = Math.floor(random() * bytes.length);
            const length = Math.min(bytes.length - offset, 1 + Math.floor(random() * 1 * MiB));
            const buffer = Buffer.alloc(length);
            expect(await snap.read(buffer, offset)).toBe(length);
            expect(firstDifference(buffer, bytes.subarray(offset, offset + length)), `read(${offset}, ${length}) of snapshot ${s.ref}\n${where()}`).toBe(-1);
          }
        } finally {
          await snap.close();
        }
      }
    });

    // The raw files are big: drop them once the seed is done.
    afterAll(() => {
      if (!outcome || process.env['DIFF_KEEP']) return;
      for (const name of fs.readdirSync(outcome.image.dir)) {
        if (name.endsWith('.raw') && (name.startsWith('qemu') || name.startsWith('ours'))) fs.rmSync(path.join(outcome.image.dir, name));
      }
    });
  });
}

if (fixed) {
  describe('the fixed seeds', () => {
    it('cover every feature of the generator', () => {
      const layers = [...outcomes.values()].flatMap((o) => o.image.layers);
      const qcow2 = layers.filter((l) => l.format === 'qcow2');
      const has = (option: string) => qcow2.some((l) => l.options.includes(option));
      const features: Record<string, boolean> = {
        'compat 0.10': has('compat=0.10'),
        'compat 1.1': has('compat=1.1'),
        'cluster 512': has('cluster_size=512'),
        'cluster 4k': has('cluster_size=4096'),
        'cluster 64k': has('cluster_size=65536'),
        'cluster 2M': has('cluster_size=2097152'),
        zstd: has('compression_type=zstd'),
        'extended L2': has('extended_l2=on'),
        'refcount bits 1': has('refcount_bits=1'),
        'refcount bits 64': has('refcount_bits=64'),
        'lazy refcounts': has('lazy_refcounts=on'),
        'preallocation=metadata': has('preallocation=metadata'),
        'data file': qcow2.some((l) => l.dataFile !== undefined),
        'data_file_raw': has('data_file_raw=on'),
        'raw backing file': [...outcomes.values()].some((o) => o.image.layers.slice(0, -1).some((l) => l.format === 'raw')),
        'qcow2 backing file': [...outcomes.values()].some((o) => o.image.layers.slice(0, -1).some((l) => l.format === 'qcow2')),
        'chain of 3 backing files': [...outcomes.values()].some((o) => o.image.layers.length === 4),
        'compressed clusters': [...outcomes.values()].some((o) => o.image.compressed),
        'internal snapshots': [...outcomes.values()].some((o) => o.image.snapshots.length > 0),
        'several snapshots': [...outcomes.values()].some((o) => o.image.snapshots.length > 1),
        'resize after a snapshot': layers.some((l) => l.changes.some((c) => c.includes('after snapshot'))),
        'amend refcount_bits': layers.some((l) => l.changes.some((c) => c.includes('refcount_bits='))),
        'amend compat': layers.some((l) => l.changes.some((c) => c.includes('compat='))),
        commit: layers.some((l) => l.changes.some((c) => c.startsWith('committed'))),
        rebase: layers.some((l) => l.changes.some((c) => c.startsWith('rebase'))),
        'dirty (killed) image': [...outcomes.values()].some((o) => o.image.dirty),
        'disk smaller than a cluster': [...outcomes.values()].some((o) => o.image.layers.at(-1)!.virtualSize < o.image.layers.at(-1)!.clusterSize!),
      };
      expect(Object.entries(features).filter(([, present]) => !present).map(([name]) => name)).toEqual([]);
    });
  });
}

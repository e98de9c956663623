#!/usr/bin/env node
/**
 * Times a memory-only snapshot of a real 1 GiB guest RAM dump (.cache/vm/ram.raw and cpu.json, made
 * by ram-dump.mjs) against zstd, in one run so the ratios hold when the machine's speed drifts:
 *
 *   create:  node dist/cli/main.js snapshot create OUT --memory ram.raw --cpu cpu.json
 *            zstd -T2 -3 -f ram.raw -o ram.zst
 *   restore: node dist/cli/main.js snapshot restore OUT --memory OUT.raw
 *            zstd -d -f ram.zst -o ram.out
 *            and both again into /dev/shm (tmpfs, where a hypervisor's RAM file lives: nothing to
 *            flush there, for either tool), when it has room
 *
 *   node benchmarks/snapshot.mjs [--runs 3] [--cache-dir .cache/vm] [--quiet-timeout 15]
 *                                [--max-others-cpu 0.3] [--attempts 4] [--profile|--no-profile]
 *                                [--skip-sparse] [--skip-tmpfs] [--skip-busy] [--skip-library]
 *   (--skip-tmpfs leaves out the dump copied into /dev/shm; the restores into /dev/shm still run)
 *
 * Four dumps, side by side: the booted guest's (mostly zero pages); the same copied into /dev/shm,
 * fully allocated (a guest's RAM file in tmpfs once it has touched all its memory; when /dev/shm
 * has room); the same as a sparse file
 * (ram.sparse.raw, `cp --sparse=always` of it, made once: a guest's RAM file on tmpfs has holes where
 * the guest never wrote; qcow2img does not read them, zstd reads the same file, holes as zeros); and
 * a busy guest's (busy.raw, made once from it by makeBusyDump: its zero pages, but for every 40th,
 * filled page by page with the host's files, as a busy guest's page cache holds them: real,
 * compressible but varied data). The summary table gives, for each dump, the time ratio and size
 * ratio against zstd and both peak RSS.
 *
 * The bars: create at least 2x faster than zstd on the mostly-zero dump and 1.2x on the busy one, and
 * no larger (our size = state.qvms);
 * restore at least as fast as zstd -d. Each figure is the median of --runs runs, the tools taking
 * turns at going first. Page cache warm for both: ram.raw is read once before the runs, so both read
 * it from memory; the restore inputs were just written. Outputs go to .cache/vm/bench/out (the same
 * filesystem), removed (and the removal synced) before every run. The clock covers the whole process (node start-up
 * included); CPU seconds and peak RSS come from GNU time (%U %S %M). The machine is shared: each run
 * waits for a quiet second (up to --quiet-timeout s) and is redone, up to --attempts times, while
 * the rest of the machine used more than --max-others-cpu CPU seconds during it (least disturbed
 * attempt kept; the worst kept figure is shown). qcow2img fdatasyncs what it writes, zstd does not:
 * the `sync` run after each process is timed separately and shown.
 *
 * Then node start-up and module loading alone, and the library in a child node timed inside it:
 * writeState, createSnapshot and restoreMemory, to separate start-up from the work. Verified once:
 * the restored RAM equals ram.raw byte for byte (cmp), the CPU JSON comes back equal, `snapshot
 * verify` passes.
 *
 * Profile (--profile, or by default when a bar is missed): the real writeState, createSnapshot and
 * restoreMemory, instrumented from outside (the addon's batch calls, hashFile and FileHandle
 * writes/syncs wrapped with timestamps), other thread counts, levels and no compression, and
 * processDumpBatch alone (scan, dedup and compression apart; batch and chunk sizes), to show where
 * the time goes. src/ and native/ are not touched.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { isDeepStrictEqual, parseArgs } from 'node:util';
import {
  ensureFreeSpace,
  freezeBuild,
  humanBytes,
  killRunningChildren,
  machineFacts,
  markdownTable,
  median,
  printFacts,
  repoRoot,
  run,
} from './common.mjs';
import { timed, timedSync, warmPageCache } from './harness.mjs';

const f2 = (value) => (Number.isFinite(value) ? value.toFixed(2) : '-');
const f3 = (value) => (Number.isFinite(value) ? value.toFixed(3) : '-');
const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;
/** The median, and the largest, of one field over a list of runs. */
const m = (list, key) => median(list.map((x) => x[key]));
const worst = (list, key) => Math.max(...list.map((x) => x[key]));
const thisFile = new URL(import.meta.url).pathname;

// ---- helpers (as in capture.mjs) ----

function installed(pkg) {
  const result = spawnSync('dpkg-query', ['-W', '-f=${Status}', pkg], { encoding: 'utf8' });
  return result.status === 0 && result.stdout.includes('install ok installed');
}

/** Fails naming what is missing: no benchmark installs packages (scripts/setup.sh does). */
function requirePackages(packages) {
  const missing = packages.filter((pkg) => !installed(pkg));
  if (missing.length) throw new Error(`missing ${missing.join(' ')}: npm run setup installs them`);
}

/** Cached pages of a file, out of all (fincore from util-linux), to say the cache is warm. */
function cachedShare(file) {
  const result = spawnSync('fincore', ['-b', '-n', '-o', 'RES,SIZE', file], { encoding: 'utf8' });
  const [res, size] = (result.stdout ?? '').trim().split(/\s+/).map(Number);
  return size > 0 ? res / size : NaN;
}

const rm = (...files) => {
  for (const file of files) fs.rmSync(file, { recursive: true, force: true });
};

// ---- in-process children: the library without the CLI ----

/**
 * Runs in a child node: the library call alone, timed inside, optionally instrumented. Prints one
 * JSON line. Modes: load (module loading times), write (writeState), bundle (createSnapshot), restore
 * (restoreMemory), batch (processDumpBatch alone, nothing written).
 */
async function childMain(spec) {
  const require = createRequire(path.join(spec.dist, 'index.js'));
  if (spec.mode === 'load') {
    // What loading costs, module by module, in the order the CLI meets them.
    const loads = {};
    let t = performance.now();
    for (const [name, id] of [['valibot', 'valibot'], ['writer', path.join(spec.dist, 'vmstate', 'writer.js')], ['snapshot', path.join(spec.dist, 'snapshot', 'index.js')], ['index', path.join(spec.dist, 'index.js')]]) {
      require(id);
      loads[name] = (performance.now() - t) / 1000;
      t = performance.now();
    }
    process.stdout.write(JSON.stringify({ loads, seconds: Object.values(loads).reduce((a, b) => a + b, 0) }) + '\n');
    return;
  }
  const loadStarted = performance.now();
  const writer = require(path.join(spec.dist, 'vmstate', 'writer.js'));
  const reader = require(path.join(spec.dist, 'vmstate', 'reader.js'));
  const snapshot = require(path.join(spec.dist, 'snapshot', 'index.js'));
  const { native, Codec } = require(path.join(spec.dist, 'native.js'));
  const addon = native();
  const loadSeconds = (performance.now() - loadStarted) / 1000;

  // Instrumentation from outside: wrap the addon's batch calls and FileHandle writes and syncs.
  const profile = { batches: [], writeSeconds: 0, writeCalls: 0, writeBytes: 0, syncSeconds: 0, hashFileSeconds: 0, events: [] };
  const t0 = performance.now();
  const now = () => (performance.now() - t0) / 1000;
  if (spec.instrument) {
    for (const name of ['processDumpBatch', 'restoreBatch']) {
      const original = addon[name];
      addon[name] = function (batchSpec) {
        const start = now();
        return original.call(this, batchSpec).then((result) => {
          const end = now();
          profile.batches.push({ name, start, end, seconds: end - start, chunks: result.chunks?.length, stored: result.chunks?.reduce((n, c) => n + c.stored.length, 0) });
          return result;
        });
      };
    }
    const originalHashFile = addon.hashFile;
    addon.hashFile = function (fd) {
      const start = now();
      return originalHashFile.call(this, fd).then((h) => {
        profile.hashFileSeconds += now() - start;
        return h;
      });
    };
    const probe = await fs.promises.open(thisFile, 'r');
    const proto = Object.getPrototypeOf(probe);
    await probe.close();
    for (const name of ['write', 'writev', 'datasync', 'sync']) {
      const original = proto[name];
      proto[name] = async function (...args) {
        const start = now();
        try {
          return await original.apply(this, args);
        } finally {
          const seconds = now() - start;
          if (name === 'write' || name === 'writev') {
            profile.writeSeconds += seconds;
            profile.writeCalls += 1;
            profile.writeBytes += name === 'writev' ? args[0].reduce((n, b) => n + b.length, 0) : (args[0]?.length ?? 0);
          } else profile.syncSeconds += seconds;
        }
      };
    }
  }

  const out = { loadSeconds };
  const started = performance.now();
  if (spec.mode === 'write') {
    const result = await writer.writeState(spec.output, { memory: spec.memory, cpu: JSON.parse(fs.readFileSync(spec.cpu, 'utf8')), ...spec.options });
    out.bytes = result.bytes;
    out.pages = result.pages;
  } else if (spec.mode === 'bundle') {
    await snapshot.createSnapshot(spec.output, { memory: spec.memory, cpu: JSON.parse(fs.readFileSync(spec.cpu, 'utf8')), ...spec.options });
  } else if (spec.mode === 'restore') {
    const openStarted = performance.now();
    const state = await reader.StateFile.open(spec.state);
    out.openSeconds = (performance.now() - openStarted) / 1000;
    try {
      await reader.restoreMemory(state, spec.output, spec.options);
    } finally {
      await state.close();
    }
  } else if (spec.mode === 'batch') {
    // processDumpBatch alone over the whole dump, in the writer's 64 MiB batches, nothing written.
    const handle = await fs.promises.open(spec.memory, 'r');
    const size = (await handle.stat()).size;
    const dedup = spec.dedup ? new addon.DedupTable() : undefined;
    const batchPages = (spec.batchBytes ?? 64 << 20) / 4096;
    let stored = 0;
    for (let page = 0; page < size / 4096; page += batchPages) {
      const start = now();
      const result = await addon.processDumpBatch({
        sourceFd: handle.fd, dumpOffset: page * 4096, firstPage: page, pageCount: Math.min(batchPages, size / 4096 - page), pageSize: 4096, spanPages: 512,
        firstSpan: page / 512, incremental: false, ...(dedup ? { dedup } : {}), codec: spec.codec === 'zstd' ? Codec.Zstd : Codec.None, level: spec.level, chunkTargetBytes: spec.chunkTargetBytes ?? 1 << 20, threads: spec.threads,
      });
      stored += result.chunks.reduce((n, c) => n + c.stored.length + 64, 0);
      profile.batches.push({ name: 'processDumpBatch', start, end: now(), seconds: now() - start, chunks: result.chunks.length });
    }
    await handle.close();
    out.bytes = stored;
  }
  out.seconds = (performance.now() - started) / 1000;
  if (spec.instrument || spec.mode === 'batch') out.profile = profile;
  out.maxRssBytes = process.resourceUsage().maxRSS * 1024;
  process.stdout.write(JSON.stringify(out) + '\n');
}

/** Options of every measured run: how long to wait for quiet, when to redo a disturbed run. */
const runOptions = { quietTimeout: 15, maxOthersCpu: 0.3, attempts: 4 };

/**
 * A measured run, redone (up to runOptions.attempts times) while the rest of the machine used more
 * than runOptions.maxOthersCpu CPU seconds during it; the least disturbed attempt is kept.
 * `prepare` runs before each attempt (removing outputs); `sync` is timed after each.
 */
async function measured(prepare, command, args) {
  let best;
  for (let attempt = 1; attempt <= runOptions.attempts; attempt++) {
    prepare?.();
    // The previous output's removal is flushed before the clock starts (as capture.mjs does): its
    // freed blocks (discarded on this filesystem) would otherwise land on the next journal commit,
    // which is the fdatasync of whichever tool flushes.
    timedSync();
    // Re-warmed after the wait for quiet, right before the run: the cache can be dropped meanwhile.
    const result = await timed(command, args, { quietTimeout: runOptions.quietTimeout, beforeRun: rewarm });
    result.sync = timedSync();
    result.attempts = attempt;
    if (!best || result.othersCpuSeconds < best.othersCpuSeconds) best = { ...result, attempts: attempt };
    best.attempts = attempt;
    if (result.othersCpuSeconds <= runOptions.maxOthersCpu) break;
  }
  return best;
}

/**
 * Inputs kept in the page cache before every run: other benchmarks on this machine drop the page
 * cache (load.mjs --cold), which would turn a warm run into a cold one. Counts the times it had to.
 */
const warmFiles = new Set();
let coldFound = 0;
function rewarm() {
  for (const file of warmFiles) {
    if (!fs.existsSync(file)) continue;
    if (cachedShare(file) < 0.999) coldFound += 1;
    warmPageCache(file);
  }
}

/** The library in a child node (see childMain), measured like a command. */
async function child(spec, prepare) {
  const result = await measured(prepare, process.execPath, [thisFile, '--child', JSON.stringify(spec)]);
  const line = result.stdout.trim().split('\n').pop();
  return { ...JSON.parse(line), processSeconds: result.seconds, cpuSeconds: result.cpuSeconds, rssBytes: result.rssBytes, othersCpuSeconds: result.othersCpuSeconds, attempts: result.attempts };
}

/** Byte for byte (cmp). */
const same = (a, b) => spawnSync('cmp', ['-s', a, b]).status === 0;

/**
 * Create and restore of one RAM dump, each tool in turn, `runs` times: prints the two tables and
 * returns the medians for the side-by-side summary.
 */
async function compare({ label, ram, cpu, build, outDir, shmDir, runs, speedBar }) {
  const name = path.basename(ram);
  // Where a hypervisor's RAM file lives (tmpfs): nothing to flush, for either tool.
  const restoredShm = shmDir && path.join(shmDir, 'snap.raw');
  const zstOutShm = shmDir && path.join(shmDir, 'ram.out');
  const bundle = path.join(outDir, 'snap');
  const restored = path.join(outDir, 'snap.raw');
  const zst = path.join(outDir, 'ram.zst');
  const zstOut = path.join(outDir, 'ram.out');
  const cpuOut = path.join(outDir, 'cpu.out.json');
  for (const file of [ram, path.join(bundle, 'state.qvms'), zst]) warmFiles.add(file);
  warmPageCache(ram);
  const ours = { create: [], restore: [], restoreShm: [] };
  const zstd = { create: [], restore: [], restoreShm: [] };
  let verified;
  // The tmpfs outputs, checked after every run (each is removed before the other tool runs).
  const shmSame = { ours: true, zstd: true };
  for (let r = 0; r < runs; r++) {
    const doOurs = async () => {
      const c = await measured(() => rm(bundle), process.execPath, [build.cliPath, 'snapshot', 'create', bundle, '--memory', ram, '--cpu', cpu]);
      c.bytes = fs.statSync(path.join(bundle, 'state.qvms')).size;
      ours.create.push(c);
      ours.restore.push(await measured(() => rm(restored), process.execPath, [build.cliPath, 'snapshot', 'restore', bundle, '--memory', restored]));
      if (shmDir) {
        ours.restoreShm.push(await measured(() => rm(restoredShm), process.execPath, [build.cliPath, 'snapshot', 'restore', bundle, '--memory', restoredShm]));
        shmSame.ours &&= same(ram, restoredShm);
        // Gone before the other tool runs: tmpfs pages stay in memory (no swap here), the page cache's can be reclaimed.
        rm(restoredShm);
      }
    };
    const doZstd = async () => {
      const c = await measured(() => rm(zst), 'zstd', ['-q', '-T2', '-3', '-f', ram, '-o', zst]);
      c.bytes = fs.statSync(zst).size;
      zstd.create.push(c);
      zstd.restore.push(await measured(() => rm(zstOut), 'zstd', ['-q', '-d', '-f', zst, '-o', zstOut]));
      if (shmDir) {
        zstd.restoreShm.push(await measured(() => rm(zstOutShm), 'zstd', ['-q', '-d', '-f', zst, '-o', zstOutShm]));
        shmSame.zstd &&= same(ram, zstOutShm);
        rm(zstOutShm);
      }
    };
    // The tools take turns at going first.
    for (const step of r % 2 === 0 ? [doOurs, doZstd] : [doZstd, doOurs]) await step();
    if (!verified) {
      // Once, untimed: the RAM byte for byte, the CPU JSON back equal, zstd's output too.
      rm(cpuOut);
      await run(process.execPath, [build.cliPath, 'snapshot', 'restore', bundle, '--cpu', cpuOut]);
      const cpuBack = isDeepStrictEqual(JSON.parse(fs.readFileSync(cpuOut, 'utf8')), JSON.parse(fs.readFileSync(cpu, 'utf8')));
      const verify = await run(process.execPath, [build.cliPath, 'snapshot', 'verify', bundle], { allowFailure: true });
      verified = { ram: same(ram, restored), cpu: cpuBack, zstd: same(ram, zstOut), verify: verify.code === 0 };
    }
    rm(restored, zstOut);
  }

  const row = (name, list) => [name, f2(m(list, 'seconds')), f2(m(list, 'sync')), f2(m(list, 'cpuSeconds')), humanBytes(m(list, 'rssBytes')), `${f2(worst(list, 'othersCpuSeconds'))} (${list.reduce((n, x) => n + x.attempts, 0)} runs)`];
  const header = ['command', 'seconds', 'sync after', 'CPU s', 'peak RSS', 'others\' CPU s (worst)'];
  const ourCreate = m(ours.create, 'seconds');
  const zstdCreate = m(zstd.create, 'seconds');
  const ourRestore = m(ours.restore, 'seconds');
  const zstdRestore = m(zstd.restore, 'seconds');
  const ourBytes = ours.create.at(-1).bytes;
  const zstdBytes = zstd.create.at(-1).bytes;
  const pass = (ok) => (ok ? 'PASS' : 'FAIL');
  const createBar = zstdCreate / ourCreate >= speedBar && ourBytes <= zstdBytes;
  const restoreBar = ourRestore <= zstdRestore;
  verified.ram &&= shmSame.ours;
  verified.zstd &&= shmSame.zstd;
  const ourRestoreShm = shmDir ? m(ours.restoreShm, 'seconds') : undefined;
  const zstdRestoreShm = shmDir ? m(zstd.restoreShm, 'seconds') : undefined;

  console.log(`## Create: ${label} (median of ${runs})`);
  console.log('');
  console.log(
    markdownTable(
      [...header, 'output'],
      [
        [...row(`qcow2img snapshot create OUT --memory ${name} --cpu cpu.json`, ours.create), `${mb(ourBytes)} (state.qvms)`],
        [...row(`zstd -T2 -3 -f ${name} -o ram.zst`, zstd.create), mb(zstdBytes)],
      ],
    ),
  );
  console.log('');
  console.log(`- speed: zstd / qcow2img = ${f2(zstdCreate / ourCreate)}x (bar: >= ${speedBar}x); CPU: zstd / qcow2img = ${f2(m(zstd.create, 'cpuSeconds') / m(ours.create, 'cpuSeconds'))}x; size: qcow2img / zstd = ${f3(ourBytes / zstdBytes)} (bar: <= 1): ${pass(createBar)}`);
  console.log('');
  console.log(`## Restore: ${label} (median of ${runs})`);
  console.log('');
  console.log(
    markdownTable(header, [
      row('qcow2img snapshot restore OUT --memory OUT.raw', ours.restore),
      row('zstd -d -f ram.zst -o ram.out', zstd.restore),
    ]),
  );
  console.log('');
  console.log(`- speed: zstd / qcow2img = ${f2(zstdRestore / ourRestore)}x (bar: >= 1x); CPU: zstd / qcow2img = ${f2(m(zstd.restore, 'cpuSeconds') / m(ours.restore, 'cpuSeconds'))}x: ${pass(restoreBar)}`);
  if (shmDir) {
    console.log('');
    console.log(markdownTable(header, [
      row('qcow2img snapshot restore OUT --memory /dev/shm/OUT.raw', ours.restoreShm),
      row('zstd -d -f ram.zst -o /dev/shm/ram.out', zstd.restoreShm),
    ]));
    console.log('');
    console.log(`- into tmpfs (/dev/shm, where a hypervisor's RAM file lives; no flush for either): zstd / qcow2img = ${f2(zstdRestoreShm / ourRestoreShm)}x (bar: >= 1x): ${pass(ourRestoreShm <= zstdRestoreShm)}`);
  }
  console.log(`- verified once: restored RAM ${verified.ram ? 'equals' : 'DIFFERS FROM'} ${name} (cmp); CPU JSON ${verified.cpu ? 'round-trips equal' : 'DIFFERS'}; snapshot verify ${verified.verify ? 'clean' : 'FAILED'}; zstd's output ${verified.zstd ? 'equals' : 'DIFFERS FROM'} ${name}`);
  console.log('');

  return {
    label, createSeconds: [ourCreate, zstdCreate], restoreSeconds: [ourRestore, zstdRestore], restoreShmSeconds: shmDir ? [ourRestoreShm, zstdRestoreShm] : undefined, bytes: [ourBytes, zstdBytes],
    createRss: [m(ours.create, 'rssBytes'), m(zstd.create, 'rssBytes')], restoreRss: [m(ours.restore, 'rssBytes'), m(zstd.restore, 'rssBytes')],
    createBar, restoreBar, verified,
  };
}

// ---- the mostly-zero dump as a sparse file ----

/**
 * ram.raw as a guest's RAM file on tmpfs holds it: pages never written are holes. `cp --sparse=always`
 * makes a hole of every zero block, so the guest's zero pages are all holes here (a real guest's file
 * also holds allocated zero pages, which are read). Made once next to ram.raw, again when ram.raw is newer.
 */
function makeSparseDump(dir, ram) {
  const out = path.join(dir, 'ram.sparse.raw');
  try {
    const made = fs.statSync(out);
    const source = fs.statSync(ram);
    if (made.size === source.size && made.mtimeMs >= source.mtimeMs) return out;
  } catch {
    // made below
  }
  console.error('making the sparse copy of the RAM dump (once)...');
  const temporary = `${out}.tmp`;
  rm(temporary);
  const copied = spawnSync('cp', ['--sparse=always', ram, temporary], { encoding: 'utf8' });
  if (copied.status !== 0) throw new Error(`cp --sparse=always ${ram}: ${copied.stderr.trim()}`);
  fs.renameSync(temporary, out);
  return out;
}

function sparseDescription(sparseRam) {
  const stats = fs.statSync(sparseRam);
  const allocated = (100 * stats.blocks * 512) / stats.size;
  return `ram.raw copied with cp --sparse=always (${allocated.toFixed(1)}% allocated, every zero page a hole), as a guest's RAM file on tmpfs leaves the pages it never touched; zstd reads the same file`;
}

// ---- the busy guest's RAM dump ----

/** Host folders whose files fill the busy dump, in this order (sorted walk): binaries, libraries, text. */
const busySources = ['/usr/lib/x86_64-linux-gnu', '/usr/bin', '/usr/share/perl', '/usr/share/locale', '/usr/share/doc', '/usr/lib/python3', '/usr/share'];
const BUSY_RECIPE = 'busy-2: booted guest pages kept; its zero pages, but for every 40th, filled with host files page by page, a file from each folder in turn (' + busySources.join(', ') + ')';

function* filesUnder(root, seen) {
  let entries;
  try {
    entries = fs.readdirSync(root, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  } catch {
    return;
  }
  for (const entry of entries) {
    const full = path.join(root, entry.name);
    if (entry.isDirectory()) yield* filesUnder(full, seen);
    else if (entry.isFile() && !seen.has(full)) {
      seen.add(full);
      yield full;
    }
  }
}

/**
 * A RAM dump of a busy guest, made once from the booted guest's (ram.raw): its non-zero pages kept
 * where they are (kernel, processes, tmpfs text), and its zero pages, but for every 40th, filled with
 * what a busy guest's page cache holds: the host's files (shared libraries, executables, documentation,
 * Perl modules, locale catalogues) read page by page, each file's last page zero-padded as the page
 * cache holds it. Real, compressible but varied data, with few zero pages. Cached as busy.raw with
 * its make-up in busy.json, made again when the recipe changes.
 */
function makeBusyDump(dir, ram) {
  const out = path.join(dir, 'busy.raw');
  const metaPath = path.join(dir, 'busy.json');
  try {
    const meta = JSON.parse(fs.readFileSync(metaPath, 'utf8'));
    if (meta.recipe === BUSY_RECIPE && fs.statSync(out).size === fs.statSync(ram).size) return out;
  } catch {
    // made below
  }
  console.error('making the busy RAM dump (once)...');
  const size = fs.statSync(ram).size;
  const page = 4096;
  const source = fs.openSync(ram, 'r');
  const temporary = `${out}.tmp`;
  const target = fs.openSync(temporary, 'w');
  // A file from each folder in turn: a page cache holds libraries, executables and text side by side.
  const files = (function* () {
    const seen = new Set();
    const walks = busySources.map((root) => filesUnder(root, seen));
    while (walks.length) {
      for (let i = 0; i < walks.length; ) {
        const next = walks[i].next();
        if (next.done) walks.splice(i, 1);
        else {
          yield next.value;
          i++;
        }
      }
    }
  })();
  let current; // { fd, position, size }
  const nextFilePage = (into) => {
    for (;;) {
      if (!current) {
        const next = files.next();
        if (next.done) return false;
        try {
          const fd = fs.openSync(next.value, 'r');
          current = { fd, position: 0, size: fs.fstatSync(fd).size };
        } catch {
          continue;
        }
      }
      if (current.position < current.size) {
        into.fill(0);
        const n = fs.readSync(current.fd, into, 0, page, current.position);
        current.position += page;
        if (n > 0) return true;
      }
      fs.closeSync(current.fd);
      current = undefined;
    }
  };
  const batch = Buffer.alloc(16 << 20);
  const makeup = { pages: size / page, keptFromGuest: 0, fromFiles: 0, zero: 0 };
  const zeroPage = Buffer.alloc(page);
  let zeroSeen = 0;
  for (let offset = 0; offset < size; offset += batch.length) {
    const n = fs.readSync(source, batch, 0, Math.min(batch.length, size - offset), offset);
    for (let at = 0; at < n; at += page) {
      const p = batch.subarray(at, at + page);
      if (!p.equals(zeroPage)) {
        makeup.keptFromGuest++;
        continue;
      }
      if (zeroSeen++ % 40 === 0 || !nextFilePage(p)) {
        makeup.zero++;
        continue;
      }
      makeup.fromFiles++;
    }
    fs.writeSync(target, batch, 0, n, offset);
  }
  if (current) fs.closeSync(current.fd);
  fs.closeSync(source);
  fs.fsyncSync(target);
  fs.closeSync(target);
  fs.renameSync(temporary, out);
  fs.writeFileSync(metaPath, JSON.stringify({ recipe: BUSY_RECIPE, makeup }, null, 2) + '\n');
  return out;
}

function busyDescription(busyRam) {
  try {
    const { makeup } = JSON.parse(fs.readFileSync(path.join(path.dirname(busyRam), 'busy.json'), 'utf8'));
    const pct = (n) => `${((100 * n) / makeup.pages).toFixed(1)}%`;
    return `the booted guest's pages (${pct(makeup.keptFromGuest)}) with its zero pages filled from host files (${pct(makeup.fromFiles)}: libraries, executables, docs, Perl, locales); ${pct(makeup.zero)} zero pages`;
  } catch {
    return 'made from ram.raw';
  }
}

/** Both dumps side by side: time and size ratios (zstd / qcow2img for time, qcow2img / zstd for size) and peak RSS. */
function printSideBySide(results, runs) {
  console.log(`## Side by side: qcow2img vs \`zstd -T2 -3\` / \`zstd -d\` (medians of ${runs})`);
  console.log('');
  const rows = [];
  for (const r of results) {
    const name = r.label.split(':')[0];
    rows.push([
      `${name}: create`,
      `${f2(r.createSeconds[0])} s, ${mb(r.bytes[0])}`,
      `${f2(r.createSeconds[1])} s, ${mb(r.bytes[1])}`,
      `${f2(r.createSeconds[1] / r.createSeconds[0])}x`,
      f3(r.bytes[0] / r.bytes[1]),
      `${humanBytes(r.createRss[0])} / ${humanBytes(r.createRss[1])}`,
    ]);
    rows.push([`${name}: restore`, `${f2(r.restoreSeconds[0])} s`, `${f2(r.restoreSeconds[1])} s`, `${f2(r.restoreSeconds[1] / r.restoreSeconds[0])}x`, '-', `${humanBytes(r.restoreRss[0])} / ${humanBytes(r.restoreRss[1])}`]);
    if (r.restoreShmSeconds) rows.push([`${name}: restore into tmpfs`, `${f2(r.restoreShmSeconds[0])} s`, `${f2(r.restoreShmSeconds[1])} s`, `${f2(r.restoreShmSeconds[1] / r.restoreShmSeconds[0])}x`, '-', '-']);
  }
  console.log(markdownTable(['dump: step', 'qcow2img', 'zstd', 'time ratio (zstd / qcow2img)', 'size ratio (qcow2img / zstd)', 'peak RSS (qcow2img / zstd)'], rows));
  console.log('');
  for (const r of results) console.log(`- ${r.label}; verified: restored RAM ${r.verified.ram ? 'equals' : 'DIFFERS FROM'} the dump, zstd's output ${r.verified.zstd ? 'equals' : 'DIFFERS FROM'} it`);
  console.log('');
}

// ---- main ----

async function main() {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      'cache-dir': { type: 'string' },
      'quiet-timeout': { type: 'string', default: String(runOptions.quietTimeout) },
      'max-others-cpu': { type: 'string', default: String(runOptions.maxOthersCpu) },
      attempts: { type: 'string', default: String(runOptions.attempts) },
      profile: { type: 'boolean' },
      'no-profile': { type: 'boolean' },
      'skip-sparse': { type: 'boolean' },
      'skip-tmpfs': { type: 'boolean' },
      'skip-busy': { type: 'boolean' },
      'skip-library': { type: 'boolean' },
      child: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.child) return childMain(JSON.parse(values.child));
  if (values.help) {
    console.log('usage: node benchmarks/snapshot.mjs [--runs 3] [--cache-dir .cache/vm] [--quiet-timeout 15] [--max-others-cpu 0.3] [--attempts 4] [--profile|--no-profile] [--skip-sparse] [--skip-tmpfs] [--skip-busy] [--skip-library]');
    return;
  }
  const runs = Math.max(1, Number(values.runs));
  runOptions.quietTimeout = Number(values['quiet-timeout']);
  runOptions.maxOthersCpu = Number(values['max-others-cpu']);
  runOptions.attempts = Math.max(1, Number(values.attempts));
  const dir = path.resolve(values['cache-dir'] ?? path.join(repoRoot, '.cache', 'vm'));
  const ram = path.join(dir, 'ram.raw');
  const cpu = path.join(dir, 'cpu.json');
  if (!fs.existsSync(ram) || !fs.existsSync(cpu)) throw new Error(`${ram} or ${cpu} is missing: run node benchmarks/ram-dump.mjs first`);
  requirePackages(['zstd', 'time']);

  const work = path.join(dir, 'bench');
  const outDir = path.join(work, 'out');
  fs.mkdirSync(outDir, { recursive: true });
  const ramSize = fs.statSync(ram).size;
  ensureFreeSpace(outDir, ramSize * 3, 'the restored RAM files');
  // Restores into tmpfs as well, as a hypervisor's RAM file is (skipped where /dev/shm has no room).
  const shmDir = fs.existsSync('/dev/shm') && fs.statfsSync('/dev/shm').bavail * fs.statfsSync('/dev/shm').bsize > ramSize * 2.5 ? fs.mkdtempSync('/dev/shm/qcow2img-bench-') : undefined;
  if (shmDir) {
    // tmpfs is memory: its files go also when the run is interrupted.
    const removeShm = () => fs.rmSync(shmDir, { recursive: true, force: true });
    process.once('exit', removeShm);
    for (const signal of ['SIGINT', 'SIGTERM']) {
      process.once(signal, () => {
        killRunningChildren();
        removeShm();
        process.exit(130);
      });
    }
  }
  // A private copy of the build: others rebuild the addon in the tree.
  const build = await freezeBuild(work);
  const dist = path.join(build.dir, 'dist');

  const bundle = path.join(outDir, 'snap');
  const restored = path.join(outDir, 'snap.raw');
  const zst = path.join(outDir, 'ram.zst');
  const zstOut = path.join(outDir, 'ram.out');
  const cpuOut = path.join(outDir, 'cpu.out.json');
  const stateOut = path.join(outDir, 'lib.qvms');
  const libBundle = path.join(outDir, 'lib-bundle');

  console.log(`# Snapshot of a ${humanBytes(ramSize)} guest RAM dump: qcow2img vs zstd`);
  console.log('');
  let makeup = '';
  try {
    const counts = JSON.parse(fs.readFileSync(path.join(dir, 'meta.json'), 'utf8')).makeup;
    makeup = `; ${((100 * counts.zero) / counts.pages).toFixed(1)}% zero pages, ${((100 * counts.duplicate) / counts.nonZero).toFixed(1)}% of the non-zero ones duplicates`;
  } catch {
    // made elsewhere: no make-up to show
  }
  // dist/ is built from whatever src/ held then, which may differ from git HEAD: a digest tells builds apart.
  const distHash = createHash('sha256');
  for (const file of ['cli/main.js', 'vmstate/writer.js', 'vmstate/reader.js', 'snapshot/index.js', 'vmstate/cpu.js']) distHash.update(fs.readFileSync(path.join(dist, file)));
  printFacts([
    ...machineFacts(outDir, build),
    ['dist (cli/main, vmstate/writer, reader, cpu, snapshot/index)', `sha256 ${distHash.digest('hex').slice(0, 12)}, ${/require\('\.\.\/snapshot\/index'\)/.test(fs.readFileSync(path.join(dist, 'cli', 'main.js'), 'utf8')) ? 'the CLI loads the snapshot code on demand' : 'the CLI loads every module at start-up'}`],
    ['zstd', spawnSync('zstd', ['--version'], { encoding: 'utf8' }).stdout.trim()],
    ['input', `${ram} (${humanBytes(ramSize)}${makeup}), ${cpu}`],
    ['load average at start', fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')],
  ]);
  for (const file of [ram, path.join(bundle, 'state.qvms'), zst, stateOut]) warmFiles.add(file);
  warmPageCache(ram);
  console.log(`- page cache: warm for both tools (ram.raw read once before the runs; ${(100 * cachedShare(ram)).toFixed(0)}% of it cached); restore inputs were just written; before every run each input is read again if any of it left the cache`);
  console.log(`- each run waited up to ${runOptions.quietTimeout} s for a quiet second and was redone (up to ${runOptions.attempts} attempts, least disturbed kept) when the rest of the machine used over ${runOptions.maxOthersCpu} CPU s during it`);
  console.log('');

  const mostlyZero = await compare({ label: `mostly-zero: ${path.basename(ram)}, the booted guest${makeup}`, ram, cpu, build, outDir, runs, speedBar: 2, shmDir });
  const { zstdCreate, zstdRestore, createBar, restoreBar } = { zstdCreate: mostlyZero.createSeconds[1], zstdRestore: mostlyZero.restoreSeconds[1], createBar: mostlyZero.createBar, restoreBar: mostlyZero.restoreBar };
  const results = [mostlyZero];
  if (!values['skip-tmpfs'] && shmDir) {
    const shmRam = path.join(shmDir, 'ram.raw');
    fs.copyFileSync(ram, shmRam);
    results.push(await compare({ label: `mostly-zero, in tmpfs: ${shmRam}, ${path.basename(ram)} copied into /dev/shm, fully allocated, as a guest's RAM file there once the guest has touched all of it`, ram: shmRam, cpu, build, outDir, runs, speedBar: 2, shmDir }));
    warmFiles.delete(shmRam);
    rm(shmRam);
  }
  if (!values['skip-sparse']) {
    const sparseRam = makeSparseDump(dir, ram);
    results.push(await compare({ label: `mostly-zero, sparse: ${path.basename(sparseRam)}, ${sparseDescription(sparseRam)}`, ram: sparseRam, cpu, build, outDir, runs, speedBar: 2, shmDir }));
    warmFiles.delete(sparseRam);
  }
  if (!values['skip-busy']) {
    const busyRam = makeBusyDump(dir, ram);
    results.push(await compare({ label: `busy: ${path.basename(busyRam)}, ${busyDescription(busyRam)}`, ram: busyRam, cpu, build, outDir, runs, speedBar: 1.2, shmDir }));
    warmFiles.delete(busyRam);
  }
  printSideBySide(results, runs);
  if (values['skip-library']) {
    rm(bundle, restored);
    if (coldFound) console.log(`- note: ${coldFound} times an input file had partly left the page cache before a run and was read back in before that run started`);
    return;
  }
  // ---- the library alone, and start-up ----
  const startup = { node0: [], cliHelp: [], inspect: [], load: [] };
  const lib = { write: [], bundle: [], restore: [] };
  for (let r = 0; r < runs; r++) {
    startup.node0.push(await measured(undefined, process.execPath, ['-e', '0']));
    startup.cliHelp.push(await measured(undefined, process.execPath, [build.cliPath, '--help']));
    startup.inspect.push(await measured(undefined, process.execPath, [build.cliPath, 'snapshot', 'inspect', bundle]));
    startup.load.push(await child({ mode: 'load', dist }));
    lib.write.push(await child({ mode: 'write', dist, memory: ram, cpu, output: stateOut, options: {} }, () => rm(stateOut)));
    lib.bundle.push(await child({ mode: 'bundle', dist, memory: ram, cpu, output: libBundle, options: {} }, () => rm(libBundle)));
    lib.restore.push(await child({ mode: 'restore', dist, state: stateOut, output: restored, options: {} }, () => rm(restored)));
  }
  rm(restored, libBundle);
  const loadOf = (name) => median(startup.load.map((x) => x.loads[name]));
  console.log(`## Start-up and the library alone (in a child node, timed inside it; median of ${runs})`);
  console.log('');
  console.log(
    markdownTable(
      ['what', 'seconds', 'CPU s of the process', 'peak RSS of the process', 'others\' CPU s (worst)'],
      [
        ['node -e 0 (start-up)', f3(m(startup.node0, 'seconds')), f2(m(startup.node0, 'cpuSeconds')), humanBytes(m(startup.node0, 'rssBytes')), f2(worst(startup.node0, 'othersCpuSeconds'))],
        ['node dist/cli/main.js --help (start-up + loading the CLI)', f3(m(startup.cliHelp, 'seconds')), f2(m(startup.cliHelp, 'cpuSeconds')), humanBytes(m(startup.cliHelp, 'rssBytes')), f2(worst(startup.cliHelp, 'othersCpuSeconds'))],
        ['node dist/cli/main.js snapshot inspect OUT (+ the snapshot code, valibot, the addon; reads snapshot.json and the index)', f3(m(startup.inspect, 'seconds')), f2(m(startup.inspect, 'cpuSeconds')), humanBytes(m(startup.inspect, 'rssBytes')), f2(worst(startup.inspect, 'othersCpuSeconds'))],
        ['  of which require("valibot")', f3(loadOf('valibot')), '-', '-', f2(worst(startup.load, 'othersCpuSeconds'))],
        ['  of which require(dist/vmstate/writer.js) after valibot (addon, load/copy)', f3(loadOf('writer')), '-', '-', ''],
        ['  of which require(dist/snapshot/index.js) after those (capture, load, check)', f3(loadOf('snapshot')), '-', '-', ''],
        ['writeState(state.qvms, {memory, cpu})', f3(m(lib.write, 'seconds')), f2(m(lib.write, 'cpuSeconds')), humanBytes(m(lib.write, 'rssBytes')), f2(worst(lib.write, 'othersCpuSeconds'))],
        ['createSnapshot(dir, {memory, cpu}) (writeState + reopen + hash + snapshot.json + fsyncs)', f3(m(lib.bundle, 'seconds')), f2(m(lib.bundle, 'cpuSeconds')), humanBytes(m(lib.bundle, 'rssBytes')), f2(worst(lib.bundle, 'othersCpuSeconds'))],
        ['StateFile.open + restoreMemory(state, out.raw)', f3(m(lib.restore, 'seconds')), f2(m(lib.restore, 'cpuSeconds')), humanBytes(m(lib.restore, 'rssBytes')), f2(worst(lib.restore, 'othersCpuSeconds'))],
      ],
    ),
  );
  const pages = lib.write[0].pages;
  console.log('');
  console.log(`- pages as writeState classified them: ${pages.zero} zero, ${pages.data} data, ${pages.duplicate} duplicate (of ${pages.zero + pages.data + pages.duplicate + pages.parent})`);
  console.log(`- writeState alone vs zstd -T2 -3: ${f2(zstdCreate / m(lib.write, 'seconds'))}x; restoreMemory alone vs zstd -d: ${f2(zstdRestore / m(lib.restore, 'seconds'))}x (CPU seconds of the child include node start-up)`);
  console.log('');

  if (values.profile || (!values['no-profile'] && (!createBar || !restoreBar))) await profileRun({ dist, ram, cpu, outDir, stateOut, restored, zstdCreate, runs });
  rm(stateOut, restored);
  if (coldFound) console.log(`- note: ${coldFound} times an input file had partly left the page cache before a run (other benchmarks here drop caches) and was read back in before that run started`);
  console.log(`(outputs in ${outDir}; the CLI bundle is kept for inspection)`);
}

/** Where writeState's and restoreMemory's time goes, measured from outside the code. */
async function profileRun({ dist, ram, cpu, outDir, stateOut, restored, zstdCreate, runs }) {
  console.log('## Profile: where the time goes');
  console.log('');
  // writeState's default (cpuThreadCount in src/jobs.ts): one thread a CPU.
  const defaultThreads = os.availableParallelism();
  const describe = (r) => {
    const p = r.profile;
    const native = p.batches.reduce((n, b) => n + b.seconds, 0);
    const longest = Math.max(...p.batches.map((b) => b.seconds));
    return { native, longest, count: p.batches.length, write: p.writeSeconds, writeCalls: p.writeCalls, sync: p.syncSeconds, rest: r.seconds - native - p.writeSeconds - p.syncSeconds };
  };
  // The run with the median time of `runs` runs.
  const medianRun = async (spec, prepare) => {
    const results = [];
    for (let r = 0; r < runs; r++) results.push(await child(spec, prepare));
    results.sort((a, b) => a.seconds - b.seconds);
    return results[Math.floor((results.length - 1) / 2)];
  };
  const rows = [];
  let shipped;
  for (const [name, options] of [
    ['as shipped (zstd 2, default threads)', {}],
    ['threads: 2', { threads: 2 }],
    ['threads: 4', { threads: 4 }],
    ['compress: none', { compress: 'none' }],
    ['zstd level 2', { level: 2 }],
    ['zstd level 3', { level: 3 }],
  ]) {
    const r = await medianRun({ mode: 'write', dist, memory: ram, cpu, output: stateOut, options, instrument: true }, () => rm(stateOut));
    shipped ??= r;
    const d = describe(r);
    rows.push([name, f3(r.seconds), f2(r.cpuSeconds), `${f3(d.native)} (${d.count} batches, longest ${f3(d.longest)})`, `${f3(d.write)} (${d.writeCalls} calls)`, f3(d.sync), f3(d.rest), mb(r.bytes), f2(r.othersCpuSeconds)]);
  }
  console.log(`writeState in a child node, instrumented (addon batch calls and FileHandle writes/syncs timed; default threads = ${defaultThreads}; the median run of ${runs} each):`);
  console.log('');
  console.log(markdownTable(['variant', 'writeState s', 'CPU s (process)', 'native processDumpBatch s', 'JS awaits on writes s', 'datasync s', 'other JS s', 'state.qvms', 'others\' CPU s'], rows));
  console.log('');
  const timeline = shipped.profile.batches.map((b, i) => `${i}:${f3(b.start)}-${f3(b.end)}`).join(' ');
  console.log(`- timeline of the native batches in the shipped writeState (seconds from its start; a batch's chunks are written in the gap before the next): ${timeline}; writeState ended at ${f3(shipped.seconds)}`);
  console.log('');

  // processDumpBatch alone (nothing written): scan, dedup and compression apart; batch size and threads.
  const batchRows = [];
  for (const [name, spec] of [
    ['scan + gather (codec none, no dedup), 64 MiB batches', { codec: 'none', dedup: false }],
    ['scan + dedup + gather (codec none), 64 MiB batches', { codec: 'none', dedup: true }],
    ['scan + dedup + zstd 2, 64 MiB batches (as writeState)', { codec: 'zstd', dedup: true }],
    ['same, threads 2', { codec: 'zstd', dedup: true, threads: 2 }],
    ['same, one 1 GiB batch, threads 2', { codec: 'zstd', dedup: true, threads: 2, batchBytes: 1 << 30 }],
    ['scan + gather, one 1 GiB batch, threads 2', { codec: 'none', dedup: false, threads: 2, batchBytes: 1 << 30 }],
    ['scan + dedup + zstd 2, 4 MiB chunks', { codec: 'zstd', dedup: true, chunkTargetBytes: 4 << 20 }],
    ['scan + dedup + zstd 2, 256 KiB chunks', { codec: 'zstd', dedup: true, chunkTargetBytes: 256 << 10 }],
  ]) {
    const r = await medianRun({ mode: 'batch', dist, memory: ram, level: 2, threads: defaultThreads, ...spec });
    const p = r.profile.batches.map((b) => b.seconds);
    batchRows.push([name, f3(r.seconds), f3(Math.max(...p)), mb(r.bytes), f2(r.othersCpuSeconds)]);
  }
  console.log(`processDumpBatch alone over the dump (nothing written; stored = chunk bytes + headers; the median run of ${runs}). With codec none the chunks still gather the data pages and checksum them:`);
  console.log('');
  console.log(markdownTable(['what', 'total s', 'slowest batch s', 'stored', 'others\' CPU s'], batchRows));
  console.log('');

  // The bundle's extra work and the restore.
  const bundleDir = path.join(outDir, 'prof-bundle');
  const b = await medianRun({ mode: 'bundle', dist, memory: ram, cpu, output: bundleDir, options: {}, instrument: true }, () => rm(bundleDir));
  const bd = describe(b);
  rm(bundleDir);
  console.log(`- createSnapshot: ${f3(b.seconds)} s, of which native batches ${f3(bd.native)}, writes ${f3(bd.write)}, syncs (state datasync, snapshot.json, folders) ${f3(bd.sync)}, hashFile of state.qvms ${f3(b.profile.hashFileSeconds)}, other ${f3(bd.rest)}`);
  const rs = await medianRun({ mode: 'restore', dist, state: stateOut, output: restored, options: {}, instrument: true }, () => rm(restored));
  const rd = describe(rs);
  rm(restored);
  console.log(`- restoreMemory: ${f3(rs.seconds)} s (+ StateFile.open ${f3(rs.openSeconds)} s), of which native restoreBatch ${f3(rd.native)} (${rd.count} batches, longest ${f3(rd.longest)}), datasync ${f3(rd.sync)}, other ${f3(rd.rest)}`);
  const rs2 = await medianRun({ mode: 'restore', dist, state: stateOut, output: restored, options: { threads: 2 }, instrument: true }, () => rm(restored));
  rm(restored);
  console.log(`- restoreMemory with threads 2: ${f3(rs2.seconds)} s, native ${f3(describe(rs2).native)}`);
  console.log(`- the 2x bar means create in ${f3(zstdCreate / 2)} s, node start-up and module loading included`);
  console.log('');
}

main().catch((error) => {
  killRunningChildren();
  console.error(`snapshot benchmark: ${error.stack ?? error.message}`);
  process.exit(1);
});

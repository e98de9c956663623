#!/usr/bin/env node
/**
 * Checks the "done when" of issue #4: on a 2 GiB disk full of real files (.cache/bench/os.raw, see
 * realistic-image.mjs), from the file and from a block device, every capture variant passes
 * `qemu-img check` with nothing to report and `qemu-img compare` as identical.
 *
 *   node scripts/verify-capture.mjs [--source PATH] [--only a,b] [--no-device] [--build-source] [--cache-dir DIR]
 *
 * Variants: uncompressed, zlib, zstd, compat-0.10, cluster-4k, cluster-2m-zstd, backing. Each runs
 * from the source file, then from a read-only loop device over it. For "backing", the source is
 * captured uncompressed into base.qcow2 (itself checked, one row), a sparse copy of the source is
 * changed (pseudo-random bytes at a few offsets, some unaligned, one ending at the disk's end, and a
 * 1 MiB range that held data zeroed), and that copy is captured with --backing base.qcow2; its
 * output is compared with the copy and must hold no more than the clusters that changed.
 *
 * Every output: `qemu-img check --output=json` exits 0 with no corruptions, leaks or check errors;
 * `qemu-img compare -f raw -F qcow2 SOURCE OUT` exits 0 (for device rows SOURCE is the file the loop
 * device shows, which is the same bytes); `qemu-img info --output=json` shows the expected compat,
 * cluster size, compression type, backing file and virtual size, and `qemu-img check` counts
 * compressed clusters if and only if the variant compresses. Outputs are deleted once checked.
 * Seconds and sizes are informational (one unrepeated run, node start-up included).
 *
 * Prints a Markdown table and exits 1 if anything fails.
 */
import { createCipheriv, createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { ensureFreeSpace, formatCommand, humanBytes, isAlive, machineFacts, markdownTable, printFacts, repoRoot, run } from '../benchmarks/common.mjs';
import { Cleanup, detachLoop, loadableBuild } from '../benchmarks/harness.mjs';
import { buildRealisticImages, defaultCacheDir } from '../benchmarks/realistic-image.mjs';

const KiB = 1024;
const MiB = 1024 * KiB;
const defaultClusterSize = 64 * KiB;
/** Room for the header, L1, L2 and refcount clusters of an overlay, beyond the clusters that changed. */
const overlayMetadataSlack = 1 * MiB;

/**
 * The variants of the issue's "done when". `expect` is what `qemu-img info` must show; `compressed`
 * says whether `qemu-img check` must count compressed clusters.
 */
const variants = [
  { name: 'uncompressed', args: [], expect: {} },
  { name: 'zlib', args: ['--compress', 'zlib'], expect: { compressed: true } },
  { name: 'zstd', args: ['--compress', 'zstd'], expect: { compressionType: 'zstd', compressed: true } },
  { name: 'compat-0.10', args: ['--compat', '0.10'], expect: { compat: '0.10' } },
  { name: 'cluster-4k', args: ['--cluster-size', '4k'], expect: { clusterSize: 4 * KiB } },
  { name: 'cluster-2m-zstd', args: ['--cluster-size', '2M', '--compress', 'zstd'], expect: { clusterSize: 2 * MiB, compressionType: 'zstd', compressed: true } },
  { name: 'backing', args: ['--backing', 'base.qcow2', '--backing-format', 'qcow2'], backing: true, expect: { backingFile: 'base.qcow2', backingFormat: 'qcow2' } },
];
const variantNames = variants.map((variant) => variant.name);

// ---- the modified copy for the backing variant ----

/** Deterministic pseudo-random bytes: AES-128-CTR over zeros, keyed by a label. */
function pseudoRandom(label, length) {
  const key = createHash('sha256').update(`verify-capture ${label}`).digest();
  const cipher = createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16, 32));
  return Buffer.concat([cipher.update(Buffer.alloc(length)), cipher.final()]);
}

function overlaps(a, b) {
  return a.start < b.end && b.start < a.end;
}

/**
 * Where the copy differs from the source: writes at fractions of the disk (one cluster-aligned,
 * one unaligned across clusters, one inside a single cluster, one ending at the disk's last byte),
 * and the first 1 MiB-aligned MiB at or after 45% of the disk (wrapping) that holds data, zeroed.
 */
function planChanges(source, size) {
  const mib = (fraction) => Math.floor((size * fraction) / MiB) * MiB;
  const writes = [
    { start: mib(0.1), length: 2 * MiB },
    { start: mib(0.35) + 12345, length: 1 * MiB + 777 },
    { start: mib(0.6) + 3 * 4096 + 100, length: 5000 },
    { start: size - 700 * KiB - 1234, length: 700 * KiB + 1234 },
  ].map((w) => ({ ...w, end: w.start + w.length }));
  const fd = fs.openSync(source, 'r');
  const buffer = Buffer.alloc(MiB);
  let zero;
  try {
    const chunks = size / MiB;
    const first = Math.floor(mib(0.45) / MiB);
    for (let i = 0; i < chunks && !zero; i += 1) {
      const start = ((first + i) % chunks) * MiB;
      const candidate = { start, end: start + MiB, length: MiB };
      if (writes.some((w) => overlaps(w, candidate))) continue;
      if (fs.readSync(fd, buffer, 0, MiB, start) !== MiB) continue;
      if (buffer.some((byte) => byte !== 0)) zero = candidate;
    }
  } finally {
    fs.closeSync(fd);
  }
  if (!zero) throw new Error(`${source} has no 1 MiB-aligned MiB of data outside the written ranges to zero`);
  return { writes, zero };
}

/** Clusters of `clusterSize` that any change touches: the most an overlay needs to store. */
function touchedClusters(changes, clusterSize) {
  const clusters = new Set();
  for (const range of [...changes.writes, changes.zero]) {
    for (let c = Math.floor(range.start / clusterSize); c * clusterSize < range.end; c += 1) clusters.add(c);
  }
  return clusters.size;
}

async function makeModifiedCopy(source, copy, changes) {
  await run('cp', ['--sparse=always', source, copy]);
  const fd = fs.openSync(copy, 'r+');
  try {
    for (const w of changes.writes) fs.writeSync(fd, pseudoRandom(`write at ${w.start}`, w.length), 0, w.length, w.start);
    fs.writeSync(fd, Buffer.alloc(changes.zero.length), 0, changes.zero.length, changes.zero.start);
  } finally {
    fs.closeSync(fd);
  }
}

function describeChanges(changes) {
  const write = (w) => `${w.length} B at ${w.start}`;
  return `pseudo-random writes of ${changes.writes.map(write).join(', ')}; zeroed ${write(changes.zero)} (held data)`;
}

// ---- checking one output ----

/** `qemu-img check --output=json`: exit 0 and no corruptions, leaks or check errors. */
async function qemuCheck(output) {
  const result = await run('qemu-img', ['check', '--output=json', output], { allowFailure: true });
  let report;
  try {
    report = JSON.parse(result.stdout);
  } catch {
    return { ok: false, text: `EXIT ${result.code}: ${(result.stderr || result.stdout).trim().split('\n')[0]}`, compressed: undefined, end: undefined };
  }
  const counts = ['corruptions', 'leaks', 'check-errors'].map((key) => report[key] ?? 0);
  const ok = result.code === 0 && counts.every((n) => n === 0);
  return {
    ok,
    text: `${ok ? 'clean' : `EXIT ${result.code}`} ${counts.join('/')}`,
    compressed: report['compressed-clusters'] ?? 0,
    end: report['image-end-offset'],
  };
}

/** `qemu-img compare -f raw -F qcow2 REFERENCE OUT`: 0 identical, 1 differ, else an error. */
async function qemuCompare(reference, output) {
  const result = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', reference, output], { allowFailure: true });
  if (result.code === 0) return { ok: true, text: 'identical' };
  if (result.code === 1) return { ok: false, text: `DIFFER: ${result.stdout.trim().split('\n')[0]}` };
  return { ok: false, text: `ERROR ${result.code}: ${(result.stderr || result.stdout).trim().split('\n')[0]}` };
}

/** `qemu-img info --output=json` against what the variant asked for; returns the mismatches. */
async function qemuInfo(output, expect, virtualSize, compressedClusters) {
  const result = await run('qemu-img', ['info', '--output=json', output], { allowFailure: true });
  let info;
  try {
    info = JSON.parse(result.stdout);
  } catch {
    return [`qemu-img info failed (exit ${result.code}): ${(result.stderr || result.stdout).trim().split('\n')[0]}`];
  }
  const data = info['format-specific']?.data ?? {};
  const wanted = [
    ['format', info.format, 'qcow2'],
    ['virtual-size', info['virtual-size'], virtualSize],
    ['compat', data.compat, expect.compat ?? '1.1'],
    ['cluster-size', info['cluster-size'], expect.clusterSize ?? defaultClusterSize],
    ['compression-type', data['compression-type'], expect.compressionType ?? 'zlib'],
    ['backing-filename', info['backing-filename'], expect.backingFile],
    ['backing-filename-format', info['backing-filename-format'], expect.backingFormat],
    ['dirty-flag', info['dirty-flag'], false],
    ['corrupt', data.corrupt, (expect.compat ?? '1.1') === '1.1' ? false : undefined],
  ];
  const mismatches = wanted.filter(([, got, want]) => got !== want).map(([key, got, want]) => `${key} ${JSON.stringify(got)} != ${JSON.stringify(want)}`);
  if (compressedClusters !== undefined && (compressedClusters > 0) !== Boolean(expect.compressed)) {
    mismatches.push(`${compressedClusters} compressed clusters, expected ${expect.compressed ? 'some' : 'none'}`);
  }
  return mismatches;
}

/**
 * Captures `source` into `output` with the variant's flags (cwd = the output's folder, so the
 * backing name is relative), checks, compares with `reference`, reads info, and deletes the output.
 */
async function captureAndVerify({ build, sourceLabel, variantLabel, variant, source, reference, output, virtualSize, keepOutput = false, sizeLimit }) {
  const row = { source: sourceLabel, variant: variantLabel, seconds: '-', size: '-', end: '-', check: '-', compressed: '-', compare: '-', info: '-', ok: false, notes: [] };
  const args = [build.cliPath, 'capture', source, output, '--progress=none', ...variant.args];
  try {
    ensureFreeSpace(path.dirname(output), virtualSize + 256 * MiB, `the output of ${sourceLabel} ${variantLabel}`);
    fs.rmSync(output, { force: true });
    const started = performance.now();
    const captured = await run(process.execPath, args, { cwd: path.dirname(output), allowFailure: true });
    row.seconds = ((performance.now() - started) / 1000).toFixed(2);
    // Anything on stderr besides the closing summary is worth reading (warnings, notices).
    const messages = captured.stderr.split('\n').filter((line) => line.trim() && !line.startsWith('qcow2img: captured '));
    if (captured.code !== 0) {
      row.notes.push(`capture failed (exit ${captured.code}): ${messages.join(' / ') || captured.stdout.trim()}`, `$ ${formatCommand(process.execPath, args)}`);
      return row;
    }
    row.notes.push(...messages.map((line) => `stderr: ${line}`));
    const size = fs.statSync(output).size;
    row.size = humanBytes(size);
    row.sizeBytes = size;

    const check = await qemuCheck(output);
    row.check = check.text;
    row.compressed = check.compressed ?? '-';
    if (check.end !== undefined) {
      row.end = humanBytes(check.end);
      if (check.end !== size) row.notes.push(`file size ${size} != image-end-offset ${check.end}`);
    }
    const compare = await qemuCompare(reference, output);
    row.compare = compare.text;
    const mismatches = await qemuInfo(output, variant.expect, virtualSize, check.compressed);
    row.info = mismatches.length ? 'NO' : 'yes';
    row.notes.push(...mismatches.map((m) => `info: ${m}`));
    let sizeOk = true;
    if (sizeLimit) {
      sizeOk = size <= sizeLimit.bytes;
      row.notes.push(`${sizeOk ? '' : 'TOO BIG: '}${humanBytes(size)} vs base ${humanBytes(sizeLimit.baseBytes)} (${((100 * size) / sizeLimit.baseBytes).toFixed(2)}%); limit ${humanBytes(sizeLimit.bytes)} = ${sizeLimit.why}`);
    }
    row.ok = check.ok && compare.ok && !mismatches.length && sizeOk;
    return row;
  } catch (error) {
    row.notes.push(`error: ${error.message.split('\n')[0]}`);
    return row;
  } finally {
    if (!keepOutput) fs.rmSync(output, { force: true });
  }
}

async function attachLoop(cleanup, file) {
  const device = (await run('losetup', ['--find', '--show', '--read-only', file])).stdout.trim();
  const detach = cleanup.add(`losetup -d ${device}`, () => detachLoop(device));
  const deviceSize = Number((await run('blockdev', ['--getsize64', device])).stdout.trim());
  const fileSize = fs.statSync(file).size;
  if (deviceSize !== fileSize) {
    detach();
    throw new Error(`${device} over ${file} has ${deviceSize} bytes, the file ${fileSize}`);
  }
  return { device, detach };
}

/** Removes work folders left by processes that died without cleaning up. */
function removeStaleWorkDirs(parent) {
  for (const entry of fs.readdirSync(parent)) {
    const match = /^work-(\d+)$/.exec(entry);
    if (match && !isAlive(Number(match[1]))) fs.rmSync(path.join(parent, entry), { recursive: true, force: true });
  }
}

async function main() {
  const { values } = parseArgs({
    options: {
      source: { type: 'string' },
      only: { type: 'string' },
      'no-device': { type: 'boolean' },
      'build-source': { type: 'boolean' },
      'cache-dir': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node scripts/verify-capture.mjs [--source PATH] [--only NAME,...] [--no-device] [--build-source] [--cache-dir DIR]');
    console.log(`variants: ${variantNames.join(', ')}`);
    console.log('--source: a raw disk file, a multiple of 512 bytes, at least 16 MiB (default CACHE/os.raw)');
    console.log('--build-source: build CACHE/os.raw with realistic-image.mjs when it is missing (minutes, all cores)');
    return 0;
  }
  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  const source = path.resolve(values.source ?? path.join(cacheDir, 'os.raw'));
  if (!fs.existsSync(source)) {
    if (values.source !== undefined) throw new Error(`${source} does not exist`);
    if (!values['build-source']) {
      const shown = path.relative(repoRoot, source).startsWith('..') ? source : path.relative(repoRoot, source);
      throw new Error(`${shown} is missing: make it with node benchmarks/realistic-image.mjs (or pass --build-source)`);
    }
    await buildRealisticImages({ cacheDir, only: [], log: console.error });
  }
  const sourceStats = fs.statSync(source);
  if (!sourceStats.isFile()) throw new Error(`${source} is not a regular file (a loop device is made over it)`);
  const virtualSize = sourceStats.size;
  if (virtualSize % 512 !== 0 || virtualSize < 16 * MiB) throw new Error(`${source} has ${virtualSize} bytes: need a multiple of 512, at least 16 MiB`);
  const only = values.only?.split(',').map((name) => name.trim()).filter(Boolean);
  const unknown = (only ?? []).filter((name) => !variantNames.includes(name));
  if (unknown.length) throw new Error(`unknown variant ${unknown.join(', ')}; known: ${variantNames.join(', ')}`);
  const selected = variants.filter((variant) => !only || only.includes(variant.name));
  if (!selected.length) throw new Error('no variant selected');

  const parent = path.join(cacheDir, 'verify-capture');
  fs.mkdirSync(parent, { recursive: true });
  removeStaleWorkDirs(parent);
  const build = await loadableBuild(cacheDir, 'verify-capture');
  // Per process, so two runs never delete each other's outputs.
  const workDir = path.join(parent, `work-${process.pid}`);
  fs.rmSync(workDir, { recursive: true, force: true });
  fs.mkdirSync(workDir);
  const cleanup = new Cleanup();
  cleanup.add(`rm -r ${workDir}`, () => fs.rmSync(workDir, { recursive: true, force: true }));

  const rows = [];
  const facts = [];
  const log = (row) => console.error(`${row.source} ${row.variant}: ${row.ok ? 'pass' : 'FAIL'} (${row.seconds} s, ${row.size}; check ${row.check}; ${row.compare}; info ${row.info})${row.notes.length ? ` - ${row.notes.join('; ')}` : ''}`);
  try {
    // The backing variant's inputs: base.qcow2 from the source, the changed copy, the size limit.
    let backing;
    if (selected.some((variant) => variant.backing)) {
      const changes = planChanges(source, virtualSize);
      const modified = path.join(workDir, 'modified.raw');
      ensureFreeSpace(workDir, 2 * virtualSize + sourceStats.blocks * 512 + 256 * MiB, 'base.qcow2, the changed copy and an output');
      await makeModifiedCopy(source, modified, changes);
      const base = path.join(workDir, 'base.qcow2');
      const baseRow = await captureAndVerify({
        build, sourceLabel: 'file', variantLabel: 'backing: base.qcow2', variant: variants[0], source, reference: source, output: base, virtualSize, keepOutput: true,
      });
      log(baseRow);
      rows.push(baseRow);
      if (baseRow.ok) {
        const touched = touchedClusters(changes, defaultClusterSize);
        backing = {
          modified,
          sizeLimit: {
            bytes: touched * defaultClusterSize + overlayMetadataSlack,
            baseBytes: baseRow.sizeBytes,
            why: `${touched} changed 64 KiB clusters + ${humanBytes(overlayMetadataSlack)} metadata`,
          },
        };
      }
      facts.push(['backing variant', `base.qcow2 = the source captured uncompressed; the changed copy: ${describeChanges(changes)}`]);
    }
    const backingSkipped = (sourceLabel) => ({
      source: sourceLabel, variant: 'backing', seconds: '-', size: '-', end: '-', check: '-', compressed: '-', compare: '-', info: '-', ok: false, notes: ['not run: base.qcow2 failed'],
    });

    // From the file, then from read-only loop devices over the same bytes.
    const sources = [{ label: 'file', path: source, modified: backing?.modified }];
    if (!values['no-device']) sources.push({ label: 'device', device: true });
    for (const from of sources) {
      let detachAll = () => {};
      try {
        if (from.device) {
          const main = await attachLoop(cleanup, source);
          from.path = main.device;
          from.label = `device (${main.device})`;
          let overModified;
          if (backing) overModified = await attachLoop(cleanup, backing.modified);
          from.modified = overModified?.device;
          detachAll = () => {
            overModified?.detach();
            main.detach();
          };
        }
        for (const variant of selected) {
          let row;
          if (variant.backing && !backing) row = backingSkipped(from.label);
          else {
            row = await captureAndVerify({
              build,
              sourceLabel: from.label,
              variantLabel: variant.name,
              variant,
              source: variant.backing ? from.modified : from.path,
              reference: variant.backing ? backing.modified : source,
              output: path.join(workDir, `${variant.name}.qcow2`),
              virtualSize,
              sizeLimit: variant.backing ? backing.sizeLimit : undefined,
            });
          }
          log(row);
          rows.push(row);
        }
      } finally {
        detachAll();
      }
    }
  } finally {
    cleanup.release();
  }

  const failures = rows.filter((row) => !row.ok).length;
  console.log('\n## qcow2img capture: qemu-img check, compare and info on every variant, from a file and a device\n');
  printFacts(machineFacts(parent, build));
  console.log(`- source: ${source}, ${virtualSize} bytes (${humanBytes(virtualSize)}), ${humanBytes(sourceStats.blocks * 512)} allocated`);
  printFacts(facts);
  console.log('- device rows: `losetup --find --show --read-only` over the source (and over the changed copy for backing); compared against the file under the device');
  console.log('- command: `qcow2img capture SRC OUT --progress=none [variant flags]`, run in the output folder; s = wall clock of that process (one run, informational)');
  console.log('- check = `qemu-img check --output=json` exit status and corruptions/leaks/check-errors; end = its image-end-offset; compressed = its compressed-clusters');
  console.log('- compare = `qemu-img compare -f raw -F qcow2 SOURCE OUT`; info = `qemu-img info --output=json` shows the expected format, virtual size, compat, cluster size, compression type, backing file and format, no dirty/corrupt flag, and compressed clusters if and only if compressed\n');
  console.log(markdownTable(
    ['source', 'variant', 's', 'output size', 'end', 'check', 'compressed', 'compare', 'info matches', 'result', 'notes'],
    rows.map((row) => [row.source, row.variant, row.seconds, row.size, row.end, row.check, row.compressed, row.compare, row.info, row.ok ? 'pass' : 'FAIL', row.notes.join('; ').replaceAll('|', '\\|')]),
  ));
  console.log(`\n${rows.length - failures} of ${rows.length} passed${failures ? `; ${failures} FAILED` : ''}`);
  return failures ? 1 : 0;
}

if (process.argv[1] && path.resolve(process.argv[1]) === path.resolve(new URL(import.meta.url).pathname)) {
  main().then(
    (code) => {
      process.exitCode = code;
    },
    (error) => {
      console.error(`verify-capture: ${error.message}`);
      process.exitCode = 1;
    },
  );
}

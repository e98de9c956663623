#!/usr/bin/env node
/**
 * Checks that `qcow2img load` writes exactly what `qemu-img convert -O raw` writes, on every
 * realistic variant (see realistic-image.mjs) and every internal snapshot of them.
 *
 *   node scripts/verify-load.mjs [--only a,b] [--threads N] [--keep-mismatches] [--cache-dir DIR]
 *
 * Prints a table and exits 1 on any mismatch or error. For a mismatch it also prints the guest
 * ranges that differ and what `qemu-img map` and `qcow2img map` say is there. Outputs are 2 GiB
 * each, so they are deleted as soon as they are compared.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ensureFreeSpace, formatCommand, freezeBuild, humanBytes, machineFacts, markdownTable, printFacts, repoRoot, run } from '../benchmarks/common.mjs';
import { buildRealisticImages, defaultCacheDir, variantNames } from '../benchmarks/realistic-image.mjs';

const MiB = 1024 * 1024;
const sectorSize = 512;
const maxReportedRanges = 12;

/** Reads until `buffer` is full or the file ends; a single read may return less. */
async function readFull(handle, buffer, position) {
  let filled = 0;
  while (filled < buffer.length) {
    const { bytesRead } = await handle.read(buffer, filled, buffer.length - filled, position + filled);
    if (bytesRead === 0) break;
    filled += bytesRead;
  }
  return filled;
}

/**
 * Compares two files; where they differ, finds the differing 512-byte sectors and merges them
 * into ranges, so a report can name guest offsets rather than "files differ".
 */
export async function compareFiles(pathA, pathB) {
  const [a, b] = await Promise.all([fs.promises.open(pathA), fs.promises.open(pathB)]);
  try {
    const [sizeA, sizeB] = [(await a.stat()).size, (await b.stat()).size];
    const common = Math.min(sizeA, sizeB);
    const chunkSize = 16 * MiB;
    const bufferA = Buffer.allocUnsafe(chunkSize);
    const bufferB = Buffer.allocUnsafe(chunkSize);
    const ranges = [];
    let differingBytes = 0;
    const addDifference = (start, end) => {
      differingBytes += end - start;
      const last = ranges[ranges.length - 1];
      if (last && last.end === start) last.end = end;
      else ranges.push({ start, end });
    };
    for (let offset = 0; offset < common; offset += chunkSize) {
      const length = Math.min(chunkSize, common - offset);
      const [readA, readB] = await Promise.all([
        readFull(a, bufferA.subarray(0, length), offset),
        readFull(b, bufferB.subarray(0, length), offset),
      ]);
      if (readA !== length || readB !== length) throw new Error(`short read at ${offset} comparing ${pathA} and ${pathB}`);
      if (bufferA.subarray(0, length).equals(bufferB.subarray(0, length))) continue;
      for (let sector = 0; sector < length; sector += sectorSize) {
        const end = Math.min(sector + sectorSize, length);
        if (!bufferA.subarray(sector, end).equals(bufferB.subarray(sector, end))) addDifference(offset + sector, offset + end);
      }
    }
    if (sizeA !== sizeB) addDifference(common, Math.max(sizeA, sizeB));
    return { identical: ranges.length === 0, sizeA, sizeB, differingBytes, ranges };
  } finally {
    await Promise.all([a.close(), b.close()]);
  }
}

function allocated(file) {
  return fs.statSync(file).blocks * 512;
}

function overlapping(entries, range) {
  return entries.filter((entry) => entry.start < range.end && entry.start + entry.length > range.start);
}

/** What each tool's map says lies under the differing ranges: the kind of clusters there. */
async function explainMismatch(variant, view, comparison, allowArgs, cliPath) {
  const lines = [`\n### ${variant.name}${view.label ? ` ${view.label}` : ''}: ${comparison.differingBytes} bytes differ (512-byte sectors), ${comparison.ranges.length} ranges`];
  if (comparison.sizeA !== comparison.sizeB) lines.push(`sizes differ: qemu-img ${comparison.sizeA}, qcow2img ${comparison.sizeB}`);
  if (view.snapshot) lines.push('(the maps below show the current state, not the snapshot)');
  const qemuMap = await run('qemu-img', ['map', '--output=json', variant.image], { cwd: variant.dir, allowFailure: true });
  const ourMap = await run(process.execPath, [cliPath, 'map', variant.image, '--json', ...allowArgs], { cwd: repoRoot, allowFailure: true });
  const parse = (result) => {
    try {
      return JSON.parse(result.stdout);
    } catch {
      return undefined;
    }
  };
  const qemuEntries = parse(qemuMap);
  const ourEntries = parse(ourMap);
  for (const range of comparison.ranges.slice(0, maxReportedRanges)) {
    lines.push(`- guest [${range.start}, ${range.end}) = 0x${range.start.toString(16)}..0x${range.end.toString(16)} (${humanBytes(range.end - range.start)})`);
    if (qemuEntries) for (const entry of overlapping(qemuEntries, range)) lines.push(`    qemu-img map: ${JSON.stringify(entry)}`);
    else lines.push(`    qemu-img map failed: ${qemuMap.stderr.trim()}`);
    if (ourEntries) for (const entry of overlapping(ourEntries, range)) lines.push(`    qcow2img map: ${JSON.stringify(entry)}`);
    else lines.push(`    qcow2img map failed: ${ourMap.stderr.trim()}`);
  }
  if (comparison.ranges.length > maxReportedRanges) lines.push(`- ... and ${comparison.ranges.length - maxReportedRanges} more ranges`);
  return lines.join('\n');
}

async function verifyView(variant, view, outDir, options) {
  const label = `${variant.name}${view.label ? ` ${view.label}` : ''}`;
  const fileStem = `${variant.name}${view.snapshot ? `@${view.snapshot}` : ''}`.replace(/[^\w@.-]/g, '_');
  const reference = path.join(outDir, `${fileStem}.qemu-img.raw`);
  const loaded = path.join(outDir, `${fileStem}.qcow2img.raw`);
  const allowArgs = variant.allowPaths.flatMap((dir) => ['--allow-path', dir]);
  ensureFreeSpace(outDir, 2 * variant.virtualSize + 256 * MiB, `the outputs of ${label}`);
  const row = { label, identical: 'ERROR', qemuSize: '-', ourSize: '-', allocated: '-', qemuSeconds: '-', ourSeconds: '-', notes: '' };
  const details = [];
  try {
    // QEMU 7.2 opens a relative data_file name from its working directory, so qemu-img runs in the
    // image's folder. qcow2img runs from the repository: it must find files from the image's folder.
    const snapshotArgs = view.qemuSnapshot ? ['-l', view.qemuSnapshot] : [];
    const qemuArgs = ['convert', ...snapshotArgs, '-O', 'raw', '-W', '-m', '16', variant.image, reference];
    let started = performance.now();
    await run('qemu-img', qemuArgs, { cwd: variant.dir });
    row.qemuSeconds = ((performance.now() - started) / 1000).toFixed(2);

    const ourArgs = [options.cliPath, 'load', variant.image, loaded, '--overwrite', '--progress=none', ...allowArgs];
    if (view.snapshot) ourArgs.push('--snapshot', view.snapshot);
    if (options.threads) ourArgs.push('--threads', String(options.threads));
    started = performance.now();
    const ours = await run(process.execPath, ourArgs, { cwd: repoRoot, allowFailure: true });
    const ourSeconds = (performance.now() - started) / 1000;
    // Anything on stderr besides the closing summary line is worth a look (warnings, notices).
    const messages = ours.stderr.split('\n').filter((line) => line.trim() && !line.startsWith('qcow2img: loaded '));
    if (ours.code !== 0) {
      row.notes = messages.join(' / ') || `exit ${ours.code}`;
      details.push(`\n### ${label}: qcow2img failed (exit ${ours.code})\n$ ${formatCommand(process.execPath, ourArgs)}\n${ours.stderr.trim()}`);
      return { row, details, ok: false };
    }
    row.ourSeconds = ourSeconds.toFixed(2);
    row.notes = messages.join(' / ');

    const comparison = await compareFiles(reference, loaded);
    row.identical = comparison.identical ? 'yes' : 'NO';
    row.qemuSize = String(comparison.sizeA);
    row.ourSize = String(comparison.sizeB);
    row.allocated = `${humanBytes(allocated(reference))} / ${humanBytes(allocated(loaded))}`;
    if (!comparison.identical) {
      details.push(await explainMismatch(variant, view, comparison, allowArgs, options.cliPath));
      if (options.keepMismatches) details.push(`kept: ${reference} and ${loaded}`);
    }
    return { row, details, ok: comparison.identical };
  } catch (error) {
    row.notes = error.message.split('\n')[0];
    details.push(`\n### ${label}: ${error.message}`);
    return { row, details, ok: false };
  } finally {
    const keep = options.keepMismatches && row.identical === 'NO';
    if (!keep) for (const file of [reference, loaded]) fs.rmSync(file, { force: true });
  }
}

async function main() {
  const { values } = parseArgs({
    options: {
      only: { type: 'string' },
      threads: { type: 'string' },
      'keep-mismatches': { type: 'boolean' },
      'cache-dir': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node scripts/verify-load.mjs [--only NAME,...] [--threads N] [--keep-mismatches] [--cache-dir DIR]');
    console.log(`variants: ${variantNames.join(', ')}`);
    return 0;
  }
  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  const variants = await buildRealisticImages({ cacheDir, only: values.only?.split(',') });
  // Per process, so two runs never delete each other's outputs.
  const outDir = path.join(cacheDir, 'verify-out', String(process.pid));
  fs.mkdirSync(outDir, { recursive: true });

  const build = await freezeBuild(cacheDir);
  const options = { threads: values.threads, keepMismatches: values['keep-mismatches'], cliPath: build.cliPath };
  const rows = [];
  const details = [];
  let failures = 0;
  for (const variant of variants) {
    for (const view of variant.views) {
      const result = await verifyView(variant, view, outDir, options);
      const { row } = result;
      console.error(`${row.label}: ${row.identical}${row.notes ? ` (${row.notes})` : ''}`);
      rows.push([row.label, row.identical, row.qemuSize, row.ourSize, row.allocated, row.qemuSeconds, row.ourSeconds, row.notes]);
      details.push(...result.details);
      if (!result.ok) failures += 1;
    }
  }
  console.log('\n## qcow2img load vs qemu-img convert -O raw, byte for byte\n');
  printFacts(machineFacts(outDir, build));
  console.log('- sizes in bytes; allocated = blocks on disk of the qemu-img output / the qcow2img output; seconds are not benchmarks (warm, unrepeated)\n');
  console.log(markdownTable(['variant', 'identical', 'qemu-img size', 'qcow2img size', 'allocated', 'qemu-img s', 'qcow2img s', 'qcow2img messages'], rows));
  if (details.length) console.log(details.join('\n'));
  console.log(`\n${rows.length - failures} of ${rows.length} identical${failures ? `; ${failures} mismatched or failed` : ''}`);
  if (!options.keepMismatches) fs.rmSync(outDir, { recursive: true, force: true });
  return failures ? 1 : 0;
}

if (process.argv[1] && path.resolve(process.argv[1]) === path.resolve(new URL(import.meta.url).pathname)) {
  main().then(
    (code) => {
      process.exitCode = code;
    },
    (error) => {
      console.error(`verify-load: ${error.message}`);
      process.exitCode = 1;
    },
  );
}

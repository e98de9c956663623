#!/usr/bin/env node
/**
 * `qcow2img bench` against fio, same job on the same target, in one run:
 *
 *   qcow2img bench TARGET --size S --block-size 1M --queue-depth 16 --json
 *   fio --name=w --filename=... --rw=write --bs=1M --iodepth=16 --ioengine=io_uring --direct=1
 *       --size=S --end_fsync=1 --output-format=json
 *
 * on (a) a folder on the root filesystem (our bench makes and preallocates its own file there;
 * fio gets a new file in the same folder, preallocated by its default fallocate=native, deleted
 * after) and (b) a loop device (direct I/O on) over a 2 GiB file this script makes and writes in
 * full first, so every run overwrites written blocks; both tools write its first S bytes.
 *
 *   node benchmarks/bench-fio.mjs [--runs 3] [--size 1G] [--loop-direct-io on|off] [--quiet-timeout 10]
 *                                 [--no-file] [--no-device] [--cache-dir DIR]
 *
 * Runs are paired, alternating which tool goes first. MB/s = 1e6 bytes/s: fio's bw_bytes (bytes /
 * job runtime, end_fsync inside it) and our bandwidthBytesPerSec (bytes / time, fdatasync inside).
 * Exits non-zero only on errors, never on a missed bar.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import {
  busyCpuSeconds,
  ensureFreeSpace,
  formatCommand,
  freezeBuild,
  humanBytes,
  killRunningChildren,
  machineFacts,
  markdownTable,
  median,
  printFacts,
  run,
} from './common.mjs';
import { defaultCacheDir } from './realistic-image.mjs';
import { gnuTime, Cleanup, detachLoop, loadAverage, loadableBuild, timed } from './harness.mjs';

const f2 = (value) => (Number.isFinite(value) ? value.toFixed(2) : '-');

// ---- bench vs fio ----

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
/** The bar: our bench within 15% of fio. */
const barRatio = 0.85;

function parseSize(text) {
  const match = /^(\d+)([kKmMgG]?)$/.exec(text);
  if (!match) throw new Error(`bad size ${text} (bytes, or with a k, M or G suffix)`);
  return Number(match[1]) * { '': 1, K: KiB, M: MiB, G: GiB }[match[2].toUpperCase()];
}

/** fio's JSON, after any warning lines it prints first. */
function parseFio(stdout) {
  const json = JSON.parse(stdout.slice(stdout.indexOf('{')));
  const job = json.jobs[0];
  if (job.error) throw new Error(`fio job error ${job.error}`);
  const write = job.write;
  const percentile = (name) => write.clat_ns.percentile?.[name] / 1000;
  return {
    bytes: write.io_bytes,
    bytesPerSec: write.bw_bytes,
    runtimeSeconds: write.runtime / 1000,
    clatP50: percentile('50.000000'),
    clatP99: percentile('99.000000'),
    latMeanUs: write.lat_ns.mean / 1000,
    slatMeanUs: write.slat_ns.mean / 1000,
  };
}

function fioArgs(filename, size) {
  return ['--name=w', `--filename=${filename}`, '--rw=write', '--bs=1M', '--iodepth=16', '--ioengine=io_uring', '--direct=1', `--size=${size}`, '--end_fsync=1', '--output-format=json'];
}

function benchArgs(target, size) {
  return ['bench', target, '--size', String(size), '--block-size', '1M', '--queue-depth', '16', '--json'];
}

function oursArgs(build, target, size) {
  return [build.cliPath, ...benchArgs(target, size)];
}

/** Paired runs on one target; `fioTarget(i)` names fio's file for run i, `afterFio(i)` tidies up. */
async function pairedRuns(label, { build, oursTarget, fioTarget, afterFio = () => {}, size, runs, quietTimeout, log }) {
  const results = [];
  for (let index = 0; index < runs; index += 1) {
    const order = index % 2 === 0 ? ['qcow2img', 'fio'] : ['fio', 'qcow2img'];
    const result = { order: order.join(' then ') };
    for (const tool of order) {
      if (tool === 'qcow2img') {
        const sample = await timed(process.execPath, oursArgs(build, oursTarget, size), { quietTimeout });
        const json = JSON.parse(sample.stdout);
        if (json.bytes !== size) throw new Error(`qcow2img bench wrote ${json.bytes} bytes, not ${size}`);
        result.ours = { ...sample, bytesPerSec: json.bandwidthBytesPerSec, p50: json.latencyUs.p50, p99: json.latencyUs.p99, engine: json.engine, direct: json.direct, benchSeconds: json.seconds };
        log(`  ${label} run ${index + 1} qcow2img: ${(json.bandwidthBytesPerSec / 1e6).toFixed(1)} MB/s, p50 ${json.latencyUs.p50.toFixed(0)} us, p99 ${json.latencyUs.p99.toFixed(0)} us (${json.engine}${json.direct ? ', O_DIRECT' : ''}), others' CPU ${f2(sample.othersCpuSeconds)} s`);
      } else {
        const target = fioTarget(index);
        try {
          const sample = await timed('fio', fioArgs(target, size), { quietTimeout });
          const parsed = parseFio(sample.stdout);
          if (parsed.bytes !== size) throw new Error(`fio wrote ${parsed.bytes} bytes, not ${size}`);
          result.fio = { ...sample, ...parsed };
          log(`  ${label} run ${index + 1} fio: ${(parsed.bytesPerSec / 1e6).toFixed(1)} MB/s, clat p50 ${parsed.clatP50.toFixed(0)} us, p99 ${parsed.clatP99.toFixed(0)} us, others' CPU ${f2(sample.othersCpuSeconds)} s`);
        } finally {
          afterFio(index);
        }
      }
    }
    results.push(result);
  }
  return results;
}

const mbps = (bytesPerSec) => (bytesPerSec / 1e6).toFixed(1);
const us = (value) => (Number.isFinite(value) ? value.toFixed(0) : '-');

function runRows(label, results) {
  return results.map((r, index) => [
    label,
    String(index + 1),
    r.order,
    mbps(r.ours.bytesPerSec),
    mbps(r.fio.bytesPerSec),
    (r.ours.bytesPerSec / r.fio.bytesPerSec).toFixed(3),
    `${us(r.ours.p50)} / ${us(r.fio.clatP50)}`,
    `${us(r.ours.p99)} / ${us(r.fio.clatP99)}`,
    `${us(r.fio.slatMeanUs)} / ${us(r.fio.latMeanUs)}`,
    `${humanBytes(r.ours.rssBytes)} / ${humanBytes(r.fio.rssBytes)}`,
    `${f2(r.ours.othersCpuSeconds)} / ${f2(r.fio.othersCpuSeconds)}`,
  ]);
}

function summaryRow(label, results) {
  const ours = median(results.map((r) => r.ours.bytesPerSec));
  const fio = median(results.map((r) => r.fio.bytesPerSec));
  const ratio = ours / fio;
  return [
    label,
    mbps(ours),
    mbps(fio),
    ratio.toFixed(3),
    ratio >= barRatio ? 'met' : 'MISSED',
    `${us(median(results.map((r) => r.ours.p50)))} / ${us(median(results.map((r) => r.fio.clatP50)))}`,
    `${us(median(results.map((r) => r.ours.p99)))} / ${us(median(results.map((r) => r.fio.clatP99)))}`,
    `${[...new Set(results.map((r) => r.ours.engine))].join(',')}${results.every((r) => r.ours.direct) ? ', O_DIRECT' : ', NOT O_DIRECT'}`,
  ];
}

async function main() {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      size: { type: 'string', default: '1G' },
      'loop-direct-io': { type: 'string', default: 'on' },
      'quiet-timeout': { type: 'string', default: '10' },
      'no-file': { type: 'boolean' },
      'no-device': { type: 'boolean' },
      'cache-dir': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node benchmarks/bench-fio.mjs [--runs 3] [--size 1G] [--loop-direct-io on|off] [--quiet-timeout 10] [--no-file] [--no-device] [--cache-dir DIR]');
    return 0;
  }
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs must be a positive integer');
  const size = parseSize(values.size);
  if (size % MiB !== 0) throw new Error('--size must be a whole number of MiB (the block size)');
  const loopBacking = 2 * GiB;
  if (size > loopBacking) throw new Error(`--size must fit the ${humanBytes(loopBacking)} loop device`);
  const loopDirectIo = values['loop-direct-io'];
  if (!['on', 'off'].includes(loopDirectIo)) throw new Error('--loop-direct-io must be on or off');
  const quietTimeout = Number(values['quiet-timeout']);
  if (!fs.existsSync(gnuTime)) throw new Error(`${gnuTime} is missing: apt-get install -y time`);
  const loadStart = loadAverage();
  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  const workDir = path.join(cacheDir, 'bench-fio');
  fs.mkdirSync(cacheDir, { recursive: true });
  const build = await loadableBuild(cacheDir, path.join('bench-fio', 'build'));
  const filesDir = path.join(workDir, 'files');
  const facts = machineFacts(cacheDir, build);
  fs.rmSync(filesDir, { recursive: true, force: true });
  fs.mkdirSync(filesDir, { recursive: true });
  const cleanup = new Cleanup();
  cleanup.add(`rm -r ${workDir}`, () => fs.rmSync(workDir, { recursive: true, force: true }));
  const log = (line) => console.error(line);
  const sections = [];
  let deviceFacts = '';
  try {
    if (!values['no-file']) {
      ensureFreeSpace(filesDir, 2 * size + GiB, 'the bench files');
      log(`folder ${filesDir}:`);
      const results = await pairedRuns('file', {
        build,
        oursTarget: filesDir,
        fioTarget: (index) => path.join(filesDir, `fio-${process.pid}-${index}`),
        afterFio: (index) => fs.rmSync(path.join(filesDir, `fio-${process.pid}-${index}`), { force: true }),
        size,
        runs,
        quietTimeout,
        log,
      });
      const leftovers = fs.readdirSync(filesDir);
      if (leftovers.length) throw new Error(`files left in ${filesDir} after the runs: ${leftovers.join(', ')}`);
      sections.push({ label: `file in a folder (${path.relative(process.cwd(), filesDir) || filesDir})`, results });
    }
    if (!values['no-device']) {
      ensureFreeSpace(workDir, loopBacking + GiB, 'the loop device backing file');
      const backing = path.join(workDir, 'loop-backing.img');
      cleanup.add(`rm ${backing}`, () => fs.rmSync(backing, { force: true }));
      fs.rmSync(backing, { force: true });
      await run('fallocate', ['-l', String(loopBacking), backing]);
      // Written in full, so no run pays for converting unwritten extents: all runs overwrite.
      await run('dd', ['if=/dev/zero', `of=${backing}`, 'bs=16M', `count=${loopBacking / (16 * MiB)}`, 'oflag=direct', 'conv=notrunc,fdatasync', 'status=none']);
      const device = (await run('losetup', [`--direct-io=${loopDirectIo}`, '-f', '--show', backing])).stdout.trim();
      const detach = cleanup.add(`losetup -d ${device}`, () => detachLoop(device));
      try {
        const sys = `/sys/block/${path.basename(device)}/loop/dio`;
        const dio = fs.existsSync(sys) ? fs.readFileSync(sys, 'utf8').trim() : '?';
        const logical = fs.readFileSync(`/sys/block/${path.basename(device)}/queue/logical_block_size`, 'utf8').trim();
        deviceFacts = `${device} over ${humanBytes(loopBacking)} ${backing} (fully written first), loop direct I/O ${dio === '1' ? 'on' : 'off'}, logical block ${logical} B; both tools write bytes [0, ${humanBytes(size)})`;
        log(`device ${device}:`);
        const results = await pairedRuns('device', { build, oursTarget: device, fioTarget: () => device, size, runs, quietTimeout, log });
        sections.push({ label: `loop device ${device}`, results });
      } finally {
        detach();
      }
    }
  } finally {
    cleanup.release();
  }
  const loadEnd = loadAverage();

  console.log('\n## qcow2img bench vs fio: sequential 1 MiB O_DIRECT writes, queue depth 16, io_uring\n');
  printFacts(facts);
  console.log(`- fio: ${spawnSync('fio', ['--version'], { encoding: 'utf8' }).stdout.trim()}`);
  console.log(`- load average (1/5/15 min): ${loadStart} at start, ${loadEnd} at end`);
  console.log(`- size: ${humanBytes(size)} per run, written once; ${runs} paired runs per target, alternating which tool goes first`);
  console.log(`- commands: \`${formatCommand('qcow2img', benchArgs('TARGET', size))}\`; \`${formatCommand('fio', fioArgs('TARGET', size))}\``);
  console.log('- file target: our bench makes and preallocates (fallocate) its own file in the folder; fio makes a new file there with its default fallocate=native; both removed after each run');
  if (deviceFacts) console.log(`- device target: ${deviceFacts}`);
  console.log('- MB/s = 1e6 bytes/s. fio: bw_bytes = io_bytes / job runtime (end_fsync inside); qcow2img: bytes / seconds from its JSON (fdatasync inside)');
  console.log('- ratio = qcow2img MB/s / fio MB/s; bar (the issue): ratio >= 0.85 (within 15%), judged on the medians');
  console.log('- latency in microseconds: qcow2img times each write from queueing (before io_uring_submit) to reaping its completion, which is closer to fio\'s total latency (lat = slat + clat) than to clat; fio prints clat percentiles by default, so its p50/p99 are clat, and the slat / lat means are given beside');
  console.log("- peak RSS = GNU time %M; others' CPU = CPU seconds the rest of the machine used during the run\n");
  console.log('### Medians\n');
  console.log(markdownTable(
    ['target', 'qcow2img MB/s', 'fio MB/s', 'ratio', 'bar (>= 0.85)', 'p50 us qcow2img / fio clat', 'p99 us qcow2img / fio clat', 'qcow2img engine'],
    sections.map((s) => summaryRow(s.label, s.results)),
  ));
  console.log('\n### Each run\n');
  console.log(markdownTable(
    ['target', 'run', 'order', 'qcow2img MB/s', 'fio MB/s', 'ratio', 'p50 us qcow2img / fio clat', 'p99 us qcow2img / fio clat', 'fio slat / lat mean us', 'peak RSS qcow2img / fio', "others' CPU s qcow2img / fio"],
    sections.flatMap((s) => runRows(s.label.split(' (')[0], s.results)),
  ));
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    console.error(`bench-fio: ${error.message}`);
    process.exitCode = 1;
  },
);

#!/usr/bin/env node
/**
 * Loading a qcow2 image onto a block device, against qemu-img and against the device's raw speed
 * as fio measures it, on the same loop device in one run:
 *
 *   qcow2img load IMG /dev/loopN --progress=none
 *   qemu-img convert -n -O raw -t none -W -m 16 IMG /dev/loopN
 *   fio --name=w --filename=/dev/loopN --rw=write --bs=1M --iodepth=16 --ioengine=io_uring
 *       --direct=1 --size=VIRTUAL_SIZE --end_fsync=1 --output-format=json
 *
 * for the uncompressed, zlib and zstd images of realistic-image.mjs. The loop device runs with
 * direct I/O on over a fresh 2.5 GiB file. Zeroing (BLKZEROOUT on a loop device) turns the backing
 * file's blocks into unwritten extents, which the next writer pays to convert, so before every timed
 * run the file's first virtual-size bytes are written again in full (dd, O_DIRECT, fdatasync).
 *
 *   node benchmarks/load-device.mjs [--images a,b] [--runs 3] [--loop-direct-io on|off]
 *                                   [--quiet-timeout 10] [--cache-dir DIR]
 *
 * Each tool's MB/s counts the DATA written (dataBytes from qcow2img's final JSON progress line,
 * taken in one untimed run with --verify that is then checked with qemu-img compare; the same figure for
 * qemu-img), fio's the bytes it wrote. MB/s = 1e6 bytes/s. Exits non-zero only on errors.
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
import { buildRealisticImages, defaultCacheDir } from './realistic-image.mjs';
import { gnuTime, Cleanup, detachLoop, loadAverage, loadableBuild, timed } from './harness.mjs';

const f2 = (value) => (Number.isFinite(value) ? value.toFixed(2) : '-');

// ---- load onto a device ----

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const backingSize = 2.5 * GiB;
const defaultImages = ['uncompressed', 'zlib', 'zstd'];
/** The issue's bars. */
const fioBar = 0.85;
const zlibSpeedupBar = 3;

function fioArgs(device, size) {
  return ['--name=w', `--filename=${device}`, '--rw=write', '--bs=1M', '--iodepth=16', '--ioengine=io_uring', '--direct=1', `--size=${size}`, '--end_fsync=1', '--output-format=json'];
}

function parseFio(stdout) {
  const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
  if (job.error) throw new Error(`fio job error ${job.error}`);
  return { bytes: job.write.io_bytes, bytesPerSec: job.write.bw_bytes, runtimeSeconds: job.write.runtime / 1000 };
}

/** Writes the backing file's first `bytes` again, so every run starts on written blocks. */
async function refill(backing, bytes) {
  const started = performance.now();
  await run('dd', ['if=/dev/zero', `of=${backing}`, 'bs=16M', `count=${Math.ceil(bytes / (16 * MiB))}`, 'oflag=direct', 'conv=notrunc,fdatasync', 'status=none']);
  return (performance.now() - started) / 1000;
}

async function main() {
  const { values } = parseArgs({
    options: {
      images: { type: 'string' },
      runs: { type: 'string', default: '3' },
      'loop-direct-io': { type: 'string', default: 'on' },
      'quiet-timeout': { type: 'string', default: '10' },
      'cache-dir': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node benchmarks/load-device.mjs [--images a,b] [--runs 3] [--loop-direct-io on|off] [--quiet-timeout 10] [--cache-dir DIR]');
    return 0;
  }
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs must be a positive integer');
  const loopDirectIo = values['loop-direct-io'];
  if (!['on', 'off'].includes(loopDirectIo)) throw new Error('--loop-direct-io must be on or off');
  const quietTimeout = Number(values['quiet-timeout']);
  if (!fs.existsSync(gnuTime)) throw new Error(`${gnuTime} is missing: apt-get install -y time`);
  const loadStart = loadAverage();
  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  const variants = await buildRealisticImages({ cacheDir, only: values.images?.split(',') ?? defaultImages });
  const workDir = path.join(cacheDir, 'load-device');
  const build = await loadableBuild(cacheDir, path.join('load-device', 'build'));
  const facts = machineFacts(cacheDir, build);
  const cleanup = new Cleanup();
  cleanup.add(`rm -r ${workDir}`, () => fs.rmSync(workDir, { recursive: true, force: true }));
  const log = (line) => console.error(line);
  const rows = [];
  const runRows = [];
  const notes = [];
  let deviceFacts = '';
  const refillSeconds = [];
  try {
    ensureFreeSpace(workDir, backingSize + GiB, 'the loop device backing file');
    const backing = path.join(workDir, 'loop-backing.img');
    fs.rmSync(backing, { force: true });
    cleanup.add(`rm ${backing}`, () => fs.rmSync(backing, { force: true }));
    await run('fallocate', ['-l', String(backingSize), backing]);
    const device = (await run('losetup', [`--direct-io=${loopDirectIo}`, '-f', '--show', backing])).stdout.trim();
    const detach = cleanup.add(`losetup -d ${device}`, () => detachLoop(device));
    try {
      const sysBlock = `/sys/block/${path.basename(device)}`;
      const dio = fs.existsSync(`${sysBlock}/loop/dio`) ? fs.readFileSync(`${sysBlock}/loop/dio`, 'utf8').trim() : '?';
      const logical = fs.readFileSync(`${sysBlock}/queue/logical_block_size`, 'utf8').trim();
      deviceFacts = `${device} over a fresh ${humanBytes(backingSize)} file (${backing}), loop direct I/O ${dio === '1' ? 'on' : 'off'}, logical block ${logical} B`;

      for (const variant of variants) {
        const image = variant.image;
        log(`${variant.name}: ${image}`);
        // One untimed run with --verify (it fails on any difference it reads back) for dataBytes (its
        // final JSON line), then checked against the image by qemu-img too.
        await refill(backing, variant.virtualSize);
        const probe = await run(process.execPath, [build.cliPath, 'load', image, device, '--verify', '--progress=json']);
        const done = probe.stdout.trim().split('\n').map((line) => JSON.parse(line)).find((event) => event.phase === 'done');
        if (!done) throw new Error(`no {"phase":"done"} line from qcow2img load ${image} ${device} --progress=json`);
        const compare = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, device], { allowFailure: true });
        const compareText = compare.code === 0 ? 'identical' : `${compare.code === 1 ? 'DIFFER' : `ERROR ${compare.code}`}: ${(compare.stdout + compare.stderr).trim().split('\n')[0]}`;
        if (compare.code !== 0) notes.push(`${variant.name}: qemu-img compare ${image} ${device} after qcow2img load: ${compareText}`);
        log(`  dataBytes ${done.dataBytes}, zeroBytes ${done.zeroBytes}, O_DIRECT ${done.direct}; --verify passed; qemu-img compare: ${compareText}`);

        const tools = {
          qcow2img: [process.execPath, [build.cliPath, 'load', image, device, '--progress=none']],
          'qemu-img': ['qemu-img', ['convert', '-n', '-O', 'raw', '-t', 'none', '-W', '-m', '16', image, device]],
          fio: ['fio', fioArgs(device, variant.virtualSize)],
        };
        const names = Object.keys(tools);
        const samples = Object.fromEntries(names.map((name) => [name, []]));
        for (let index = 0; index < runs; index += 1) {
          const order = names.map((_, i) => names[(i + index) % names.length]);
          for (const name of order) {
            refillSeconds.push(await refill(backing, variant.virtualSize));
            const [command, args] = tools[name];
            const sample = await timed(command, args, { quietTimeout });
            if (name === 'qcow2img') {
              const match = / in ([\d.]+) s \(/.exec(sample.stderr);
              sample.internalSeconds = match ? Number(match[1]) : NaN;
              sample.direct = /O_DIRECT/.test(sample.stderr);
              sample.bytes = done.dataBytes;
              sample.rate = done.dataBytes / sample.seconds;
              sample.internalRate = done.dataBytes / sample.internalSeconds;
            } else if (name === 'qemu-img') {
              sample.bytes = done.dataBytes;
              sample.rate = done.dataBytes / sample.seconds;
            } else {
              const parsed = parseFio(sample.stdout);
              if (parsed.bytes !== variant.virtualSize) throw new Error(`fio wrote ${parsed.bytes} bytes, not ${variant.virtualSize}`);
              sample.bytes = parsed.bytes;
              sample.internalSeconds = parsed.runtimeSeconds;
              sample.rate = parsed.bytes / sample.seconds;
              sample.internalRate = parsed.bytesPerSec;
            }
            samples[name].push(sample);
            log(`  run ${index + 1} ${name}: ${f2(sample.seconds)} s${sample.internalSeconds !== undefined ? ` (own clock ${f2(sample.internalSeconds)} s)` : ''}, ` +
              `${(sample.rate / 1e6).toFixed(0)} MB/s, CPU ${f2(sample.cpuSeconds)} s, RSS ${humanBytes(sample.rssBytes)}, others' CPU ${f2(sample.othersCpuSeconds)} s${sample.quiet ? '' : ' (not quiet)'}`);
            runRows.push([variant.name, String(index + 1), name, f2(sample.seconds), f2(sample.internalSeconds ?? NaN), (sample.rate / 1e6).toFixed(0),
              sample.internalRate ? (sample.internalRate / 1e6).toFixed(0) : '-', f2(sample.cpuSeconds), humanBytes(sample.rssBytes), f2(sample.othersCpuSeconds)]);
          }
        }
        const m = (name, key) => median(samples[name].map((s) => s[key]));
        const ours = { seconds: m('qcow2img', 'seconds'), internal: m('qcow2img', 'internalSeconds'), rate: m('qcow2img', 'rate'), internalRate: m('qcow2img', 'internalRate') };
        const qemu = { seconds: m('qemu-img', 'seconds'), rate: m('qemu-img', 'rate') };
        const fio = { seconds: m('fio', 'seconds'), internal: m('fio', 'internalSeconds'), rate: m('fio', 'rate'), internalRate: m('fio', 'internalRate') };
        const percentWall = ours.rate / fio.rate;
        const percentOwn = ours.internalRate / fio.internalRate;
        const speedup = qemu.seconds / ours.seconds;
        const rss = (name) => humanBytes(Math.max(...samples[name].map((s) => s.rssBytes)));
        let bar = '-';
        if (variant.name === 'uncompressed') bar = `% of fio >= 85: wall ${percentWall >= fioBar ? 'met' : 'MISSED'}, own clocks ${percentOwn >= fioBar ? 'met' : 'MISSED'}`;
        if (variant.name === 'zlib') bar = `speedup >= 3x: ${speedup >= zlibSpeedupBar ? 'met' : 'MISSED'}`;
        rows.push([
          `${variant.name} (${humanBytes(fs.statSync(image).blocks * 512)})`,
          `${(done.dataBytes / 1e6).toFixed(0)} MB`,
          `${f2(ours.seconds)} (${f2(ours.internal)})`,
          f2(qemu.seconds),
          `${f2(fio.seconds)} (${f2(fio.internal)})`,
          `${(ours.rate / 1e6).toFixed(0)} (${(ours.internalRate / 1e6).toFixed(0)})`,
          (qemu.rate / 1e6).toFixed(0),
          `${(fio.rate / 1e6).toFixed(0)} (${(fio.internalRate / 1e6).toFixed(0)})`,
          `${(100 * percentWall).toFixed(1)}% (${(100 * percentOwn).toFixed(1)}%)`,
          `${speedup.toFixed(2)}x`,
          bar,
          `${rss('qcow2img')} / ${rss('qemu-img')} / ${rss('fio')}`,
          f2(Math.max(...names.flatMap((name) => samples[name].map((s) => s.othersCpuSeconds)))),
        ]);
        if (!samples.qcow2img.every((s) => s.direct)) notes.push(`${variant.name}: qcow2img did not report O_DIRECT on ${device}`);
      }
    } finally {
      detach();
    }
  } finally {
    cleanup.release();
  }
  const loadEnd = loadAverage();

  console.log('\n## Loading onto a block device: qcow2img load vs qemu-img convert -n vs fio\n');
  printFacts(facts);
  console.log(`- fio: ${spawnSync('fio', ['--version'], { encoding: 'utf8' }).stdout.trim()}`);
  console.log(`- load average (1/5/15 min): ${loadStart} at start, ${loadEnd} at end`);
  console.log(`- device: ${deviceFacts}; before every timed run its first 2 GiB were rewritten (dd O_DIRECT + fdatasync, ${f2(median(refillSeconds))} s median, untimed)`);
  console.log(`- commands: \`${formatCommand('qcow2img', ['load', 'IMG', 'DEV', '--progress=none'])}\`; \`${formatCommand('qemu-img', ['convert', '-n', '-O', 'raw', '-t', 'none', '-W', '-m', '16', 'IMG', 'DEV'])}\`; \`${formatCommand('fio', fioArgs('DEV', 'VIRTUAL_SIZE'))}\``);
  console.log(`- s = median of ${runs} runs, wall clock of the whole process (start-up included), the three tools rotating which goes first; in brackets, the tool's own clock: qcow2img's "loaded ... in X s" (write + flush), fio's job runtime (end_fsync inside)`);
  console.log("- data = qcow2img's dataBytes (guest bytes holding data, from the final --progress=json line of an untimed run whose result qemu-img compare checked); qcow2img and qemu-img MB/s = data / s; fio MB/s = bytes fio wrote (the whole virtual size) / s. MB/s = 1e6 bytes/s; outside brackets wall clock, in brackets own clocks");
  console.log('- % of fio = qcow2img data MB/s / fio MB/s (bar, uncompressed: >= 85%); speedup = qemu-img s / qcow2img s, wall clock (bar, zlib: >= 3x)');
  console.log("- peak RSS = GNU time %M (largest of the runs); others' CPU = CPU seconds the rest of the machine used during a run (largest of all runs of that image)\n");
  console.log(markdownTable(
    ['image (on disk)', 'data', 'qcow2img s', 'qemu-img s', 'fio s', 'qcow2img MB/s', 'qemu-img MB/s', 'fio MB/s', 'qcow2img % of fio', 'speedup vs qemu-img', 'bar', 'peak RSS qcow2img / qemu-img / fio', "others' CPU s"],
    rows,
  ));
  console.log('\n### Each run\n');
  console.log(markdownTable(['image', 'run', 'tool', 'wall s', 'own clock s', 'MB/s wall', 'MB/s own clock', 'CPU s', 'peak RSS', "others' CPU s"], runRows));
  if (notes.length) console.log(`\nNotes:\n${notes.map((note) => `- ${note}`).join('\n')}`);
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    console.error(`load-device: ${error.message}`);
    process.exitCode = 1;
  },
);

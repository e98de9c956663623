#!/usr/bin/env node
/**
 * Every load measured against the disk's limit: qcow2img and qemu-img loading the realistic
 * uncompressed, zlib and zstd images (realistic-image.mjs), into a new file and onto a loop
 * device, beside fio writing the same data bytes to the same target, all in one rotation.
 *
 *   qcow2img load IMG TARGET --progress=none [--overwrite]
 *   qemu-img convert [-n] -O raw -t none -W -m 16 IMG TARGET
 *   fio --rw=write --bs=1M --iodepth=16 --ioengine=io_uring --direct=1 --end_fsync=1 --size=DATA
 *
 *   node benchmarks/load.mjs [--images uncompressed,zlib,zstd] [--targets file,device] [--runs 3]
 *                            [--cold] [--threads N] [--quiet-timeout 30] [--max-others-cpu 0.5]
 *                            [--attempts 3] [--cache-dir DIR]
 *
 * Per target, each run goes through every command once, the order rotating from run to run, so
 * the ratios compare figures taken minutes apart at most. Before each timed run a file target is
 * removed; a device's backing file is written again in full (BLKZEROOUT leaves unwritten extents
 * that the next writer pays to convert). Warm by default (the image read into the page cache
 * first, as on a host that just downloaded it); --cold drops the page cache before every run.
 *
 * The table gives each load's time (median) and its ratios: to qemu-img (its time over ours), to
 * qcow2img's uncompressed load of the same disk (ours over that), and to fio (fio's over ours,
 * as a share of the disk's pace), with peak RSS from GNU time.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { dropCaches, ensureFreeSpace, formatCommand, humanBytes, machineFacts, markdownTable, median, printFacts, run, seconds } from './common.mjs';
import { buildRealisticImages, defaultCacheDir } from './realistic-image.mjs';
import { Cleanup, detachLoop, gnuTime, loadAverage, loadableBuild, timedBest, timedRunArgs, timedRunOptions, warmPageCache } from './harness.mjs';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function usage() {
  return 'usage: node benchmarks/load.mjs [--images uncompressed,zlib,zstd] [--targets file,device] [--runs 3] [--cold] [--threads N]\n' +
    '                                 [--quiet-timeout 30] [--max-others-cpu 0.5] [--attempts 3] [--cache-dir DIR]';
}

function fioArgs(target, bytes) {
  return ['--name=floor', `--filename=${target}`, `--size=${bytes}`, '--rw=write', '--bs=1M', '--iodepth=16', '--ioengine=io_uring',
    '--direct=1', '--end_fsync=1', '--output-format=terse'];
}

/** Guest bytes the image holds as data (neither zero nor unallocated), by qemu-img map. */
async function dataBytesOf(image) {
  const { stdout } = await run('qemu-img', ['map', '--output=json', image]);
  return JSON.parse(stdout).filter((extent) => extent.data && !extent.zero).reduce((sum, extent) => sum + extent.length, 0);
}

/** The commands of one target's rotation: fio, then each image's qcow2img and qemu-img loads. */
function commandsFor(target, variants, { cliPath, threads, fioBytes }) {
  const commands = [{ tool: 'fio', image: '-', command: 'fio', args: fioArgs(target.path, fioBytes) }];
  for (const variant of variants) {
    const ours = [cliPath, 'load', variant.image, target.path, '--progress=none', ...(target.device ? [] : ['--overwrite'])];
    if (threads) ours.push('--threads', String(threads));
    const qemu = ['convert', ...(target.device ? ['-n'] : []), '-O', 'raw', '-t', 'none', '-W', '-m', '16', variant.image, target.path];
    commands.push({ tool: 'qcow2img', image: variant.name, variant, command: process.execPath, args: ours });
    commands.push({ tool: 'qemu-img', image: variant.name, variant, command: 'qemu-img', args: qemu });
  }
  return commands;
}

/** A new file beside the images, removed before each run. */
function fileTarget(workDir) {
  const file = path.join(workDir, 'out.raw');
  return { name: 'file', path: file, describe: `a new file on ${workDir}`, prepare: async () => fs.rmSync(file, { force: true }), release: () => fs.rmSync(file, { force: true }) };
}

/** A loop device (direct I/O) over a preallocated file, whose first `bytes` are rewritten before each run. */
async function deviceTarget(workDir, bytes, cleanup) {
  const backing = path.join(workDir, 'loop-backing.img');
  fs.rmSync(backing, { force: true });
  await run('fallocate', ['-l', String(bytes + 512 * MiB), backing]);
  const device = (await run('losetup', ['--direct-io=on', '-f', '--show', backing])).stdout.trim();
  const detach = cleanup.add(`losetup -d ${device}`, () => detachLoop(device));
  const refill = () => run('dd', ['if=/dev/zero', `of=${backing}`, 'bs=16M', `count=${Math.ceil(bytes / (16 * MiB))}`, 'oflag=direct', 'conv=notrunc,fdatasync', 'status=none']);
  return {
    name: 'loop device',
    device: true,
    path: device,
    describe: `${device} (direct I/O) over a ${humanBytes(bytes + 512 * MiB)} file on ${workDir}, its first ${humanBytes(bytes)} rewritten before each run`,
    prepare: refill,
    release: () => {
      detach();
      fs.rmSync(backing, { force: true });
    },
  };
}

/** `runs` rotations of the commands on one target; samples by "tool image". */
async function rotate(target, commands, { runs, cold, log, runOptions }) {
  const samples = new Map(commands.map((c) => [`${c.tool} ${c.image}`, []]));
  for (let round = 0; round < runs; round++) {
    for (let i = 0; i < commands.length; i++) {
      const c = commands[(i + round) % commands.length];
      const beforeRun = () => {
        if (cold) dropCaches();
        else if (c.variant) warmPageCache(c.variant.image);
      };
      await target.prepare();
      const sample = await timedBest(c.command, c.args, { ...runOptions, beforeRun });
      samples.get(`${c.tool} ${c.image}`).push(sample);
      log(`  ${target.name} run ${round + 1} ${c.tool} ${c.image}: ${seconds(sample.seconds)} s, CPU ${seconds(sample.cpuSeconds)} s, RSS ${humanBytes(sample.rssBytes)}, others' CPU ${seconds(sample.othersCpuSeconds)} s${sample.attempts > 1 ? ` (best of ${sample.attempts})` : ''}`);
    }
  }
  return samples;
}

function summary(list) {
  return {
    seconds: median(list.map((s) => s.seconds)),
    cpuSeconds: median(list.map((s) => s.cpuSeconds)),
    rssBytes: Math.max(...list.map((s) => s.rssBytes)),
    othersCpuSeconds: Math.max(...list.map((s) => s.othersCpuSeconds)),
    all: list.map((s) => seconds(s.seconds)).join(', '),
  };
}

function tableRows(target, variants, samples) {
  const get = (tool, image) => summary(samples.get(`${tool} ${image}`));
  const fio = get('fio', '-');
  const uncompressed = samples.has('qcow2img uncompressed') ? get('qcow2img', 'uncompressed') : undefined;
  return variants.map((variant) => {
    const ours = get('qcow2img', variant.name);
    const qemu = get('qemu-img', variant.name);
    return [
      target.name,
      `${variant.name} (${humanBytes(fs.statSync(variant.image).size)})`,
      `${seconds(ours.seconds)} (CPU ${seconds(ours.cpuSeconds)})`,
      `${(qemu.seconds / ours.seconds).toFixed(2)}x`,
      uncompressed ? `${(ours.seconds / uncompressed.seconds).toFixed(2)}x` : '-',
      `${((fio.seconds / ours.seconds) * 100).toFixed(0)}%`,
      `${seconds(qemu.seconds)} (${((fio.seconds / qemu.seconds) * 100).toFixed(0)}% of fio)`,
      seconds(fio.seconds),
      `${humanBytes(ours.rssBytes)} / ${humanBytes(qemu.rssBytes)}`,
      seconds(Math.max(ours.othersCpuSeconds, qemu.othersCpuSeconds, fio.othersCpuSeconds)),
      `${ours.all} / ${qemu.all} / ${fio.all}`,
    ];
  });
}

async function main() {
  const { values } = parseArgs({
    options: {
      images: { type: 'string', default: 'uncompressed,zlib,zstd' },
      targets: { type: 'string', default: 'file,device' },
      runs: { type: 'string', default: '3' },
      cold: { type: 'boolean' },
      threads: { type: 'string' },
      ...timedRunArgs,
    },
  });
  if (values.help) return console.log(usage());
  const runs = Number(values.runs);
  const runOptions = timedRunOptions(values, usage());
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`bad arguments\n${usage()}`);
  const targetNames = values.targets.split(',');
  if (targetNames.some((name) => !['file', 'device'].includes(name))) throw new Error('--targets takes file and/or device');
  if (!fs.existsSync(gnuTime)) throw new Error(`${gnuTime} is missing: run npm run setup`);

  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  const variants = await buildRealisticImages({ cacheDir, only: values.images.split(',') });
  const build = await loadableBuild(cacheDir, path.join('load', 'build'));
  const workDir = path.join(cacheDir, 'load', 'work');
  fs.mkdirSync(workDir, { recursive: true });
  const virtualSize = Math.max(...variants.map((v) => v.virtualSize));
  ensureFreeSpace(workDir, virtualSize + GiB, 'the load target');
  const fioBytes = Math.floor((await dataBytesOf(variants[0].image)) / MiB) * MiB;
  const log = (line) => console.error(line);
  const loadAtStart = loadAverage();
  const cleanup = new Cleanup();
  const rows = [];
  const described = [];
  try {
    for (const name of targetNames) {
      const target = name === 'file' ? fileTarget(workDir) : await deviceTarget(workDir, virtualSize, cleanup);
      described.push(`${target.name}: ${target.describe}`);
      try {
        const samples = await rotate(target, commandsFor(target, variants, { cliPath: build.cliPath, threads: values.threads, fioBytes }), { runs, cold: values.cold, log, runOptions });
        rows.push(...tableRows(target, variants, samples));
      } finally {
        target.release();
      }
    }
  } finally {
    cleanup.release();
  }

  console.log('\n## qcow2img load against qemu-img and the disk (fio)\n');
  printFacts(machineFacts(workDir, build));
  console.log(`- targets: ${described.join('; ')}`);
  console.log(`- load average (1/5/15 min): ${loadAtStart} at the start, ${loadAverage()} at the end`);
  console.log(`- page cache: ${values.cold ? 'dropped before every run (cold)' : 'the image read into it before every run (warm)'}`);
  console.log(`- commands: \`${formatCommand('qcow2img', ['load', 'IMG', 'TARGET', '--progress=none'])}\`; \`${formatCommand('qemu-img', ['convert', '[-n]', '-O', 'raw', '-t', 'none', '-W', '-m', '16', 'IMG', 'TARGET'])}\`; fio writing ${humanBytes(fioBytes)} (the image's data bytes): \`${formatCommand('fio', fioArgs('TARGET', fioBytes))}\``);
  console.log(`- s = median of ${runs} runs, wall clock of the whole process (start-up included); each run waited up to ${runOptions.quietTimeout} s for a quiet second and was redone (up to ${runOptions.attempts} attempts, least disturbed kept) when the rest of the machine used over ${runOptions.maxOthersCpu} CPU s`);
  console.log('- vs qemu-img = qemu-img s / qcow2img s; vs uncompressed = qcow2img s / qcow2img s of the uncompressed image (1.00x: as fast as a plain copy); of fio = fio s / tool s (100%: the disk\'s pace)\n');
  console.log(markdownTable(['target', 'image', 'qcow2img s', 'vs qemu-img', 'vs uncompressed', 'of fio', 'qemu-img s', 'fio s', 'peak RSS ours / qemu-img', "others' CPU s", 'runs s ours / qemu-img / fio'], rows));
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code ?? 0;
  },
  (error) => {
    console.error(`load: ${error.message}`);
    process.exitCode = 1;
  },
);

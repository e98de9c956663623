#!/usr/bin/env node
/**
 * `qcow2img load IMAGE TARGET...`: one, two and four targets written from one read and decode of
 * the realistic zlib image (realistic-image.mjs), each count against one target, in these settings:
 *
 *   disk        new files on one disk (the cache folder's): every target's bytes go to the same
 *               disk, so the time grows with the bytes that disk takes;
 *   memory      each target on a tmpfs of its own mounted by this script (as root; elsewhere
 *               folders of /dev/shm): a file the size of the disk, its pages written with zeros
 *               before the timed runs, loaded in place (--offset 0 --target-is-zero: the zero ranges are
 *               zeros already). The targets share no disk's bandwidth, so the figures show what
 *               decoding once saves; issue #21's bar: two targets at most 1.3x one target's time,
 *               four at most 2x;
 *   memory-new  (only when asked) new files on those tmpfs mounts: every run allocates the pages
 *               it writes, which on a virtual machine can cost more than the load (measured once
 *               here: four new 2 GiB files took 21 s of system CPU, 70% of it copying into new
 *               shmem pages, against 1.3 s into pages allocated beforehand).
 *
 *   node benchmarks/load-many.mjs [--image zlib] [--counts 1,2,4] [--modes disk,memory] [--runs 5]
 *                                 [--quiet-timeout 30] [--max-others-cpu 0.5] [--attempts 3]
 *                                 [--cache-dir DIR]
 *
 * Warm runs (the image read into the page cache before each); the counts rotate which goes first
 * from run to run, every setting in each run; each figure is the median of --runs runs, peak RSS
 * the largest of them (GNU time). The first run of each count in each setting is checked: every
 * target byte for byte equal to `qemu-img convert -O raw` of the image.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ensureFreeSpace, formatCommand, humanBytes, machineFacts, markdownTable, median, printFacts, run, seconds } from './common.mjs';
import { Cleanup, gnuTime, loadAverage, loadableBuild, timedBest, timedRunArgs, timedRunOptions, warmPageCache } from './harness.mjs';
import { buildRealisticImages, defaultCacheDir } from './realistic-image.mjs';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
/** Issue #21: a load onto N targets against one target. */
const bars = { 2: 1.3, 4: 2 };

function usage() {
  return 'usage: node benchmarks/load-many.mjs [--image zlib] [--counts 1,2,4] [--modes disk,memory[,memory-new]] [--runs 5]\n' +
    '                                      [--quiet-timeout 30] [--max-others-cpu 0.5] [--attempts 3] [--cache-dir DIR]';
}

/**
 * A setting: where its targets are, the load's arguments, and whether the outputs are removed after
 * each run (new files) or stay (in place).
 */
function setting(name, describe, outputs, { inPlace = false } = {}) {
  return { name, describe, outputs, args: inPlace ? ['--offset', '0', '--target-is-zero'] : ['--overwrite'], removeAfter: !inPlace };
}

/** New files on one disk: target i is `i.raw` in the work folder. */
function diskSetting(workDir, count, virtualSize) {
  ensureFreeSpace(workDir, count * virtualSize + GiB, `${count} targets`);
  return setting('disk', `new files in ${workDir}, all on one disk`, Array.from({ length: count }, (_, i) => path.join(workDir, `${i}.raw`)));
}

/** `count` folders, each a tmpfs of its own (root) or a folder of /dev/shm; unmounted and removed on the way out. */
async function memoryFolders(workDir, name, count, virtualSize, cleanup) {
  if (process.getuid?.() !== 0) {
    const shm = fs.mkdtempSync(`/dev/shm/qcow2img-${name}-`);
    cleanup.add(`rm -r ${shm}`, () => fs.rmSync(shm, { recursive: true, force: true }));
    const folders = Array.from({ length: count }, (_, i) => path.join(shm, String(i)));
    folders.forEach((folder) => fs.mkdirSync(folder));
    return { folders, where: `a folder of ${shm} (one tmpfs for all: not root, so no mounts of their own)` };
  }
  const folders = [];
  for (let i = 0; i < count; i++) {
    const mount = path.join(workDir, `${name}-${i}`);
    fs.mkdirSync(mount, { recursive: true });
    // The target and a temporary name beside it fit; pages are taken only as they are written.
    await run('mount', ['-t', 'tmpfs', '-o', `size=${virtualSize + 256 * MiB},mode=0755`, `qcow2img-${name}`, mount]);
    // Synchronous: the cleanup also runs from a signal handler.
    cleanup.add(`umount ${mount}`, () => {
      const { status, stderr } = spawnSync('umount', [mount], { encoding: 'utf8' });
      if (status !== 0) throw new Error(`umount ${mount}: ${stderr.trim()}`);
      fs.rmdirSync(mount);
    });
    folders.push(mount);
  }
  return { folders, where: `its own tmpfs (mounted under ${workDir})` };
}

/** Each target a file the size of the disk on its own tmpfs, its pages allocated now, loaded in place. */
async function memorySetting(workDir, count, virtualSize, cleanup) {
  const { folders, where } = await memoryFolders(workDir, 'memory', count, virtualSize, cleanup);
  const outputs = folders.map((folder) => path.join(folder, 'disk.raw'));
  // Written, not fallocated: a fallocated tmpfs page is first touched (and, on a virtual machine,
  // backed by the host) when the first load writes it, which would charge that run for it.
  for (const output of outputs) await run('dd', ['if=/dev/zero', `of=${output}`, 'bs=16M', `count=${virtualSize}`, 'iflag=count_bytes', 'status=none']);
  return setting('memory', `a ${humanBytes(virtualSize)} file for each target on ${where}, its pages written with zeros before the runs, loaded in place (--offset 0 --target-is-zero)`, outputs, { inPlace: true });
}

/** New files on a tmpfs of its own for each target: each run allocates the pages it writes. */
async function memoryNewSetting(workDir, count, virtualSize, cleanup) {
  const { folders, where } = await memoryFolders(workDir, 'memory-new', count, virtualSize, cleanup);
  return setting('memory-new', `a new file for each target on ${where}`, folders.map((folder) => path.join(folder, 'new.raw')));
}

/** Refuses settings whose targets would not fit in the memory available now. */
function checkMemory(modes, count, virtualSize) {
  const inMemory = modes.filter((m) => m.startsWith('memory')).length;
  const needed = inMemory * count * virtualSize + 2 * GiB;
  const kib = Number(/^MemAvailable:\s+(\d+) kB$/m.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1]);
  if (inMemory > 0 && kib * 1024 < needed) throw new Error(`memory targets: ${humanBytes(kib * 1024)} available, ${humanBytes(needed)} needed for ${count} targets in ${inMemory} setting(s) (lower --counts, or fewer --modes)`);
}

/** `cmp` of each target with the reference: the load wrote exactly qemu-img's bytes. */
async function checkIdentical(targets, reference, label) {
  for (const target of targets) {
    const result = await run('cmp', [reference, target], { allowFailure: true });
    if (result.code !== 0) throw new Error(`${label}: ${target} differs from qemu-img convert's output: ${(result.stdout || result.stderr).trim()}`);
  }
  console.error(`  ${label}: ${targets.length} target(s) byte for byte equal to qemu-img convert's output`);
}

function tableRows(counts, samples) {
  const one = median(samples.get(1).map((s) => s.seconds));
  return counts.map((count) => {
    const list = samples.get(count);
    const time = median(list.map((s) => s.seconds));
    const ratio = time / one;
    const bar = bars[count];
    return [
      String(count),
      `${seconds(time)} (CPU ${seconds(median(list.map((s) => s.cpuSeconds)))})`,
      `${ratio.toFixed(2)}x`,
      bar === undefined ? '-' : `<= ${bar}x: ${ratio <= bar ? 'met' : 'not met'}`,
      humanBytes(Math.max(...list.map((s) => s.rssBytes))),
      seconds(Math.max(...list.map((s) => s.othersCpuSeconds))),
      list.map((s) => seconds(s.seconds)).join(', '),
    ];
  });
}

async function main() {
  const { values } = parseArgs({
    options: {
      image: { type: 'string', default: 'zlib' },
      counts: { type: 'string', default: '1,2,4' },
      modes: { type: 'string', default: 'disk,memory' },
      runs: { type: 'string', default: '5' },
      ...timedRunArgs,
    },
  });
  if (values.help) return console.log(usage());
  const runs = Number(values.runs);
  const counts = values.counts.split(',').map(Number);
  const modes = values.modes.split(',');
  const runOptions = timedRunOptions(values, usage());
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`bad arguments\n${usage()}`);
  if (!counts.includes(1) || counts.some((c) => !Number.isInteger(c) || c < 1)) throw new Error('--counts takes whole numbers, 1 among them (the ratios are to one target)');
  if (modes.some((m) => !['disk', 'memory', 'memory-new'].includes(m))) throw new Error('--modes takes disk, memory and memory-new');
  if (!fs.existsSync(gnuTime)) throw new Error(`${gnuTime} is missing: run npm run setup`);

  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  const [variant] = await buildRealisticImages({ cacheDir, only: [values.image], log: console.error });
  const build = await loadableBuild(cacheDir, path.join('load-many', 'build'));
  const workDir = path.join(cacheDir, 'load-many', 'work');
  fs.mkdirSync(workDir, { recursive: true });
  const maxCount = Math.max(...counts);
  const cleanup = new Cleanup();
  const loadAtStart = loadAverage();
  const samples = new Map(modes.map((m) => [m, new Map(counts.map((c) => [c, []]))]));
  const settings = new Map();
  try {
    // The oracle, once: the raw disk as qemu-img writes it.
    ensureFreeSpace(workDir, variant.virtualSize + GiB, 'the reference');
    const reference = path.join(workDir, 'qemu-img.raw');
    cleanup.add(`rm ${reference}`, () => fs.rmSync(reference, { force: true }));
    await run('qemu-img', ['convert', '-O', 'raw', variant.image, reference]);
    checkMemory(modes, maxCount, variant.virtualSize);
    const makers = { disk: diskSetting, memory: memorySetting, 'memory-new': memoryNewSetting };
    for (const mode of modes) settings.set(mode, await makers[mode](workDir, maxCount, variant.virtualSize, cleanup));
    for (let round = 0; round < runs; round++) {
      for (const mode of modes) {
        for (const count of [...counts.slice(round % counts.length), ...counts.slice(0, round % counts.length)]) {
          const { outputs, args, removeAfter } = settings.get(mode);
          const targets = outputs.slice(0, count);
          const clear = () => removeAfter && targets.forEach((o) => fs.rmSync(o, { force: true }));
          try {
            const sample = await timedBest(process.execPath, [build.cliPath, 'load', variant.image, ...targets, ...args, '--progress=none'], {
              ...runOptions,
              beforeRun: () => {
                clear();
                warmPageCache(variant.image);
              },
            });
            samples.get(mode).get(count).push(sample);
            console.error(`${mode} ${count} target(s) run ${round + 1}: ${seconds(sample.seconds)} s, CPU ${seconds(sample.cpuSeconds)} s, RSS ${humanBytes(sample.rssBytes)}, others' CPU ${seconds(sample.othersCpuSeconds)} s${sample.attempts > 1 ? ` (best of ${sample.attempts})` : ''}`);
            if (round === 0) await checkIdentical(targets, reference, `${mode}, ${count} target(s)`);
          } finally {
            clear();
          }
        }
      }
    }
  } finally {
    cleanup.release();
  }

  console.log(`\n## qcow2img load onto several targets: ${variant.name} image (${humanBytes(fs.statSync(variant.image).size)}, ${humanBytes(variant.virtualSize)} disk)\n`);
  printFacts(machineFacts(workDir, build));
  console.log(`- load average (1/5/15 min): ${loadAtStart} at the start, ${loadAverage()} at the end`);
  console.log(`- command: \`${formatCommand('qcow2img', ['load', 'IMG', 'TARGET...', '--overwrite', '--progress=none'])}\` (new files), \`${formatCommand('qcow2img', ['load', 'IMG', 'TARGET...', '--offset', '0', '--target-is-zero', '--progress=none'])}\` (in place), warm (the image read into the page cache before every run)`);
  console.log(`- s = median of ${runs} runs, wall clock of the whole process; each run waited up to ${runOptions.quietTimeout} s for a quiet second and was redone (up to ${runOptions.attempts} attempts, least disturbed kept) when the rest of the machine used over ${runOptions.maxOthersCpu} CPU s`);
  console.log("- every target of each count's first run in each setting: byte for byte equal to `qemu-img convert -O raw` of the image");
  for (const mode of modes) {
    const title = { disk: 'targets on one disk', memory: 'targets on memory-backed storage, each its own', 'memory-new': 'new files on memory-backed storage, each its own' }[mode];
    console.log(`\n### ${title}: ${settings.get(mode).describe}\n`);
    console.log(markdownTable(['targets', 'load s', 'vs one target', 'issue #21 bar', 'peak RSS', "others' CPU s", 'runs s'], tableRows(counts, samples.get(mode))));
  }
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code ?? 0;
  },
  (error) => {
    console.error(`load-many: ${error.message}`);
    process.exitCode = 1;
  },
);

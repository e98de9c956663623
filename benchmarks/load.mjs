#!/usr/bin/env node
/**
 * Times `qcow2img load` against `qemu-img convert -O raw -t none -W -m 16` on the realistic
 * uncompressed, zlib and zstd images (see realistic-image.mjs), in one run so the ratios hold even
 * when the machine's absolute speed drifts.
 *
 *   node benchmarks/load.mjs [--images a,b] [--runs 3] [--threads N] [--sweep-threads 2,4,8,16]
 *                            [--no-warm] [--nice=-10] [--quiet-timeout 30] [--max-others-cpu 0.5]
 *                            [--attempts 3] [--cache-dir DIR] [--floor uncompressed]
 *
 * Cold runs: before each one the output is removed and `sync; echo 3 > /proc/sys/vm/drop_caches`
 * empties the page cache, so both tools read the image from the disk. Warm runs: the image is read
 * into the page cache first and caches are left alone. Each figure is the median of --runs runs,
 * the two tools alternating which goes first. Peak memory is GNU time's maximum RSS.
 * --sweep-threads repeats the cold qcow2img runs for each thread count, to tune the default.
 * For the images --floor names (default: the uncompressed one, whose load is a copy), fio writing
 * the same number of data bytes is timed in the same rotation: the disk's pace for that copy.
 *
 * On a shared 2-core machine other work skews wall times badly, so each run waits (up to
 * --quiet-timeout seconds) for the CPUs to go idle, a run during which other processes used more
 * than --max-others-cpu CPU seconds is redone (up to --attempts times, keeping the cleanest), and
 * the CPU time others used is reported next to the figures.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import {
  busyCpuSeconds,
  canDropCaches,
  dropCaches,
  ensureFreeSpace,
  formatCommand,
  freezeBuild,
  humanBytes,
  machineFacts,
  markdownTable,
  median,
  printFacts,
  run,
  seconds,
} from './common.mjs';
import { buildRealisticImages, defaultCacheDir } from './realistic-image.mjs';
import { warmPageCache } from './harness.mjs';

const gnuTime = '/usr/bin/time';
const defaultImages = ['uncompressed', 'zlib', 'zstd'];
/** Below this many busy cores (averaged over a second) the machine counts as quiet. */
const quietBusyCores = 0.1;

function qemuImgCommand(image, output) {
  return ['qemu-img', ['convert', '-O', 'raw', '-t', 'none', '-W', '-m', '16', image, output]];
}

function qcow2imgCommand(cliPath, image, output, threads) {
  const args = [cliPath, 'load', image, output, '--overwrite', '--progress=none'];
  if (threads !== undefined) args.push('--threads', String(threads));
  return [process.execPath, args];
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until other processes leave the CPUs idle for a whole second, or the timeout passes. */
async function waitForQuiet(timeoutSeconds) {
  const started = performance.now();
  for (;;) {
    const before = busyCpuSeconds();
    await sleep(1000);
    const busy = busyCpuSeconds() - before;
    const waited = (performance.now() - started) / 1000;
    if (busy < quietBusyCores) return { quiet: true, waited };
    if (waited >= timeoutSeconds) return { quiet: false, waited };
  }
}

/**
 * One timed run. The clock covers the whole process (node start-up included, since users pay it
 * too); both tools flush their output before exiting, and the `sync` timed after it shows if
 * either left dirty pages behind.
 */
async function timedRunOnce([command, args], output, { cold, quietTimeout, nice }) {
  fs.rmSync(output, { force: true });
  spawnSync('sync');
  if (cold) dropCaches();
  const quiet = await waitForQuiet(quietTimeout);
  const statsFile = `${output}.time`;
  const busyBefore = busyCpuSeconds();
  const started = performance.now();
  // nice execs the command, so GNU time still measures the tool itself.
  const priority = nice ? ['nice', '-n', String(nice)] : [];
  const result = await run(gnuTime, ['-f', '%U %S %M', '-o', statsFile, ...priority, command, ...args], { allowFailure: true });
  const elapsed = (performance.now() - started) / 1000;
  const busy = busyCpuSeconds() - busyBefore;
  const syncStarted = performance.now();
  spawnSync('sync');
  const syncSeconds = (performance.now() - syncStarted) / 1000;
  // GNU time puts "Command exited with non-zero status N" first when the command fails.
  const [user, system, rssKiB] = fs.readFileSync(statsFile, 'utf8').trim().split('\n').pop().split(' ').map(Number);
  fs.rmSync(statsFile, { force: true });
  fs.rmSync(output, { force: true });
  if (result.code !== 0) {
    throw new Error(`${formatCommand(command, args)} failed (exit ${result.code}):\n${(result.stderr || result.stdout).trim()}`);
  }
  return {
    seconds: elapsed,
    cpuSeconds: user + system,
    // What the rest of the machine used meanwhile (hypervisor steal and kernel threads included).
    othersCpuSeconds: Math.max(0, busy - user - system),
    quiet: quiet.quiet,
    syncSeconds,
    rssBytes: rssKiB * 1024,
    direct: / O_DIRECT\)/.test(result.stderr),
  };
}

/** A timed run, redone while other processes disturbed it; the least disturbed attempt wins. */
async function timedRun(command, output, options) {
  let best;
  let attempts = 0;
  while (attempts < options.attempts) {
    attempts += 1;
    const sample = await timedRunOnce(command, output, options);
    if (!best || sample.othersCpuSeconds < best.othersCpuSeconds) best = sample;
    if (sample.othersCpuSeconds <= options.maxOthersCpu) break;
  }
  return { ...best, attempts };
}

function summarize(samples, maxOthersCpu) {
  return {
    disturbedRuns: samples.filter((s) => s.othersCpuSeconds > maxOthersCpu).length,
    seconds: median(samples.map((s) => s.seconds)),
    cpuSeconds: median(samples.map((s) => s.cpuSeconds)),
    othersCpuSeconds: Math.max(...samples.map((s) => s.othersCpuSeconds)),
    rssBytes: Math.max(...samples.map((s) => s.rssBytes)),
    maxSyncSeconds: Math.max(...samples.map((s) => s.syncSeconds)),
    allQuiet: samples.every((s) => s.quiet),
    all: samples.map((s) => seconds(s.seconds)).join(', '),
    direct: samples.every((s) => s.direct),
  };
}

function describeSample(tool, sample) {
  return `${tool} ${seconds(sample.seconds)} s, CPU ${seconds(sample.cpuSeconds)} s, max RSS ${humanBytes(sample.rssBytes)}, ` +
    `others' CPU ${seconds(sample.othersCpuSeconds)} s, sync after ${seconds(sample.syncSeconds)} s${sample.quiet ? '' : ', NOT QUIET'}` +
    `${sample.attempts > 1 ? ` (best of ${sample.attempts} attempts)` : ''}`;
}

/**
 * Runs each tool `runs` times, rotating which goes first so none always follows another. `tools`
 * holds qemu-img and qcow2img, and fio where the disk floor is measured too.
 */
async function compareTools(tools, output, { runs, cold, log, ...runOptions }) {
  const names = Object.keys(tools);
  const samples = Object.fromEntries(names.map((name) => [name, []]));
  for (let index = 0; index < runs; index += 1) {
    const order = names.map((_, at) => names[(at + index) % names.length]);
    for (const tool of order) {
      const sample = await timedRun(tools[tool], output, { cold, ...runOptions });
      samples[tool].push(sample);
      log(`  ${cold ? 'cold' : 'warm'} run ${index + 1}: ${describeSample(tool, sample)}`);
    }
  }
  const summaries = Object.fromEntries(names.map((name) => [name, summarize(samples[name], runOptions.maxOthersCpu)]));
  return { qemu: summaries['qemu-img'], ours: summaries.qcow2img, floor: summaries.fio };
}

/**
 * The disk's pace for an image whose clusters are stored as they are: fio writing as many bytes
 * as the image holds data (rounded down to 1 MiB) into a new file beside the outputs, with
 * O_DIRECT, 1 MiB blocks at queue depth 16, and an fsync at the end, as both tools flush theirs.
 * A load of such an image is a copy of those bytes; a tool near fio's time is held by the disk.
 */
function fioFloorCommand(output, dataBytes) {
  const size = Math.floor(dataBytes / (1 << 20)) * (1 << 20);
  return ['fio', ['--name=floor', `--filename=${output}`, `--size=${size}`, '--rw=write', '--bs=1M', '--iodepth=16',
    '--ioengine=io_uring', '--direct=1', '--end_fsync=1', '--output-format=terse']];
}

/** Guest bytes the image holds as data (not zero, not unallocated), by qemu-img map. */
async function dataBytesOf(image) {
  const { stdout } = await run('qemu-img', ['map', '--output=json', image]);
  return JSON.parse(stdout).filter((extent) => extent.data && !extent.zero).reduce((sum, extent) => sum + extent.length, 0);
}

function floorRow(variant, mode, dataBytes, { qemu, ours, floor }) {
  // fio's time over the tool's: 100% is fio's pace, above it faster than fio.
  const percent = (toolSeconds) => `${((floor.seconds / toolSeconds) * 100).toFixed(0)}%`;
  return [
    variant.name,
    mode,
    `${seconds(floor.seconds)} (${humanBytes(dataBytes)})`,
    `${seconds(qemu.seconds)} (${percent(qemu.seconds)})`,
    `${seconds(ours.seconds)} (${percent(ours.seconds)})`,
    `${seconds(qemu.seconds / 1.2)} (${percent(qemu.seconds / 1.2)})`,
    floor.all,
  ];
}

function resultRow(variant, mode, { qemu, ours }) {
  return [
    `${variant.name} (${humanBytes(fs.statSync(variant.image).blocks * 512)})`,
    mode,
    seconds(qemu.seconds),
    seconds(ours.seconds),
    `${(qemu.seconds / ours.seconds).toFixed(2)}x`,
    `${seconds(qemu.cpuSeconds)} / ${seconds(ours.cpuSeconds)}`,
    `${humanBytes(qemu.rssBytes)} / ${humanBytes(ours.rssBytes)}`,
    `${seconds(Math.max(qemu.othersCpuSeconds, ours.othersCpuSeconds))}`,
    `${qemu.all} / ${ours.all}`,
  ];
}

/**
 * Start-up alone, cold and warm (medians of `runs`): after drop_caches node must read its ~100 MB
 * binary back from the disk, qemu-img a few MB, which weighs on the cold figures.
 */
async function startupSeconds(command, args, { runs, quietTimeout }) {
  const measure = async (cold) => {
    if (cold) dropCaches();
    await waitForQuiet(quietTimeout);
    const started = performance.now();
    await run(command, args);
    return (performance.now() - started) / 1000;
  };
  const cold = [];
  const warm = [];
  for (let index = 0; index < runs; index += 1) {
    cold.push(await measure(true));
    warm.push(await measure(false));
  }
  return `${seconds(median(cold))} s cold, ${seconds(median(warm))} s warm`;
}

/**
 * What the disk itself does (fio, O_DIRECT, 1 MiB blocks, queue depth 16): reading the first image
 * and writing a 2 GiB file beside the outputs. Cold loads of uncompressed images cannot beat it.
 */
async function diskThroughput(image, outDir) {
  if (spawnSync('fio', ['--version']).status !== 0) return 'fio not installed';
  const common = ['--bs=1M', '--iodepth=16', '--ioengine=io_uring', '--direct=1', '--output-format=json'];
  const rate = async (args, kind) => {
    const { stdout } = await run('fio', [...args, ...common]);
    return (JSON.parse(stdout).jobs[0][kind].bw_bytes / 1e9).toFixed(2);
  };
  const scratch = path.join(outDir, 'fio-scratch');
  const read = await rate(['--name=read', `--filename=${image}`, '--rw=read', '--readonly'], 'read');
  const write = await rate(['--name=write', `--filename=${scratch}`, '--size=2G', '--rw=write'], 'write');
  fs.rmSync(scratch, { force: true });
  return `sequential read of ${path.basename(path.dirname(image))} ${read} GB/s, sequential write ${write} GB/s (fio, O_DIRECT, 1 MiB, QD16, io_uring)`;
}

/** Reads the image into the page cache, for the warm runs. */
async function main() {
  const { values } = parseArgs({
    options: {
      images: { type: 'string' },
      runs: { type: 'string', default: '3' },
      threads: { type: 'string' },
      'sweep-threads': { type: 'string' },
      'no-warm': { type: 'boolean' },
      floor: { type: 'string', default: 'uncompressed' },
      nice: { type: 'string', default: '-10' },
      'quiet-timeout': { type: 'string', default: '30' },
      'max-others-cpu': { type: 'string', default: '0.5' },
      attempts: { type: 'string', default: '3' },
      'cache-dir': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node benchmarks/load.mjs [--images a,b] [--runs 3] [--threads N] [--sweep-threads 2,4,8,16] [--no-warm]');
    console.log('                            [--nice=-10] [--quiet-timeout 30] [--max-others-cpu 0.5] [--attempts 3] [--cache-dir DIR] [--floor uncompressed]');
    return 0;
  }
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs must be a positive integer');
  const quietTimeout = Number(values['quiet-timeout']);
  const runOptions = {
    quietTimeout,
    nice: Number(values.nice),
    maxOthersCpu: Number(values['max-others-cpu']),
    attempts: Math.max(1, Number(values.attempts)),
  };
  if (![quietTimeout, runOptions.nice, runOptions.maxOthersCpu, runOptions.attempts].every(Number.isFinite)) throw new Error('--nice, --quiet-timeout, --max-others-cpu and --attempts take numbers');
  const threads = values.threads === undefined ? undefined : Number(values.threads);
  const sweep = values['sweep-threads']?.split(',').map(Number) ?? [];
  if ([threads ?? 1, ...sweep].some((n) => !Number.isInteger(n) || n < 1)) throw new Error('thread counts must be positive integers');
  if (!fs.existsSync(gnuTime)) throw new Error(`${gnuTime} is missing: apt-get install -y time`);
  if (!canDropCaches()) throw new Error('cold runs need root: /proc/sys/vm/drop_caches is not writable');

  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  const variants = await buildRealisticImages({ cacheDir, only: values.images?.split(',') ?? defaultImages });
  const build = await freezeBuild(cacheDir);
  // Per process, so two runs never delete each other's outputs.
  const outDir = path.join(cacheDir, 'load-out', String(process.pid));
  fs.mkdirSync(outDir, { recursive: true });
  const log = (line) => console.error(line);

  const startup = {
    qcow2img: await startupSeconds(process.execPath, [build.cliPath, '--version'], { runs, quietTimeout }),
    qemuImg: await startupSeconds('qemu-img', ['--version'], { runs, quietTimeout }),
  };
  const disk = await diskThroughput(variants[0].image, outDir);
  const floorImages = new Set(values.floor.split(',').filter(Boolean));
  const rows = [];
  const floorRows = [];
  const sweepRows = [];
  const notes = [];
  let allQuiet = true;
  const disturbed = [];
  const noteDisturbed = (label, summary) => {
    if (summary.disturbedRuns) disturbed.push(`${label} (${summary.disturbedRuns} of ${runs})`);
  };
  for (const variant of variants) {
    const output = path.join(outDir, `${variant.name}.raw`);
    ensureFreeSpace(outDir, variant.virtualSize + 256 * 1024 * 1024, `the output of ${variant.name}`);
    log(`${variant.name}: ${variant.image}`);
    const tools = { 'qemu-img': qemuImgCommand(variant.image, output), qcow2img: qcow2imgCommand(build.cliPath, variant.image, output, threads) };
    const dataBytes = floorImages.has(variant.name) ? await dataBytesOf(variant.image) : 0;
    if (dataBytes > 0 && spawnSync('fio', ['--version']).status === 0) tools.fio = fioFloorCommand(output, dataBytes);
    const cold = await compareTools(tools, output, { runs, cold: true, log, ...runOptions });
    rows.push(resultRow(variant, 'cold', cold));
    if (cold.floor) floorRows.push(floorRow(variant, 'cold', dataBytes, cold));
    if (!cold.ours.direct) notes.push(`${variant.name}: qcow2img did not report O_DIRECT output`);
    for (const [tool, summary] of [['qemu-img', cold.qemu], ['qcow2img', cold.ours]]) {
      if (summary.maxSyncSeconds > 0.05) notes.push(`${variant.name}: a sync after ${tool} took up to ${seconds(summary.maxSyncSeconds)} s (not in its time)`);
      allQuiet &&= summary.allQuiet;
      noteDisturbed(`${variant.name} cold ${tool}`, summary);
    }
    if (!values['no-warm']) {
      warmPageCache(variant.image);
      const warm = await compareTools(tools, output, { runs, cold: false, log, ...runOptions });
      rows.push(resultRow(variant, 'warm', warm));
      if (warm.floor) floorRows.push(floorRow(variant, 'warm', dataBytes, warm));
      allQuiet &&= warm.qemu.allQuiet && warm.ours.allQuiet;
      noteDisturbed(`${variant.name} warm qemu-img`, warm.qemu);
      noteDisturbed(`${variant.name} warm qcow2img`, warm.ours);
    }
    for (const count of sweep) {
      const samples = [];
      for (let index = 0; index < runs; index += 1) {
        const sample = await timedRun(qcow2imgCommand(build.cliPath, variant.image, output, count), output, { cold: true, ...runOptions });
        log(`  cold run ${index + 1}: ${describeSample(`qcow2img --threads ${count}`, sample)}`);
        samples.push(sample);
      }
      const summary = summarize(samples, runOptions.maxOthersCpu);
      allQuiet &&= summary.allQuiet;
      noteDisturbed(`${variant.name} qcow2img --threads ${count}`, summary);
      sweepRows.push([variant.name, count, seconds(cold.qemu.seconds), seconds(summary.seconds), `${(cold.qemu.seconds / summary.seconds).toFixed(2)}x`,
        seconds(summary.cpuSeconds), humanBytes(summary.rssBytes), seconds(summary.othersCpuSeconds), summary.all]);
    }
  }

  console.log('\n## qcow2img load vs qemu-img convert -O raw -t none -W -m 16\n');
  printFacts(machineFacts(outDir, build));
  // Asked of the build itself, so the report stays right when the default changes.
  const { threadCount } = createRequire(import.meta.url)(path.join(build.dir, 'dist', 'load', 'copy.js'));
  console.log(`- qcow2img threads: ${threads ?? `default (${threadCount(undefined, '')} on this machine)`}`);
  console.log(`- disk: ${disk}`);
  console.log(`- start-up only (\`--version\`): qcow2img ${startup.qcow2img}; qemu-img ${startup.qemuImg}`);
  console.log('- cold = before every timed run the output is removed and `sync; echo 3 > /proc/sys/vm/drop_caches` is run, so both tools start with an empty page cache');
  console.log('- warm = the image was read into the page cache first; caches not dropped between runs');
  console.log(`- s = median of ${runs} runs, wall clock of the whole process (node start-up included); output on the same filesystem, removed between runs`);
  console.log('- speedup = qemu-img s / qcow2img s (above 1: qcow2img faster); CPU = user+sys (median); peak RSS = GNU time %M, largest of the runs');
  console.log(`- both tools run under \`nice -n ${runOptions.nice}\` (the same priority for both, above other work on this shared machine)`);
  console.log(`- others' CPU = CPU seconds the rest of the machine used during a run (largest of the runs, kernel threads included); each run first waited up to ${quietTimeout} s for a quiet second, and was redone (up to ${runOptions.attempts} attempts, best kept) when others used over ${runOptions.maxOthersCpu} s\n`);
  console.log(markdownTable(['image (on disk)', 'cache', 'qemu-img s', 'qcow2img s', 'speedup', 'CPU s qemu-img / qcow2img', 'peak RSS qemu-img / qcow2img', "others' CPU s", 'runs s qemu-img / qcow2img'], rows));
  if (floorRows.length) {
    console.log('\n### The disk\'s pace: fio writing the same data bytes in the same rotation (O_DIRECT, 1 MiB, QD16, io_uring, fsync at the end)\n');
    console.log('Pace = fio s / tool s: 100% is fio\'s pace, above it faster than fio (fio\'s start-up and buffer filling count too). The last column is the time a 1.2x lead over qemu-img would take.\n');
    console.log(markdownTable(['image', 'cache', 'fio s (data)', 'qemu-img s (pace)', 'qcow2img s (pace)', 'qemu-img s / 1.2 (pace)', 'fio runs s'], floorRows));
  }
  if (sweepRows.length) {
    console.log('\n### qcow2img --threads sweep (cold)\n');
    console.log(markdownTable(['image', 'threads', 'qemu-img s', 'qcow2img s', 'speedup', 'qcow2img CPU s', 'qcow2img peak RSS', "others' CPU s", 'runs s'], sweepRows));
  }
  if (!allQuiet) notes.push(`some runs started on a busy machine (no quiet second within ${quietTimeout} s): compare the others' CPU column`);
  if (disturbed.length) notes.push(`runs still disturbed after ${runOptions.attempts} attempts (others' CPU over ${runOptions.maxOthersCpu} s): ${disturbed.join(', ')}`);
  if (notes.length) console.log(`\nNotes:\n${notes.map((note) => `- ${note}`).join('\n')}`);
  fs.rmSync(outDir, { recursive: true, force: true });
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    console.error(`load: ${error.message}`);
    process.exitCode = 1;
  },
);

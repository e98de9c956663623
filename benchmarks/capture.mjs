#!/usr/bin/env node
/**
 * Times `qcow2img capture` against `qemu-img convert -f raw -O qcow2 [-c] -W -m 16` on the realistic
 * 2 GiB OS disk (.cache/bench/os.raw, see realistic-image.mjs), uncompressed, zlib and zstd, in one
 * run so the ratios hold when the machine's speed drifts. Then the same from a read-only loop device
 * over os.raw (uncompressed and zstd). zlib at three levels: the default 4 (ISA-L's level 3, then
 * zlib's 5 on the clusters ISA-L left at 59-82%), 3 (ISA-L alone: fastest) and 6 (zlib's own encoder:
 * the size of qemu-img's output).
 *
 *   node benchmarks/capture.mjs [--runs 3] [--quiet-timeout 10] [--no-device] [--cache-dir DIR]
 *                               [--modes uncompressed,zlib,zstd]
 *
 * Warm source: os.raw is read into the page cache before every run, so both tools read it from
 * memory; the loop device is attached without direct I/O, so its reads come from os.raw's page
 * cache too. Outputs go to the same filesystem (.cache/bench/capture-out), removed before every run.
 * Each figure is the median of --runs runs, the tools taking turns at going first. The clock covers
 * the whole process (node start-up included). qemu-img convert writes with cache=unsafe (no flush);
 * qcow2img fdatasyncs its output: the `sync` run after each process is timed separately and shown.
 * Every output is checked once (`qemu-img check`, `qemu-img compare os.raw OUT`), untimed.
 * Uncompressed, qemu-img also runs with `-t none` (O_DIRECT writes and a flush at the end): the same
 * promise as qcow2img's, that the image is on the disk when the command returns.
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
import { gnuTime, Cleanup, detachLoop, loadAverage, loadableBuild, timed, timedSync, warmPageCache } from './harness.mjs';

const f2 = (value) => (Number.isFinite(value) ? value.toFixed(2) : '-');

// ---- capture ----

function oursCommand(build, source, output, compress, env, extra = []) {
  const args = [build.cliPath, 'capture', source, output, '--progress=none', '--overwrite', ...extra];
  if (compress) args.push('--compress', compress);
  // Through env(1), so the variable shows in the command line and reaches this process only.
  return env ? ['env', [...Object.entries(env).map(([k, v]) => `${k}=${v}`), process.execPath, ...args]] : [process.execPath, args];
}

function qemuCommand(source, output, compress, sourceCacheNone, outputCache) {
  const args = ['convert', '-f', 'raw'];
  if (sourceCacheNone) args.push('-T', 'none');
  if (outputCache) args.push('-t', outputCache);
  args.push('-O', 'qcow2');
  if (compress) args.push('-c');
  if (compress === 'zstd') args.push('-o', 'compression_type=zstd');
  args.push('-W', '-m', '16', source, output);
  return ['qemu-img', args];
}

/** qemu-img check and qemu-img compare against the raw disk, as one short verdict. */
async function verify(reference, output) {
  const check = await run('qemu-img', ['check', '--output=json', output], { allowFailure: true });
  let checkText;
  try {
    const report = JSON.parse(check.stdout);
    const problems = ['check-errors', 'corruptions', 'leaks'].filter((key) => report[key]).map((key) => `${key} ${report[key]}`);
    checkText = `${check.code === 0 && !problems.length ? 'clean' : `EXIT ${check.code} ${problems.join(', ')}`} (${report['compressed-clusters'] ?? 0} compressed)`;
  } catch {
    checkText = `EXIT ${check.code}: ${(check.stderr || check.stdout).trim().split('\n')[0]}`;
  }
  const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', reference, output], { allowFailure: true });
  const compareText = compare.code === 0 ? 'identical' : compare.code === 1 ? `DIFFER: ${compare.stdout.trim().split('\n')[0]}` : `ERROR ${compare.code}: ${compare.stderr.trim().split('\n')[0]}`;
  return { ok: check.code === 0 && compare.code === 0, text: `check ${checkText}; compare ${compareText}` };
}

/**
 * Runs each tool `runs` times, rotating which goes first. The output of each tool's last run is
 * verified, untimed, then removed.
 */
async function compare(tools, { runs, reference, output, warmFile, quietTimeout, log }) {
  const names = Object.keys(tools);
  const samples = Object.fromEntries(names.map((name) => [name, []]));
  const verdicts = {};
  for (let index = 0; index < runs; index += 1) {
    const order = names.map((_, i) => names[(i + index) % names.length]);
    for (const name of order) {
      fs.rmSync(output, { force: true });
      timedSync();
      if (warmFile) warmPageCache(warmFile);
      const [command, args] = tools[name];
      const sample = await timed(command, args, { quietTimeout });
      sample.syncSeconds = timedSync();
      const stats = fs.statSync(output);
      sample.fileSize = stats.size;
      sample.allocated = stats.blocks * 512;
      samples[name].push(sample);
      log(`  run ${index + 1} ${name}: ${f2(sample.seconds)} s (+ sync ${f2(sample.syncSeconds)} s), CPU ${f2(sample.cpuSeconds)} s, RSS ${humanBytes(sample.rssBytes)}, ` +
        `${sample.fileSize} bytes, others' CPU ${f2(sample.othersCpuSeconds)} s${sample.quiet ? '' : ' (not quiet)'}`);
      if (index === runs - 1) {
        verdicts[name] = await verify(reference, output);
        log(`  ${name}: ${verdicts[name].text}`);
      }
      fs.rmSync(output, { force: true });
    }
  }
  const summary = {};
  for (const name of names) {
    const list = samples[name];
    summary[name] = {
      seconds: median(list.map((s) => s.seconds)),
      withSync: median(list.map((s) => s.seconds + s.syncSeconds)),
      maxSync: Math.max(...list.map((s) => s.syncSeconds)),
      cpuSeconds: median(list.map((s) => s.cpuSeconds)),
      rssBytes: Math.max(...list.map((s) => s.rssBytes)),
      othersCpuSeconds: Math.max(...list.map((s) => s.othersCpuSeconds)),
      fileSize: list[list.length - 1].fileSize,
      sizes: [...new Set(list.map((s) => s.fileSize))],
      all: list.map((s) => f2(s.seconds)).join(', '),
      verdict: verdicts[name],
    };
  }
  return summary;
}

function row(source, mode, qemu, ours) {
  return [
    source,
    mode,
    f2(qemu.seconds),
    f2(ours.seconds),
    `${(qemu.seconds / ours.seconds).toFixed(2)}x`,
    `${(qemu.withSync / ours.withSync).toFixed(2)}x`,
    `${humanBytes(qemu.fileSize)} / ${humanBytes(ours.fileSize)}`,
    (ours.fileSize / qemu.fileSize).toFixed(3),
    `${f2(qemu.cpuSeconds)} / ${f2(ours.cpuSeconds)}`,
    `${humanBytes(qemu.rssBytes)} / ${humanBytes(ours.rssBytes)}`,
    `${f2(qemu.maxSync)} / ${f2(ours.maxSync)}`,
    f2(Math.max(qemu.othersCpuSeconds, ours.othersCpuSeconds)),
    `${qemu.all} / ${ours.all}`,
  ];
}

async function main() {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      'quiet-timeout': { type: 'string', default: '10' },
      'no-device': { type: 'boolean' },
      'cache-dir': { type: 'string' },
      modes: { type: 'string', default: 'uncompressed,zlib,zstd' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node benchmarks/capture.mjs [--runs 3] [--quiet-timeout 10] [--no-device] [--cache-dir DIR] [--modes uncompressed,zlib,zstd]');
    return 0;
  }
  const modes = values.modes.split(',');
  for (const mode of modes) if (!['uncompressed', 'zlib', 'zstd'].includes(mode)) throw new Error(`--modes: unknown mode ${mode}`);
  const wanted = (compress) => modes.includes(compress ?? 'uncompressed');
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs must be a positive integer');
  const quietTimeout = Number(values['quiet-timeout']);
  if (!fs.existsSync(gnuTime)) throw new Error(`${gnuTime} is missing: apt-get install -y time`);
  const loadStart = loadAverage();
  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  await buildRealisticImages({ cacheDir, only: [] });
  const disk = path.join(cacheDir, 'os.raw');
  const workDir = path.join(cacheDir, 'capture-bench');
  const build = await loadableBuild(cacheDir, 'capture-bench');
  const outDir = path.join(cacheDir, 'capture-out');
  fs.rmSync(outDir, { recursive: true, force: true });
  fs.mkdirSync(outDir, { recursive: true });
  const cleanup = new Cleanup();
  cleanup.add(`rm -r ${outDir}`, () => fs.rmSync(outDir, { recursive: true, force: true }));
  cleanup.add(`rm -r ${workDir}`, () => fs.rmSync(workDir, { recursive: true, force: true }));
  const log = (line) => console.error(line);
  const rows = [];
  const notes = [];
  const verdictRows = [];
  let sourceCacheNone = false;
  try {
    ensureFreeSpace(outDir, 2.5 * 1024 ** 3, 'one capture output');
    const output = path.join(outDir, 'out.qcow2');
    const record = (source, mode, summary, qemuName, oursName) => {
      rows.push(row(source, mode, summary[qemuName], summary[oursName]));
      for (const name of [qemuName, oursName]) {
        verdictRows.push([source, mode, name, summary[name].verdict.text]);
        if (!summary[name].verdict.ok) notes.push(`${source} ${mode} ${name}: output failed verification (${summary[name].verdict.text})`);
        if (summary[name].sizes.length > 1) notes.push(`${source} ${mode} ${name}: output size varied between runs (${summary[name].sizes.join(', ')} bytes)`);
      }
    };

    // From the file, pages cached.
    for (const compress of [undefined, 'zlib', 'zstd'].filter(wanted)) {
      const mode = compress ?? 'uncompressed';
      log(`file, ${mode}:`);
      const tools = {
        'qemu-img': qemuCommand(disk, output, compress, false),
        qcow2img: oursCommand(build, disk, output, compress),
      };
      if (!compress) tools['qemu-img -t none'] = qemuCommand(disk, output, compress, false, 'none');
      if (compress === 'zlib') {
        tools['qcow2img --level 3'] = oursCommand(build, disk, output, compress, undefined, ['--level', '3']);
        tools['qcow2img --level 6'] = oursCommand(build, disk, output, compress, undefined, ['--level', '6']);
      }
      const summary = await compare(tools, { runs, reference: disk, output, warmFile: disk, quietTimeout, log });
      record('file', mode, summary, 'qemu-img', 'qcow2img');
      if (!compress) record('file', 'uncompressed, qemu-img -t none (flushed)', summary, 'qemu-img -t none', 'qcow2img');
      if (compress === 'zlib') {
        record('file', 'zlib --level 3 (ISA-L alone)', summary, 'qemu-img', 'qcow2img --level 3');
        record('file', 'zlib --level 6 (zlib encoder)', summary, 'qemu-img', 'qcow2img --level 6');
      }
    }

    // From a read-only loop device over os.raw.
    if (!values['no-device']) {
      const device = (await run('losetup', ['-r', '-f', '--show', disk])).stdout.trim();
      const detach = cleanup.add(`losetup -d ${device}`, () => detachLoop(device));
      try {
        // -T none (O_DIRECT reads, as qcow2img does on a device) if QEMU opens this device so.
        const probe = await run('qemu-io', ['-r', '-f', 'raw', '-t', 'none', '-c', 'read 0 1M', device], { allowFailure: true });
        sourceCacheNone = probe.code === 0;
        if (!sourceCacheNone) notes.push(`QEMU could not read ${device} with cache=none (${probe.stderr.trim().split('\n')[0]}); qemu-img read it through the page cache`);
        for (const compress of [undefined, 'zstd'].filter(wanted)) {
          const mode = compress ?? 'uncompressed';
          log(`device ${device}, ${mode}:`);
          const tools = {
            'qemu-img': qemuCommand(device, output, compress, sourceCacheNone),
            qcow2img: oursCommand(build, device, output, compress),
          };
          const summary = await compare(tools, { runs, reference: disk, output, warmFile: disk, quietTimeout, log });
          record(`loop device (ro)`, mode, summary, 'qemu-img', 'qcow2img');
        }
      } finally {
        detach();
      }
    }
  } finally {
    cleanup.release();
  }
  const loadEnd = loadAverage();

  const diskStats = fs.statSync(disk);
  console.log('\n## qcow2img capture vs qemu-img convert -f raw -O qcow2 -W -m 16\n');
  printFacts(machineFacts(cacheDir, build));
  console.log(`- fio: ${spawnSync('fio', ['--version'], { encoding: 'utf8' }).stdout.trim()}`);
  console.log(`- load average (1/5/15 min): ${loadStart} at start, ${loadEnd} at end`);
  console.log(`- source: ${disk}, ${humanBytes(diskStats.size)} GPT disk, ext4 root partition of real files; ${humanBytes(diskStats.blocks * 512)} allocated (sparse: both tools skip holes)`);
  console.log('- file rows: os.raw is read into the page cache before every run, so both tools read it from memory (warm source)');
  console.log(`- device rows: \`losetup -r -f --show os.raw\` (no loop direct I/O: the loop driver reads os.raw's cached pages); qcow2img reads the device with O_DIRECT; qemu-img ${sourceCacheNone ? 'with -T none (O_DIRECT)' : 'with its default source cache'}; a device has no holes, so both read all 2 GiB`);
  console.log('- commands: `qemu-img convert -f raw [-T none] -O qcow2 [-c] [-o compression_type=zstd] -W -m 16 SRC OUT`; `qcow2img capture SRC OUT [--compress zlib|zstd] --progress=none --overwrite` (default threads, zlib level 4 = ISA-L level 3 + zlib 5 on clusters ISA-L left at 59-82%, zstd level 1)');
  console.log(`- s = median of ${runs} runs, wall clock of the whole process (node start-up included); outputs on the same filesystem, removed before each run`);
  console.log('- qemu-img convert writes with cache=unsafe (no flush at the end); qcow2img fdatasyncs. "speedup +sync" adds the `sync` run right after each process (the dirty pages the tool left) to both. The "qemu-img -t none" row runs qemu-img with O_DIRECT writes and its flush at the end, the promise qcow2img makes');
  console.log('- speedup = qemu-img s / qcow2img s (above 1: qcow2img faster); size = output file size (st_size); size ratio = qcow2img / qemu-img');
  console.log("- CPU = user+sys seconds (median); peak RSS = GNU time %M (largest of the runs); others' CPU = CPU seconds the rest of the machine used during a run (largest)\n");
  console.log(markdownTable(
    ['source', 'compression', 'qemu-img s', 'qcow2img s', 'speedup', 'speedup +sync', 'size qemu-img / qcow2img', 'size ratio', 'CPU s qemu-img / qcow2img', 'peak RSS qemu-img / qcow2img', 'sync after s (max)', "others' CPU s", 'runs s qemu-img / qcow2img'],
    rows,
  ));
  console.log('\n### Verification of each output (last run; qemu-img check, then qemu-img compare os.raw OUT)\n');
  console.log(markdownTable(['source', 'compression', 'tool', 'result'], verdictRows));
  if (notes.length) console.log(`\nNotes:\n${notes.map((note) => `- ${note}`).join('\n')}`);
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    console.error(`capture: ${error.message}`);
    process.exitCode = 1;
  },
);

#!/usr/bin/env node
/**
 * Times `qcow2img capture --compress zlib` of the realistic 2 GiB OS disk (.cache/bench/os.raw, see
 * realistic-image.mjs) with the package as npm installs it (packed, installed with --ignore-scripts,
 * so the prebuild from scripts/prebuild.sh loads) against the tree's source build (build/Release),
 * in one run, the two taking turns at going first. The prebuild should be as fast: same codecs
 * (Debian 12's ISA-L and zlib), built in a Debian 11 root with GCC 10 instead of Debian 12's GCC 12.
 *
 *   node benchmarks/prebuild-capture.mjs [--runs 3] [--level 4] [--quiet-timeout 10] [--cache-dir DIR]
 *
 * os.raw is read into the page cache before every run; outputs go to .cache/bench/prebuild-out and
 * are removed before every run. Each figure is the median of --runs runs, wall clock of the whole
 * process (node start-up and the final fdatasync included). Each build's last output is checked with
 * `qemu-img compare os.raw OUT`, untimed. Exits 1 when the prebuild is more than 10% slower.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { humanBytes, machineFacts, markdownTable, median, printFacts, repoRoot, run } from './common.mjs';
import { buildRealisticImages, defaultCacheDir } from './realistic-image.mjs';
import { Cleanup, gnuTime, loadAverage, loadableBuild, timed, timedSync, warmPageCache } from './harness.mjs';

const f2 = (value) => (Number.isFinite(value) ? value.toFixed(2) : '-');

/** The packed package installed without scripts into an empty project; returns its CLI and the addon it loads. */
async function installPacked(workDir) {
  fs.rmSync(workDir, { recursive: true, force: true });
  const consumer = path.join(workDir, 'consumer');
  fs.mkdirSync(consumer, { recursive: true });
  const packed = JSON.parse((await run('npm', ['pack', '--json', '--silent', '--pack-destination', workDir], { cwd: repoRoot })).stdout);
  fs.writeFileSync(path.join(consumer, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true }));
  await run('npm', ['install', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error', path.join(workDir, packed[0].filename)], { cwd: consumer });
  const installed = path.join(consumer, 'node_modules', 'qcow2img');
  const addon = (await run(process.execPath, ['-p', `require('node-gyp-build').path(${JSON.stringify(installed)})`], { cwd: consumer })).stdout.trim();
  if (addon !== path.join(installed, 'prebuilds', `linux-${process.arch}`, 'qcow2img.glibc.node')) throw new Error(`the installed package loads ${addon}, not its prebuild`);
  return { cliPath: path.join(installed, 'dist', 'cli', 'main.js'), addon };
}

async function main() {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      level: { type: 'string', default: '4' },
      'quiet-timeout': { type: 'string', default: '10' },
      'cache-dir': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node benchmarks/prebuild-capture.mjs [--runs 3] [--level 4] [--quiet-timeout 10] [--cache-dir DIR]');
    return 0;
  }
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs must be a positive integer');
  if (!fs.existsSync(gnuTime)) throw new Error(`${gnuTime} is missing: apt-get install -y time`);
  const quietTimeout = Number(values['quiet-timeout']);
  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  await buildRealisticImages({ cacheDir, only: [] });
  const disk = path.join(cacheDir, 'os.raw');
  const log = (line) => console.error(line);

  // The prebuilds as the sources make them now (a no-op when current).
  await run('bash', [path.join(repoRoot, 'scripts', 'prebuild.sh')], { cwd: repoRoot });
  const cleanup = new Cleanup();
  const workDir = path.join(cacheDir, 'prebuild-capture');
  const outDir = path.join(cacheDir, 'prebuild-out');
  cleanup.add(`rm -r ${workDir}`, () => fs.rmSync(workDir, { recursive: true, force: true }));
  cleanup.add(`rm -r ${outDir}`, () => fs.rmSync(outDir, { recursive: true, force: true }));
  const loadStart = loadAverage();
  const rows = [];
  let ratio;
  try {
    const source = await loadableBuild(cacheDir, 'prebuild-capture-source');
    const packed = await installPacked(workDir);
    fs.mkdirSync(outDir, { recursive: true });
    const output = path.join(outDir, 'out.qcow2');
    const builds = {
      'source build (build/Release)': source.cliPath,
      [`packed prebuild (prebuilds/linux-${process.arch})`]: packed.cliPath,
    };
    const names = Object.keys(builds);
    const samples = Object.fromEntries(names.map((name) => [name, []]));
    const verdicts = {};
    for (let index = 0; index < runs; index += 1) {
      for (const name of names.map((_, i) => names[(i + index) % names.length])) {
        fs.rmSync(output, { force: true });
        timedSync();
        warmPageCache(disk);
        const sample = await timed(process.execPath, [builds[name], 'capture', disk, output, '--compress', 'zlib', '--level', values.level, '--progress=none', '--overwrite'], { quietTimeout });
        sample.fileSize = fs.statSync(output).size;
        samples[name].push(sample);
        log(`  run ${index + 1} ${name}: ${f2(sample.seconds)} s, CPU ${f2(sample.cpuSeconds)} s, ${sample.fileSize} bytes, others' CPU ${f2(sample.othersCpuSeconds)} s`);
        if (index === runs - 1) {
          const compared = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', disk, output], { allowFailure: true });
          verdicts[name] = compared.code === 0 ? 'identical' : `DIFFER (exit ${compared.code}): ${(compared.stdout + compared.stderr).trim().split('\n')[0]}`;
        }
      }
    }
    const summary = Object.fromEntries(names.map((name) => [name, {
      seconds: median(samples[name].map((s) => s.seconds)),
      cpu: median(samples[name].map((s) => s.cpuSeconds)),
      size: samples[name].at(-1).fileSize,
      all: samples[name].map((s) => f2(s.seconds)).join(', '),
      others: Math.max(...samples[name].map((s) => s.othersCpuSeconds)),
    }]));
    ratio = summary[names[1]].seconds / summary[names[0]].seconds;
    for (const name of names) {
      const s = summary[name];
      rows.push([name, f2(s.seconds), f2(s.cpu), humanBytes(s.size), s.all, f2(s.others), verdicts[name]]);
    }
    console.log(`\n## capture --compress zlib --level ${values.level}: packed prebuild vs source build\n`);
    printFacts(machineFacts(cacheDir, source));
    console.log(`- prebuild: ${packed.addon}`);
    console.log(`- load average (1/5/15 min): ${loadStart} at start, ${loadAverage()} at end`);
    console.log(`- source: ${disk}, ${humanBytes(fs.statSync(disk).size)}, read into the page cache before each run; s = median of ${runs} runs, whole process\n`);
    console.log(markdownTable(['build', 's', 'CPU s', 'output', 'runs s', "others' CPU s (max)", 'qemu-img compare'], rows));
    const cpuRatio = summary[names[1]].cpu / summary[names[0]].cpu;
    console.log(`\nprebuild / source build: ${ratio.toFixed(3)}x the time${ratio > 1.1 ? ' (MORE THAN 10% SLOWER)' : ''}, ${cpuRatio.toFixed(3)}x the CPU seconds`);
    if (Object.values(verdicts).some((v) => v !== 'identical')) return 1;
  } finally {
    cleanup.release();
  }
  return ratio > 1.1 ? 1 : 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    console.error(`prebuild-capture: ${error.message}`);
    process.exitCode = 1;
  },
);

/**
 * The harness the benchmark scripts share: timed runs under GNU time with the CPU the rest of
 * the machine used meanwhile, waiting for a quiet machine, a private loadable copy of the build,
 * and cleanup of loop devices and files on the way out (Ctrl-C included).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { busyCpuSeconds, formatCommand, freezeBuild, killRunningChildren, run } from './common.mjs';

export const gnuTime = '/usr/bin/time';

/** Reads the file through the page cache, so the timed runs find it there. */
export function warmPageCache(file) {
  const fd = fs.openSync(file, 'r');
  const buffer = Buffer.allocUnsafe(16 * 1024 * 1024);
  try {
    for (let position = 0; fs.readSync(fd, buffer, 0, buffer.length, position) > 0; position += buffer.length);
  } finally {
    fs.closeSync(fd);
  }
}
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function loadAverage() {
  return fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
}

/** Undoes loop devices and files on the way out, Ctrl-C included, in reverse order. */
export class Cleanup {
  #undo = [];
  #onSignal = (signal) => {
    killRunningChildren();
    this.release();
    process.kill(process.pid, signal);
  };

  constructor() {
    process.once('SIGINT', this.#onSignal);
    process.once('SIGTERM', this.#onSignal);
  }

  add(description, undo) {
    const entry = { description, undo };
    this.#undo.push(entry);
    return () => {
      this.#undo = this.#undo.filter((e) => e !== entry);
      undo();
    };
  }

  release() {
    process.off('SIGINT', this.#onSignal);
    process.off('SIGTERM', this.#onSignal);
    while (this.#undo.length) {
      const { description, undo } = this.#undo.pop();
      try {
        undo();
      } catch (error) {
        console.error(`cleanup: could not undo ${description}: ${error.message}`);
      }
    }
  }
}

/** Detaches a loop device, retrying while udev or a closing process still holds it. */
export function detachLoop(device) {
  for (let attempt = 0; attempt < 20; attempt += 1) {
    if (spawnSync('losetup', ['-d', device]).status === 0) return;
    spawnSync('sleep', ['0.25']);
  }
  const result = spawnSync('losetup', ['-d', device], { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`losetup -d ${device}: ${result.stderr.trim()}`);
}

/**
 * A private copy of the tree's build (others rebuild the addon in place), checked to load: a
 * build caught half-way can be settled on disk and still miss symbols.
 */
export async function loadableBuild(cacheDir, name, waitSeconds = 900) {
  const deadline = Date.now() + waitSeconds * 1000;
  for (let announced = false; ; announced = true) {
    const build = await freezeBuild(path.join(cacheDir, name), { waitSeconds });
    const addon = path.join(build.dir, 'build', 'Release', 'qcow2img.node');
    const probe = await run(process.execPath, ['-e', `require(${JSON.stringify(addon)})`], { allowFailure: true });
    if (probe.code === 0) return build;
    const reason = probe.stderr.trim().split('\n').find((line) => /error|symbol/i.test(line)) ?? probe.stderr.trim().split('\n')[0];
    if (Date.now() > deadline) throw new Error(`the tree's addon does not load: ${reason}`);
    if (!announced) console.error(`waiting for a loadable build (${reason})...`);
    await sleep(10000);
  }
}

/** Waits until other processes leave the CPUs idle for a whole second, or the timeout passes. */
export async function waitForQuiet(timeoutSeconds) {
  const started = performance.now();
  for (;;) {
    const before = busyCpuSeconds();
    await sleep(1000);
    if (busyCpuSeconds() - before < 0.1) return true;
    if ((performance.now() - started) / 1000 >= timeoutSeconds) return false;
  }
}

let statsCounter = 0;

/**
 * Runs one command under GNU time: wall seconds (performance.now around the process), CPU seconds,
 * peak RSS, and the CPU time the rest of the machine used meanwhile. Throws on failure.
 */
export async function timed(command, args, { quietTimeout = 0, beforeRun } = {}) {
  const quiet = quietTimeout > 0 ? await waitForQuiet(quietTimeout) : true;
  // After the wait: e.g. re-warming a page cache another process may have dropped meanwhile.
  beforeRun?.();
  const statsFile = `/tmp/qcow2img-bench-${process.pid}-${statsCounter++}.time`;
  const busyBefore = busyCpuSeconds();
  const started = performance.now();
  const result = await run(gnuTime, ['-f', '%U %S %M', '-o', statsFile, command, ...args], { allowFailure: true });
  const seconds = (performance.now() - started) / 1000;
  const busy = busyCpuSeconds() - busyBefore;
  let stats = [NaN, NaN, NaN];
  try {
    // GNU time puts "Command exited with non-zero status N" first when the command fails.
    stats = fs.readFileSync(statsFile, 'utf8').trim().split('\n').pop().split(' ').map(Number);
  } catch {
    // reported below with the command's own message
  }
  fs.rmSync(statsFile, { force: true });
  if (result.code !== 0) {
    throw new Error(`${formatCommand(command, args)} failed (exit ${result.code}):\n${(result.stderr || result.stdout).trim().split('\n').slice(-5).join('\n')}`);
  }
  const [user, system, rssKiB] = stats;
  return { seconds, cpuSeconds: user + system, rssBytes: rssKiB * 1024, othersCpuSeconds: Math.max(0, busy - user - system), quiet, stdout: result.stdout, stderr: result.stderr };
}

export function timedSync() {
  const started = performance.now();
  spawnSync('sync');
  return (performance.now() - started) / 1000;
}

/** The parseArgs options of a benchmark whose runs are timed with timedBest (and its cache and help). */
export const timedRunArgs = {
  'quiet-timeout': { type: 'string', default: '30' },
  'max-others-cpu': { type: 'string', default: '0.5' },
  attempts: { type: 'string', default: '3' },
  'cache-dir': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
};

/** timedBest's options from timedRunArgs' values; throws (with `usage`) on one that is not a number. */
export function timedRunOptions(values, usage) {
  const options = { quietTimeout: Number(values['quiet-timeout']), maxOthersCpu: Number(values['max-others-cpu']), attempts: Number(values.attempts) };
  if (!Object.values(options).every(Number.isFinite)) throw new Error(`bad arguments\n${usage}`);
  return options;
}

/**
 * `timed`, redone (up to `attempts` times) while the rest of the machine used more than
 * `maxOthersCpu` CPU seconds during the run; the least disturbed attempt is kept.
 */
export async function timedBest(command, args, { attempts = 3, maxOthersCpu = 0.5, ...options } = {}) {
  let best;
  for (let attempt = 1; attempt <= Math.max(1, attempts); attempt++) {
    const sample = await timed(command, args, options);
    if (!best || sample.othersCpuSeconds < best.othersCpuSeconds) best = sample;
    best.attempts = attempt;
    if (sample.othersCpuSeconds <= maxOthersCpu) break;
  }
  return best;
}

/**
 * Hundreds of random mutants of QEMU-made images through the CLI, each command in its own process
 * under a 4 GiB address-space limit (prlimit --as) and a 20 s timeout:
 *
 *   node dist/cli/main.js info --json M
 *   node dist/cli/main.js load M OUT --progress=none --overwrite
 *
 * Asserted: no signal death, no timeout, exit 0 or 1; a failure prints one line "qcow2img: why"
 * (warning lines "qcow2img: warning: ..." may precede it) and, reproduced in-process, is a
 * Qcow2Error with a code; a load that succeeds where `qemu-img convert -O raw M REF` also succeeds
 * gives the same bytes and size; an info that succeeds where `qemu-img info` also succeeds agrees
 * on virtual size, cluster size, snapshot count and backing file name.
 * Recorded, not asserted: where we refuse what qemu-img reads, and the reverse.
 *
 * Mutants are weighted toward metadata (header, extensions, backing name, L1, L2, refcount,
 * snapshot and bitmap tables; test/helpers/mutate.ts), with some truncations and appended garbage.
 * Deterministic: mutant i of run seed S is always the same.
 *
 *   QCOW2IMG_MUTANTS=1000            how many (default 200)
 *   QCOW2IMG_MUTANT_SEED=text        run seed (default below)
 *   QCOW2IMG_MUTANT_ONLY=17,42       only these mutant indexes (to reproduce a failure)
 *   QCOW2IMG_MUTANT_KEEP=DIR         copy failing mutants there
 *   QCOW2IMG_MUTANT_VERBOSE=1        print every mutant's outcome and patches
 *
 * Needs dist/ built (npm run build).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Patch, type Seed, applyPatches, buildSeeds, formatPatches, randomPatches, seedOf } from '../helpers/mutate';
import { Random } from '../helpers/prng';

const repoRoot = path.resolve(__dirname, '..', '..');
const cli = path.join(repoRoot, 'dist', 'cli', 'main.js');
const mutantCount = Number(process.env.QCOW2IMG_MUTANTS ?? 200);
const runSeed = process.env.QCOW2IMG_MUTANT_SEED ?? 'qcow2img-mutants-2026';
const only = process.env.QCOW2IMG_MUTANT_ONLY?.split(',').map(Number);
const keepDir = process.env.QCOW2IMG_MUTANT_KEEP;
const verbose = process.env.QCOW2IMG_MUTANT_VERBOSE === '1';
const timeoutMs = 20_000;
const addressSpace = 4 * 1024 ** 3;
const concurrency = 2;
/** Outputs up to this size are compared in-process; larger (sparse) ones with qemu-img compare. */
const compareInProcessMax = 256 * 1024 ** 2;

// The library as the CLI runs it (dist), for the error codes of the CLI's failures.
type Library = typeof import('../../src/index');
let library: Library;

let scratch: string;
let seeds: Seed[];

beforeAll(() => {
  if (!fs.existsSync(cli)) throw new Error(`${cli} is missing: run npm run build first`);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  library = require(path.join(repoRoot, 'dist', 'index.js')) as Library;
  scratch = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-mutants-')));
  seeds = buildSeeds(scratch);
});

afterAll(() => {
  if (scratch) fs.rmSync(scratch, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// Processes

interface Ran {
  status: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs a command under prlimit --as and a timeout (SIGKILL), without blocking the event loop. */
function bounded(command: string, args: readonly string[], cwd: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const child = spawn('prlimit', [`--as=${addressSpace}`, command, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outBytes = 0;
    let errBytes = 0;
    const cap = 4 * 1024 * 1024;
    child.stdout.on('data', (d: Buffer) => {
      if ((outBytes += d.length) <= cap) out.push(d);
    });
    child.stderr.on('data', (d: Buffer) => {
      if ((errBytes += d.length) <= cap) err.push(d);
    });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({ status, signal, timedOut, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), ms: Date.now() - started });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Outcomes

interface Outcome {
  index: number;
  seed: string;
  patches: Patch[];
  /** Assertion failures (the test fails if any mutant has one). */
  problems: string[];
  infoCode: string;
  loadCode: string;
  /** Our load's error line, paths and numbers removed. */
  loadReason: string;
  qemuInfo: string;
  qemuConvert: string;
  /** Our load and qemu-img convert both succeeded and were compared. */
  compared: boolean;
  maxMs: number;
}

const ok = 'ok';

/** Failures whose error line came after warning lines (allowed; counted for the summary). */
let failuresAfterWarnings = 0;

/** The error line of a failed command, checked: one line "qcow2img: ...", after any warnings. */
function errorLine(ran: Ran, what: string, problems: string[]): string | undefined {
  const lines = ran.stderr.split('\n').filter((l) => l.length > 0);
  const errors = lines.filter((l) => !l.startsWith('qcow2img: warning: '));
  if (errors.length < lines.length) failuresAfterWarnings++;
  if (errors.length !== 1 || !errors[0]!.startsWith('qcow2img: ')) {
    problems.push(`${what}: failure output is not one line "qcow2img: ...": ${JSON.stringify(ran.stderr.slice(0, 2000))}`);
    return undefined;
  }
  return errors[0]!.slice('qcow2img: '.length);
}

function checkProcess(ran: Ran, what: string, problems: string[]): boolean {
  if (ran.timedOut) problems.push(`${what}: still running after ${timeoutMs} ms (killed)`);
  else if (ran.signal !== null || ran.status === null) problems.push(`${what}: died of signal ${ran.signal}: ${ran.stderr.slice(-2000)}`);
  else if (ran.status !== 0 && ran.status !== 1) problems.push(`${what}: exit status ${ran.status}: ${ran.stderr.slice(-2000)}`);
  else return true;
  return false;
}

/** The error of a CLI failure, reproduced in-process (dist) for its code. */
async function codeOf(run: () => Promise<unknown>, cliMessage: string | undefined, what: string, problems: string[]): Promise<string> {
  try {
    await run();
  } catch (error) {
    if (!(error instanceof library.Qcow2Error)) {
      problems.push(`${what}: fails with ${(error as Error)?.constructor?.name}, not a Qcow2Error: ${(error as Error)?.stack ?? String(error)}`);
      return `internal:${(error as Error)?.constructor?.name}`;
    }
    return error.code;
  }
  problems.push(`${what}: failed in its process (${JSON.stringify(cliMessage)}) but succeeds in-process: the address-space limit?`);
  return 'not-reproduced';
}

/** An error message as a class: paths, quoted names and numbers removed. */
function normalize(message: string): string {
  return message
    .replace(/^\S+: /, '')
    .replace(/"[^"]*"/g, '"…"')
    .replace(/\([^)]*\)/g, '(…)')
    .replace(/0x[0-9a-f]+|\d+/gi, 'N')
    .slice(0, 100);
}

/** qemu-img's error, shortened to a class: paths and numbers removed. */
function qemuReason(ran: Ran): string {
  if (ran.timedOut) return 'qemu:timeout';
  if (ran.signal) return `qemu:signal ${ran.signal}`;
  const line = ran.stderr.split('\n').find((l) => l.trim().length > 0) ?? `exit ${ran.status}`;
  return (
    'qemu:' +
    line
      .replace(/^qemu-img: /, '')
      .replace(/Could not open '[^']*': /g, '')
      .replace(/error while reading (sector|at byte) \d+: /, 'read error: ')
      .replace(/'[^']*'/g, "'…'")
      .replace(/0x[0-9a-f]+|\d+/gi, 'N')
      .slice(0, 90)
  );
}

async function sameFile(a: string, b: string, problems: string[]): Promise<void> {
  const [sa, sb] = [fs.statSync(a).size, fs.statSync(b).size];
  if (sa !== sb) {
    problems.push(`load: output has ${sa} bytes, qemu-img convert ${sb}`);
    return;
  }
  if (sa > compareInProcessMax) {
    const ran = await bounded('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', a, b], scratch);
    if (ran.status !== 0) problems.push(`load: output differs from qemu-img convert's (qemu-img compare: ${ran.status ?? ran.signal} ${ran.stdout}${ran.stderr})`);
    return;
  }
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const chunk = 4 * 1024 * 1024;
    const ba = Buffer.alloc(chunk);
    const bb = Buffer.alloc(chunk);
    for (let at = 0; at < sa; at += chunk) {
      const n = Math.min(chunk, sa - at);
      fs.readSync(fa, ba, 0, n, at);
      fs.readSync(fb, bb, 0, n, at);
      if (!ba.subarray(0, n).equals(bb.subarray(0, n))) {
        let i = 0;
        while (ba[i] === bb[i]) i++;
        problems.push(`load: output differs from qemu-img convert's at byte ${at + i} (ours 0x${ba[i]!.toString(16)}, qemu 0x${bb[i]!.toString(16)})`);
        return;
      }
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

function compareInfo(oursJson: string, qemuJson: string, problems: string[]): void {
  const ours = JSON.parse(oursJson) as { virtualSize: number; clusterSize?: number; snapshots?: unknown[]; backingFile?: string };
  const qemu = JSON.parse(qemuJson) as { 'virtual-size': number; 'cluster-size'?: number; snapshots?: unknown[]; 'backing-filename'?: string };
  const pairs: [string, unknown, unknown][] = [
    ['virtual size', ours.virtualSize, qemu['virtual-size']],
    ['cluster size', ours.clusterSize, qemu['cluster-size']],
    ['snapshot count', ours.snapshots?.length ?? 0, qemu.snapshots?.length ?? 0],
    ['backing file', ours.backingFile, qemu['backing-filename']],
  ];
  for (const [what, a, b] of pairs) {
    // A name that is not UTF-8 is shown differently (U+FFFD here, raw bytes there).
    if (what === 'backing file' && typeof a === 'string' && a.includes('\uFFFD')) continue;
    if (a !== b) problems.push(`info: ${what} ${JSON.stringify(a)}, qemu-img info says ${JSON.stringify(b)}`);
  }
}

async function runMutant(index: number): Promise<Outcome> {
  const random = new Random(seedOf(`${runSeed}:${index}`));
  const seed = seeds[index % seeds.length]!;
  const patches = randomPatches(random, seed, `mutant-${index}.qcow2`);
  const problems: string[] = [];
  const outcome: Outcome = { index, seed: seed.name, patches, problems, infoCode: '', loadCode: '', loadReason: '', qemuInfo: '', qemuConvert: '', compared: false, maxMs: 0 };
  const mutant = path.join(scratch, `mutant-${index}.qcow2`);
  const outDir = path.join(scratch, `out-${index}`);
  const out = path.join(outDir, 'out.raw');
  const ref = path.join(scratch, `ref-${index}.raw`);
  fs.writeFileSync(mutant, applyPatches(seed.bytes, patches));
  fs.mkdirSync(outDir);
  try {
    // Ours
    const info = await bounded(process.execPath, [cli, 'info', '--json', mutant], scratch);
    const load = await bounded(process.execPath, [cli, 'load', mutant, out, '--progress=none', '--overwrite'], scratch);
    outcome.maxMs = Math.max(info.ms, load.ms);
    if (checkProcess(info, 'info', problems)) {
      if (info.status === 0) {
        outcome.infoCode = ok;
        try {
          JSON.parse(info.stdout);
        } catch {
          problems.push(`info: exit 0 but stdout is not JSON: ${info.stdout.slice(0, 500)}`);
        }
      } else {
        const message = errorLine(info, 'info', problems);
        outcome.infoCode = await codeOf(async () => (await library.open(mutant)).close(), message, 'info', problems);
      }
    } else outcome.infoCode = info.timedOut ? 'timeout' : `signal/status ${info.signal ?? info.status}`;
    if (checkProcess(load, 'load', problems)) {
      if (load.status === 0) outcome.loadCode = ok;
      else {
        const message = errorLine(load, 'load', problems);
        outcome.loadReason = normalize(message ?? load.stderr);
        const again = path.join(outDir, 'again.raw');
        outcome.loadCode = await codeOf(() => library.load(mutant, again, { overwrite: true }), message, 'load', problems);
        fs.rmSync(again, { force: true });
        // A failed load leaves nothing behind: no target, no temporary file.
        const left = fs.readdirSync(outDir);
        if (left.length > 0) problems.push(`load: failed but left ${left.join(', ')} in the target's folder`);
      }
    } else outcome.loadCode = load.timedOut ? 'timeout' : `signal/status ${load.signal ?? load.status}`;

    // qemu-img
    const qemuInfo = await bounded('qemu-img', ['info', '-f', 'qcow2', '--output=json', mutant], scratch);
    outcome.qemuInfo = qemuInfo.status === 0 ? ok : qemuReason(qemuInfo);
    const convert = await bounded('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', mutant, ref], scratch);
    outcome.qemuConvert = convert.status === 0 ? ok : qemuReason(convert);

    if (outcome.infoCode === ok && outcome.qemuInfo === ok) compareInfo(info.stdout, qemuInfo.stdout, problems);
    if (outcome.loadCode === ok && outcome.qemuConvert === ok) {
      outcome.compared = true;
      await sameFile(out, ref, problems);
    }
  } finally {
    if (problems.length > 0 && keepDir) {
      fs.mkdirSync(keepDir, { recursive: true });
      fs.copyFileSync(mutant, path.join(keepDir, `mutant-${index}-${seed.name}.qcow2`));
    }
    fs.rmSync(mutant, { force: true });
    fs.rmSync(ref, { force: true });
    fs.rmSync(outDir, { recursive: true, force: true });
  }
  return outcome;
}

// ---------------------------------------------------------------------------------------------
// Summary

function table(title: string, counts: Map<string, number>, limit = 40): string {
  const rows = [...counts].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  const width = Math.max(title.length, ...rows.slice(0, limit).map(([k]) => k.length));
  const lines = [`${title.padEnd(width)}  count`, `${'-'.repeat(width)}  -----`];
  for (const [k, v] of rows.slice(0, limit)) lines.push(`${k.padEnd(width)}  ${String(v).padStart(5)}`);
  if (rows.length > limit) lines.push(`... ${rows.length - limit} more`);
  return lines.join('\n');
}

function count(outcomes: readonly Outcome[], key: (o: Outcome) => string | undefined): Map<string, number> {
  const counts = new Map<string, number>();
  for (const o of outcomes) {
    const k = key(o);
    if (k !== undefined) counts.set(k, (counts.get(k) ?? 0) + 1);
  }
  return counts;
}

function summary(outcomes: readonly Outcome[], seconds: number): string {
  const n = outcomes.length;
  const both = (a: boolean, b: boolean) => outcomes.filter((o) => (o.loadCode === ok) === a && (o.qemuConvert === ok) === b).length;
  const infoBoth = (a: boolean, b: boolean) => outcomes.filter((o) => (o.infoCode === ok) === a && (o.qemuInfo === ok) === b).length;
  return [
    `mutants: ${n} (run seed "${runSeed}"), ${seconds.toFixed(0)} s, slowest command ${Math.max(0, ...outcomes.map((o) => o.maxMs))} ms`,
    `load vs qemu-img convert: both ok ${both(true, true)} (compared ${outcomes.filter((o) => o.compared).length}), both fail ${both(false, false)}, we fail / qemu reads ${both(false, true)}, we read / qemu fails ${both(true, false)}`,
    `info vs qemu-img info:    both ok ${infoBoth(true, true)}, both fail ${infoBoth(false, false)}, we fail / qemu reads ${infoBoth(false, true)}, we read / qemu fails ${infoBoth(true, false)}`,
    `failures printed after warning lines: ${failuresAfterWarnings}`,
    '',
    table('info: our outcome', count(outcomes, (o) => o.infoCode)),
    '',
    table('load: our outcome', count(outcomes, (o) => o.loadCode)),
    '',
    table('load refused, qemu-img convert reads: our code', count(outcomes, (o) => (o.loadCode !== ok && o.qemuConvert === ok ? o.loadCode : undefined))),
    '',
    table('load refused, qemu-img convert reads: our message', count(outcomes, (o) => (o.loadCode !== ok && o.qemuConvert === ok ? o.loadReason : undefined)), 20),
    '',
    table('info refused, qemu-img info reads: our code', count(outcomes, (o) => (o.infoCode !== ok && o.qemuInfo === ok ? o.infoCode : undefined))),
    '',
    table('load ok, qemu-img convert fails: qemu says', count(outcomes, (o) => (o.loadCode === ok && o.qemuConvert !== ok ? o.qemuConvert : undefined))),
    '',
    bySeed(outcomes),
  ].join('\n');
}

function bySeed(outcomes: readonly Outcome[]): string {
  const lines = ['seed image     mutants  info ok  load ok  qemu info ok  qemu convert ok', '-----------    -------  -------  -------  ------------  ---------------'];
  for (const s of seeds) {
    const mine = outcomes.filter((o) => o.seed === s.name);
    const n = (f: (o: Outcome) => boolean) => String(mine.filter(f).length);
    lines.push(
      `${s.name.padEnd(13)}  ${String(mine.length).padStart(7)}  ${n((o) => o.infoCode === ok).padStart(7)}  ${n((o) => o.loadCode === ok).padStart(7)}  ${n((o) => o.qemuInfo === ok).padStart(12)}  ${n((o) => o.qemuConvert === ok).padStart(15)}`,
    );
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------

describe('random mutants through the CLI (prlimit --as=4G, 20 s)', () => {
  it(`${only ? only.length : mutantCount} mutants: no crash, no hang, one-line failures, qemu-img's bytes where both read`, async () => {
    const indexes = only ?? Array.from({ length: mutantCount }, (_, i) => i);
    const outcomes: Outcome[] = [];
    const started = Date.now();
    let next = 0;
    const worker = async () => {
      while (next < indexes.length) {
        const index = indexes[next++]!;
        const outcome = await runMutant(index);
        outcomes.push(outcome);
        if (verbose) {
          console.log(
            `#${index} ${outcome.seed}: info ${outcome.infoCode} / qemu ${outcome.qemuInfo}; load ${outcome.loadCode} / qemu ${outcome.qemuConvert}` +
              `${outcome.problems.length ? ' PROBLEM' : ''}\n    ${formatPatches(outcome.patches).split('\n').join('\n    ')}`,
          );
        }
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    outcomes.sort((a, b) => a.index - b.index);
    console.log(summary(outcomes, (Date.now() - started) / 1000));

    const failures = outcomes
      .filter((o) => o.problems.length > 0)
      .map(
        (o) =>
          `mutant ${o.index} of seed image ${o.seed} (QCOW2IMG_MUTANT_SEED=${JSON.stringify(runSeed)} QCOW2IMG_MUTANT_ONLY=${o.index}):\n` +
          `  ${o.problems.join('\n  ')}\n  patches:\n    ${formatPatches(o.patches).split('\n').join('\n    ')}`,
      );
    if (failures.length > 0) console.log(`${failures.length} failing mutants:\n\n${failures.join('\n\n')}`);
    expect(failures).toEqual([]);
  }, 900_000);
});

/**
 * Helpers shared by the load benchmarks: running commands, the page cache, disk space,
 * formatting, and facts about the machine (numbers mean little without them).
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const cliPath = path.join(repoRoot, 'dist', 'cli', 'main.js');
export const addonPath = path.join(repoRoot, 'build', 'Release', 'qcow2img.node');

/**
 * This machine sets NODE_EXTRA_CA_CERTS (an HTTPS proxy's CA bundle), which makes every node process
 * parse the whole bundle at start-up: about 0.07-0.1 s here, work no qcow2img command needs and not
 * part of a hypervisor host's usual environment. The processes the benchmarks measure run without
 * it (children inherit this process's environment); machineFacts says so, with both start-up times.
 */
const unsetEnvironment = Object.fromEntries(['NODE_EXTRA_CA_CERTS'].filter((name) => process.env[name] !== undefined).map((name) => [name, process.env[name]]));
for (const name of Object.keys(unsetEnvironment)) delete process.env[name];

/** Median wall seconds of `node -e 0` in this process's environment plus `extra`. */
function nodeStartupSeconds(extra = {}) {
  const times = [];
  for (let i = 0; i < 5; i++) {
    const started = performance.now();
    spawnSync(process.execPath, ['-e', '0'], { env: { ...process.env, ...extra } });
    times.push((performance.now() - started) / 1000);
  }
  return times.sort((a, b) => a - b)[2];
}

/** Children still running, so a signal handler can stop them before it unmounts what they use. */
const runningChildren = new Set();

/** Registers a spawned child until it exits. */
export function track(child) {
  runningChildren.add(child);
  child.on('close', () => runningChildren.delete(child));
  return child;
}

export function killRunningChildren() {
  for (const child of runningChildren) child.kill('SIGKILL');
}

/**
 * Runs a command to completion; rejects with its stderr on failure. Asynchronous on purpose:
 * signal handlers (which clean up mounts and loop devices) only run while the event loop is free.
 */
export function run(command, args, { cwd, input, allowFailure = false } = {}) {
  return new Promise((resolve, reject) => {
    const child = track(spawn(command, args, { cwd, stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] }));
    const stdout = [];
    const stderr = [];
    child.stdout.on('data', (chunk) => stdout.push(chunk));
    child.stderr.on('data', (chunk) => stderr.push(chunk));
    if (input !== undefined) child.stdin.end(input);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      const result = {
        code: code ?? 128,
        signal,
        stdout: Buffer.concat(stdout).toString(),
        stderr: Buffer.concat(stderr).toString(),
      };
      if (result.code !== 0 && !allowFailure) {
        const message = (result.stderr.trim() || result.stdout.trim()).split('\n').slice(-5).join('\n');
        reject(new Error(`${formatCommand(command, args)} failed (${signal ?? `exit ${code}`}):\n${message}`));
      } else {
        resolve(result);
      }
    });
  });
}

/** A command line as a user would paste it into a shell, for reports. */
export function formatCommand(command, args) {
  const quote = (word) => (/^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`);
  return [command, ...args].map(quote).join(' ');
}

/** Flushes dirty pages and empties the page cache, so the next run reads from the disk. */
export function dropCaches() {
  spawnSync('sync');
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

export function canDropCaches() {
  try {
    fs.accessSync('/proc/sys/vm/drop_caches', fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

export function freeBytes(dir) {
  const stats = fs.statfsSync(dir);
  return stats.bavail * stats.bsize;
}

/** Fails early with a clear message instead of a half-written image deep inside a run. */
export function ensureFreeSpace(dir, bytes, what) {
  const free = freeBytes(dir);
  if (free < bytes) {
    throw new Error(`not enough space in ${dir} for ${what}: ${humanBytes(free)} free, ${humanBytes(bytes)} needed (see df -h ${dir})`);
  }
}

export function humanBytes(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(2)} ${units[unit]}`;
}

export function seconds(value) {
  return value.toFixed(2);
}

export function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** A Markdown table, so the output pastes straight into an issue or a PR. */
export function markdownTable(header, rows) {
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => String(row[column]).length)));
  const line = (cells) => `| ${cells.map((cell, column) => String(cell).padEnd(widths[column])).join(' | ')} |`;
  return [line(header), `| ${widths.map((width) => '-'.repeat(width)).join(' | ')} |`, ...rows.map(line)].join('\n');
}

function firstLine(command, args) {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  return result.status === 0 ? result.stdout.trim().split('\n')[0] : 'unknown';
}

/** A short digest of the addon, to tell builds apart in reports. */
export function addonDigest(file = addonPath) {
  try {
    return createHash('sha256').update(fs.readFileSync(file)).digest('hex').slice(0, 12);
  } catch {
    return 'missing';
  }
}

/**
 * Copies the built CLI and addon aside and returns the copy's CLI path. The working tree is shared:
 * someone rebuilding the addon (node-gyp deletes build/ first) would otherwise fail runs half-way or
 * mix two builds in one table. Waits for a build that has not changed for a few seconds and that
 * loads a tiny image: a half-finished rebuild can leave an addon with undefined symbols.
 * Each process gets its own copy (frozen-build/PID, removed on exit), so concurrent benchmarks
 * never replace each other's; copies left by dead processes are removed here.
 */
export async function freezeBuild(cacheDir, { waitSeconds = 900, log = console.error } = {}) {
  const settledMs = 5000;
  const deadline = Date.now() + waitSeconds * 1000;
  const parent = path.join(cacheDir, 'frozen-build');
  fs.mkdirSync(parent, { recursive: true });
  for (const entry of fs.readdirSync(parent)) {
    if (/^\d+$/.test(entry) && !isAlive(Number(entry))) fs.rmSync(path.join(parent, entry), { recursive: true, force: true });
  }
  const dir = path.join(parent, String(process.pid));
  process.once('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  const frozenCli = path.join(dir, 'dist', 'cli', 'main.js');
  const frozenAddon = path.join(dir, 'build', 'Release', 'qcow2img.node');
  let lastProblem = '';
  for (;;) {
    const addon = fs.statSync(addonPath, { throwIfNoEntry: false });
    let problem;
    if (!addon || !fs.existsSync(cliPath)) problem = `${addonPath} or ${cliPath} is missing`;
    else if (Date.now() - addon.mtimeMs < settledMs) problem = `${addonPath} was just written`;
    else {
      fs.rmSync(dir, { recursive: true, force: true });
      fs.mkdirSync(path.dirname(frozenAddon), { recursive: true });
      fs.cpSync(path.join(repoRoot, 'dist'), path.join(dir, 'dist'), { recursive: true });
      fs.copyFileSync(addonPath, frozenAddon);
      fs.copyFileSync(path.join(repoRoot, 'package.json'), path.join(dir, 'package.json'));
      fs.symlinkSync(path.join(repoRoot, 'node_modules'), path.join(dir, 'node_modules'));
      problem = await smokeTest(dir, frozenCli);
      if (!problem) return { dir, cliPath: frozenCli, addonDigest: addonDigest(frozenAddon) };
    }
    if (Date.now() > deadline) throw new Error(`no working build of qcow2img after ${waitSeconds} s: ${problem}`);
    if (problem !== lastProblem) log(`waiting for a working build of qcow2img: ${problem}`);
    lastProblem = problem;
    await new Promise((resolve) => setTimeout(resolve, 10_000));
  }
}

export function isAlive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return error.code === 'EPERM';
  }
}

/** Loads a tiny image with the frozen CLI; returns what went wrong, or undefined. */
async function smokeTest(dir, frozenCli) {
  const image = path.join(dir, 'smoke.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1M']);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', image]);
  const result = await run(process.execPath, [frozenCli, 'load', image, path.join(dir, 'smoke.raw'), '--overwrite', '--progress=none'], { allowFailure: true });
  fs.rmSync(path.join(dir, 'smoke.raw'), { force: true });
  return result.code === 0 ? undefined : `the build fails to load a 1 MiB image: ${result.stderr.trim().split('\n')[0]}`;
}

export function machineFacts(dir, build) {
  const cpuModel = fs.readFileSync('/proc/cpuinfo', 'utf8').match(/^model name\s*:\s*(.*)$/m)?.[1] ?? 'unknown';
  const filesystem = firstLine('findmnt', ['-n', '-o', 'FSTYPE,SOURCE,OPTIONS', '-T', dir]);
  const gitHead = firstLine('git', ['-C', repoRoot, 'rev-parse', '--short', 'HEAD']);
  const gitDirty = spawnSync('git', ['-C', repoRoot, 'status', '--porcelain', '--', 'src', 'native'], { encoding: 'utf8' }).stdout.trim() ? ' (src/native modified)' : '';
  return [
    ['nproc', String(os.availableParallelism())],
    ['CPU', cpuModel],
    ['memory', humanBytes(os.totalmem())],
    ['kernel', `${os.type()} ${os.release()}`],
    ['filesystem (images and outputs)', `${filesystem} at ${dir}`],
    ['node', process.version],
    ...(Object.keys(unsetEnvironment).length > 0
      ? [['environment', `${Object.keys(unsetEnvironment).join(', ')} unset for the measured processes (node start-up ${nodeStartupSeconds(unsetEnvironment).toFixed(3)} s with it, ${nodeStartupSeconds().toFixed(3)} s without)`]]
      : []),
    ['qemu-img', firstLine('qemu-img', ['--version'])],
    ['qcow2img', `git ${gitHead}${gitDirty}, addon sha256 ${build?.addonDigest ?? addonDigest()}${build ? ` (copy of the tree's build in ${build.dir})` : ''}`],
  ];
}

/** CPU seconds all processes spent busy since boot, from /proc/stat (iowait counts as idle). */
export function busyCpuSeconds() {
  const [, user, nice, system, , , irq, softirq, steal] = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).map(Number);
  // USER_HZ is 100 on every Linux ABI node runs on.
  return (user + nice + system + irq + softirq + steal) / 100;
}

export function printFacts(facts) {
  for (const [name, value] of facts) console.log(`- ${name}: ${value}`);
}

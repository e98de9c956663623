#!/usr/bin/env node
/**
 * Makes, once, a real RAM dump and CPU state of a booted Linux guest, for the snapshot benchmark
 * (snapshot.mjs) and anyone who needs realistic VM state:
 *
 *   .cache/vm/ram.raw    1 GiB of guest-physical RAM (QMP pmemsave of 0..1 GiB)
 *   .cache/vm/cpu.json   the two vCPUs as qcow2img's CPU JSON (src/vmstate/cpu.ts), from `info registers -a`
 *   .cache/vm/cpu.txt    the `info registers -a` text it was converted from
 *   .cache/vm/meta.json  recipe digest, kernel, timings, page make-up
 *
 *   node benchmarks/ram-dump.mjs [--force] [--cache-dir DIR] [--boot-timeout 180]
 *
 * Needs qemu-system-x86, busybox-static and cpio (npm run setup installs them) and
 * linux-image-cloud-amd64, installed by hand (setup installs no kernel).
 *
 * How: builds a busybox initramfs whose init mounts proc/sys/dev, fills a tmpfs with text (numbers,
 * kernel symbols and copies of them), a little random data, starts a few processes and prints a
 * marker; boots Debian's cloud kernel under TCG with 1 GiB and 2 vCPUs; waits for the marker on the
 * serial log; then over QMP `stop`, `pmemsave` and `human-monitor-command` `info registers -a`, and
 * `quit`. QEMU is killed on any failure or signal; nothing half-made is left under the final names.
 * An existing dump made by the same recipe is reused (its make-up is printed again); --force makes
 * it anew.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as net from 'node:net';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { gzipSync } from 'node:zlib';
import { humanBytes, markdownTable, repoRoot, run } from './common.mjs';

const RAM_BYTES = 1024 * 1024 * 1024;
const PAGE = 4096;
const VCPUS = 2;
const MARKER = 'QCOW2IMG-GUEST-READY';
// The kernel is not in scripts/setup.sh: on a real machine a second kernel flavour changes its boot menu.
const KERNEL_PACKAGE = 'linux-image-cloud-amd64';
const PACKAGES = ['qemu-system-x86', KERNEL_PACKAGE, 'busybox-static', 'cpio'];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The guest's init. Memory it fills (tmpfs pages): about 20 MB of numbers as text, the kernel's
// symbol table three times (page-aligned copies: duplicate pages, as file copies make in real
// guests), the boot log and 4 MB of random bytes (incompressible, like encrypted or compressed
// data). Sized so the dump's make-up comes near the product notes' (about 88% zero pages, a fifth
// of the rest duplicates).
const INIT_SCRIPT = `#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=512m tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "qcow2img guest: filling memory"
seq 1 2600000 > /tmp/numbers.txt
cat /proc/kallsyms > /tmp/kallsyms.txt
cp /tmp/kallsyms.txt /tmp/kallsyms.copy1
cp /tmp/kallsyms.txt /tmp/kallsyms.copy2
dmesg > /tmp/dmesg.txt
dd if=/dev/urandom of=/tmp/random.bin bs=1M count=4 2>/dev/null
for i in 1 2 3; do (while true; do sleep 7; done) & done
(while true; do cat /proc/meminfo > /run/meminfo; sleep 2; done) &
sleep 1000000 &
syslogd -O /run/messages 2>/dev/null
klogd 2>/dev/null
sync
echo "qcow2img guest: $(ls /proc | grep -c '^[0-9]') processes; $(du -sk /tmp | cut -f1) KiB in /tmp"
grep -E 'MemFree|^Cached|Shmem:' /proc/meminfo
echo ${MARKER}
while true; do sleep 3600; done
`;

// ---------------------------------------------------------------------------------------------
// Cleanup: QEMU is killed and temporary files removed on failure, exit and signals.

let qemuChild;
const temporaryPaths = new Set();

function killQemu() {
  if (qemuChild && qemuChild.exitCode === null && qemuChild.signalCode === null) {
    try {
      qemuChild.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
}

function removeTemporaries() {
  for (const file of temporaryPaths) fs.rmSync(file, { recursive: true, force: true });
  temporaryPaths.clear();
}

process.on('exit', () => {
  killQemu();
  removeTemporaries();
});
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    killQemu();
    removeTemporaries();
    process.kill(process.pid, signal);
  });
}

// ---------------------------------------------------------------------------------------------
// Packages

function installed(pkg) {
  const result = spawnSync('dpkg-query', ['-W', '-f=${Status}', pkg], { encoding: 'utf8' });
  return result.status === 0 && result.stdout.includes('install ok installed');
}

/** Fails naming what is missing: no benchmark installs packages (scripts/setup.sh does). */
function requirePackages(packages) {
  const missing = packages.filter((pkg) => !installed(pkg));
  if (missing.length === 0) return;
  const bySetup = missing.filter((pkg) => pkg !== KERNEL_PACKAGE);
  const hints = [];
  if (bySetup.length) hints.push('npm run setup installs ' + bySetup.join(', '));
  if (missing.includes(KERNEL_PACKAGE)) hints.push(`the guest kernel: apt-get install --no-install-recommends ${KERNEL_PACKAGE}`);
  throw new Error(`missing ${missing.join(' ')}: ${hints.join('; ')}`);
}

// ---------------------------------------------------------------------------------------------
// Guest: kernel and initramfs

/** The newest Debian cloud kernel in /boot. */
function cloudKernel() {
  const kernels = fs.readdirSync('/boot').filter((name) => /^vmlinuz-.*-cloud-amd64$/.test(name));
  if (kernels.length === 0) throw new Error('no /boot/vmlinuz-*-cloud-amd64: is linux-image-cloud-amd64 installed?');
  kernels.sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  return path.join('/boot', kernels[kernels.length - 1]);
}

function busyboxPath() {
  for (const candidate of ['/bin/busybox', '/usr/bin/busybox']) {
    if (fs.existsSync(candidate)) {
      const file = spawnSync('file', ['-L', candidate], { encoding: 'utf8' });
      // `file` may be absent; ldd says "not a dynamic executable" for a static one.
      const ldd = spawnSync('ldd', [candidate], { encoding: 'utf8' });
      const isStatic = /statically linked|static-pie/.test(file.stdout ?? '') || /not a dynamic executable|statically linked/.test(`${ldd.stdout}${ldd.stderr}`);
      if (isStatic) return candidate;
    }
  }
  throw new Error('no statically linked busybox in /bin or /usr/bin: is busybox-static installed?');
}

/** A gzip-compressed newc cpio holding busybox, /dev/console and the init script. */
async function buildInitramfs(output, workDir) {
  const root = path.join(workDir, 'initramfs-root');
  fs.rmSync(root, { recursive: true, force: true });
  for (const dir of ['bin', 'dev', 'proc', 'sys', 'tmp', 'run', 'sbin', 'usr/bin', 'usr/sbin']) fs.mkdirSync(path.join(root, dir), { recursive: true });
  fs.copyFileSync(busyboxPath(), path.join(root, 'bin', 'busybox'));
  fs.chmodSync(path.join(root, 'bin', 'busybox'), 0o755);
  fs.symlinkSync('busybox', path.join(root, 'bin', 'sh'));
  fs.writeFileSync(path.join(root, 'init'), INIT_SCRIPT, { mode: 0o755 });
  // The kernel opens /dev/console for init before init runs; the script also reopens it after
  // mounting devtmpfs, in case mknod is not allowed here.
  spawnSync('mknod', ['-m', '600', path.join(root, 'dev', 'console'), 'c', '5', '1']);
  const names = (await run('find', ['.', '-mindepth', '1'], { cwd: root })).stdout.split('\n').filter(Boolean).sort().join('\n') + '\n';
  const cpio = await new Promise((resolve, reject) => {
    const child = spawn('cpio', ['--quiet', '-o', '-H', 'newc', '-R', '0:0'], { cwd: root, stdio: ['pipe', 'pipe', 'pipe'] });
    const out = [];
    const err = [];
    child.stdout.on('data', (chunk) => out.push(chunk));
    child.stderr.on('data', (chunk) => err.push(chunk));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(Buffer.concat(out)) : reject(new Error(`cpio failed: ${Buffer.concat(err).toString().trim()}`))));
    child.stdin.end(names);
  });
  fs.writeFileSync(output, gzipSync(cpio, { level: 6 }));
  fs.rmSync(root, { recursive: true, force: true });
}

// ---------------------------------------------------------------------------------------------
// QMP: line-delimited JSON over a unix socket

class Qmp {
  #socket;
  #buffer = '';
  #waiters = [];
  #lines = [];
  #closed;

  static async connect(socketPath, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise((resolve, reject) => {
          const s = net.createConnection(socketPath);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const qmp = new Qmp(socket);
        await qmp.#next(deadline - Date.now()); // greeting
        await qmp.execute('qmp_capabilities', undefined, 10_000);
        return qmp;
      } catch (error) {
        if (Date.now() > deadline) throw new Error(`cannot talk QMP on ${socketPath}: ${error.message}`);
        if (qemuChild && qemuChild.exitCode !== null) throw new Error(`QEMU exited (${qemuChild.exitCode}) before QMP answered`);
        await sleep(200);
      }
    }
  }

  constructor(socket) {
    this.#socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (text) => {
      this.#buffer += text;
      for (let at = this.#buffer.indexOf('\n'); at >= 0; at = this.#buffer.indexOf('\n')) {
        const line = this.#buffer.slice(0, at).trim();
        this.#buffer = this.#buffer.slice(at + 1);
        if (!line) continue;
        let message;
        try {
          message = JSON.parse(line);
        } catch {
          continue;
        }
        if (message.event) continue; // STOP, RESUME, SHUTDOWN...: not answers
        const waiter = this.#waiters.shift();
        if (waiter) waiter.resolve(message);
        else this.#lines.push(message);
      }
    });
    const fail = (error) => {
      this.#closed = error ?? new Error('QMP connection closed');
      for (const waiter of this.#waiters.splice(0)) waiter.reject(this.#closed);
    };
    socket.on('error', fail);
    socket.on('close', () => fail());
  }

  #next(timeoutMs) {
    if (this.#lines.length) return Promise.resolve(this.#lines.shift());
    if (this.#closed) return Promise.reject(this.#closed);
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        reject(new Error(`no QMP answer within ${Math.round(timeoutMs / 1000)} s`));
      }, Math.max(1, timeoutMs));
      this.#waiters.push(waiter);
    });
  }

  /** Runs one command; resolves with its `return`, rejects with its `error`. */
  async execute(command, args, timeoutMs = 30_000) {
    this.#socket.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
    const answer = await this.#next(timeoutMs);
    if (answer.error) throw new Error(`QMP ${command}: ${answer.error.class}: ${answer.error.desc}`);
    return answer.return;
  }

  close() {
    this.#socket.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// `info registers -a` to CPU JSON

const hex = (digits) => `0x${BigInt(`0x${digits}`).toString(16)}`;
const hex128 = (digits) => `0x${BigInt(`0x${digits}`).toString(16).padStart(32, '0')}`;

/**
 * Converts QEMU's `info registers -a` text (target/i386/cpu-dump.c, 64-bit mode) to the CPU JSON of
 * src/vmstate/cpu.ts. Segments keep QEMU's flags word as `attrs`; XMM registers are the low 128
 * bits of XMM, YMM or ZMM, whichever QEMU printed.
 */
export function registersToCpuJson(text) {
  const blocks = text.split(/^CPU#(\d+)\s*$/m);
  const vcpus = [];
  for (let i = 1; i < blocks.length; i += 2) {
    const id = Number(blocks[i]);
    const body = blocks[i + 1];
    const fields = new Map();
    for (const match of body.matchAll(/\b([A-Z][A-Z0-9]*)\s*=\s*([0-9a-fA-F]+)\b/g)) if (!fields.has(match[1])) fields.set(match[1], match[2]);
    const need = (name) => {
      const value = fields.get(name);
      if (value === undefined) throw new Error(`CPU#${id}: no ${name}= in the register dump${name === 'RAX' ? ' (is the guest in 64-bit mode?)' : ''}`);
      return hex(value);
    };
    const regs = {};
    for (const r of ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip']) regs[r] = need(r.toUpperCase());
    regs.rflags = need('RFL');

    const sregs = {};
    for (const match of body.matchAll(/^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=\s*([0-9a-fA-F]+) ([0-9a-fA-F]+) ([0-9a-fA-F]+) ([0-9a-fA-F]+)/gm)) {
      sregs[match[1].toLowerCase()] = { selector: hex(match[2]), base: hex(match[3]), limit: hex(match[4]), attrs: hex(match[5]) };
    }
    const ordered = {};
    for (const name of ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt']) {
      if (!sregs[name]) throw new Error(`CPU#${id}: no ${name.toUpperCase()} segment line in the register dump`);
      ordered[name] = sregs[name];
    }
    for (const name of ['GDT', 'IDT']) {
      const match = body.match(new RegExp(`^${name}=\\s*([0-9a-fA-F]+) ([0-9a-fA-F]+)`, 'm'));
      if (!match) throw new Error(`CPU#${id}: no ${name}= line in the register dump`);
      ordered[name.toLowerCase()] = { base: hex(match[1]), limit: hex(match[2]) };
    }
    for (const cr of ['cr0', 'cr2', 'cr3', 'cr4']) ordered[cr] = need(cr.toUpperCase());
    ordered.efer = need('EFER');

    const dregs = {};
    for (const dr of ['dr0', 'dr1', 'dr2', 'dr3', 'dr6', 'dr7']) dregs[dr] = need(dr.toUpperCase());

    const xmm = {};
    for (const match of body.matchAll(/\b([XYZ])MM(\d\d)=((?:[0-9a-fA-F]+ ?)+)/g)) {
      // XMM: one 32-digit word; YMM/ZMM: 16-digit quadwords, most significant first.
      const digits = match[3].trim().split(/\s+/).join('');
      xmm[`xmm${match[2]}`] = hex128(digits.slice(-32));
    }
    if (Object.keys(xmm).length === 0) throw new Error(`CPU#${id}: no XMM/YMM/ZMM registers in the dump (was it taken without FPU state?)`);
    const fpu = { fcw: need('FCW'), fsw: need('FSW'), ftw: need('FTW'), mxcsr: need('MXCSR'), xmm };

    vcpus.push({ id, regs, sregs: ordered, dregs, fpu });
  }
  if (vcpus.length === 0) throw new Error('no CPU#n blocks in the register dump');
  return { arch: 'x86_64', vcpus };
}

// ---------------------------------------------------------------------------------------------
// Page make-up of a dump

/** Zero pages, and non-zero pages equal to an earlier page (what the state file stores as DUPLICATE). */
export function pageMakeup(file) {
  const fd = fs.openSync(file, 'r');
  const buffer = Buffer.allocUnsafe(64 << 20);
  const zeroPage = Buffer.alloc(PAGE);
  const seen = new Map();
  let pages = 0;
  let zero = 0;
  let duplicate = 0;
  try {
    for (let position = 0; ; ) {
      const n = fs.readSync(fd, buffer, 0, buffer.length, position);
      if (n <= 0) break;
      for (let at = 0; at + PAGE <= n; at += PAGE) {
        const page = buffer.subarray(at, at + PAGE);
        pages += 1;
        if (page.equals(zeroPage)) {
          zero += 1;
          continue;
        }
        const key = createHash('sha256').update(page).digest('base64');
        const count = seen.get(key);
        if (count === undefined) seen.set(key, 1);
        else {
          seen.set(key, count + 1);
          duplicate += 1;
        }
      }
      position += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  const nonZero = pages - zero;
  let inGroups = 0;
  for (const count of seen.values()) if (count > 1) inGroups += count;
  return { pages, zero, nonZero, duplicate, distinct: seen.size, inDuplicateGroups: inGroups };
}

export function printMakeup(m) {
  const pct = (a, b) => `${((100 * a) / b).toFixed(1)}%`;
  console.log(
    markdownTable(
      ['pages (4 KiB)', 'count', 'share'],
      [
        ['all', m.pages, '100%'],
        ['zero', m.zero, pct(m.zero, m.pages)],
        ['non-zero', `${m.nonZero} (${humanBytes(m.nonZero * PAGE)})`, pct(m.nonZero, m.pages)],
        ['  duplicate (equal to an earlier page)', m.duplicate, `${pct(m.duplicate, m.nonZero)} of non-zero, ${pct(m.duplicate, m.pages)} of all`],
        ['  in a group of equal pages (first copies too)', m.inDuplicateGroups, `${pct(m.inDuplicateGroups, m.nonZero)} of non-zero`],
        ['  distinct non-zero', m.distinct, `${humanBytes(m.distinct * PAGE)} left to compress`],
      ],
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// Main

function recipeDigest(kernel) {
  const qemu = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).stdout?.split('\n')[0] ?? '';
  return createHash('sha256').update(INIT_SCRIPT).update(path.basename(kernel)).update(qemu).update(String(RAM_BYTES)).digest('hex').slice(0, 16);
}

/** Serial output without terminal escape sequences (SeaBIOS and busybox clear the screen). */
const stripEscapes = (text) => text.replace(/\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])/g, '');

async function waitForMarker(logPath, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const log = fs.existsSync(logPath) ? fs.readFileSync(logPath, 'utf8') : '';
    if (log.includes(MARKER)) return log;
    if (/Kernel panic|end Kernel panic/.test(log)) throw new Error(`the guest kernel panicked:\n${stripEscapes(log).split('\n').slice(-15).join('\n')}`);
    if (qemuChild.exitCode !== null || qemuChild.signalCode !== null) throw new Error(`QEMU exited (${qemuChild.exitCode ?? qemuChild.signalCode}) before the guest was up:\n${qemuStderr().slice(-1500)}\n${stripEscapes(log).slice(-1500)}`);
    if (Date.now() > deadline) throw new Error(`no "${MARKER}" on the serial console within ${Math.round(timeoutMs / 1000)} s; the log ends:\n${stripEscapes(log).split('\n').slice(-15).join('\n')}`);
    await sleep(500);
  }
}

let qemuStderrChunks = [];
const qemuStderr = () => Buffer.concat(qemuStderrChunks).toString();

function waitForExit(child, timeoutMs) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), timeoutMs);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/** Leftovers of runs that were killed outright (.work-PID-* folders, .ram.raw.PID.tmp files). */
function removeStale(dir) {
  for (const name of fs.readdirSync(dir)) {
    const pid = Number(name.match(/^\.work-(\d+)-|^\.ram\.raw\.(\d+)\.tmp$/)?.slice(1).find(Boolean));
    if (!pid || pid === process.pid) continue;
    let alive = true;
    try {
      process.kill(pid, 0);
    } catch {
      alive = false;
    }
    if (!alive) fs.rmSync(path.join(dir, name), { recursive: true, force: true });
  }
}

async function makeDump(dir, { bootTimeoutSeconds }) {
  const times = {};
  let t = performance.now();
  const lap = (name) => {
    const now = performance.now();
    times[name] = (now - t) / 1000;
    t = now;
  };

  requirePackages(PACKAGES);
  const kernel = cloudKernel();
  const digest = recipeDigest(kernel);

  removeStale(dir);
  const work = fs.mkdtempSync(path.join(dir, `.work-${process.pid}-`));
  temporaryPaths.add(work);
  const initrd = path.join(work, 'initramfs.cpio.gz');
  await buildInitramfs(initrd, work);
  lap('initramfs');

  const socketPath = path.join(work, 'qmp.sock');
  const serialLog = path.join(work, 'serial.log');
  const ramTemporary = path.join(dir, `.ram.raw.${process.pid}.tmp`);
  temporaryPaths.add(ramTemporary);
  const args = [
    '-accel', 'tcg', '-m', '1G', '-smp', String(VCPUS), '-nographic', '-monitor', 'none', '-nic', 'none', '-no-reboot',
    '-kernel', kernel, '-initrd', initrd, '-append', 'console=ttyS0 quiet panic=-1',
    '-qmp', `unix:${socketPath},server,nowait`, '-serial', `file:${serialLog}`,
  ];
  console.error(`booting ${path.basename(kernel)} under TCG (1 GiB, ${VCPUS} vCPUs), up to ${bootTimeoutSeconds} s...`);
  qemuStderrChunks = [];
  // Under `setpriv --pdeathsig KILL` where there is one: QEMU then dies with this process even when
  // no handler gets to run (SIGKILL, a crash).
  const setpriv = ['/usr/bin/setpriv', '/bin/setpriv'].find((file) => fs.existsSync(file));
  qemuChild = setpriv
    ? spawn(setpriv, ['--pdeathsig', 'KILL', '--', 'qemu-system-x86_64', ...args], { stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  qemuChild.stderr.on('data', (chunk) => qemuStderrChunks.push(chunk));
  const spawnFailed = new Promise((_, reject) => qemuChild.once('error', (error) => reject(new Error(`cannot start qemu-system-x86_64: ${error.message}`))));
  spawnFailed.catch(() => {});
  let qmp;
  try {
    const bootStarted = performance.now();
    qmp = await Promise.race([Qmp.connect(socketPath, 30_000), spawnFailed]);
    const log = await Promise.race([waitForMarker(serialLog, bootTimeoutSeconds * 1000 - (performance.now() - bootStarted)), spawnFailed]);
    lap('boot and fill');
    const guestLines = log.split('\n').filter((line) => /qcow2img guest|Mem|Cached|Shmem/.test(line)).map((line) => stripEscapes(line).trim());

    await qmp.execute('stop');
    await qmp.execute('pmemsave', { val: 0, size: RAM_BYTES, filename: ramTemporary }, 120_000);
    lap('pmemsave');
    const registers = await qmp.execute('human-monitor-command', { 'command-line': 'info registers -a' });
    await qmp.execute('quit').catch(() => {}); // QEMU may close the socket before it answers
    qmp.close();
    if (!(await waitForExit(qemuChild, 15_000))) {
      killQemu();
      await waitForExit(qemuChild, 5_000);
    }
    lap('quit');

    const size = fs.statSync(ramTemporary).size;
    if (size !== RAM_BYTES) throw new Error(`pmemsave wrote ${size} bytes, expected ${RAM_BYTES}`);
    const cpu = registersToCpuJson(registers);
    if (cpu.vcpus.length !== VCPUS) throw new Error(`the register dump holds ${cpu.vcpus.length} vCPUs, expected ${VCPUS}`);
    const require = createRequire(import.meta.url);
    const { parseCpuState } = require(path.join(repoRoot, 'dist', 'vmstate', 'cpu.js'));
    parseCpuState(cpu, path.join(dir, 'cpu.json')); // throws, naming the field, when the shape is wrong
    lap('convert');

    fs.writeFileSync(path.join(dir, 'cpu.txt'), registers);
    fs.writeFileSync(path.join(dir, 'cpu.json'), JSON.stringify(cpu, null, 2) + '\n');
    fs.renameSync(ramTemporary, path.join(dir, 'ram.raw'));
    temporaryPaths.delete(ramTemporary);
    return { digest, kernel, times, guestLines, qemuArgs: args };
  } finally {
    qmp?.close();
    killQemu();
    removeTemporaries();
  }
}

async function main() {
  const { values } = parseArgs({
    options: {
      force: { type: 'boolean' },
      'cache-dir': { type: 'string' },
      'boot-timeout': { type: 'string', default: '180' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node benchmarks/ram-dump.mjs [--force] [--cache-dir DIR (default .cache/vm)] [--boot-timeout SECONDS (default 180)]');
    return;
  }
  const dir = path.resolve(values['cache-dir'] ?? path.join(repoRoot, '.cache', 'vm'));
  const bootTimeoutSeconds = Number(values['boot-timeout']);
  if (!(bootTimeoutSeconds > 0 && bootTimeoutSeconds <= 600)) throw new Error('--boot-timeout takes 1 to 600 seconds');
  fs.mkdirSync(dir, { recursive: true });
  const metaPath = path.join(dir, 'meta.json');
  const ramPath = path.join(dir, 'ram.raw');
  const cpuPath = path.join(dir, 'cpu.json');

  let meta;
  try {
    meta = JSON.parse(fs.readFileSync(metaPath, 'utf8'));
  } catch {
    meta = undefined;
  }
  const complete = meta && fs.existsSync(cpuPath) && fs.statSync(ramPath, { throwIfNoEntry: false })?.size === RAM_BYTES;
  const stillCurrent = complete && PACKAGES.every(installed) && (() => {
    try {
      return meta.digest === recipeDigest(cloudKernel());
    } catch {
      return false;
    }
  })();
  // Reused while the recipe (init script, kernel, QEMU) is unchanged; kept as it is when the tools
  // are gone (a fresh machine reuses nothing anyway: .cache is not in git).
  if (complete && !values.force && (stillCurrent || !PACKAGES.every(installed))) {
    console.log(`reusing ${ramPath} and ${cpuPath} (made ${meta.created} in ${meta.times.total.toFixed(1)} s; --force to make them anew)`);
    printMakeup(meta.makeup);
    return;
  }

  const started = performance.now();
  fs.rmSync(metaPath, { force: true });
  const made = await makeDump(dir, { bootTimeoutSeconds });
  const makeupStarted = performance.now();
  const makeup = pageMakeup(ramPath);
  made.times['page scan'] = (performance.now() - makeupStarted) / 1000;
  made.times.total = (performance.now() - started) / 1000;
  fs.writeFileSync(
    metaPath,
    JSON.stringify({ created: new Date().toISOString(), digest: made.digest, kernel: made.kernel, qemu: ['qemu-system-x86_64', ...made.qemuArgs].join(' '), guest: made.guestLines, times: made.times, makeup }, null, 2) + '\n',
  );

  console.log(`made ${ramPath} (${humanBytes(RAM_BYTES)}) and ${cpuPath} (${VCPUS} vCPUs, validated with parseCpuState) from ${path.basename(made.kernel)}`);
  for (const line of made.guestLines) console.log(`  guest: ${line}`);
  console.log(markdownTable(['step', 'seconds'], Object.entries(made.times).map(([name, s]) => [name, s.toFixed(1)])));
  console.log('');
  printMakeup(makeup);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((error) => {
    killQemu();
    removeTemporaries();
    console.error(`ram-dump: ${error.message}`);
    process.exit(1);
  });
}

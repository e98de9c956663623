#!/usr/bin/env node
/**
 * Shows, on real data, the "Done when" of issue #8: a real 1 GiB RAM dump of a booted Linux guest
 * (most pages zero), its 2-vCPU register state and a 2 GiB disk full of real files round-trip bit for
 * bit through a folder bundle and through a .tar.zst bundle, and `snapshot verify` names the file in
 * which one byte was changed.
 *
 *   node scripts/snapshot-roundtrip.mjs [--vm-dir .cache/vm] [--disk .cache/bench/os.raw]
 *
 * Inputs (made once, never here): VM_DIR/ram.raw and VM_DIR/cpu.json (benchmarks/ram-dump.mjs) and
 * os.raw (benchmarks/realistic-image.mjs). Everything is done with the CLI as a user would
 * (`node dist/cli/main.js snapshot create|inspect|restore|verify`), on a private copy of dist/ and
 * the addon (others rebuild the tree's), in VM_DIR/roundtrip/run-PID (same filesystem), removed at
 * the end, Ctrl-C included.
 *
 * For the folder bundle OUT/s1 and the archive OUT/s1.tar.zst:
 *   create   snapshot create OUT --disk os.raw --memory ram.raw --cpu cpu.json --device nic0=nic0.bin
 *   inspect  2 vCPUs, the nic0 blob, one region the size of ram.raw, both files listed
 *   restore  snapshot restore OUT --disk D.raw --memory R.raw --cpu C.json --device-dir DEV into
 *            fresh paths, then cmp D.raw os.raw, qemu-img compare -f raw -F raw D.raw os.raw,
 *            cmp R.raw ram.raw, cmp DEV/nic0 nic0.bin, and the CPU JSON deep-equal to cpu.json
 *   verify   exit 0 on the intact bundle
 *   damage   one byte flipped (XOR 0xff) in the middle of a copy: the folder's disk.qcow2, the
 *            folder's state.qvms (verify must also name a chunk and its guest-physical range), the
 *            whole .tar.zst; then, in a plain s1.tar (memory, CPU and device only, to keep it quick),
 *            the middle of the state.qvms member's data, found from the tar headers: verify must name
 *            `s1.tar:state.qvms`. Each time verify must exit non-zero and name the damaged file and
 *            no other.
 *
 * Prints a Markdown report; exits 1 if any check fails.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { isDeepStrictEqual, parseArgs } from 'node:util';
import {
  ensureFreeSpace,
  formatCommand,
  humanBytes,
  isAlive,
  killRunningChildren,
  machineFacts,
  markdownTable,
  printFacts,
  repoRoot,
  run,
} from '../benchmarks/common.mjs';
import { Cleanup, loadAverage, loadableBuild } from '../benchmarks/harness.mjs';

const usage = 'usage: node scripts/snapshot-roundtrip.mjs [--vm-dir .cache/vm] [--disk .cache/bench/os.raw]';
const f2 = (value) => (Number.isFinite(value) ? value.toFixed(2) : '-');
const log = (line) => console.error(line);

// ---- small helpers ----

function sizeOf(file) {
  return fs.statSync(file).size;
}

function allocatedOf(file) {
  return fs.statSync(file).blocks * 512;
}

/** Bytes of every file under a folder (a bundle's size). */
function folderBytes(dir) {
  let total = 0;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += sizeOf(path.join(entry.parentPath ?? entry.path, entry.name));
  }
  return total;
}

/** XORs one byte with 0xff; returns its old and new values. */
function flipByte(file, offset) {
  const fd = fs.openSync(file, 'r+');
  try {
    const byte = Buffer.alloc(1);
    if (fs.readSync(fd, byte, 0, 1, offset) !== 1) throw new Error(`${file}: no byte at ${offset}`);
    const before = byte[0];
    byte[0] ^= 0xff;
    fs.writeSync(fd, byte, 0, 1, offset);
    fs.fsyncSync(fd);
    return { before, after: byte[0] };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * The members of a tar file and where their data starts: 512-byte headers (ustar name and prefix,
 * size in octal at 124, type at 156), data right after, padded to 512; pax `x` records override the
 * next entry's path and size.
 */
function tarMembers(file) {
  const fd = fs.openSync(file, 'r');
  const header = Buffer.alloc(512);
  const members = [];
  try {
    let offset = 0;
    let pax = {};
    for (;;) {
      if (fs.readSync(fd, header, 0, 512, offset) !== 512) throw new Error(`${file}: ends inside a header at ${offset}`);
      if (header.every((b) => b === 0)) break;
      const field = (start, length) => header.toString('latin1', start, start + length).replace(/\0[\s\S]*$/, '');
      const type = field(156, 1) || '0';
      const ustar = field(257, 6).startsWith('ustar');
      let name = field(0, 100);
      if (ustar && field(345, 155)) name = `${field(345, 155)}/${name}`;
      let size = parseInt(field(124, 12).trim() || '0', 8);
      if (pax.path !== undefined) name = pax.path;
      if (pax.size !== undefined) size = Number(pax.size);
      const dataOffset = offset + 512;
      if (type === 'x') {
        const data = Buffer.alloc(size);
        fs.readSync(fd, data, 0, size, dataOffset);
        pax = {};
        for (const [, key, value] of data.toString('utf8').matchAll(/\d+ ([^=]+)=([^\n]*)\n/g)) pax[key] = value;
      } else {
        if (type !== 'g') pax = {};
        members.push({ name, type, size, dataOffset });
      }
      offset = dataOffset + Math.ceil(size / 512) * 512;
    }
  } finally {
    fs.closeSync(fd);
  }
  return members;
}

/** Text for a table cell: the run folder shortened to OUT, pipes escaped. */
function cell(text, runDir) {
  return String(text).replaceAll(`${runDir}/`, 'OUT/').replaceAll('|', '\\|');
}

// ---- main ----

async function main() {
  const { values } = parseArgs({
    options: {
      'vm-dir': { type: 'string' },
      disk: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(usage);
    return 0;
  }
  const vmDir = path.resolve(values['vm-dir'] ?? path.join(repoRoot, '.cache', 'vm'));
  const ram = path.join(vmDir, 'ram.raw');
  const cpu = path.join(vmDir, 'cpu.json');
  const disk = path.resolve(values.disk ?? path.join(repoRoot, '.cache', 'bench', 'os.raw'));
  for (const [file, maker] of [[ram, 'benchmarks/ram-dump.mjs'], [cpu, 'benchmarks/ram-dump.mjs'], [disk, 'benchmarks/realistic-image.mjs']]) {
    if (!fs.existsSync(file)) {
      console.error(`${file} is missing: run node ${maker} first`);
      return 1;
    }
  }
  const cpuJson = JSON.parse(fs.readFileSync(cpu, 'utf8'));
  const ramSize = sizeOf(ram);
  const diskSize = sizeOf(disk);

  // A folder per run, so two runs never share outputs; folders of dead runs are removed.
  const parentDir = path.join(vmDir, 'roundtrip');
  fs.mkdirSync(parentDir, { recursive: true });
  for (const entry of fs.readdirSync(parentDir)) {
    const pid = /^run-(\d+)$/.exec(entry)?.[1];
    if (pid && !isAlive(Number(pid))) fs.rmSync(path.join(parentDir, entry), { recursive: true, force: true });
  }
  const runDir = path.join(parentDir, `run-${process.pid}`);
  const cleanup = new Cleanup();
  cleanup.add(`rm -r ${parentDir} (if empty)`, () => {
    if (fs.existsSync(parentDir) && fs.readdirSync(parentDir).length === 0) fs.rmdirSync(parentDir);
  });
  cleanup.add(`rm -r ${runDir}`, () => fs.rmSync(runDir, { recursive: true, force: true }));
  fs.mkdirSync(runDir);

  const steps = [];
  const damages = [];
  const notes = [];
  const loadStart = loadAverage();
  let build;
  try {
    // Peak: a bundle (about the allocated disk + the state), a restored disk and RAM, and the disk
    // member extracted beside it (archive restore) or a copy of the bundle (damage tests).
    const needed = 2 * allocatedOf(disk) + diskSize + ramSize + 512 * 1024 ** 2;
    ensureFreeSpace(runDir, needed, 'the bundles, their restored files and damaged copies');
    build = await loadableBuild(runDir, 'build');
    const cliArgs = (args) => [build.cliPath, ...args];
    const cli = async (args) => {
      const started = performance.now();
      const result = await run(process.execPath, cliArgs(args), { allowFailure: true });
      return { ...result, seconds: (performance.now() - started) / 1000 };
    };
    const timedRun = async (command, args) => {
      const started = performance.now();
      const result = await run(command, args, { allowFailure: true });
      return { ...result, seconds: (performance.now() - started) / 1000 };
    };
    const failure = (result) => (result.stderr.trim() || result.stdout.trim()).split('\n')[0] ?? '';
    const record = (kind, step, ok, { seconds, bytes, detail = '' } = {}) => {
      steps.push({ kind, step, ok, seconds, bytes, detail });
      log(`${ok ? 'pass' : 'FAIL'}: ${kind}: ${step}${seconds !== undefined ? ` (${f2(seconds)} s)` : ''}${detail ? `: ${detail}` : ''}`);
      return ok;
    };
    const temp = path.join(runDir, 'tmp');
    fs.mkdirSync(temp);
    // Archives are extracted to --temp-dir: on this filesystem, and checked empty after each command.
    const tempLeft = (kind, step) => {
      const left = fs.readdirSync(temp);
      if (left.length) {
        record(kind, `${step}: --temp-dir left empty`, false, { detail: `left behind: ${left.join(', ')}` });
        for (const entry of left) fs.rmSync(path.join(temp, entry), { recursive: true, force: true });
      }
    };

    // A small device blob of odd size, not all one value.
    const nic = path.join(runDir, 'nic0.bin');
    const nicData = Buffer.concat([Buffer.from('{"model":"virtio-net","mac":"52:54:00:12:34:56","rx":[17,42],"tx":[9,3]}\n'), Buffer.alloc(1000, 0), Buffer.from(Array.from({ length: 2021 }, (_, i) => (i * 131 + 7) & 0xff))]);
    fs.writeFileSync(nic, nicData);

    /** Verify on a bundle; the damaged file must be named and no other bundle file. */
    const verifyDamaged = async (kind, label, bundle, expected, { others = [], needChunk = false, offset, flip }) => {
      const result = await cli(['snapshot', 'verify', bundle, '--temp-dir', temp]);
      const lines = result.stderr.trim().split('\n').filter(Boolean);
      const namesIt = lines.some((line) => line.includes(expected));
      const namesOther = others.filter((other) => lines.some((line) => line.replace(expected, '').includes(other)));
      const chunkLine = lines.find((line) => /CHUNK \d+/.test(line) && /guest-physical 0x[0-9a-f]+-0x[0-9a-f]+/.test(line));
      const ok = result.code !== 0 && namesIt && namesOther.length === 0 && (!needChunk || chunkLine !== undefined);
      damages.push({
        kind,
        label,
        offset,
        flip,
        code: result.code,
        first: lines[0] ?? '(nothing on stderr)',
        chunkLine,
        lines: lines.length,
        ok,
        why: [
          result.code === 0 ? 'exit 0' : '',
          namesIt ? '' : `does not name ${expected}`,
          namesOther.length ? `also names ${namesOther.join(', ')}` : '',
          needChunk && !chunkLine ? 'no chunk and guest-physical range' : '',
        ].filter(Boolean).join('; '),
        seconds: result.seconds,
      });
      log(`${ok ? 'pass' : 'FAIL'}: ${kind}: verify after damaging ${label}: exit ${result.code}, ${lines[0] ?? ''}`);
      tempLeft(kind, `verify ${label}`);
    };

    /** create, inspect, restore and compare, verify: the round trip of one bundle kind. */
    const roundTrip = async (kind, bundle) => {
      const create = await cli(['snapshot', 'create', bundle, '--disk', disk, '--memory', ram, '--cpu', cpu, '--device', `nic0=${nic}`]);
      const exists = fs.existsSync(bundle);
      const bytes = exists ? (fs.statSync(bundle).isDirectory() ? folderBytes(bundle) : sizeOf(bundle)) : undefined;
      let members = '';
      if (exists && fs.statSync(bundle).isDirectory()) members = fs.readdirSync(bundle).sort().map((name) => `${name} ${humanBytes(sizeOf(path.join(bundle, name)))}`).join(', ');
      // Made under a temporary name beside its final one and renamed: nothing else may be left there.
      const stray = fs.readdirSync(path.dirname(bundle)).filter((name) => name.startsWith('.'));
      const createDetail = create.code !== 0 ? failure(create) : stray.length ? `left beside it: ${stray.join(', ')}` : members || humanBytes(bytes);
      if (!record(kind, 'create', create.code === 0 && exists && stray.length === 0, { seconds: create.seconds, bytes, detail: createDetail })) return false;

      if (kind !== 'folder') {
        // GNU tar reads it (the bundle format's promise).
        const list = await timedRun('tar', ['-tf', bundle, ...(bundle.endsWith('.zst') ? ['--zstd'] : [])]);
        const names = list.stdout.trim().split('\n');
        const want = ['s1/', 's1/disk.qcow2', 's1/state.qvms', 's1/snapshot.json'];
        record(kind, 'tar -t lists s1/, disk, state, metadata', list.code === 0 && isDeepStrictEqual(names, want), { seconds: list.seconds, detail: list.code === 0 ? names.join(' ') : failure(list) });
      }

      const inspect = await cli(['snapshot', 'inspect', bundle, '--json', '--temp-dir', temp]);
      let inspectOk = false;
      let inspectDetail = failure(inspect);
      if (inspect.code === 0) {
        const info = JSON.parse(inspect.stdout);
        const m = info.metadata;
        const regionBytes = (m.memoryRegions ?? []).reduce((n, r) => n + r.size, 0);
        inspectOk = m.vcpuCount === cpuJson.vcpus.length && info.state?.vcpus === cpuJson.vcpus.length && isDeepStrictEqual(m.devices, ['nic0'])
          && regionBytes === ramSize && m.parent === null && m.files['disk.qcow2']?.virtualSize === diskSize && m.files['state.qvms'] !== undefined;
        const p = info.state?.pages ?? {};
        inspectDetail = `${m.vcpuCount} vCPUs, devices ${m.devices.join(',')}, ${humanBytes(regionBytes)} of RAM: ${p.zero} zero / ${p.data} data / ${p.duplicate} duplicate pages, ${info.state?.chunks} chunks; disk virtual size ${humanBytes(m.files['disk.qcow2']?.virtualSize ?? 0)}`;
      }
      record(kind, 'inspect: 2 vCPUs, nic0, RAM and disk sizes', inspectOk, { seconds: inspect.seconds, detail: inspectDetail });
      tempLeft(kind, 'inspect');

      const out = path.join(runDir, `restored-${kind.replace(/\W+/g, '-')}`);
      fs.mkdirSync(out);
      try {
        const restored = { disk: path.join(out, 'D.raw'), ram: path.join(out, 'R.raw'), cpu: path.join(out, 'C.json'), dev: path.join(out, 'DEV') };
        const restore = await cli(['snapshot', 'restore', bundle, '--disk', restored.disk, '--memory', restored.ram, '--cpu', restored.cpu, '--device-dir', restored.dev, '--temp-dir', temp]);
        const restoredBytes = [restored.disk, restored.ram, restored.cpu, path.join(restored.dev, 'nic0')].filter((f) => fs.existsSync(f)).reduce((n, f) => n + sizeOf(f), 0);
        const restoreOk = record(kind, 'restore (disk, memory, cpu, devices)', restore.code === 0, {
          seconds: restore.seconds,
          bytes: restoredBytes,
          detail: restore.code === 0 ? `D.raw ${humanBytes(allocatedOf(restored.disk))} allocated, R.raw ${humanBytes(allocatedOf(restored.ram))} allocated` : failure(restore),
        });
        tempLeft(kind, 'restore');
        if (restoreOk) {
          for (const [what, a, b] of [
            ['cmp D.raw os.raw', restored.disk, disk],
            ['cmp R.raw ram.raw', restored.ram, ram],
            ['cmp DEV/nic0 nic0.bin', path.join(restored.dev, 'nic0'), nic],
          ]) {
            const cmp = await timedRun('cmp', [a, b]);
            record(kind, what, cmp.code === 0, { seconds: cmp.seconds, bytes: fs.existsSync(a) ? sizeOf(a) : undefined, detail: cmp.code === 0 ? 'identical' : failure(cmp) });
          }
          const compare = await timedRun('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', restored.disk, disk]);
          record(kind, 'qemu-img compare -f raw -F raw D.raw os.raw', compare.code === 0, { seconds: compare.seconds, detail: failure(compare) });
          let cpuBack;
          try {
            cpuBack = JSON.parse(fs.readFileSync(restored.cpu, 'utf8'));
          } catch (error) {
            cpuBack = error;
          }
          const same = isDeepStrictEqual(cpuBack, cpuJson);
          const sameText = !(cpuBack instanceof Error) && JSON.stringify(cpuBack) === JSON.stringify(cpuJson);
          record(kind, 'C.json deep-equals cpu.json', same, {
            bytes: fs.existsSync(restored.cpu) ? sizeOf(restored.cpu) : undefined,
            detail: cpuBack instanceof Error ? cpuBack.message : `${cpuBack.vcpus?.length} vCPUs${same ? `; keys in the same order: ${sameText ? 'yes' : 'no'}` : ''}`,
          });
        }
      } finally {
        fs.rmSync(out, { recursive: true, force: true });
      }

      const verify = await cli(['snapshot', 'verify', bundle, '--temp-dir', temp]);
      record(kind, 'verify (intact): exit 0', verify.code === 0, { seconds: verify.seconds, detail: verify.code === 0 ? verify.stdout.trim() : failure(verify) });
      tempLeft(kind, 'verify');
      return true;
    };

    // ---- 1. the folder bundle ----
    const folder = path.join(runDir, 's1');
    if (await roundTrip('folder', folder)) {
      for (const member of ['disk.qcow2', 'state.qvms']) {
        const copyParent = path.join(runDir, `damaged-${member.replace('.', '-')}`);
        fs.mkdirSync(copyParent);
        try {
          await run('cp', ['-r', folder, copyParent]);
          const copy = path.join(copyParent, 's1');
          const file = path.join(copy, member);
          const offset = Math.floor(sizeOf(file) / 2);
          const flip = flipByte(file, offset);
          const others = ['disk.qcow2', 'state.qvms', 'snapshot.json'].filter((m) => m !== member).map((m) => path.join(copy, m));
          await verifyDamaged('folder', `s1/${member}`, copy, file, { others, needChunk: member === 'state.qvms', offset, flip });
        } finally {
          fs.rmSync(copyParent, { recursive: true, force: true });
        }
      }
    }
    // Not needed any more: keeps the peak of disk space down.
    fs.rmSync(folder, { recursive: true, force: true });

    // ---- 2. the .tar.zst bundle ----
    const archive = path.join(runDir, 's1.tar.zst');
    if (await roundTrip('.tar.zst', archive)) {
      const copyParent = path.join(runDir, 'damaged-tar-zst');
      fs.mkdirSync(copyParent);
      try {
        const copy = path.join(copyParent, 's1.tar.zst');
        fs.copyFileSync(archive, copy);
        const offset = Math.floor(sizeOf(copy) / 2);
        const flip = flipByte(copy, offset);
        await verifyDamaged('.tar.zst', 's1.tar.zst', copy, copy, { others: [], offset, flip });
      } finally {
        fs.rmSync(copyParent, { recursive: true, force: true });
      }
    }
    fs.rmSync(archive, { force: true });

    // ---- 3. a plain .tar: damage inside a member, named ARCHIVE:MEMBER ----
    const tar = path.join(runDir, 's1.tar');
    const create = await cli(['snapshot', 'create', tar, '--memory', ram, '--cpu', cpu, '--device', `nic0=${nic}`]);
    const stray = fs.readdirSync(runDir).filter((name) => name.startsWith('.'));
    const createDetail = create.code !== 0 ? failure(create) : stray.length ? `left beside it: ${stray.join(', ')}` : '';
    if (record('.tar', 'create (memory, cpu, nic0)', create.code === 0 && stray.length === 0, { seconds: create.seconds, bytes: fs.existsSync(tar) ? sizeOf(tar) : undefined, detail: createDetail })) {
      const verify = await cli(['snapshot', 'verify', tar, '--temp-dir', temp]);
      record('.tar', 'verify (intact): exit 0', verify.code === 0, { seconds: verify.seconds, detail: verify.code === 0 ? verify.stdout.trim() : failure(verify) });
      tempLeft('.tar', 'verify');
      const members = tarMembers(tar);
      const state = members.find((m) => m.name === 's1/state.qvms');
      record('.tar', 'tar headers: s1/state.qvms found', state !== undefined, { detail: members.map((m) => `${m.name} (type ${m.type}, ${m.size} bytes at ${m.dataOffset})`).join(', ') });
      if (state) {
        const copyParent = path.join(runDir, 'damaged-tar');
        fs.mkdirSync(copyParent);
        try {
          const copy = path.join(copyParent, 's1.tar');
          fs.copyFileSync(tar, copy);
          const offset = state.dataOffset + Math.floor(state.size / 2);
          const flip = flipByte(copy, offset);
          await verifyDamaged('.tar', `s1.tar, member s1/state.qvms (byte ${Math.floor(state.size / 2)} of it)`, copy, `${copy}:state.qvms`, {
            others: [`${copy}:snapshot.json`, `${copy}:disk.qcow2`],
            needChunk: true,
            offset,
            flip,
          });
        } finally {
          fs.rmSync(copyParent, { recursive: true, force: true });
        }
      }
    }
    fs.rmSync(tar, { force: true });
  } finally {
    cleanup.release();
  }

  // ---- the report ----
  const allOk = steps.every((s) => s.ok) && damages.every((d) => d.ok) && damages.length === 4;
  if (damages.length !== 4) notes.push(`only ${damages.length} of the 4 damage tests ran (an earlier step failed)`);
  console.log('# Snapshot round trip on real data (issue #8)');
  console.log('');
  printFacts(machineFacts(vmDir, build));
  let makeup = '';
  try {
    const m = JSON.parse(fs.readFileSync(path.join(vmDir, 'meta.json'), 'utf8')).makeup;
    makeup = `, ${((100 * m.zero) / m.pages).toFixed(1)}% zero pages`;
  } catch {
    // made elsewhere: no make-up to show
  }
  console.log(`- RAM: ${ram} (${humanBytes(ramSize)}${makeup}); CPU: ${cpu} (${cpuJson.arch}, ${cpuJson.vcpus.length} vCPUs); disk: ${disk} (${humanBytes(diskSize)}, ${humanBytes(allocatedOf(disk))} allocated)`);
  console.log(`- commands: ${formatCommand('node', ['dist/cli/main.js', 'snapshot', 'create', 'OUT', '--disk', 'os.raw', '--memory', 'ram.raw', '--cpu', 'cpu.json', '--device', 'nic0=nic0.bin'])} (default compression); inspect, restore and verify with \`--temp-dir OUT/tmp\`, checked empty after each`);
  console.log(`- OUT = ${runDir} (removed at the end); seconds = wall clock of the whole process, node start-up included; load average ${loadStart} at start, ${loadAverage()} at end`);
  console.log('');
  console.log('## Round trip');
  console.log('');
  console.log(markdownTable(
    ['bundle', 'step', 'seconds', 'bytes', 'result', 'detail'],
    steps.map((s) => [s.kind, s.step, s.seconds === undefined ? '' : f2(s.seconds), s.bytes === undefined ? '' : `${s.bytes} (${humanBytes(s.bytes)})`, s.ok ? 'pass' : 'FAIL', cell(s.detail, runDir)]),
  ));
  console.log('');
  console.log('## One byte changed (XOR 0xff), then `snapshot verify`');
  console.log('');
  console.log(markdownTable(
    ['bundle', 'file damaged', 'byte offset (old -> new)', 'verify exit', 'verify s', 'first line of stderr', 'chunk / guest range', 'named correctly'],
    damages.map((d) => [
      d.kind,
      d.label,
      `${d.offset} (0x${d.flip.before.toString(16).padStart(2, '0')} -> 0x${d.flip.after.toString(16).padStart(2, '0')})`,
      d.code,
      f2(d.seconds),
      cell(d.first, runDir),
      d.chunkLine ? cell(d.chunkLine.replace(/^qcow2img: [^:]+(:[a-z.]+)?: /, ''), runDir) : '-',
      d.ok ? 'yes' : `NO: ${d.why}`,
    ]),
  ));
  console.log('');
  for (const note of notes) console.log(`- ${note}`);
  console.log(`Result: ${allOk ? 'PASS' : 'FAIL'} (${steps.filter((s) => !s.ok).length + damages.filter((d) => !d.ok).length} checks failed)`);
  return allOk ? 0 : 1;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    killRunningChildren();
    console.error(`snapshot round trip: ${error.stack ?? error.message}`);
    process.exitCode = 1;
  },
);

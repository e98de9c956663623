/**
 * QEMU's image locks, both ways, against a real qemu-system-x86_64 (TCG, paused with -S: the
 * disk is attached and locked as for a running guest): qcow2img refuses what QEMU holds, and
 * QEMU refuses to start on what qcow2img is loading. Also: a block device some other process
 * has open for writing.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshot, load, Qcow2Error } from '../../src/index';
import { loadWith } from '../../src/load/index';
import { attachLoop, type LoopDevice, loopUnavailable } from '../helpers/loop';
import { cliPath, MiB, qemuImg, qemuIo, run, sha256File } from '../helpers/qemu';

const skip = loopUnavailable();

const vmArgs = ['-accel', 'tcg', '-S', '-display', 'none', '-nodefaults', '-no-user-config', '-monitor', 'none', '-serial', 'none'];

/** A paused VM with `drives` attached; resolves once QEMU holds its locks on each. */
async function startVm(...drives: { file: string; format: 'raw' | 'qcow2' }[]): Promise<ChildProcess> {
  const vm = spawn('qemu-system-x86_64', [...vmArgs, ...drives.flatMap(({ file, format }) => ['-drive', `file=${file},format=${format},if=virtio`])], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  vm.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const targets = drives.map(({ file }) => fs.statSync(file));
  for (let tries = 0; tries < 300; tries++) {
    if (vm.exitCode !== null) throw new Error(`qemu-system-x86_64 exited: ${stderr}`);
    if (targets.every((target) => holdsLocks(vm.pid!, target))) return vm;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  vm.kill('SIGKILL');
  throw new Error(`qemu-system-x86_64 took no lock on ${drives.map((d) => d.file).join(', ')}: ${stderr}`);
}

function holdsLocks(pid: number, target: fs.Stats): boolean {
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    const stats = (() => {
      try {
        return fs.statSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        return undefined;
      }
    })();
    if (stats?.dev === target.dev && stats.ino === target.ino && /^lock:/m.test(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'))) return true;
  }
  return false;
}

async function stopVm(vm: ChildProcess): Promise<void> {
  if (vm.exitCode !== null) return;
  const exited = new Promise((resolve) => vm.once('exit', resolve));
  vm.kill('SIGKILL');
  await exited;
}

/** A QEMU started on `disk` while it is busy: its exit status and what it said. */
function qemuStartsOn(disk: string): { status: number | null; stderr: string } {
  const result = spawnSync('qemu-system-x86_64', [...vmArgs, '-drive', `file=${disk},format=raw,if=virtio`], {
    encoding: 'utf8',
    timeout: 5_000,
  });
  return { status: result.status, stderr: result.stderr };
}

function cli(args: string[]) {
  return run('node', [cliPath, ...args]);
}

/** One line naming the file and the VM, and the exit status 1. */
function expectRefusedFor(result: { status: number | null; stderr: string }, file: string, vm: ChildProcess): void {
  expect(result.status).toBe(1);
  const lines = result.stderr.trim().split('\n');
  expect(lines).toHaveLength(1);
  expect(lines[0]).toContain(file);
  expect(lines[0]).toContain(`PID ${vm.pid} (qemu-system-x86_64`);
}

describe.skipIf(skip)('QEMU image locks', () => {
  let dir: string;
  let image: string;
  let bundle: string;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-locks-'));
    image = path.join(dir, 'image.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', image, '16M']);
    qemuIo(image, ['write -P 0x5a 0 3M', 'write -P 0x17 9M 1M']);
    const disk = path.join(dir, 'bundle-disk.raw');
    fs.writeFileSync(disk, Buffer.alloc(16 * MiB, 0x33));
    bundle = path.join(dir, 'bundle');
    await createSnapshot(bundle, { disk });
  });

  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('a VM running on a loop device', () => {
    let loop: LoopDevice;
    let vm: ChildProcess;
    let before: string;

    beforeAll(async () => {
      const file = path.join(dir, 'vm-disk.raw');
      fs.writeFileSync(file, Buffer.alloc(16 * MiB, 0xc3));
      loop = attachLoop(file);
      before = sha256File(loop.device);
      vm = await startVm({ file: loop.device, format: 'raw' });
    });

    afterAll(async () => {
      await stopVm(vm);
      loop.detach();
    });

    it('load is refused before the first byte, naming the VM, even with --force', () => {
      expectRefusedFor(cli(['load', image, loop.device]), loop.device, vm);
      expectRefusedFor(cli(['load', image, loop.device, '--force']), loop.device, vm);
      expect(sha256File(loop.device)).toBe(before);
    });

    it('snapshot restore onto it is refused', () => {
      expectRefusedFor(cli(['snapshot', 'restore', bundle, '--disk', loop.device]), loop.device, vm);
      expect(sha256File(loop.device)).toBe(before);
    });

    it('capture of it is refused, and reads it with --force-share as qemu-img -U does', () => {
      const out = path.join(dir, 'captured.qcow2');
      expectRefusedFor(cli(['capture', loop.device, out]), loop.device, vm);
      expect(fs.existsSync(out)).toBe(false);
      expect(cli(['capture', '-U', loop.device, out]).status).toBe(0);
      expect(run('qemu-img', ['compare', '-U', '-f', 'raw', loop.device, out]).status).toBe(0);
    });

    it('the API says LOCKED with the path', async () => {
      const error = await load(image, loop.device).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect((error as Qcow2Error).code).toBe('LOCKED');
      expect((error as Qcow2Error).path).toBe(loop.device);
    });
  });

  describe('a VM running on image files', () => {
    let vm: ChildProcess;
    let raw: string;
    let rawBefore: string;
    let used: string;

    beforeAll(async () => {
      used = path.join(dir, 'used.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', used, '16M']);
      qemuIo(used, ['write -P 0x44 1M 2M']);
      raw = path.join(dir, 'used.raw');
      fs.writeFileSync(raw, Buffer.alloc(16 * MiB, 0x99));
      rawBefore = sha256File(raw);
      vm = await startVm({ file: used, format: 'qcow2' }, { file: raw, format: 'raw' });
    });

    afterAll(async () => {
      await stopVm(vm);
    });

    it('info, map and check refuse it as qemu-img does, and read it with -U', () => {
      for (const command of ['info', 'map', 'check']) {
        expect(run('qemu-img', [command, used]).status).not.toBe(0);
        expectRefusedFor(cli([command, used]), used, vm);
        expect(run('qemu-img', [command, '-U', used]).status).toBe(0);
        expect(cli([command, '-U', used]).status).toBe(0);
      }
    });

    it('an image over it as a backing file is refused', () => {
      const overlay = path.join(dir, 'overlay.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'used.qcow2', '-F', 'qcow2', overlay, '16M']);
      expectRefusedFor(cli(['load', overlay, path.join(dir, 'from-overlay.raw')]), used, vm);
      expect(fs.existsSync(path.join(dir, 'from-overlay.raw'))).toBe(false);
    });

    it('load over its raw disk is refused, whether replacing it or writing into it', () => {
      expectRefusedFor(cli(['load', image, raw, '--overwrite']), raw, vm);
      expectRefusedFor(cli(['load', image, raw, '--offset', '0']), raw, vm);
      expect(sha256File(raw)).toBe(rawBefore);
    });
  });

  describe('QEMU on a disk qcow2img is loading', () => {
    it('fails to start on a loop device, with its lock error', async () => {
      const file = path.join(dir, 'loading.raw');
      fs.writeFileSync(file, '');
      fs.truncateSync(file, 16 * MiB);
      const loop = attachLoop(file);
      try {
        let during: { status: number | null; stderr: string } | undefined;
        await loadWith(image, loop.device, { verify: true, beforeVerify: () => void (during = qemuStartsOn(loop.device)) });
        expect(during!.status).not.toBe(0);
        expect(during!.stderr).toContain('Failed to get "write" lock');
        // Released at the end: QEMU starts now.
        const vm = await startVm({ file: loop.device, format: 'raw' });
        await stopVm(vm);
      } finally {
        loop.detach();
      }
    });

    it('fails to start on a file being replaced or written in place', async () => {
      const file = path.join(dir, 'loading-file.raw');
      fs.writeFileSync(file, Buffer.alloc(16 * MiB));
      for (const options of [{ overwrite: true }, { offset: 0 }]) {
        let during: { status: number | null; stderr: string } | undefined;
        await loadWith(image, file, { ...options, verify: true, beforeVerify: () => void (during = qemuStartsOn(file)) });
        expect(during!.status).not.toBe(0);
        expect(during!.stderr).toContain('Failed to get "write" lock');
      }
    });
  });

  describe('a block device another process has open for writing', () => {
    it('is refused for load and restore unless --force, naming the process', async () => {
      const file = path.join(dir, 'held.raw');
      fs.writeFileSync(file, '');
      fs.truncateSync(file, 16 * MiB);
      const loop = attachLoop(file);
      const holder = spawn('sh', ['-c', `exec 3<>${loop.device}; echo ready; exec sleep 600`], { stdio: ['ignore', 'pipe', 'ignore'] });
      try {
        await new Promise((resolve) => holder.stdout!.once('data', resolve));
        for (const args of [['load', image, loop.device], ['snapshot', 'restore', bundle, '--disk', loop.device]]) {
          const refused = cli(args);
          expect(refused.status).toBe(1);
          expect(refused.stderr.trim().split('\n')).toHaveLength(1);
          expect(refused.stderr).toContain(`open for writing by PID ${holder.pid} (sleep 600)`);
          expect(refused.stderr).toContain('--force');
        }
        expect(cli(['load', image, loop.device, '--force']).status).toBe(0);
        expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', loop.device, image]).status).toBe(0);
      } finally {
        holder.kill('SIGKILL');
        loop.detach();
      }
    });
  });
});

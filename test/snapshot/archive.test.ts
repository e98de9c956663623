/**
 * Snapshot archives (.tar, .tar.gz, .tar.zst): round trips through each kind,
 * interchange with GNU tar, damage and truncation caught, hostile entries refused.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshot, inspectSnapshot, Qcow2Error, restoreSnapshot, verifySnapshot } from '../../src/index';
import { ChunkReader, entryData, tarEntries, TarWriter } from '../../src/snapshot/tar';
import { sampleCpuState as cpu } from '../helpers/cpu';
import { makeRamDump } from '../helpers/ram';
import { withTmpfs } from '../helpers/tmpfs';
import { qemuImg, writeRaw, mixedRegions } from '../helpers/qemu';

const MiB = 1024 * 1024;
const kinds = ['tar', 'tar.gz', 'tar.zst'] as const;
let dir: string;
let ram: Buffer;
let disk: string;
function tarTool(args: string[], cwd = dir): string {
  return execFileSync('tar', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-archive-'));
  ram = makeRamDump(path.join(dir, 'ram.raw'), 32 * MiB, 7);
  disk = path.join(dir, 'disk.raw');
  writeRaw(disk, 24 * MiB, 'archive-disk', mixedRegions(24 * MiB, 65536));
  fs.writeFileSync(path.join(dir, 'cpu.json'), JSON.stringify(cpu));
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function makeArchive(name: string): Promise<string> {
  const out = path.join(dir, name);
  await createSnapshot(out, { disk, memory: path.join(dir, 'ram.raw'), cpu, devices: [{ name: 'nic0', data: Buffer.from('device state') }] });
  return out;
}

function leftovers(folder: string): string[] {
  return fs.readdirSync(folder).filter((f) => f.startsWith('qcow2img-bundle-') || f.includes('.qcow2img-'));
}

describe('snapshot archives', () => {
  for (const kind of kinds) {
    it(`round-trip disk, memory, CPU and devices bit for bit through a .${kind}`, async () => {
      const archive = await makeArchive(`s-${kind.replace('.', '-')}.${kind}`);
      expect(leftovers(dir)).toEqual([]);
      // GNU tar reads it: one folder named after the archive, the three members in it.
      const flag = kind === 'tar.zst' ? ['--zstd'] : kind === 'tar.gz' ? ['-z'] : [];
      const listing = tarTool([...flag, '-tf', archive]).trim().split('\n');
      const top = path.basename(archive).replace(`.${kind}`, '');
      expect(listing).toEqual([`${top}/`, `${top}/disk.qcow2`, `${top}/state.qvms`, `${top}/snapshot.json`]);

      const temp = fs.mkdtempSync(path.join(dir, 'temp-'));
      const out = fs.mkdtempSync(path.join(dir, 'out-'));
      const result = await restoreSnapshot(archive, {
        disk: path.join(out, 'disk.raw'),
        memory: path.join(out, 'ram.raw'),
        cpu: path.join(out, 'cpu.json'),
        deviceDir: path.join(out, 'devices'),
        tempDir: temp,
      });
      expect(result.memory?.bytes).toBe(ram.length);
      expect(fs.readFileSync(path.join(out, 'ram.raw')).equals(ram)).toBe(true);
      expect(fs.readFileSync(path.join(out, 'disk.raw')).equals(fs.readFileSync(disk))).toBe(true);
      expect(JSON.parse(fs.readFileSync(path.join(out, 'cpu.json'), 'utf8')).vcpus[0].xsave).toBe(cpu.vcpus[0]!.xsave);
      expect(fs.readFileSync(path.join(out, 'devices', 'nic0'), 'utf8')).toBe('device state');
      // The extracted members are gone once restore returns.
      expect(fs.readdirSync(temp)).toEqual([]);

      expect(await verifySnapshot(archive)).toEqual([]);
      const inspection = await inspectSnapshot(archive);
      expect(inspection.bundle).toBe(archive);
      expect(inspection.state?.vcpus).toBe(2);

      // What GNU tar extracts is a folder bundle in its own right, and QEMU trusts its disk.
      const extracted = fs.mkdtempSync(path.join(dir, 'extracted-'));
      tarTool([...flag, '-xf', archive, '-C', extracted]);
      expect(await verifySnapshot(path.join(extracted, top))).toEqual([]);
      expect(qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', path.join(extracted, top, 'disk.qcow2'), disk])).toContain('Images are identical');
      fs.rmSync(extracted, { recursive: true });
      fs.rmSync(out, { recursive: true });
    });
  }

  it('reads a plain .tar in place: nothing is extracted', async () => {
    const archive = path.join(dir, 's-tar.tar');
    const out = fs.mkdtempSync(path.join(dir, 'in-place-'));
    // A temporary folder that does not exist: any extraction would fail.
    const nowhere = path.join(dir, 'no-such-folder');
    await restoreSnapshot(archive, { disk: path.join(out, 'disk.raw'), memory: path.join(out, 'ram.raw'), tempDir: nowhere });
    expect(fs.readFileSync(path.join(out, 'disk.raw')).equals(fs.readFileSync(disk))).toBe(true);
    expect(fs.readFileSync(path.join(out, 'ram.raw')).equals(ram)).toBe(true);
    expect(await verifySnapshot(archive, { tempDir: nowhere })).toEqual([]);
    expect((await inspectSnapshot(archive, { tempDir: nowhere })).state?.pages.data).toBeGreaterThan(0);
    await expect(restoreSnapshot(path.join(dir, 's-tar-zst.tar.zst'), { memory: path.join(out, 'never.raw'), tempDir: nowhere })).rejects.toMatchObject({ code: 'IO_ERROR' });
    fs.rmSync(out, { recursive: true });
  });

  it('restores only the members asked for', async () => {
    const archive = path.join(dir, 's-tar.tar');
    const out = path.join(dir, 'memory-only.raw');
    const result = await restoreSnapshot(archive, { memory: out });
    expect(result.disk).toBeUndefined();
    expect(fs.readFileSync(out).equals(ram)).toBe(true);
    fs.rmSync(out);
  });

  it('verify names the member with a changed byte, and the archive when its stream is damaged', async () => {
    const plain = path.join(dir, 'damaged.tar');
    fs.copyFileSync(path.join(dir, 's-tar.tar'), plain);
    // The disk's data starts after the folder's header and its own: change a byte well inside it.
    const bytes = fs.readFileSync(plain);
    bytes[3 * 512 + 70000] = bytes[3 * 512 + 70000]! ^ 0x40;
    fs.writeFileSync(plain, bytes);
    const problems = await verifySnapshot(plain);
    expect(problems.map((p) => p.file)).toContain(`${plain}:disk.qcow2`);
    await expect(restoreSnapshot(plain, { disk: path.join(dir, 'never.raw') })).rejects.toMatchObject({ code: 'CHECKSUM_MISMATCH' });
    expect(fs.existsSync(path.join(dir, 'never.raw'))).toBe(false);

    const zst = path.join(dir, 'damaged.tar.zst');
    const compressed = fs.readFileSync(path.join(dir, 's-tar-zst.tar.zst'));
    compressed[Math.floor(compressed.length / 2)]! ^= 0x01;
    fs.writeFileSync(zst, compressed);
    const zstProblems = await verifySnapshot(zst);
    expect(zstProblems.length).toBeGreaterThan(0);
    expect(zstProblems[0]!.file.startsWith(zst)).toBe(true);
  });

  for (const kind of kinds) {
    it(`refuses a truncated .${kind} and writes nothing`, async () => {
      const source = path.join(dir, `s-${kind.replace('.', '-')}.${kind}`);
      const bytes = fs.readFileSync(source);
      // Into the disk, into the state file, and (past the longest record padding) into
      // snapshot.json or, compressed, the stream's last frame and trailer.
      for (const length of [bytes.length * 0.3, bytes.length * 0.9, bytes.length - (kind === 'tar' ? 11000 : 12)]) {
        const cut = path.join(dir, `cut.${kind}`);
        fs.writeFileSync(cut, bytes.subarray(0, Math.floor(length)));
        const target = path.join(dir, 'cut-ram.raw');
        const error = await restoreSnapshot(cut, { memory: target }).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(Qcow2Error);
        expect((error as Qcow2Error).message).toContain(cut);
        expect(fs.existsSync(target)).toBe(false);
        expect(leftovers(os.tmpdir()).filter((f) => f.startsWith('qcow2img-bundle-'))).toEqual([]);
      }
    });
  }

  it('refuses links, devices, FIFOs, absolute names, ".." and strangers, extracting nothing outside', async () => {
    const hostile = fs.mkdtempSync(path.join(dir, 'hostile-'));
    const bundle = path.join(hostile, 'b');
    fs.mkdirSync(bundle);
    tarTool(['-xf', path.join(dir, 's-tar.tar'), '-C', bundle, '--strip-components=1']);
    const cases: { name: string; make: () => void; expect: RegExp }[] = [
      { name: 'symlink', make: () => fs.symlinkSync('/etc/passwd', path.join(bundle, 'disk.qcow2.link')), expect: /symbolic link/ },
      { name: 'fifo', make: () => execFileSync('mkfifo', [path.join(bundle, 'pipe')]), expect: /FIFO/ },
      { name: 'stranger', make: () => fs.writeFileSync(path.join(bundle, 'extra.txt'), 'x'), expect: /not part of a snapshot/ },
    ];
    for (const c of cases) {
      c.make();
      const archive = path.join(hostile, `${c.name}.tar`);
      // The odd entry first, so that it is met before anything else is written.
      const odd = fs.readdirSync(bundle).filter((f) => !['disk.qcow2', 'state.qvms', 'snapshot.json'].includes(f));
      tarTool(['-cf', archive, '-C', bundle, ...odd, 'snapshot.json', 'state.qvms', 'disk.qcow2']);
      for (const f of odd) fs.rmSync(path.join(bundle, f));
      const error = await restoreSnapshot(archive, { memory: path.join(hostile, 'ram.raw') }).catch((e: unknown) => e);
      expect(error, c.name).toMatchObject({ code: 'BAD_ARCHIVE' });
      expect((error as Error).message).toMatch(c.expect);
      expect(fs.existsSync(path.join(hostile, 'ram.raw'))).toBe(false);
    }
    const character = path.join(hostile, 'device.tar');
    tarTool(['-cf', character, '-C', '/', 'dev/null']);
    await expect(inspectSnapshot(character)).rejects.toThrow(/character device/);
    const absolute = path.join(hostile, 'absolute.tar');
    tarTool(['-cPf', absolute, path.join(bundle, 'snapshot.json')]);
    await expect(inspectSnapshot(absolute)).rejects.toThrow(/absolute name/);
    const climbing = path.join(hostile, 'climb.tar');
    tarTool(['-cf', climbing, '-C', bundle, '--transform', 's,^,../,', 'snapshot.json']);
    await expect(inspectSnapshot(climbing)).rejects.toThrow(/"\.\."/);
    const twice = path.join(hostile, 'twice.tar');
    tarTool(['-cf', twice, '-C', bundle, 'snapshot.json']);
    tarTool(['-rf', twice, '-C', bundle, 'snapshot.json']);
    await expect(inspectSnapshot(twice)).rejects.toThrow(/appears twice/);
    // Named twice in one run, GNU tar stores the second as a hard link.
    const hardLink = path.join(hostile, 'hardlink.tar');
    tarTool(['-cf', hardLink, '-C', bundle, 'snapshot.json', 'snapshot.json']);
    await expect(inspectSnapshot(hardLink)).rejects.toThrow(/hard link/);
    const none = path.join(hostile, 'none.tar');
    tarTool(['-cf', none, '-C', bundle, 'state.qvms']);
    await expect(inspectSnapshot(none)).rejects.toThrow(/no snapshot\.json/);
    const notTar = path.join(hostile, 'garbage.tar');
    fs.writeFileSync(notTar, Buffer.alloc(4096, 0x41));
    await expect(inspectSnapshot(notTar)).rejects.toThrow(/checksum mismatch/);
    expect(leftovers(os.tmpdir()).filter((f) => f.startsWith('qcow2img-bundle-'))).toEqual([]);
  });

  it('CLI: a hostile .tar.gz is refused in one line, and the process ends (fflate\'s worker is stopped)', () => {
    const hostile = fs.mkdtempSync(path.join(dir, 'hostile-gz-'));
    const bundle = path.join(hostile, 'b');
    fs.mkdirSync(bundle);
    tarTool(['-xf', path.join(dir, 's-tar.tar'), '-C', bundle, '--strip-components=1']);
    fs.writeFileSync(path.join(bundle, 'extra.txt'), 'x');
    // The stranger in the middle of a long stream: gunzip is still at work when it is refused.
    fs.writeFileSync(path.join(bundle, 'state.qvms'), randomBytes(8 << 20));
    fs.writeFileSync(path.join(bundle, 'disk.qcow2'), randomBytes(16 << 20));
    const archive = path.join(hostile, 'stranger.tar.gz');
    tarTool(['-czf', archive, '-C', bundle, 'snapshot.json', 'state.qvms', 'extra.txt', 'disk.qcow2']);
    const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
    const ran = spawnSync(process.execPath, [cli, 'snapshot', 'restore', archive, '--memory', path.join(hostile, 'ram.raw'), '--temp-dir', hostile], { encoding: 'utf8', timeout: 60_000 });
    expect(ran.signal, 'the CLI did not exit by itself').toBeNull();
    expect(ran.status).toBe(1);
    expect(ran.stderr.trim().split('\n')).toHaveLength(1);
    expect(ran.stderr).toMatch(/not part of a snapshot/);
    expect(fs.readdirSync(hostile).sort()).toEqual(['b', 'stranger.tar.gz']);
  });

  it('CLI: a .tar.gz create that fails ends the process (fflate\'s gzip worker is stopped) and leaves nothing', () => {
    const folder = fs.mkdtempSync(path.join(dir, 'failed-gz-'));
    const empty = path.join(folder, 'empty.raw');
    fs.writeFileSync(empty, '');
    const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
    const ran = spawnSync(process.execPath, [cli, 'snapshot', 'create', path.join(folder, 'out.tar.gz'), '--memory', empty], { encoding: 'utf8', timeout: 60_000 });
    expect(ran.signal, 'the CLI did not exit by itself').toBeNull();
    expect(ran.status).toBe(1);
    expect(ran.stderr).toMatch(/RAM dump is empty/);
    expect(fs.readdirSync(folder)).toEqual(['empty.raw']);
  });

  it('an incremental archive whose parent has no disk holds the whole disk', async () => {
    const parent = path.join(dir, 'parent-folder');
    await createSnapshot(parent, { memory: path.join(dir, 'ram.raw') });
    const out = path.join(dir, 'child.tar.zst');
    const disk = path.join(dir, 'child-disk.raw');
    fs.writeFileSync(disk, Buffer.alloc(1 << 20, 3));
    await createSnapshot(out, { disk, memory: path.join(dir, 'ram.raw'), parent });
    const restored = path.join(dir, 'child-restored.raw');
    await restoreSnapshot(out, { disk: restored, tempDir: dir });
    expect(fs.readFileSync(restored).equals(fs.readFileSync(disk))).toBe(true);
    fs.rmSync(disk);
    fs.rmSync(restored);
    fs.rmSync(out);
    expect(leftovers(dir)).toEqual([]);
  });

  it('CLI: create an archive, verify it, restore from it', () => {
    const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
    const archive = path.join(dir, 'cli.tar.zst');
    const created = spawnSync(process.execPath, [cli, 'snapshot', 'create', archive, '--memory', path.join(dir, 'ram.raw'), '--cpu', path.join(dir, 'cpu.json'), '--archive-level', '1'], { encoding: 'utf8' });
    expect(created.status, created.stderr).toBe(0);
    const verified = spawnSync(process.execPath, [cli, 'snapshot', 'verify', archive], { encoding: 'utf8' });
    expect(verified.status, verified.stderr).toBe(0);
    const out = path.join(dir, 'cli-ram.raw');
    const restored = spawnSync(process.execPath, [cli, 'snapshot', 'restore', archive, '--memory', out, '--temp-dir', dir], { encoding: 'utf8' });
    expect(restored.status, restored.stderr).toBe(0);
    expect(fs.readFileSync(out).equals(ram)).toBe(true);
    const truncated = path.join(dir, 'cli-cut.tar.zst');
    fs.writeFileSync(truncated, fs.readFileSync(archive).subarray(0, 1000));
    const failed = spawnSync(process.execPath, [cli, 'snapshot', 'verify', truncated], { encoding: 'utf8' });
    expect(failed.status).toBe(1);
    expect(failed.stderr.trim().split('\n')).toHaveLength(1);
    expect(failed.stderr).toContain(truncated);
  });
});

describe('an archive whose members do not fit in the temporary folder (a 1 MiB tmpfs)', () => {
  it('names the member as ARCHIVE:MEMBER, says it could not be extracted there and why, and leaves nothing behind', async () => {
    const mnt = path.join(dir, 'small-temp');
    await withTmpfs(mnt, '1m', async () => {
      // Random bytes do not compress: the state file is over 1 MiB once extracted.
      const noise = path.join(dir, 'noise.raw');
      fs.writeFileSync(noise, randomBytes(3 * MiB));
      const archive = path.join(dir, 'noise.tar.zst');
      await createSnapshot(archive, { memory: noise });
      const error = await restoreSnapshot(archive, { memory: path.join(dir, 'noise-out.raw'), tempDir: mnt }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect(error).toMatchObject({ code: 'IO_ERROR', path: `${archive}:state.qvms` });
      expect((error as Error).message).toMatch(/cannot extract it into the temporary folder .*no space left/i);
      expect(fs.readdirSync(mnt)).toEqual([]);
    });
  });
});

describe('tar layer', () => {
  it('writes a pax size record for a member over 8 GiB and reads it back', async () => {
    const size = 9 * 1024 * MiB + 123;
    const blocks: Buffer[] = [];
    let headerBytes = 0;
    let dataBytes = 0;
    const zeros = Buffer.alloc(64 * MiB);
    const writer = new TarWriter({
      write: async (data) => {
        // Headers are kept; the body (zeros) is only counted.
        if (dataBytes === 0 && data.length <= 2048 && data !== zeros) {
          blocks.push(Buffer.from(data));
          headerBytes += data.length;
        } else dataBytes += data.length;
      },
    });
    await writer.addFile('big/disk.qcow2', size, async (sink) => {
      for (let left = size; left > 0; left -= Math.min(left, zeros.length)) await sink.write(zeros.subarray(0, Math.min(left, zeros.length)));
    });
    // The body and the padding to a whole block.
    expect(dataBytes).toBe(size + ((512 - (size % 512)) % 512));
    const header = Buffer.concat(blocks);
    expect(header.toString('latin1')).toContain(`size=${size}`);
    // Read back: the header, then the body as zero chunks, then the end blocks.
    async function* chunks(): AsyncGenerator<Buffer> {
      yield header;
      const padded = size + ((512 - (size % 512)) % 512);
      for (let left = padded; left > 0; left -= Math.min(left, zeros.length)) yield zeros.subarray(0, Math.min(left, zeros.length));
      yield Buffer.alloc(1024);
    }
    const reader = new ChunkReader(chunks());
    const entries = [];
    for await (const entry of tarEntries(reader, 'big.tar')) {
      entries.push(entry);
      await entryData(reader, entry.size, 'big.tar');
    }
    expect(entries.map((e) => [e.name, e.size])).toEqual([['big/disk.qcow2', size]]);
  });

  it('GNU tar reads long names through pax records', async () => {
    const archive = path.join(dir, 'long.tar');
    const parts: Buffer[] = [];
    const writer = new TarWriter({ write: async (data) => void parts.push(Buffer.from(data)) });
    const name = `folder/${'n'.repeat(150)}`;
    await writer.addFile(name, 5, (sink) => sink.write(Buffer.from('hello')));
    await writer.finish(parts.reduce((n, p) => n + p.length, 0));
    fs.writeFileSync(archive, Buffer.concat(parts));
    expect(tarTool(['-tf', archive]).trim()).toBe(name);
    expect(Buffer.concat(parts).length % 10240).toBe(0);
  });
});

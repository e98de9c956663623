/**
 * `load` at its edges: zero ranges with an O_DIRECT unit larger than the image's granularity,
 * preallocation at a disk end that is not a whole unit, a file region that must end where the
 * disk ends, failures that must leave nothing behind and name the right file, and native jobs
 * that must be over before the descriptors they use are closed.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { type Image, Qcow2Error, load, open } from '../../src/index';
import { copyImage } from '../../src/load/copy';
import { openTarget } from '../../src/load/target';
import { memoryFilesystem } from '../../src/files';
import { native, PlanKind, planRunFields, ZeroMode } from '../../src/native';
import { parseLayout } from '../helpers/damage';
import { MiB, KiB, cliPath, qemuImg, qemuIo, randomBytes, run } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-load-edges-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

function image(name: string, size: number, writes: readonly string[], extra: readonly string[] = []): string {
  const file = path.join(work, name);
  qemuImg(['create', '-q', '-f', 'qcow2', ...extra, file, String(size)]);
  if (writes.length > 0) qemuIo(file, writes);
  return file;
}

describe('options', () => {
  it('a thread count that is not a whole number from 1 to 64 is INVALID_ARGUMENT naming the target, and nothing is written', async () => {
    const file = image('threads.qcow2', 4 * MiB, ['write -P 0x11 0 64k']);
    for (const threads of [0, 2.5, 100]) {
      const target = path.join(work, `threads-${threads}.raw`);
      const error = await load(file, target, { threads }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect((error as Qcow2Error).code).toBe('INVALID_ARGUMENT');
      expect((error as Qcow2Error).path).toBe(target);
      expect(fs.readdirSync(work).filter((f) => f.includes(`threads-${threads}`))).toEqual([]);
    }
  });
});

describe('the native copy with a 4 KiB O_DIRECT unit', () => {
  for (const [mode, zeroMode] of [['written zeros', ZeroMode.Write], ['punched holes', ZeroMode.PunchHole]] as const) {
    it(`zeroes a long zero run that starts inside a unit, across every 64 MiB task edge (${mode})`, async () => {
      const size = 68 * MiB;
      const source = path.join(work, `source-${zeroMode}.bin`);
      fs.writeFileSync(source, Buffer.alloc(4096, 0xab));
      const target = path.join(work, `target-${zeroMode}.bin`);
      fs.writeFileSync(target, Buffer.alloc(size, 0xff));
      const runs = new Float64Array(2 * planRunFields);
      runs.set([0, 512, PlanKind.Data, 0, 0, 0, 0], 0);
      runs.set([512, size - 512, PlanKind.Zero, 0, 0, 0, 0], planRunFields);
      const sourceFd = fs.openSync(source, 'r');
      const targetFd = fs.openSync(target, 'r+');
      try {
        await native().copy({
          runs,
          sources: [{ fd: sourceFd, base: 0, size: 4096, codec: 0, clusterSize: 512 }],
          targetFd,
          targetTailFd: -1,
          targetBase: 0,
          limitStart: 0,
          limitEnd: size,
          alignment: 4096,
          zeroMode,
          threads: 2,
          windowSize: MiB,
        });
      } finally {
        fs.closeSync(sourceFd);
        fs.closeSync(targetFd);
      }
      const written = fs.readFileSync(target);
      expect(written.length).toBe(size);
      expect(written.subarray(0, 512).every((b) => b === 0xab)).toBe(true);
      const firstNonZero = written.subarray(512).findIndex((b) => b !== 0);
      expect(firstNonZero, `a non-zero byte at ${512 + firstNonZero}`).toBe(-1);
    });
  }
});

describe('preallocation of a new file', () => {
  it('stops at the disk end when the disk is not a whole number of O_DIRECT units', async () => {
    const virtualSize = 4 * MiB + 512;
    const file = image('odd-end.qcow2', virtualSize, [`write -P 0x11 ${4 * MiB} 512`]);
    const img = await open(file);
    const target = path.join(work, 'odd-end.raw');
    const handle = fs.openSync(target, 'w+');
    try {
      fs.ftruncateSync(handle, virtualSize);
      await copyImage(img, { path: target, fd: handle, tailFd: handle, base: 0, alignment: 4096, zeroMode: ZeroMode.Skip, preallocate: true });
    } finally {
      fs.closeSync(handle);
      await img.close();
    }
    expect(fs.statSync(target).size).toBe(virtualSize);
    const bytes = fs.readFileSync(target);
    expect(bytes.subarray(4 * MiB).every((b) => b === 0x11)).toBe(true);
  });

  // On tmpfs fallocate only takes the pages early (and a load stops its jobs for it): only files
  // written with O_DIRECT on a disk filesystem, whose unwritten extents it is for, get it.
  it('is asked for on a disk filesystem, not on tmpfs', async () => {
    const shm = fs.mkdtempSync('/dev/shm/qcow2img-edges-');
    const img = await open(image('prealloc.qcow2', 4 * MiB, ['write -P 0x11 0 64k']));
    try {
      const decide = async (folder: string) => {
        const target = await openTarget(img, path.join(folder, 'prealloc.raw'), {});
        await target.abort();
        return [target.direct, target.preallocate];
      };
      // O_DIRECT on tmpfs needs Linux 6.6; os.tmpdir() is tmpfs on some systems.
      const [direct, preallocate] = await decide(work);
      expect(preallocate).toBe(direct && (await memoryFilesystem(work)) === undefined);
      expect(await decide(shm)).toEqual([expect.any(Boolean), false]);
    } finally {
      await img.close();
      fs.rmSync(shm, { recursive: true, force: true });
    }
  });
});

describe('a file region (--offset) in a new file', () => {
  const disk = () => image('zero-tail.qcow2', 4 * MiB, ['write -P 0x22 0 64k']);

  it('ends at offset + virtual size even when the disk ends in zeros, and verifies', () => {
    const target = path.join(work, 'region.raw');
    const ran = run(process.execPath, [cliPath, 'load', disk(), target, '--offset', String(MiB), '--verify', '--progress=none']);
    expect(ran.status, ran.stderr).toBe(0);
    expect(fs.statSync(target).size).toBe(5 * MiB);
    const bytes = fs.readFileSync(target);
    expect(bytes.subarray(0, MiB).every((b) => b === 0)).toBe(true);
    expect(bytes.subarray(MiB, MiB + 64 * KiB).every((b) => b === 0x22)).toBe(true);
    expect(bytes.subarray(MiB + 64 * KiB).every((b) => b === 0)).toBe(true);
  });

  it('is removed again when the load fails', () => {
    // A compressed cluster whose stream does not decode: the copy fails after the target exists.
    // (Data cut off the end of the image would read as zeros, as QEMU reads it.)
    const broken = image('undecodable.qcow2', 4 * MiB, ['write -c -P 0x33 0 64k']);
    const bytes = fs.readFileSync(broken);
    const compressed = parseLayout(bytes).l2.flatMap((t) => t.entries).find((e) => e.kind === 'compressed')!;
    bytes.fill(0xff, compressed.host, compressed.host + 64);
    fs.writeFileSync(broken, bytes);
    const target = path.join(work, 'failed-region.raw');
    const ran = run(process.execPath, [cliPath, 'load', broken, target, '--offset', '4096', '--progress=none']);
    expect(ran.status).not.toBe(0);
    expect(ran.stderr).toContain(broken);
    expect(fs.existsSync(target)).toBe(false);
  });
});

const mountSkip = process.getuid?.() === 0 ? undefined : 'mounting a small tmpfs needs root';

describe.skipIf(mountSkip !== undefined)('a write that fails (a 1 MiB tmpfs)', () => {
  it('names the target, not the image, with the target offset', () => {
    const full = path.join(work, 'full');
    fs.mkdirSync(full);
    const mounted = run('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', full]);
    if (mounted.status !== 0) throw new Error(`cannot mount a tmpfs on ${full}: ${mounted.stderr.trim()}`);
    try {
      const source = image('three-mib.qcow2', 4 * MiB, []);
      qemuIo(source, [], {});
      const raw = path.join(work, 'three-mib.raw');
      fs.writeFileSync(raw, randomBytes('load-edges/enospc', 3 * MiB));
      qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, source]);
      const target = path.join(full, 'disk.raw');
      const ran = run(process.execPath, [cliPath, 'load', source, target, '--progress=none']);
      expect(ran.status).toBe(1);
      const line = ran.stderr.trim();
      expect(line.split('\n')).toHaveLength(1);
      expect(line).toContain(target);
      expect(line).not.toContain(source);
      expect(line).toMatch(/target offset \d+/);
      expect(fs.readdirSync(full)).toEqual([]);
    } finally {
      run('umount', [full]);
    }
  });
});

describe('native jobs and closed descriptors', () => {
  /** 2 GiB: 256 MiB of data in the first 1 GiB batch; an L2 entry with an unaligned host offset at 1.5 GiB. */
  function badSecondBatch(): string {
    const file = image('bad-second-batch.qcow2', 2048 * MiB, ['write -P 0x5a 0 256M', `write -P 0x66 ${1536 * MiB} 64k`]);
    const header = Buffer.alloc(48);
    const fd = fs.openSync(file, 'r+');
    try {
      fs.readSync(fd, header, 0, 48, 0);
      const l1Offset = Number(header.readBigUInt64BE(40));
      const l1Entry = Buffer.alloc(8);
      fs.readSync(fd, l1Entry, 0, 8, l1Offset + 3 * 8);
      const l2Offset = Number(l1Entry.readBigUInt64BE(0) & 0x00fffffffffffe00n);
      const l2Entry = Buffer.alloc(8);
      fs.readSync(fd, l2Entry, 0, 8, l2Offset);
      l2Entry.writeBigUInt64BE(l2Entry.readBigUInt64BE(0) | 0x200n);
      fs.writeSync(fd, l2Entry, 0, 8, l2Offset);
    } finally {
      fs.closeSync(fd);
    }
    return file;
  }

  it('a load whose next batch cannot be planned has stopped writing when it rejects', async () => {
    const img: Image = await open(badSecondBatch());
    try {
      const target = path.join(work, 'stopped.raw');
      const error = await load(img, target, { threads: 1 }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect((error as Qcow2Error).code).toBe('BAD_L2_ENTRY');
      // New files take the lowest free descriptor numbers, the target's among them: a job still
      // running would write the guest's 0x5a bytes into them.
      const probes = Array.from({ length: 16 }, (_, i) => path.join(work, `probe-${i}`));
      const fds = probes.map((p) => fs.openSync(p, 'w+'));
      try {
        await new Promise((resolve) => setTimeout(resolve, 500));
        for (const p of probes) expect(fs.statSync(p).size, p).toBe(0);
      } finally {
        for (const fd of fds) fs.closeSync(fd);
      }
      expect(fs.existsSync(target)).toBe(false);
    } finally {
      await img.close();
    }
  });

  it('close() during a read: the read completes or says CLOSED, never reads a closed descriptor', async () => {
    const file = image('read-close.qcow2', 64 * MiB, ['write -P 0x77 0 64M']);
    for (let attempt = 0; attempt < 4; attempt++) {
      const img = await open(file);
      const buffer = Buffer.alloc(64 * MiB);
      const reading = img.read(buffer, 0).then(
        (n) => ({ n }),
        (e: unknown) => ({ error: e }),
      );
      // Let the read get this far before closing: 0, 1, 2, 3 turns of the event loop.
      for (let i = 0; i < attempt; i++) await new Promise((resolve) => setImmediate(resolve));
      await img.close();
      const outcome = await reading;
      if ('n' in outcome) {
        expect(outcome.n).toBe(64 * MiB);
        expect(buffer.every((b) => b === 0x77)).toBe(true);
      } else {
        expect(outcome.error).toBeInstanceOf(Qcow2Error);
        expect((outcome.error as Qcow2Error).code).toBe('CLOSED');
      }
    }
  });
});

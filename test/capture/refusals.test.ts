/**
 * `capture` refuses, before writing anything, what would make an image QEMU cannot use or would
 * destroy the user's data, and stores backing names QEMU resolves to the right file.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { capture, Qcow2Error } from '../../src/index';
import { noise } from '../helpers/damage';

const KiB = 1024;
const MiB = 1024 * KiB;
const work = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-capture-refusals-')));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

function qemuImg(args: readonly string[], cwd?: string): { status: number | null; stdout: string; stderr: string } {
  const ran = spawnSync('qemu-img', args, { encoding: 'utf8', ...(cwd ? { cwd } : {}) });
  if (ran.error) throw ran.error;
  return { status: ran.status, stdout: ran.stdout, stderr: ran.stderr };
}

/** A 1 MiB source and an older version of it that differs in its second half. */
/** A copy of `source` as base.raw in `folder` (made with its parents): a base whose name is long. */
function copyInto(folder: string, source: string): string {
  fs.mkdirSync(folder, { recursive: true });
  const base = path.join(folder, 'base.raw');
  fs.copyFileSync(source, base);
  return base;
}

function sourceAndBase(name: string): { source: string; base: string } {
  const dir = path.join(work, name);
  fs.mkdirSync(dir, { recursive: true });
  const bytes = noise(`refusals/${name}`, MiB);
  const source = path.join(dir, 'source.raw');
  fs.writeFileSync(source, bytes);
  const older = Buffer.from(bytes);
  noise(`refusals/${name}/old`, MiB / 2).copy(older, MiB / 2);
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, older);
  return { source, base };
}

async function refusal(promise: Promise<unknown>): Promise<Qcow2Error> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(Qcow2Error);
  return error as Qcow2Error;
}

describe('capture refuses before writing', () => {
  it('an output that is its own backing file (with overwrite), leaving the base as it was', async () => {
    const { source } = sourceAndBase('self');
    const self = path.join(work, 'self', 'self.qcow2');
    expect(qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', source, self]).status).toBe(0);
    const before = fs.readFileSync(self);
    const error = await refusal(capture(source, self, { backing: self, overwrite: true }));
    expect(error.code).toBe('TARGET_IS_SOURCE');
    expect(error.path).toBe(self);
    expect(fs.readFileSync(self).equals(before)).toBe(true);
  });

  it('an output that is a file further down its qcow2 base’s chain', async () => {
    const { source, base } = sourceAndBase('chain');
    const lower = path.join(work, 'chain', 'lower.qcow2');
    const upper = path.join(work, 'chain', 'upper.qcow2');
    expect(qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', base, lower]).status).toBe(0);
    expect(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'lower.qcow2', '-F', 'qcow2', upper]).status).toBe(0);
    const error = await refusal(capture(source, lower, { backing: upper, backingFormat: 'qcow2', overwrite: true }));
    expect(error.code).toBe('TARGET_IS_SOURCE');
  });

  it('a disk whose L1 table would be larger than QEMU opens (129 GiB in 512-byte clusters)', async () => {
    const big = path.join(work, 'big.raw');
    fs.writeFileSync(big, '');
    fs.truncateSync(big, 129 * 2 ** 30);
    const out = path.join(work, 'big.qcow2');
    const error = await refusal(capture(big, out, { clusterSize: 512 }));
    expect(error.code).toBe('INVALID_ARGUMENT');
    expect(error.message).toMatch(/L1 table of \d+ entries, more than QEMU opens/);
    expect(fs.readdirSync(work).filter((f) => f.includes('big.qcow2'))).toEqual([]);
  });

  it('a backing name too long for the header cluster', async () => {
    const { source } = sourceAndBase('long');
    const deep = path.join(work, 'long', 'x'.repeat(200), 'y'.repeat(200));
    const base = copyInto(deep, source);
    const error = await refusal(capture(source, path.join(work, 'long', 'out.qcow2'), { backing: base, clusterSize: 512 }));
    expect(error.code).toBe('INVALID_ARGUMENT');
    expect(error.message).toMatch(/does not fit in a 512-byte header cluster/);
    expect(fs.readdirSync(path.join(work, 'long')).filter((f) => f.includes('out.qcow2'))).toEqual([]);
  });

  it('a backing name that fits a zlib header but not a zstd one (8 bytes longer) is refused for zstd', async () => {
    const { source } = sourceAndBase('zstd-long');
    // 380 bytes relative to the output's folder: room for it beside a 104-byte header, not a 112-byte one.
    const deep = path.join(work, 'zstd-long', 'a'.repeat(200), 'b'.repeat(170));
    const base = copyInto(deep, source);
    const zlibOut = path.join(work, 'zstd-long', 'zlib.qcow2');
    await capture(source, zlibOut, { backing: base, backingFormat: 'raw', clusterSize: 512, compress: 'zlib' });
    const compared = qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', source, zlibOut]);
    expect(compared.stdout + compared.stderr).toContain('Images are identical');
    const zstdOut = path.join(work, 'zstd-long', 'zstd.qcow2');
    const error = await refusal(capture(source, zstdOut, { backing: base, backingFormat: 'raw', clusterSize: 512, compress: 'zstd' }));
    expect(error.code).toBe('INVALID_ARGUMENT');
    expect(error.message).toMatch(/does not fit in a 512-byte header cluster/);
  });

  it('a thread count that is not a whole number from 1 to 64', async () => {
    const { source } = sourceAndBase('threads');
    const out = path.join(work, 'threads', 'out.qcow2');
    for (const threads of [0, 1.5, 65, -1]) {
      const error = await refusal(capture(source, out, { threads }));
      expect(error.code, String(threads)).toBe('INVALID_ARGUMENT');
      expect(error.path).toBe(out);
    }
  });

  it('a backing file it cannot read: one error naming it, and no descriptor left open', async () => {
    const { source } = sourceAndBase('unreadable');
    const folder = path.join(work, 'unreadable', 'a-folder');
    fs.mkdirSync(folder);
    const open = () => fs.readdirSync('/proc/self/fd').length;
    const before = open();
    for (let i = 0; i < 5; i++) {
      const error = await refusal(capture(source, path.join(work, 'unreadable', 'out.qcow2'), { backing: folder }));
      expect(error.path).toBe(folder);
    }
    expect(open()).toBe(before);
  });
});

describe('backing names QEMU resolves', () => {
  it('an output reached through a symlinked folder', async () => {
    const { source, base } = sourceAndBase('linked');
    const real = path.join(work, 'linked', 'out', 'sub');
    fs.mkdirSync(real, { recursive: true });
    const link = path.join(work, 'linked', 'lnk');
    fs.symlinkSync(real, link);
    const out = path.join(link, 'o.qcow2');
    await capture(source, out, { backing: base, backingFormat: 'raw' });
    for (const name of [out, path.join(real, 'o.qcow2')]) {
      const compared = qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', source, name]);
      expect(compared.stdout + compared.stderr, name).toContain('Images are identical');
    }
  });

  it('a backing file whose name has a ":" in its first part', async () => {
    const { source, base } = sourceAndBase('colon');
    const colon = path.join(work, 'colon', 'b:x.raw');
    fs.renameSync(base, colon);
    const out = path.join(work, 'colon', 'o.qcow2');
    await capture(source, out, { backing: colon, backingFormat: 'raw' });
    const compared = qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', source, out]);
    expect(compared.stdout + compared.stderr).toContain('Images are identical');
  });
});

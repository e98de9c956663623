/**
 * SIGTERM during `snapshot create` and `snapshot restore`: the command stops at its next step,
 * exits 130 with one line on stderr, and leaves nothing behind (no temporary bundle, state
 * file, extracted archive member or partial RAM dump).
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cliPath as cli } from '../helpers/qemu';
import { interruptedCli } from '../helpers/signals';

const MiB = 1024 * 1024;
let dir: string;
/** 64 MiB: one native batch. */
let ram: string;
/** 192 MiB: three batches, so a create signalled during the first has more to stop. */
let bigRam: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-snapshot-signals-'));
  ram = path.join(dir, 'ram.raw');
  // Incompressible pages: slow to compress at deflate's highest level, slow to gunzip.
  fs.writeFileSync(ram, randomBytes(64 * MiB));
  bigRam = path.join(dir, 'big.raw');
  fs.writeFileSync(bigRam, Buffer.concat([fs.readFileSync(ram), randomBytes(128 * MiB)]));
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('SIGTERM during snapshot commands', () => {
  it('create: exit 130, and no temporary bundle is left', async () => {
    const outDir = path.join(dir, 'create');
    fs.mkdirSync(outDir);
    const out = path.join(outDir, 'snap');
    const ran = await interruptedCli(['snapshot', 'create', out, '--memory', bigRam, '--compress', 'deflate', '--level', '12'], () => fs.readdirSync(outDir).length > 0);
    expect(ran.status, ran.stderr).toBe(130);
    expect(ran.stderr.trim().split('\n')).toHaveLength(1);
    expect(ran.stderr).toContain(`${out}: cancelled`);
    expect(fs.readdirSync(outDir)).toEqual([]);
  });

  it('restore from a .tar.gz: exit 130, and neither the extracted members nor a RAM dump are left', async () => {
    // A folder bundle packed by GNU tar and gzip: quicker to make than through fflate.
    const bundle = path.join(dir, 'snap');
    const made = spawnSync(process.execPath, [cli, 'snapshot', 'create', bundle, '--memory', ram, '--compress', 'none'], { encoding: 'utf8' });
    expect(made.status, made.stderr).toBe(0);
    const archive = path.join(dir, 'snap.tar.gz');
    const packed = spawnSync('tar', ['-czf', archive, '-C', dir, 'snap'], { encoding: 'utf8' });
    expect(packed.status, packed.stderr).toBe(0);
    const tempDir = path.join(dir, 'extract');
    const outDir = path.join(dir, 'restored');
    fs.mkdirSync(tempDir);
    fs.mkdirSync(outDir);
    const ran = await interruptedCli(['snapshot', 'restore', archive, '--memory', path.join(outDir, 'ram.raw'), '--temp-dir', tempDir], () => fs.readdirSync(tempDir).length > 0);
    expect(ran.status, ran.stderr).toBe(130);
    expect(ran.stderr).toContain(`${archive}: cancelled`);
    expect(fs.readdirSync(tempDir)).toEqual([]);
    expect(fs.readdirSync(outDir)).toEqual([]);
  });
});

/**
 * qemu-img's own words: `info`, `map` and `check --output=json` print exactly what qemu-img
 * 7.2 prints, byte for byte (QDict key order, 4-space indent, map's own lines), on every fixture
 * the suite builds, backing chains, LUKS and AES images, snapshots, odd file names and a
 * corrupt image; -f qcow2 is accepted and -f raw refused in one line.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { catalog, cliPath, makeCorruptRefcountImage, prepare, repoRoot, run } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-qemu-output-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

beforeAll(() => {
  const tsc = run(path.join(repoRoot, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.build.json'], { cwd: repoRoot });
  if (tsc.status !== 0) throw new Error(`tsc failed:\n${tsc.stdout}${tsc.stderr}`);
}, 300_000);

/** qemu-img and qcow2img with the same arguments, in the same folder. */
function both(args: readonly string[], cwd: string) {
  return {
    qemu: spawnSync('qemu-img', args, { cwd, encoding: 'utf8' }),
    ours: spawnSync(process.execPath, [cliPath, ...args], { cwd, encoding: 'utf8' }),
  };
}

/**
 * The same stdout and exit status; stderr too where asked (elsewhere each may warn in its own
 * words: our corrupt-bit warning, qemu-img's PBKDF2 timing note).
 */
function expectSame(args: readonly string[], cwd: string, what = args.join(' '), sameStderr = false): void {
  const { qemu, ours } = both(args, cwd);
  expect(qemu.status, `qemu-img ${what}: ${qemu.stderr}`).not.toBe(null);
  if (sameStderr) expect(ours.stderr, `qcow2img ${what}: stderr`).toBe(qemu.stderr);
  expect(ours.stdout, `qcow2img ${what}: stdout`).toBe(qemu.stdout);
  expect(ours.status, `qcow2img ${what}: exit status`).toBe(qemu.status);
}

describe('--output=json on every fixture, byte for byte', () => {
  for (const spec of catalog) {
    it(spec.name, () => {
      const fixture = prepare(spec);
      const name = path.basename(fixture.image);
      expectSame(['info', '--output=json', name], fixture.dir);
      expectSame(['info', '--output=json', '--backing-chain', '-f', 'qcow2', name], fixture.dir);
      expectSame(['map', '--output=json', name], fixture.dir);
      // check of a dirty image exits 3 and of a corrupt-bit one 0: the same as qemu-img either way.
      expectSame(['check', '--output=json', name], fixture.dir);
      expectSame(['info', '--output', 'human', '-f', 'qcow2', name], fixture.dir);
    });
  }
});

describe('--output=json on images the catalog lacks', () => {
  it('LUKS and AES encrypted images: the encrypt block', () => {
    const secret = ['--object', 'secret,id=sec0,data=abc'];
    const luks = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10';
    const images: Record<string, string> = {
      'luks-essiv.qcow2': `${luks},encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512`,
      'aes.qcow2': 'encrypt.format=aes,encrypt.key-secret=sec0',
    };
    for (const [name, options] of Object.entries(images)) {
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...secret, '-o', options, name, '1M'], { cwd: work });
      expectSame(['info', '--output=json', name], work);
    }
  }, 120_000);

  it('file names with quotes, backslashes, control characters and non-ASCII letters', () => {
    for (const name of ['quote"back\\slash.qcow2', 'tab\tnew.qcow2', 'ünïcödé-😀.qcow2']) {
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', name, '1M'], { cwd: work });
      expectSame(['info', '--output=json', name], work, `info of ${JSON.stringify(name)}`);
    }
  });

  it('a chain named from another folder, with snapshots and a raw base', () => {
    const folder = path.join(work, 'chain');
    fs.mkdirSync(folder);
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', path.join(folder, 'base.raw'), '4M']);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', path.join(folder, 'top.qcow2')]);
    execFileSync('qemu-io', ['-c', 'write -P 7 0 1M', path.join(folder, 'top.qcow2')], { stdio: 'ignore' });
    execFileSync('qemu-img', ['snapshot', '-c', 'first', path.join(folder, 'top.qcow2')]);
    expectSame(['info', '--output=json', '--backing-chain', 'chain/top.qcow2'], work);
    expectSame(['map', '--output=json', 'chain/top.qcow2'], work);
  });

  it('a corrupt image: the same JSON, the same problems on stderr, exit 2', () => {
    const image = path.join(work, 'corrupt.qcow2');
    makeCorruptRefcountImage(image);
    expectSame(['check', '--output=json', image], work, 'check --output=json of a corrupt image', true);
    const quiet = both(['check', '-q', image], work);
    expect(quiet.ours.status).toBe(2);
    expect(quiet.ours.stdout).toBe(quiet.qemu.stdout);
  });
});

describe('-f and --output: refusals in one line', () => {
  it('-f raw, an unknown --output, --json with --output', () => {
    const image = path.join(work, 'plain.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1M']);
    for (const args of [
      ['info', '-f', 'raw', image],
      ['map', '-f', 'raw', image],
      ['check', '-f', 'vmdk', image],
      ['info', '--output=yaml', image],
      ['map', '--output=json', '--json', image],
    ]) {
      const ran = spawnSync(process.execPath, [cliPath, ...args], { encoding: 'utf8' });
      expect(ran.status, args.join(' ')).toBe(1);
      expect(ran.stdout).toBe('');
      const lines = ran.stderr.trim().split('\n');
      expect(lines, ran.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(/^qcow2img: .*\(see qcow2img (info|map|check) --help\)$/);
    }
  });
});

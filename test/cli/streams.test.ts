/**
 * `-` is a stream, never a file name: `load IMAGE -` writes the raw disk to stdout (checked
 * byte for byte against qemu-img convert -O raw, through a pipe into sha256sum), `capture -`
 * reads a raw disk from a pipe (checked with qemu-img compare and qemu-img check), and where a
 * command needs random access (a qcow2 image read or written) `-` is refused in words.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cliPath } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-streams-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));
const image = path.join(work, 'disk.qcow2');
const raw = path.join(work, 'disk.raw');
const cli = `${JSON.stringify(process.execPath)} ${JSON.stringify(cliPath)}`;

function sh(script: string) {
  return spawnSync('bash', ['-o', 'pipefail', '-c', script], { cwd: work, encoding: 'utf8' });
}

beforeAll(() => {
  // Data, zero clusters, compressed clusters and unallocated space past a backing file's end: every read path.
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(work, 'base.qcow2'), '40M']);
  execFileSync('qemu-io', ['-c', 'write -P 7 1M 3M', '-c', 'write -P 9 30M 100k', path.join(work, 'base.qcow2')], { stdio: 'ignore' });
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', image, '48M'], { cwd: work });
  execFileSync('qemu-io', ['-c', 'write -P 5 2M 64k', '-c', 'write -z 1M 128k', '-c', 'write -c -P 11 40M 1M', '-c', 'write -P 1 50331136 512', image], { stdio: 'ignore' });
  execFileSync('qemu-img', ['convert', '-O', 'raw', image, raw]);
});

describe('load IMAGE - (stdout)', () => {
  it('writes exactly the bytes of qemu-img convert -O raw, through a pipe', () => {
    const expected = sh(`sha256sum < ${JSON.stringify(raw)}`).stdout.split(' ')[0];
    const ran = sh(`${cli} load disk.qcow2 - | sha256sum`);
    expect(ran.status, ran.stderr).toBe(0);
    expect(ran.stdout.split(' ')[0]).toBe(expected);
    expect(ran.stderr).toMatch(/^qcow2img: loaded 48 MiB to stdout in /);
    expect(fs.existsSync(path.join(work, '-'))).toBe(false);
  });

  it('refuses the options that need a file target', () => {
    for (const [option, word] of [['--offset=1M', '--offset'], ['--partition=1', '--partition'], ['--verify', '--verify'], ['--json', '--json']] as const) {
      const ran = sh(`${cli} load disk.qcow2 - ${option} | cat`);
      expect(ran.status).toBe(1);
      expect(ran.stderr.trim().split('\n')).toEqual([`qcow2img: ${word} cannot be used with TARGET - (stdout carries the disk) (see qcow2img load --help)`]);
    }
  });
});

describe('capture - (stdin)', () => {
  it('a pipe: qemu-img compare finds the same disk, qemu-img check finds no errors, zero clusters are left out', () => {
    const ran = sh(`cat disk.raw | ${cli} capture - piped.qcow2`);
    expect(ran.status, ran.stderr).toBe(0);
    expect(execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, path.join(work, 'piped.qcow2')], { encoding: 'utf8' })).toMatch(/identical/);
    expect(spawnSync('qemu-img', ['check', path.join(work, 'piped.qcow2')]).status).toBe(0);
    // 3M + 64k + 100k + 1M + 512 of data: far less than 48 MiB of file.
    expect(fs.statSync(path.join(work, 'piped.qcow2')).size).toBeLessThan(6 * 2 ** 20);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', path.join(work, 'piped.qcow2')], { encoding: 'utf8' })) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(48 * 2 ** 20);
    expect(fs.existsSync(path.join(work, '-'))).toBe(false);
  });

  it('a length that is no whole cluster, with --size, compressed, in 4 KiB clusters', () => {
    sh(`head -c 5000000 disk.raw > part.raw`);
    const ran = sh(`cat part.raw | ${cli} capture --size 5000000 --compress zstd --cluster-size 4k - part.qcow2`);
    expect(ran.status, ran.stderr).toBe(0);
    // QEMU sees the raw file in whole sectors: qemu-img compare of two 5000192-byte disks.
    sh('cp part.raw part-sectors.raw && truncate -s 5000192 part-sectors.raw');
    expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', path.join(work, 'part-sectors.raw'), path.join(work, 'part.qcow2')]).status).toBe(0);
    expect(spawnSync('qemu-img', ['check', path.join(work, 'part.qcow2')]).status).toBe(0);
  });

  it('a redirected file is read as a file', () => {
    const ran = sh(`${cli} capture -q - redirected.qcow2 < disk.raw`);
    expect(ran.status, ran.stderr).toBe(0);
    expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, path.join(work, 'redirected.qcow2')]).status).toBe(0);
  });

  it('a stream shorter or longer than --size, or empty, is refused and leaves nothing', () => {
    const short = sh(`cat disk.raw | ${cli} capture --size 64M - short.qcow2`);
    expect(short.status).toBe(1);
    expect(short.stderr).toBe('qcow2img: /dev/stdin: the source stream ended after 50331648 bytes, before the 67108864 bytes --size (size) gives\n');
    const long = sh(`cat disk.raw | ${cli} capture --size 16M - long.qcow2`);
    expect(long.status).toBe(1);
    expect(long.stderr).toBe('qcow2img: /dev/stdin: the source stream holds more than the 16777216 bytes --size (size) gives\n');
    const empty = sh(`true | ${cli} capture - empty.qcow2`);
    expect(empty.stderr).toBe('qcow2img: /dev/stdin: the source stream is empty: no disk to capture\n');
    expect(fs.readdirSync(work).filter((name) => /short|long|empty/.test(name))).toEqual([]);
  });
});

describe('- where a command needs random access', () => {
  const cases: [string, string][] = [
    ['info -', 'qcow2img: -: a qcow2 image cannot be read from stdin: reading one needs random access; save it to a file first (see qcow2img info --help)'],
    ['map -', 'qcow2img: -: a qcow2 image cannot be read from stdin: reading one needs random access; save it to a file first (see qcow2img map --help)'],
    ['check -', 'qcow2img: -: a qcow2 image cannot be read from stdin: reading one needs random access; save it to a file first (see qcow2img check --help)'],
    ['load - out.raw', 'qcow2img: -: a qcow2 image cannot be read from stdin: reading one needs random access; save it to a file first (see qcow2img load --help)'],
    ['capture disk.raw -', 'qcow2img: -: a qcow2 image cannot be written to stdout: it is written out of order; name a file (see qcow2img capture --help)'],
    ['snapshot inspect -', 'qcow2img: -: a snapshot bundle cannot be read from stdin or written to stdout; name a folder or an archive file (see qcow2img snapshot inspect --help)'],
  ];
  for (const [args, line] of cases) {
    it(args, () => {
      const ran = sh(`${cli} ${args} < disk.qcow2 | cat`);
      expect(ran.status).toBe(1);
      expect(ran.stderr).toBe(`${line}\n`);
      expect(fs.existsSync(path.join(work, '-'))).toBe(false);
      expect(fs.existsSync(path.join(work, 'out.raw'))).toBe(false);
    });
  }
});

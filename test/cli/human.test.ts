/**
 * The CLI's human output against qemu-img's, text for text: `info` (sizes as QEMU's size_to_str
 * prints them, backing paths, snapshot tables), `check` (summary on stdout, problems on stderr,
 * percentages as C's printf rounds them), and a reader that goes away mid-output.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { percent } from '../../src/cli/format';
import { cliPath, makeCorruptRefcountImage } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-cli-human-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

function both(args: readonly string[], cwd: string): { qemu: ReturnType<typeof spawnSync>; ours: ReturnType<typeof spawnSync> } {
  return {
    qemu: spawnSync('qemu-img', args, { cwd, encoding: 'utf8' }),
    ours: spawnSync(process.execPath, [cliPath, ...args], { cwd, encoding: 'utf8' }),
  };
}

describe('info', () => {
  // 1000 KiB prints as 0.977 MiB; 100.5 KiB is an exact tie at three digits (C rounds it to even).
  for (const size of [512, 1024000, 102912, 999 * 1024, 1023 * 1024, 5 * 2 ** 30 + 512, 2 ** 40]) {
    it(`a ${size}-byte disk reads as qemu-img prints it`, () => {
      const image = path.join(work, `size-${size}.qcow2`);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
      const { qemu, ours } = both(['info', path.basename(image)], work);
      expect(ours.status).toBe(0);
      expect(ours.stdout).toBe(qemu.stdout);
    });
  }

  it('an overlay named from another folder: backing file with its actual path, the chain, snapshots', () => {
    const folder = path.join(work, 'chain');
    fs.mkdirSync(folder);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(folder, 'base.qcow2'), '64M']);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path.join(folder, 'top.qcow2')]);
    execFileSync('qemu-io', ['-c', 'write -P 7 0 1M', path.join(folder, 'top.qcow2')], { stdio: 'ignore' });
    execFileSync('qemu-img', ['snapshot', '-c', 'a-rather-long-snapshot-name', path.join(folder, 'top.qcow2')]);
    execFileSync('qemu-img', ['snapshot', '-c', 's2', path.join(folder, 'top.qcow2')]);
    for (const args of [['info', 'chain/top.qcow2'], ['info', '--backing-chain', 'chain/top.qcow2'], ['info', '--backing-chain', path.join(folder, 'top.qcow2')]]) {
      const { qemu, ours } = both(args, work);
      expect(ours.status, args.join(' ')).toBe(0);
      expect(ours.stdout, args.join(' ')).toBe(qemu.stdout);
    }
  });
});

describe('check', () => {
  it('a corrupt image: the same stdout, the same problems on stderr, the same exit status', () => {
    const image = path.join(work, 'corrupt.qcow2');
    makeCorruptRefcountImage(image);
    const { qemu, ours } = both(['check', image], work);
    expect(qemu.status).toBe(2);
    expect(ours.status).toBe(qemu.status);
    expect(ours.stdout).toBe(qemu.stdout);
    expect(ours.stderr).toBe(qemu.stderr);
  });

  it('percentages round as C’s printf("%0.2f") does, exact ties to even', () => {
    const pairs: [number, number][] = [];
    for (let d = 1; d <= 4000; d += 37) for (let n = 0; n <= d; n += Math.max(1, Math.floor(d / 23))) pairs.push([n, d]);
    pairs.push([1, 4000], [1, 8], [3, 8], [5, 2000], [1, 3], [2, 3]);
    const source = path.join(work, 'percent.c');
    fs.writeFileSync(
      source,
      `#include <stdio.h>\nint main(void){long n,d;while(scanf("%ld %ld",&n,&d)==2)printf("%0.2f\\n",n*100.0/d);return 0;}\n`,
    );
    execFileSync('cc', ['-o', path.join(work, 'percent'), source]);
    const c = execFileSync(path.join(work, 'percent'), { input: pairs.map(([n, d]) => `${n} ${d}`).join('\n'), encoding: 'utf8' }).trim().split('\n');
    const ours = pairs.map(([n, d]) => percent(n, d));
    const differing = pairs.filter((_, i) => ours[i] !== c[i]);
    expect(differing).toEqual([]);
  });
});

describe('a reader that goes away', () => {
  it('`map | head` stops quietly: no stack trace', () => {
    const image = path.join(work, 'many-runs.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1G']);
    const writes = Array.from({ length: 3000 }, (_, i) => `write -P 1 ${i * 256 * 1024} 4k`).join('\n');
    execFileSync('qemu-io', [image], { input: writes, stdio: ['pipe', 'ignore', 'ignore'] });
    const ran = spawnSync('bash', ['-c', `node ${JSON.stringify(cliPath)} map ${JSON.stringify(image)} | head -1 >/dev/null; echo "\${PIPESTATUS[0]}"`], { encoding: 'utf8' });
    expect(ran.stderr).toBe('');
    expect(ran.stdout.trim()).toBe('0');
  });
});

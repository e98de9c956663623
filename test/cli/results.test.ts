/**
 * What load, capture and snapshot create print: JSON only with --json (load and capture used to
 * accept it and print nothing), a summary line otherwise, nothing with -q; snapshot create
 * --overwrite and one codec name (zlib, "deflate" accepted); the progress bar on a terminal
 * (a pseudo-terminal from script(1)) fits its width and is cleared, and is off elsewhere.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cliPath } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-results-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));
const image = path.join(work, 'disk.qcow2');

function cli(args: readonly string[]) {
  return spawnSync(process.execPath, [cliPath, ...args], { encoding: 'utf8' });
}

beforeAll(() => {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '4M']);
  execFileSync('qemu-io', ['-c', 'write -P 3 0 1M', image], { stdio: 'ignore' });
});

describe('--json, -q and the summary line', () => {
  it('load', () => {
    const target = path.join(work, 'load.raw');
    const json = cli(['load', image, target, '--json']);
    expect(json.status, json.stderr).toBe(0);
    expect(json.stderr).toBe('');
    const result = JSON.parse(json.stdout) as { virtualSize: number; target: string };
    expect(result.virtualSize).toBe(4 * 2 ** 20);
    const quiet = cli(['load', image, target, '--overwrite', '-q']);
    expect([quiet.status, quiet.stdout, quiet.stderr]).toEqual([0, '', '']);
    const plain = cli(['load', image, target, '--overwrite']);
    expect(plain.stdout).toBe('');
    expect(plain.stderr).toMatch(/^qcow2img: loaded 4 MiB into .* in [\d.]+ s/);
  });

  it('capture', () => {
    const raw = path.join(work, 'capture.raw');
    fs.writeFileSync(raw, Buffer.alloc(2 ** 20, 7));
    const json = cli(['capture', raw, path.join(work, 'captured.qcow2'), '--json', '--compress', 'deflate']);
    expect(json.status, json.stderr).toBe(0);
    expect((JSON.parse(json.stdout) as { virtualSize: number }).virtualSize).toBe(2 ** 20);
    const quiet = cli(['capture', raw, path.join(work, 'captured.qcow2'), '--overwrite', '-q', '--compress', 'zlib']);
    expect([quiet.status, quiet.stdout, quiet.stderr]).toEqual([0, '', '']);
    expect(cli(['capture', raw, path.join(work, 'x.qcow2'), '--progress=loud']).status).toBe(1);
  });

  it('snapshot create: JSON only with --json; --overwrite replaces a snapshot, and nothing else', () => {
    const ram = path.join(work, 'ram.raw');
    fs.writeFileSync(ram, Buffer.alloc(2 ** 20, 1));
    const out = path.join(work, 'snap');
    const first = cli(['snapshot', 'create', out, '--memory', ram, '--compress', 'zlib']);
    expect(first.status, first.stderr).toBe(0);
    expect(first.stdout).toBe('');
    expect(first.stderr).toMatch(/^qcow2img: snapshot [0-9a-f-]+ written to /);
    const refused = cli(['snapshot', 'create', out, '--memory', ram]);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toContain('--overwrite');
    const firstId = (JSON.parse(fs.readFileSync(path.join(out, 'snapshot.json'), 'utf8')) as { id: string }).id;
    const second = cli(['snapshot', 'create', out, '--memory', ram, '--overwrite', '--json', '--compress', 'deflate']);
    expect(second.status, second.stderr).toBe(0);
    const metadata = JSON.parse(second.stdout) as { id: string };
    expect(metadata.id).not.toBe(firstId);
    expect((JSON.parse(fs.readFileSync(path.join(out, 'snapshot.json'), 'utf8')) as { id: string }).id).toBe(metadata.id);
    expect(fs.readdirSync(work).filter((name) => name.includes('.tmp'))).toEqual([]);
    const notASnapshot = path.join(work, 'precious');
    fs.mkdirSync(notASnapshot);
    fs.writeFileSync(path.join(notASnapshot, 'keep'), 'x');
    const kept = cli(['snapshot', 'create', notASnapshot, '--memory', ram, '--overwrite']);
    expect(kept.status).toBe(1);
    expect(kept.stderr.trim().split('\n')).toHaveLength(1);
    expect(fs.readFileSync(path.join(notASnapshot, 'keep'), 'utf8')).toBe('x');
  });
});

describe('the progress bar', () => {
  /** bench for a second under script(1)'s pseudo-terminal of `columns` columns: what the terminal got. */
  function onTerminal(columns: number): string {
    const command = `stty cols ${columns}; ${JSON.stringify(process.execPath)} ${JSON.stringify(cliPath)} bench ${JSON.stringify(path.join(work, `bench-${columns}`))} --size 64M --time 1.5 --direct=never --progress=bar`;
    return execFileSync('script', ['-qec', command, '/dev/null'], { encoding: 'utf8' });
  }

  for (const columns of [100, 60, 30]) {
    it(`fits ${columns} columns and is cleared before the result`, () => {
      const screen = onTerminal(columns);
      const bars = screen.split('\r').map((piece) => piece.replace(/\x1b\[K/g, '')).filter((piece) => piece.includes('%'));
      expect(bars.length, screen).toBeGreaterThan(0);
      for (const bar of bars) expect(bar.length, JSON.stringify(bar)).toBeLessThan(columns);
      if (columns >= 40) expect(bars.some((bar) => bar.startsWith('['))).toBe(true);
      // The last bar is erased (\r ESC[K) before the result's first line.
      expect(screen).toMatch(/\r\x1b\[K(\r\n)?target: /);
      const after = screen.slice(screen.lastIndexOf('\r\x1b[K') + 4);
      expect(after, 'no bar after the clear').not.toMatch(/\d%/);
    });
  }

  it('stays off when stderr is not a terminal, even with --progress=bar or -p', () => {
    const bench = cli(['bench', path.join(work, 'bench-pipe'), '--size', '16M', '--time', '1', '--direct=never', '--progress=bar']);
    expect(bench.status, bench.stderr).toBe(0);
    expect(bench.stderr).toBe('');
    const load = cli(['load', image, path.join(work, 'load-p.raw'), '-p']);
    expect(load.stderr).not.toContain('\r');
  });
});

/**
 * `qcow2img load IMAGE TARGET...` from the command line: --partition and --offset given once for
 * every TARGET or once for each TARGET in order (GPT disk image files, compared with qemu-img
 * convert's output at each target's place), any other count a one-line usage error that writes
 * nothing. Progress: JSON lines that name their target (a single target's stay as they were), and
 * on a terminal (script(1)'s pseudo-terminal) one line per target, redrawn in place and cleared.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { targetProgressLines } from '../../src/cli/format';
import type { Progress } from '../../src/index';
import { expectPlaced, gptDisk, oldDisk } from '../helpers/fixtures';
import { partitionsOf } from '../helpers/loop';
import { MiB, cliPath, qemuConvert, qemuImg, randomBytes } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-cli-many-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));
/** 6 MiB, compressed: fits the 8 MiB partitions of gptDisk. */
let image: string;
let expected: string;

beforeAll(() => {
  const raw = path.join(work, 'source.raw');
  fs.writeFileSync(raw, Buffer.concat([randomBytes('cli-many-a', 2 * MiB), Buffer.alloc(3 * MiB), randomBytes('cli-many-b', MiB)]));
  image = path.join(work, 'disk.qcow2');
  qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, image]);
  expected = qemuConvert(image);
});

function cli(args: readonly string[]) {
  return spawnSync(process.execPath, [cliPath, ...args], { encoding: 'utf8' });
}

/** Each file's bytes now, to compare with after a load. */
function snapshot(files: readonly string[]): Map<string, Buffer> {
  return new Map(files.map((f) => [f, fs.readFileSync(f)]));
}

describe('--partition and --offset with several TARGETs', () => {
  it('given once for each TARGET, in order', () => {
    const a = gptDisk(work, 'each-a.img');
    const b = gptDisk(work, 'each-b.img');
    const before = snapshot([a, b]);
    const ran = cli(['load', image, a, b, '--partition', '2', '--partition', '1', '--verify']);
    expect(ran.status, ran.stderr).toBe(0);
    const starts = [partitionsOf(a).get(2)!.start, partitionsOf(b).get(1)!.start];
    expect(starts[0]).not.toBe(starts[1]);
    expectPlaced(a, before.get(a)!, starts[0]!, expected);
    expectPlaced(b, before.get(b)!, starts[1]!, expected);
    expect(ran.stderr).toContain(`into ${a} at offset ${starts[0]} `);
    expect(ran.stderr).toContain(`into ${b} at offset ${starts[1]} `);
  });

  it('given once, for every TARGET', () => {
    const a = gptDisk(work, 'every-a.img');
    const b = gptDisk(work, 'every-b.img');
    const before = snapshot([a, b]);
    const ran = cli(['load', image, a, b, '--partition', '2']);
    expect(ran.status, ran.stderr).toBe(0);
    expectPlaced(a, before.get(a)!, partitionsOf(a).get(2)!.start, expected);
    expectPlaced(b, before.get(b)!, partitionsOf(b).get(2)!.start, expected);
  });

  it('--offset once for each TARGET, and once for all (not a multiple of the O_DIRECT unit: written through the page cache)', () => {
    const c = oldDisk(work, 'offset-c.img', 12 * MiB);
    const d = oldDisk(work, 'offset-d.img', 12 * MiB);
    const before = snapshot([c, d]);
    const each = cli(['load', image, c, d, '--offset', '1M', '--offset', '3.5M', '--verify']);
    expect(each.status, each.stderr).toBe(0);
    expectPlaced(c, before.get(c)!, MiB, expected);
    expectPlaced(d, before.get(d)!, 3.5 * MiB, expected);
    const e = oldDisk(work, 'offset-e.img', 12 * MiB);
    const f = oldDisk(work, 'offset-f.img', 12 * MiB);
    const unaligned = 2 * MiB + 100;
    const beforeAll = snapshot([e, f]);
    const all = cli(['load', image, e, f, '--offset', String(unaligned)]);
    expect(all.status, all.stderr).toBe(0);
    expectPlaced(e, beforeAll.get(e)!, unaligned, expected);
    expectPlaced(f, beforeAll.get(f)!, unaligned, expected);
  });

  it('any other count is a usage error (one line, exit 1) and nothing is written', () => {
    const a = gptDisk(work, 'count-a.img');
    const b = gptDisk(work, 'count-b.img');
    const fresh = path.join(work, 'count-new.raw');
    const before = snapshot([a, b]);
    const cases: [string[], string][] = [
      [['load', image, a, b, '--partition', '1', '--partition', '2', '--partition', '1'], '--partition is given 3 times for 2 TARGETs'],
      [['load', image, a, b, fresh, '--offset', '1M', '--offset', '2M'], '--offset is given 2 times for 3 TARGETs'],
      [['load', image, fresh, '--offset', '1M', '--offset', '2M'], '--offset is given 2 times for 1 TARGET'],
    ];
    for (const [args, message] of cases) {
      const ran = cli(args);
      expect(ran.status, args.join(' ')).toBe(1);
      expect(ran.stdout).toBe('');
      expect(ran.stderr).toBe(`qcow2img: ${message}: give it once (for every TARGET) or once for each TARGET (see qcow2img load --help)\n`);
    }
    expect(fs.existsSync(fresh)).toBe(false);
    for (const [file, bytes] of before) expect(fs.readFileSync(file).equals(bytes), file).toBe(true);
  });

  it('--partition and --offset for the same TARGET are refused before any TARGET is written', () => {
    const a = gptDisk(work, 'both-a.img');
    const fresh = path.join(work, 'both-new.raw');
    const before = snapshot([a]);
    const ran = cli(['load', image, fresh, a, '--partition', '1', '--offset', '1M']);
    expect(ran.status).toBe(1);
    expect(ran.stderr).toMatch(/^qcow2img: .*: --offset and --partition cannot be combined\n$/);
    expect(fs.existsSync(fresh)).toBe(false);
    expect(fs.readFileSync(a).equals(before.get(a)!)).toBe(true);
  });
});

describe('progress of several TARGETs', () => {
  interface Event {
    phase: string;
    target?: string;
    bytesDone: number;
    bytesTotal: number;
    error?: { code: string; message: string; path?: string };
    failed?: number;
  }

  it('--progress=json: every event names its target; the failed one says why; the last line is the result', () => {
    const good = path.join(work, 'json-good.raw');
    const taken = path.join(work, 'json-taken.raw');
    const other = path.join(work, 'json-other.raw');
    fs.writeFileSync(taken, 'x');
    const ran = cli(['load', '--progress=json', '--verify', image, good, taken, other]);
    expect(ran.status).toBe(1);
    const lines = ran.stdout.trim().split('\n').map((line) => JSON.parse(line) as Event);
    const events = lines.slice(0, -1);
    expect(events.map((e) => e.target).filter((t) => ![good, taken, other].includes(t!))).toEqual([]);
    for (const target of [good, other]) {
      const phases = events.filter((e) => e.target === target).map((e) => e.phase);
      expect(phases.filter((phase, i) => phase !== phases[i - 1]), target).toEqual(['write', 'flush', 'verify', 'done']);
    }
    expect(events.filter((e) => e.target === taken)).toEqual([expect.objectContaining({ phase: 'failed', error: expect.objectContaining({ code: 'TARGET_EXISTS', path: taken }) })]);
    expect(lines.at(-1)).toMatchObject({ phase: 'done', failed: 1 });
    expect(lines.at(-1)!.target).toBeUndefined();
    // The failure is said on stderr too, with the summary naming it.
    expect(ran.stderr).toBe(`qcow2img: ${taken}: target exists; pass --overwrite (overwrite: true) to replace it\nqcow2img: 1 of 3 targets failed: ${taken}\n`);
    expect(fs.readFileSync(taken, 'utf8')).toBe('x');
  });

  it("one TARGET's JSON events stay as they were: no target field", () => {
    const ran = cli(['load', '--progress=json', image, path.join(work, 'json-single.raw')]);
    expect(ran.status, ran.stderr).toBe(0);
    const lines = ran.stdout.trim().split('\n').map((line) => JSON.parse(line) as Event);
    expect(lines.length).toBeGreaterThan(1);
    for (const event of lines.slice(0, -1)) expect(Object.keys(event)).not.toContain('target');
  });

  it('on a terminal: one line per TARGET (writing, verifying, done, failed and why), within its width, cleared before the summary', () => {
    const columns = 100;
    const good = path.join(work, 'tty-good.raw');
    const taken = path.join(work, 'tty-taken.raw');
    const other = path.join(work, 'tty-other.raw');
    fs.writeFileSync(taken, 'x');
    const command = [process.execPath, cliPath, 'load', '-p', '--verify', image, good, taken, other].map((a) => JSON.stringify(a)).join(' ');
    const screen = execFileSync('script', ['-qec', `stty cols ${columns}; ${command}; echo "exit $?"`, '/dev/null'], { encoding: 'utf8' });
    expect(screen).toMatch(/exit 1\s*$/);
    // The block is three lines: redrawn from its first (ESC[2A), and erased (ESC[2A ESC[J) before the summary.
    const cleared = screen.lastIndexOf('\x1b[2A\x1b[J');
    expect(cleared, screen).toBeGreaterThan(0);
    const drawn = screen.slice(0, cleared);
    const after = screen.slice(cleared);
    expect(drawn).toContain('\x1b[2A');
    const lines = drawn.split(/\r\n|\r|\n/).map((piece) => piece.replace(/\x1b\[\d*[AKJ]/g, '')).filter((piece) => piece !== '');
    for (const line of lines) expect(line.length, JSON.stringify(line)).toBeLessThan(columns);
    const states = (name: string) => lines.filter((line) => line.startsWith(name)).map((line) => line.slice(name.length).trim());
    for (const name of [good, other]) {
      expect(states(name).some((s) => /^writing +\d+\.\d% /.test(s)), name).toBe(true);
      expect(states(name).some((s) => /^verifying +\d+\.\d% /.test(s)), name).toBe(true);
      expect(states(name).at(-1)).toBe('done');
    }
    // Every redraw of the block shows the failed target's line as it was (its reason cut at the width).
    expect(states(taken).length).toBeGreaterThan(0);
    for (const state of states(taken)) expect(state).toMatch(/^failed: target exists; pass --over/);
    expect(after).not.toMatch(/\d%|writing|verifying/);
    expect(after).toContain(`qcow2img: loaded 6 MiB into ${good}`);
    expect(after).toContain(`qcow2img: 1 of 3 targets failed: ${taken}`);
  });
});

describe('the lines of several TARGETs', () => {
  const event = (target: string, phase: Progress['phase'], bytesDone = 0): Progress => ({
    phase,
    target,
    bytesDone,
    bytesTotal: 8 * MiB,
    dataBytes: bytesDone,
    zeroBytes: 0,
    elapsedSeconds: 1,
    bytesPerSecond: 0,
    etaSeconds: undefined,
  });

  it('a long path keeps its end; a failure says why without its path again; past the rows, one line counts the rest', () => {
    const long = `/dev/disk/by-id/${'x'.repeat(80)}-part3`;
    const failed: Progress = { ...event('/dev/sdd', 'failed'), error: { code: 'IO_ERROR', message: '/dev/sdd: write failed at guest offset 0: Input/output error', path: '/dev/sdd' } };
    const events = [event(long, 'write', 2 * MiB), event('/dev/sdb', 'done'), event('/dev/sdc', 'done'), failed, event('/dev/sde', 'verify', MiB)];
    const lines = targetProgressLines(events, 60, 3);
    expect(lines).toHaveLength(3);
    for (const line of lines) expect(line.length).toBeLessThan(60);
    expect(lines[0]).toMatch(/^\.\.\.x+-part3 +writing +25\.0% 2 MiB\/8 MiB$/);
    expect(lines[1]).toMatch(/^\/dev\/sdb +done$/);
    expect(lines[2]).toBe('... and 3 more: 1 done, 1 failed');
    const all = targetProgressLines(events.slice(1), 80, 24);
    expect(all.map((line) => line.replace(/ +/g, ' '))).toEqual(['/dev/sdb done', '/dev/sdc done', '/dev/sdd failed: write failed at guest offset 0: Input/output error', '/dev/sde verifying 12.5% 1 MiB/8 MiB']);
  });
});

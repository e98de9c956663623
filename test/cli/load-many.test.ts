/**
 * `qcow2img load IMAGE TARGET...` from the command line: --partition and --offset given once for
 * every TARGET or once for each TARGET in order (GPT disk image files, compared with qemu-img
 * convert's output at each target's place), any other count a one-line usage error that writes
 * nothing.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
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

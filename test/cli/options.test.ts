/**
 * Option values: sizes as qemu-img reads them (checked against qemu-img create itself) and as
 * fio writes them (KB, KiB); a size that is not whole bytes is a one-line error naming the option.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseInteger, parseSize, UsageError } from '../../src/cli/options';
import { cliPath } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-options-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

describe('sizes', () => {
  it('read as qemu-img reads them: qemu-img create of each size (whole sectors) makes a disk of that many bytes', () => {
    for (const text of ['512', '1536', '64k', '64K', '1M', '1.5M', '2.25G', '1T', '0.5k', '1024b', '2048B']) {
      const image = path.join(work, 'size.raw');
      execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, text]);
      expect(parseSize(text, '--size'), text).toBe(fs.statSync(image).size);
      fs.rmSync(image);
    }
    expect(parseSize('1P', '--size')).toBe(2 ** 50);
    expect(parseSize('3b', '--size')).toBe(3);
    expect(() => parseSize('8E', '--size'), 'past 2^53: not exact in a JavaScript number').toThrow(UsageError);
  });

  it('fio\'s units: K, KB and KiB (any case) all 1024', () => {
    for (const [text, bytes] of [['4KiB', 4096], ['4kb', 4096], ['4KB', 4096], ['1MiB', 2 ** 20], ['1mib', 2 ** 20], ['2GiB', 2 ** 31], ['1gb', 2 ** 30]] as const) {
      expect(parseSize(text, '--block-size'), text).toBe(bytes);
    }
  });

  it('refused in one line naming the option: fractions of a byte, no unit on a fraction, words, negatives', () => {
    for (const text of ['1.1k', '0.3', '1.5', 'lots', '-1', '', '1 M', '1kk', '0x100', '1.M']) {
      expect(() => parseSize(text, '--offset'), text).toThrow(UsageError);
      try {
        parseSize(text, '--offset');
      } catch (error) {
        expect((error as Error).message).toContain('--offset');
      }
    }
  });

  it('integers: digits only, in range (--level= is not 0)', () => {
    expect(parseInteger('-7', '--level', -10)).toBe(-7);
    for (const text of ['', '1.0', '1e3', ' 1', '0x10']) expect(() => parseInteger(text, '--level', -10), JSON.stringify(text)).toThrow(UsageError);
  });

  it('through the CLI: --offset, --cluster-size, --block-size and --size take units', () => {
    const image = path.join(work, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1M']);
    execFileSync('qemu-io', ['-c', 'write -P 9 0 64k', image], { stdio: 'ignore' });
    const target = path.join(work, 'target.img');
    fs.writeFileSync(target, Buffer.alloc(3 * 2 ** 20));
    const loaded = spawnSync(process.execPath, [cliPath, 'load', image, target, '--offset', '1.5M', '-q', '--direct=never'], { encoding: 'utf8' });
    expect(loaded.status, loaded.stderr).toBe(0);
    expect(loaded.stderr).toBe('');
    const bytes = fs.readFileSync(target);
    expect(bytes[1.5 * 2 ** 20 - 1]).toBe(0);
    expect(bytes[1.5 * 2 ** 20]).toBe(9);
    const out = path.join(work, 'captured.qcow2');
    const captured = spawnSync(process.execPath, [cliPath, 'capture', target, out, '--cluster-size', '4KiB', '-q'], { encoding: 'utf8' });
    expect(captured.status, captured.stderr).toBe(0);
    expect(JSON.parse(execFileSync('qemu-img', ['info', '--output=json', out], { encoding: 'utf8' }))['cluster-size']).toBe(4096);
    const refused = spawnSync(process.execPath, [cliPath, 'bench', path.join(work, 'bench.file'), '--block-size', '1.1k'], { encoding: 'utf8' });
    expect(refused.status).toBe(1);
    expect(refused.stderr).toBe('qcow2img: --block-size: 1.1k is not a whole number of bytes (see qcow2img bench --help)\n');
  });
});

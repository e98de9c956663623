/**
 * Issue #19's bad inputs: each error is one line naming the file at fault, in words, and the
 * library's is a Qcow2Error with that path and one code for one condition.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { capture } from '../../src/capture/index';
import { check } from '../../src/check/index';
import { load } from '../../src/load/index';
import { open } from '../../src/qcow2/open';
import { inspectSnapshot } from '../../src/snapshot/index';
import { cliPath } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-errors-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));
const at = (name: string) => path.join(work, name);

function cli(...args: string[]) {
  return spawnSync(process.execPath, [cliPath, ...args], { cwd: work, encoding: 'utf8' });
}

/** Exit 1, nothing on stdout, and exactly this one line on stderr. */
function expectLine(ran: ReturnType<typeof cli>, line: string): void {
  expect(ran.stderr).toBe(`qcow2img: ${line}\n`);
  expect(ran.stdout).toBe('');
  expect(ran.status).toBe(1);
}

beforeAll(() => {
  fs.mkdirSync(at('dir'));
  fs.writeFileSync(at('text.txt'), 'hello\n');
  fs.writeFileSync(at('empty'), '');
  fs.writeFileSync(at('bad.json'), '{bad');
  fs.writeFileSync(at('wrong.json'), '{"arch":"x86_64"}');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', at('disk.raw'), '4M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', at('disk.qcow2'), '4M']);
});

describe('the CLI: one line naming the file', () => {
  it('check DIR', () => expectLine(cli('check', 'dir'), 'dir: image is a folder'));
  it('info DIR', () => expectLine(cli('info', 'dir'), 'dir: image is not a regular file or block device'));
  it('info of a text file: not a qcow2 image', () => expectLine(cli('info', 'text.txt'), 'text.txt: not a qcow2 image (bad magic)'));
  it('check of a text file: not a qcow2 image', () => expectLine(cli('check', 'text.txt'), 'text.txt: not a qcow2 image (bad magic)'));
  it('info of an empty file', () => expectLine(cli('info', 'empty'), 'empty: not a qcow2 image (the file is empty)'));
  it('snapshot inspect of a text file', () => expectLine(cli('snapshot', 'inspect', 'text.txt'), `${at('text.txt')}: not a snapshot bundle: a file that is not an archive (.tar, .tar.gz, .tar.zst); a bundle is a folder or one of those`));
  it('snapshot inspect of a missing bundle', () => expectLine(cli('snapshot', 'inspect', 'nope'), `${at('nope')}: cannot open the snapshot bundle: no such file`));
  it('snapshot inspect of a folder that is no bundle', () => expectLine(cli('snapshot', 'inspect', 'dir'), `${at('dir')}: not a snapshot bundle: no snapshot.json in it`));
  it('snapshot create --cpu with bad JSON blames the JSON file', () => {
    const ran = cli('snapshot', 'create', 'S', '--cpu', 'bad.json');
    expect(ran.stderr).toMatch(/^qcow2img: bad\.json: CPU state is not JSON: [^\n]+\n$/);
    expect(fs.existsSync(at('S'))).toBe(false);
  });
  it('snapshot create --cpu with a wrong field blames the JSON file, not the snapshot', () => {
    expectLine(cli('snapshot', 'create', 'S', '--cpu', 'wrong.json'), 'wrong.json: CPU state: vcpus: Invalid key: Expected "vcpus" but received undefined');
    expect(fs.existsSync(at('S'))).toBe(false);
  });
  it('snapshot create --cpu DIR', () => expectLine(cli('snapshot', 'create', 'S', '--cpu', 'dir'), 'dir: cannot read the CPU state: it is a folder'));
  it('capture SRC DIR --overwrite: refused before the disk is read', () => {
    const ran = cli('capture', 'disk.raw', 'dir', '--overwrite', '--progress=json');
    // No progress line: nothing was captured before the refusal.
    expectLine(ran, `${at('dir')}: output is a folder; name the image file to write`);
    expect(fs.readdirSync(at('dir'))).toEqual([]);
    expect(fs.readdirSync(work).filter((name) => name.endsWith('.tmp'))).toEqual([]);
  });
  it('capture into a folder that does not exist: refused before the disk is read', () => {
    expectLine(cli('capture', 'disk.raw', 'nowhere/out.qcow2', '--progress=json'), `${at('nowhere/out.qcow2')}: cannot create the output file: no such file`);
  });
  it('load IMAGE DIR --overwrite', () => expectLine(cli('load', 'disk.qcow2', 'dir', '--overwrite'), `${at('dir')}: target is a folder`));
});

describe('the library: Qcow2Error with the path, one code a condition', () => {
  it('check(dir) is NOT_A_REGULAR_FILE naming the folder, as open(dir) is', async () => {
    await expect(check(at('dir'))).rejects.toMatchObject({ name: 'Qcow2Error', code: 'NOT_A_REGULAR_FILE', path: at('dir') });
    await expect(open(at('dir'))).rejects.toMatchObject({ name: 'Qcow2Error', code: 'NOT_A_REGULAR_FILE', path: at('dir') });
  });
  it('load() and capture() say NOT_A_REGULAR_FILE for a folder as well', async () => {
    await expect(load(at('disk.qcow2'), at('dir'), { overwrite: true })).rejects.toMatchObject({ code: 'NOT_A_REGULAR_FILE', path: at('dir') });
    await expect(capture(at('dir'), at('out.qcow2'))).rejects.toMatchObject({ code: 'NOT_A_REGULAR_FILE', path: at('dir') });
    await expect(capture(at('disk.raw'), at('dir'), { overwrite: true })).rejects.toMatchObject({ code: 'NOT_A_REGULAR_FILE', path: at('dir') });
  });
  it('a text file is BAD_MAGIC, not TRUNCATED', async () => {
    await expect(open(at('text.txt'))).rejects.toMatchObject({ code: 'BAD_MAGIC', path: at('text.txt') });
    await expect(check(at('text.txt'))).rejects.toMatchObject({ code: 'BAD_MAGIC', path: at('text.txt') });
  });
  it('inspectSnapshot of a text file names it', async () => {
    await expect(inspectSnapshot(at('text.txt'))).rejects.toMatchObject({ name: 'Qcow2Error', path: at('text.txt') });
  });
});

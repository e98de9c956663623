/**
 * A symbolic link as load's target is written through, as cp and dd do: the file it names gets
 * the disk (made beside that file under a temporary name and renamed over it), the link stays.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { load } from '../../src/load/index';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-symlink-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));
const image = path.join(work, 'disk.qcow2');
const raw = path.join(work, 'disk.raw');
const links = path.join(work, 'links');
const files = path.join(work, 'files');

beforeAll(() => {
  fs.mkdirSync(links);
  fs.mkdirSync(files);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '8M']);
  execFileSync('qemu-io', ['-c', 'write -P 7 1M 2M', image], { stdio: 'ignore' });
  execFileSync('qemu-img', ['convert', '-O', 'raw', image, raw]);
});

it('--overwrite through a link: the file it names holds the disk, the link is still the link', async () => {
  const file = path.join(files, 'vm.img');
  fs.writeFileSync(file, Buffer.alloc(3 << 20, 0xee));
  const link = path.join(links, 'vm.img');
  fs.symlinkSync('../files/vm.img', link);
  const result = await load(image, link, { overwrite: true });
  expect(fs.lstatSync(link).isSymbolicLink()).toBe(true);
  expect(fs.readlinkSync(link)).toBe('../files/vm.img');
  expect(Buffer.compare(fs.readFileSync(file), fs.readFileSync(raw))).toBe(0);
  expect(result.target).toBe(file);
  // The temporary file was made beside the real file: nothing is left in either folder.
  expect(fs.readdirSync(links)).toEqual(['vm.img']);
  expect(fs.readdirSync(files)).toEqual(['vm.img']);
});

it('without --overwrite a link to an existing file is refused, naming the link', async () => {
  const file = path.join(files, 'kept.img');
  fs.writeFileSync(file, 'keep');
  const link = path.join(links, 'kept.img');
  fs.symlinkSync(file, link);
  await expect(load(image, link)).rejects.toMatchObject({ code: 'TARGET_EXISTS', path: link });
  expect(fs.readFileSync(file, 'utf8')).toBe('keep');
});

it('a link to a link, and a dangling link (the named file is made, as cp makes it)', async () => {
  const file = path.join(files, 'chain.img');
  fs.writeFileSync(file, 'old');
  fs.symlinkSync(file, path.join(links, 'one'));
  fs.symlinkSync('one', path.join(links, 'two'));
  await load(image, path.join(links, 'two'), { overwrite: true });
  expect(Buffer.compare(fs.readFileSync(file), fs.readFileSync(raw))).toBe(0);
  expect(fs.readlinkSync(path.join(links, 'two'))).toBe('one');

  const missing = path.join(files, 'new.img');
  fs.symlinkSync(missing, path.join(links, 'dangling'));
  await load(image, path.join(links, 'dangling'));
  expect(fs.lstatSync(path.join(links, 'dangling')).isSymbolicLink()).toBe(true);
  expect(Buffer.compare(fs.readFileSync(missing), fs.readFileSync(raw))).toBe(0);
});

it('--offset through a link writes into the file it names', async () => {
  const file = path.join(files, 'region.img');
  fs.writeFileSync(file, Buffer.alloc(10 << 20, 0xaa));
  fs.symlinkSync(file, path.join(links, 'region'));
  await load(image, path.join(links, 'region'), { offset: 1 << 20 });
  const bytes = fs.readFileSync(file);
  expect(bytes.subarray(0, 1 << 20).every((b) => b === 0xaa)).toBe(true);
  expect(Buffer.compare(bytes.subarray(1 << 20, 9 << 20), fs.readFileSync(raw))).toBe(0);
  expect(bytes.subarray(9 << 20).every((b) => b === 0xaa)).toBe(true);
});

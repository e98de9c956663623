/**
 * info names a backing file without opening it, as qemu-img info does (BDRV_O_NO_BACKING): an
 * OpenStack `_base` layout (the overlay in instances/UUID/disk, its raw base in instances/_base)
 * is described without --allow-path, byte for byte as qemu-img info prints it, human and JSON.
 * Whatever reads the base's data (--backing-chain, map, load) still asks the allow-list.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openToDescribe } from '../../src/qcow2/open';
import { cliPath } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-info-backing-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));
const instances = path.join(work, 'instances');
const base = path.join(instances, '_base', '6f1ed002ab5595859014ebf0951522d9');
const disk = path.join(instances, '3a4b-uuid', 'disk');
const relative = path.join(instances, '3a4b-uuid', 'relative');
const missing = path.join(instances, '3a4b-uuid', 'missing');

function cli(...args: string[]) {
  return spawnSync(process.execPath, [cliPath, ...args], { cwd: instances, encoding: 'utf8' });
}
function qemuImg(...args: string[]) {
  return spawnSync('qemu-img', args, { cwd: instances, encoding: 'utf8' });
}

beforeAll(() => {
  fs.mkdirSync(path.dirname(base), { recursive: true });
  fs.mkdirSync(path.dirname(disk), { recursive: true });
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', base, '64M']);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 5 0 1M', base], { stdio: 'ignore' });
  // Nova's layout: an absolute backing name in a sibling folder.
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', disk]);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', '../_base/6f1ed002ab5595859014ebf0951522d9', '-F', 'raw', relative]);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', '/nowhere/base.qcow2', '-F', 'qcow2', missing, '64M']);
});

describe('info without --backing-chain: as qemu-img info, without --allow-path', () => {
  for (const [name, image] of [['absolute name in _base', disk], ['relative ../_base name', relative], ['a backing file that does not exist', missing]] as const) {
    for (const output of ['human', 'json']) {
      it(`${name}, --output=${output}`, () => {
        for (const named of [image, path.relative(instances, image)]) {
          const ours = cli('info', `--output=${output}`, named);
          expect(ours.stderr).toBe('');
          expect(ours.status).toBe(0);
          const theirs = qemuImg('info', `--output=${output}`, named);
          expect(theirs.status).toBe(0);
          expect(ours.stdout).toBe(theirs.stdout);
        }
      });
    }
  }

  it('the backing file is named in the output', () => {
    expect(cli('info', disk).stdout).toContain(`backing file: ${base}\n`);
  });
});

describe('reading the backing file still asks the allow-list', () => {
  const refusal = `qcow2img: ${path.relative(instances, disk)}: backing file "${base}" resolves outside the image's folder (${path.dirname(disk)}); allow it with --allow-path DIR or --allow-any-path\n`;
  it('info --backing-chain, map and load are refused without --allow-path', () => {
    for (const args of [['info', '--backing-chain'], ['map'], ['load']]) {
      const ran = cli(...args, path.relative(instances, disk), ...(args[0] === 'load' ? [path.join(work, 'out.raw')] : []));
      expect(ran.stderr).toBe(refusal);
      expect(ran.status).toBe(1);
    }
    expect(fs.existsSync(path.join(work, 'out.raw'))).toBe(false);
  });

  it('info --backing-chain with --allow-path prints what qemu-img info --backing-chain prints', () => {
    const ours = cli('info', '--backing-chain', '--allow-path', path.dirname(base), disk);
    expect(ours.stderr).toBe('');
    expect(ours.stdout).toBe(qemuImg('info', '--backing-chain', disk).stdout);
  });

  it('an image opened to be described cannot be read', async () => {
    const image = await openToDescribe(disk);
    try {
      expect(image.info.backingFile).toBe(base);
      expect(image.backingChain).toEqual([]);
      await expect(image.read(Buffer.alloc(512), 0)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', path: disk });
    } finally {
      await image.close();
    }
  });
});

/**
 * `--memory-map q35:SIZE` / `pc:SIZE` and maps read from `info mtree -f`, against the layout a
 * real QEMU (paused, its RAM in a sparse shared file) reports for the same machine and size.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../src/index';
import { memoryMapFromMtree, qemuMemoryMap, type QemuMachine } from '../../src/vmstate/machine-memory';
import { startQemu } from '../helpers/qmp';

const GiB = 1024 ** 3;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-machine-memory-'));

async function qemuLayout(machine: QemuMachine, size: number): Promise<string> {
  const ram = path.join(dir, `${machine}-${size}.ram`);
  fs.writeFileSync(ram, '');
  fs.truncateSync(ram, size);
  const qmp = await startQemu(dir, ['-machine', `${machine},memory-backend=mem`, '-m', `${size / 1024 ** 2}M`, '-object', `memory-backend-file,id=mem,size=${size},mem-path=${ram},share=on`]);
  try {
    return (await qmp.call('human-monitor-command', { 'command-line': 'info mtree -f' })) as string;
  } finally {
    await qmp.close();
    fs.rmSync(ram);
  }
}

describe('QEMU memory maps', () => {
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  // Each side of each machine's threshold (q35: 2.75 GiB, pc: 3.5 GiB), and one with RAM above 4 GiB.
  const cases: [QemuMachine, number][] = [
    ['q35', 1 * GiB],
    ['q35', 2.75 * GiB - 2 ** 20],
    ['q35', 2.75 * GiB],
    ['q35', 3 * GiB],
    ['pc', 3.5 * GiB - 2 ** 20],
    ['pc', 3.5 * GiB],
    ['pc', 5 * GiB],
  ];
  for (const [machine, size] of cases) {
    it(`${machine} with ${size / 2 ** 20} MiB: the map QEMU lays out`, async () => {
      const mtree = await qemuLayout(machine, size);
      const fromQemu = memoryMapFromMtree(mtree, 'mem', 'mtree');
      expect(qemuMemoryMap(machine, size)).toEqual(fromQemu);
      expect(fromQemu.reduce((sum, r) => sum + r.size, 0)).toBe(size);
    });
  }

  it('q35:3G is 0-2 GiB at dump offset 0 and 4-5 GiB at dump offset 2 GiB', () => {
    expect(qemuMemoryMap('q35', 3 * GiB)).toEqual([
      { guestBase: 0, size: 2 * GiB, dumpOffset: 0 },
      { guestBase: 4 * GiB, size: GiB, dumpOffset: 2 * GiB },
    ]);
  });

  it('refuses an unknown machine, a bad size and a tree without the block, naming them', () => {
    expect(() => qemuMemoryMap('virt' as QemuMachine, GiB)).toThrow(/unknown machine "virt"/);
    expect(() => qemuMemoryMap('q35', 0)).toThrow(Qcow2Error);
    expect(() => memoryMapFromMtree('FlatView #0\n', 'mem', 'tree.txt')).toThrow(/tree.txt: no RAM ranges of "mem"/);
  });
});

/**
 * Memory maps without arithmetic: where a QEMU x86 guest's RAM file lands in guest-physical
 * memory, from the machine type and the RAM size (as QEMU 7.2 lays it out), or from what
 * `info mtree -f` printed for the running guest.
 */
import { Qcow2Error } from '../errors';
import type { MemoryRegion } from './writer';

const GiB = 1024 ** 3;
const FOUR_GIB = 4 * GiB;

/**
 * How much RAM stays below 4 GiB. q35 (hw/i386/pc_q35.c): all of it under 2.75 GiB, else 2 GiB,
 * leaving room for PCI holes and MMCONFIG; pc (hw/i386/pc_piix.c): all of it under 3.5 GiB,
 * else 3 GiB (gigabyte-aligned, as every machine version since 1.7).
 */
const lowMemory: Record<'q35' | 'pc', (size: number) => number> = {
  q35: (size) => (size >= 0xb0000000 ? 0x80000000 : 0xb0000000),
  pc: (size) => (size >= 0xe0000000 ? 0xc0000000 : 0xe0000000),
};

export type QemuMachine = keyof typeof lowMemory;

/** The regions of a `machine` guest whose RAM file (one memory backend) is `size` bytes. */
export function qemuMemoryMap(machine: QemuMachine, size: number, path = machine): MemoryRegion[] {
  if (!(machine in lowMemory)) throw new Qcow2Error('INVALID_ARGUMENT', `unknown machine "${machine}" (q35 or pc)`, { path });
  if (!Number.isSafeInteger(size) || size <= 0) throw new Qcow2Error('INVALID_ARGUMENT', `RAM size ${size} is not a positive number of bytes`, { path });
  const below = Math.min(size, lowMemory[machine](size));
  const regions: MemoryRegion[] = [{ guestBase: 0, size: below, dumpOffset: 0 }];
  if (size > below) regions.push({ guestBase: FOUR_GIB, size: size - below, dumpOffset: below });
  return regions;
}

/**
 * The regions of one RAM block in `info mtree -f` output (the text, or QMP's
 * human-monitor-command answer holding it): its ranges "START-END (prio P, ram): NAME [@OFFSET]",
 * joined where guest addresses and file offsets both continue or only a hole the block's
 * bytes still fill lies between them (the ROM and VGA window under 1 MiB).
 */
export function memoryMapFromMtree(text: string, block: string, path: string): MemoryRegion[] {
  const pattern = /^\s*([0-9a-f]{16})-([0-9a-f]{16}) \(prio -?\d+, ram\): (\S+)(?: @([0-9a-f]{16}))?/gm;
  const ranges = new Map<number, { guestBase: number; size: number; dumpOffset: number }>();
  for (const match of text.matchAll(pattern)) {
    if (match[3] !== block) continue;
    const guestBase = parseInt(match[1]!, 16);
    const range = { guestBase, size: parseInt(match[2]!, 16) + 1 - guestBase, dumpOffset: match[4] ? parseInt(match[4], 16) : 0 };
    // Each address space prints its own flat view: the same range comes once per view.
    ranges.set(guestBase, range);
  }
  if (ranges.size === 0) throw new Qcow2Error('INVALID_ARGUMENT', `no RAM ranges of "${block}" in the memory tree`, { path });
  const regions: MemoryRegion[] = [];
  for (const range of [...ranges.values()].sort((a, b) => a.guestBase - b.guestBase)) {
    const last = regions[regions.length - 1];
    if (last && range.guestBase - last.guestBase === range.dumpOffset - last.dumpOffset!) last.size = range.guestBase + range.size - last.guestBase;
    else regions.push({ ...range });
  }
  return regions;
}

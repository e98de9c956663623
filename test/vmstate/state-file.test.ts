/**
 * The VM state file on its own: zero and duplicate pages dropped, every byte round-tripped,
 * random reads, and a dump mapped as more than one range. (Split from test/snapshot.test.ts.)
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StateFile, writeState } from '../../src/index';
import { native } from '../../src/native';
import { sampleCpuState as cpu } from '../helpers/cpu';
import { Random } from '../helpers/prng';
import { makeRamDump } from '../helpers/ram';
import { withTmpfs } from '../helpers/tmpfs';

const MiB = 1024 * 1024;
let dir: string;
let ram1: Buffer;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-state-file-'));
  ram1 = makeRamDump(path.join(dir, 'ram1.raw'), 64 * MiB, 1);
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('the VM state file', () => {
  it('drops zero and duplicate pages, and round-trips every byte', async () => {
    const statePath = path.join(dir, 'alone.qvms');
    const written = await writeState(statePath, { memory: path.join(dir, 'ram1.raw'), cpu: cpu as never });
    const pages = 64 * 256;
    expect(written.pages.zero + written.pages.data + written.pages.duplicate).toBe(pages);
    expect(written.pages.zero / pages).toBeGreaterThan(0.8);
    expect(written.pages.duplicate).toBeGreaterThan(0);
    // Smaller than the non-zero pages it holds.
    expect(written.bytes).toBeLessThan((written.pages.data + written.pages.duplicate) * 4096);
    // The file's hash, taken while it was flushed, is that of the file as it lies.
    expect(fs.statSync(statePath).size).toBe(written.bytes);
    const handle = fs.openSync(statePath, 'r');
    try {
      expect(written.xxh3).toBe((await native().hashFile(handle)).toString(16).padStart(16, '0'));
    } finally {
      fs.closeSync(handle);
    }
    const state = await StateFile.open(statePath);
    try {
      expect(await state.verify()).toEqual([]);
      expect(await state.cpu()).toEqual(cpu);
      // Random reads at odd addresses and lengths, across pages and chunks.
      for (const [address, length] of [[0, 100], [4095, 2], [123 * 4096 + 7, 3 * 4096], [2 * MiB - 10, 20], [64 * MiB - 5000, 5000], [30 * MiB + 1, MiB + 3]] as const) {
        const buffer = Buffer.alloc(length);
        await state.readGuest(buffer, address);
        expect(buffer.equals(ram1.subarray(address, address + length))).toBe(true);
      }
      await expect(state.readGuest(Buffer.alloc(10), 64 * MiB - 5)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    } finally {
      await state.close();
    }
  });

  it('maps a dump that is not one range from zero', async () => {
    const statePath = path.join(dir, 'regions.qvms');
    const regions = [
      { guestBase: 0, size: 16 * MiB, dumpOffset: 0 },
      { guestBase: 4096 * MiB, size: 48 * MiB, dumpOffset: 16 * MiB },
    ];
    await writeState(statePath, { memory: path.join(dir, 'ram1.raw'), regions });
    const state = await StateFile.open(statePath);
    try {
      const buffer = Buffer.alloc(8192);
      await state.readGuest(buffer, 4096 * MiB + 5 * MiB);
      expect(buffer.equals(ram1.subarray(21 * MiB, 21 * MiB + 8192))).toBe(true);
      await expect(state.readGuest(buffer, 20 * MiB)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    } finally {
      await state.close();
    }
  });
});

describe('a state file that fails part-way', () => {
  it('out of space (a 1 MiB tmpfs) on its first chunks while the next batch runs: one IO_ERROR, nothing left behind, no progress after', async () => {
    // Three batches of random pages: the first batch's chunks fill the tmpfs while the second is read.
    const noise = path.join(dir, 'noise.raw');
    fs.writeFileSync(noise, new Random(9).bytes(160 * MiB));
    const mnt = path.join(dir, 'small');
    await withTmpfs(mnt, '1m', async () => {
      let calls = 0;
      const error = await writeState(path.join(mnt, 'state.qvms'), { memory: noise, onProgress: () => calls++ }).catch((e: unknown) => e);
      expect(error).toMatchObject({ code: 'IO_ERROR', path: path.join(mnt, 'state.qvms') });
      expect((error as Error).message).toMatch(/no space left/i);
      expect(fs.readdirSync(mnt)).toEqual([]);
      const after = calls;
      await new Promise((resolve) => setTimeout(resolve, 600));
      expect(calls).toBe(after);
    });
  });

  it('cancelled before its first batch: CANCELLED, nothing left behind, no progress after', async () => {
    const controller = new AbortController();
    controller.abort();
    let calls = 0;
    const target = path.join(dir, 'cancelled.qvms');
    await expect(writeState(target, { memory: path.join(dir, 'ram1.raw'), signal: controller.signal, onProgress: () => calls++ })).rejects.toMatchObject({ code: 'CANCELLED' });
    expect(fs.readdirSync(dir).filter((f) => f.includes('cancelled'))).toEqual([]);
    const after = calls;
    await new Promise((resolve) => setTimeout(resolve, 600));
    expect(calls).toBe(after);
  });
});

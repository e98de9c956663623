/**
 * The native engine reading a remote file from its stage: extents in chunks, a read running on
 * from one extent into the next where the file continues, and stopping short at a gap.
 */
import { describe, expect, it } from 'vitest';
import { Codec, native, PlanKind } from '../../src/native';
import { Random } from '../helpers/prng';

/** The engine's view of a file of `size` bytes whose `extents` ([fileOffset, length, chunk, at]) are staged in `chunks`. */
function stagedSource(size: number, chunks: Buffer[], extents: number[][]) {
  return { fd: -1, size, codec: Codec.None, clusterSize: 512, stage: chunks, extents: Float64Array.from(extents.flat()) };
}

function copyData(source: ReturnType<typeof stagedSource>, hostOffset: number, length: number): Promise<Buffer> {
  const memory = Buffer.alloc(length);
  return native()
    .copy({ runs: Float64Array.from([0, length, PlanKind.Data, 0, hostOffset, 0, 0]), sources: [source], memory, memoryGuestOffset: 0, threads: 1 })
    .then(() => memory);
}

describe('a staged source', () => {
  const file = new Random(7).bytes(64 * 1024);

  it('reads across extents that continue the file, whichever chunk holds them', async () => {
    // File bytes 4096..12288 staged as two extents: the first at the end of chunk 1, the rest at the start of chunk 0.
    const chunks = [Buffer.alloc(8192), Buffer.alloc(8192)];
    file.copy(chunks[1]!, 5000, 4096, 4096 + 3192);
    file.copy(chunks[0]!, 0, 4096 + 3192, 12288);
    const source = stagedSource(file.length, chunks, [[4096, 3192, 1, 5000], [4096 + 3192, 12288 - 4096 - 3192, 0, 0]]);
    expect((await copyData(source, 4096, 8192)).equals(file.subarray(4096, 12288))).toBe(true);
    expect((await copyData(source, 7000, 2000)).equals(file.subarray(7000, 9000))).toBe(true);
  });

  it('stops short at bytes that were not staged: the job fails, naming the read', async () => {
    const chunks = [Buffer.alloc(8192)];
    file.copy(chunks[0]!, 0, 0, 4096);
    file.copy(chunks[0]!, 4096, 8192, 12288);
    const source = stagedSource(file.length, chunks, [[0, 4096, 0, 0], [8192, 4096, 0, 4096]]);
    expect((await copyData(source, 0, 4096)).equals(file.subarray(0, 4096))).toBe(true);
    await expect(copyData(source, 2048, 4096)).rejects.toThrow(/unexpected end of file/);
  });

  it('refuses extents outside their chunks or out of order', () => {
    const chunks = [Buffer.alloc(4096)];
    expect(() => copyData(stagedSource(file.length, chunks, [[0, 4096, 0, 1]]), 0, 10)).toThrow(/outside its stage or out of order/);
    expect(() => copyData(stagedSource(file.length, chunks, [[0, 10, 1, 0]]), 0, 10)).toThrow(/outside its stage or out of order/);
    expect(() => copyData(stagedSource(file.length, chunks, [[100, 10, 0, 0], [0, 10, 0, 100]]), 0, 10)).toThrow(/outside its stage or out of order/);
  });
});

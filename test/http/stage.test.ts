/**
 * The native engine reading a remote file from its stage: extents in chunks, a read running on
 * from one extent into the next where the file continues, and stopping short at a gap; whole data
 * windows written from the stage as they lie, and compressed clusters decoded where they lie.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { Codec, native, PlanKind, planRunFields } from '../../src/native';
import { Random } from '../helpers/prng';

const MiB = 1024 * 1024;
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-stage-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

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

describe('a staged data window written as it lies', () => {
  const size = 4 * MiB;
  const file = new Random(11).bytes(size);
  const sourcePath = path.join(work, 'source.bin');
  fs.writeFileSync(sourcePath, file);
  // Guest [0, 4 MiB) is file [0, 4 MiB) but for guest 1 MiB..1.5 MiB, read from file 3.5 MiB..4 MiB.
  const runs = Float64Array.from([
    [0, MiB, PlanKind.Data, 0, 0, 0, 0],
    [MiB, MiB / 2, PlanKind.Data, 0, 3.5 * MiB, 0, 0],
    [1.5 * MiB, 2.5 * MiB, PlanKind.Data, 0, 1.5 * MiB, 0, 0],
  ].flat());
  const expected = Buffer.concat([file.subarray(0, MiB), file.subarray(3.5 * MiB), file.subarray(1.5 * MiB)]);

  /** Copies the plan to a new O_DIRECT file with window hashes; the target's bytes, the hashes and the bytes written from the stage as they lie. */
  async function copyToDirectFile(source: object, name: string): Promise<{ bytes: Buffer; hashes: BigUint64Array; stagedBytes: bigint }> {
    const target = path.join(work, name);
    fs.writeFileSync(target, Buffer.alloc(0));
    fs.truncateSync(target, size);
    const targetFd = fs.openSync(target, fs.constants.O_RDWR | fs.constants.O_DIRECT);
    const windowHashes = new BigUint64Array(8);
    const counters = new BigUint64Array(4);
    try {
      await native().copy({ runs, sources: [source as never], targetFd, targetTailFd: -1, targetBase: 0, limitStart: 0, limitEnd: size, alignment: 4096, zeroMode: 0, threads: 2, windowSize: MiB, windowHashes, hashedSize: size, counters });
    } finally {
      fs.closeSync(targetFd);
    }
    return { bytes: fs.readFileSync(target), hashes: windowHashes, stagedBytes: counters[3]! };
  }

  /** The whole file staged in chunks of 1.25 MiB at `skew` bytes into each (windows cross chunk ends). */
  function stageWhole(chunk: (bytes: number) => Buffer, skew: number) {
    const room = 1.25 * MiB;
    const chunks: Buffer[] = [];
    const extents: number[] = [];
    for (let at = 0; at < size; at += room) {
      const memory = chunk(room + skew);
      const length = Math.min(room, size - at);
      file.copy(memory, skew, at, at + length);
      extents.push(at, length, chunks.length, skew);
      chunks.push(memory);
    }
    return { fd: -1, size, codec: Codec.None, clusterSize: 65536, stage: chunks, extents: Float64Array.from(extents) };
  }

  it('gives the bytes and window hashes of the same copy from the file, from aligned chunks and from chunks no O_DIRECT write could take as they lie', async () => {
    const fd = fs.openSync(sourcePath, 'r');
    let fromFile;
    try {
      fromFile = await copyToDirectFile({ fd, base: 0, size, codec: Codec.None, clusterSize: 65536 }, 'from-file.bin');
    } finally {
      fs.closeSync(fd);
    }
    expect(fromFile.bytes.equals(expected)).toBe(true);
    expect(fromFile.hashes.every((word, i) => i % 2 === 1 || word === 1n)).toBe(true);
    const aligned = await copyToDirectFile(stageWhole((n) => native().alignedBuffer(n), 0), 'aligned.bin');
    // 512 bytes into an unaligned allocation: an O_DIRECT write from there fails with EINVAL, so the engine must copy.
    const unaligned = await copyToDirectFile(stageWhole((n) => Buffer.alloc(n), 512 + 7), 'unaligned.bin');
    for (const copy of [aligned, unaligned]) {
      expect(copy.bytes.equals(expected)).toBe(true);
      expect(copy.hashes).toEqual(fromFile.hashes);
    }
    // Every window of the aligned stage was written from it as it lies; none of the others.
    expect(aligned.stagedBytes).toBe(BigInt(size));
    expect(unaligned.stagedBytes).toBe(0n);
    expect(fromFile.stagedBytes).toBe(0n);
  });

  it('alignedBuffer gives memory an O_DIRECT write takes as it lies, and refuses sizes it cannot give', () => {
    const buffer = native().alignedBuffer(8192);
    expect(buffer.length).toBe(8192);
    const fd = fs.openSync(path.join(work, 'direct.bin'), fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_DIRECT);
    try {
      expect(fs.writeSync(fd, buffer, 0, 8192, 0)).toBe(8192);
      // The control: memory one byte off a boundary is refused here, so the write above proves the alignment.
      expect(() => fs.writeSync(fd, Buffer.alloc(8193).subarray(1), 0, 8192, 0)).toThrow(/EINVAL/);
    } finally {
      fs.closeSync(fd);
    }
    expect(() => native().alignedBuffer(0)).toThrow(/1 to 1 GiB/);
    expect(() => native().alignedBuffer(2 ** 31)).toThrow(/1 to 1 GiB/);
  });
});

describe('staged compressed clusters', () => {
  const clusterSize = 65536;
  const clusters = [0, 1, 2].map((i) => Buffer.concat([new Random(20 + i).bytes(clusterSize / 2), Buffer.alloc(clusterSize / 2, i)]));
  const stored = clusters.map((c) => zlib.deflateRawSync(c, { windowBits: 12 }));

  it('decode where they lie in one chunk and across a chunk end', async () => {
    // The three stored clusters back to back in the file; the second straddles two chunks.
    const fileBytes = Buffer.concat(stored);
    const split = stored[0]!.length + Math.floor(stored[1]!.length / 2);
    const chunks = [native().alignedBuffer(split), native().alignedBuffer(fileBytes.length - split)];
    fileBytes.copy(chunks[0]!, 0, 0, split);
    fileBytes.copy(chunks[1]!, 0, split);
    const source = { fd: -1, size: fileBytes.length, codec: Codec.Deflate, clusterSize, stage: chunks, extents: Float64Array.from([0, split, 0, 0, split, fileBytes.length - split, 1, 0]) };
    const runs = new Float64Array(3 * planRunFields);
    let host = 0;
    stored.forEach((s, i) => {
      runs.set([i * clusterSize, clusterSize, PlanKind.Compressed, 0, host, s.length, 0], i * planRunFields);
      host += s.length;
    });
    const memory = Buffer.alloc(3 * clusterSize);
    await native().copy({ runs, sources: [source], memory, memoryGuestOffset: 0, threads: 1 });
    expect(memory.equals(Buffer.concat(clusters))).toBe(true);
  });
});

/**
 * The addon's boundary: every argument it is given wrongly (missing, of another type, negative,
 * fractional, past 2^53, a typed array of another kind, sizes whose sum would wrap) becomes a
 * JavaScript error, and hostile file contents that reach an engine are refused. A crash of the
 * process (abort, segfault) would end this test file instead.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Codec, native } from '../src/native';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-addon-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
const addon = native() as unknown as Record<string, (...args: unknown[]) => unknown> & { ZstdStream: new (...args: unknown[]) => { step(...args: unknown[]): Promise<unknown> } };

/** Calls f; resolves to the error it threw or its promise rejected with. */
async function failure(f: () => unknown): Promise<Error> {
  try {
    await f();
  } catch (error) {
    return error as Error;
  }
  throw new Error('no error');
}

describe('enums', () => {
  it('the addon numbers codecs as src/native.ts does (one enum for every engine)', () => {
    expect(native().enums.Codec).toEqual(Codec);
  });
});

describe('arguments', () => {
  const file = path.join(dir, 'data.bin');
  fs.writeFileSync(file, Buffer.alloc(1 << 20, 1));
  const fd = fs.openSync(file, 'r');
  afterAll(() => fs.closeSync(fd));

  const cases: [string, () => unknown, RegExp][] = [
    ['walkL2 without arguments', () => addon.walkL2!(), /walkL2\(table/],
    ['walkL2 with entries past the end of the table', () => addon.walkL2!(Buffer.alloc(65536), 2 ** 52, 2 ** 52, 16, false, false), /outside the table/],
    ['walkL2 with a negative count', () => addon.walkL2!(Buffer.alloc(65536), 0, -1, 16, false, false), /entryCount must be a whole number/],
    ['copy without a job', () => addon.copy!(), /needs a job object/],
    ['copy with runs of another type', () => addon.copy!({ runs: new Uint8Array(7), sources: [] }), /runs must be a Float64Array/],
    ['copy with a negative plan value', () => addon.copy!({ runs: Float64Array.from([0, 8192, 2, 0, 0, 100, -4096]), sources: [] }), /element 6/],
    ['copy with a fractional fd', () => addon.copy!({ runs: new Float64Array(0), sources: [], targetFd: 1.5 }), /targetFd must be a whole number/],
    ['capture with results of another type', () => addon.capture!({ results: new Uint8Array(192), clusterCount: 64, clusterSize: 65536, sourceFd: fd }), /results must be a Float64Array/],
    ['capture with a source alignment above the cluster size', () => addon.capture!({ results: new Float64Array(3), clusterCount: 1, clusterSize: 65536, sourceAlignment: 1 << 20, sourceFd: fd }), /source alignment/],
    ['decompressChunk with a codec that is a string', () => addon.decompressChunk!('1', Buffer.alloc(4), 10), /codec must be a number/],
    ['decompressChunk with a huge raw length', () => addon.decompressChunk!(1, Buffer.alloc(4), 2 ** 31), /raw length out of range/],
    ['hashFile with a string fd', () => addon.hashFile!('3'), /fd must be a number/],
    ['hash64 of a number', () => addon.hash64!(5), /Uint8Array or Buffer/],
    ['blockDeviceInfo of a regular file', () => addon.blockDeviceInfo!(fd), /Inappropriate ioctl/],
    ['restoreBatch with a negative span', () => addon.restoreBatch!({ spans: Float64Array.from([-1, 0]), states: new Uint8Array(1), chunks: new Float64Array(0), duplicates: new Float64Array(0) }), /spans: element 0/],
    ['writeBench for an endless time', () => addon.writeBench!({ fd, size: 4096, blockSize: 4096, seconds: Infinity }), /seconds must be/],
    ['processDumpBatch with a span of 4 GiB', () => addon.processDumpBatch!({ sourceFd: fd, pageCount: 1, pageSize: 2 ** 31, spanPages: 2 }), /inconsistent batch/],
    // 2^52 pages of 64 KiB is 2^68 bytes, which wraps to 0: a 4 KiB parent must not pass for it.
    ['processDumpBatch with a page count whose bytes wrap', () => addon.processDumpBatch!({ sourceFd: fd, pageCount: 2 ** 52, pageSize: 65536, spanPages: 2, incremental: true, parent: new Uint8Array(4096) }), /inconsistent batch/],
  ];
  for (const [name, call, message] of cases) {
    it(`${name}: an error, not a crash`, async () => {
      const error = await failure(call);
      expect(error).toBeInstanceOf(Error);
      expect(error.message).toMatch(message);
    });
  }

  it('a second ZstdStream step while one runs is an error', async () => {
    const stream = new addon.ZstdStream(true, 3, 0);
    const first = stream.step(Buffer.alloc(10), Buffer.alloc(100), false);
    expect((await failure(() => stream.step(Buffer.alloc(10), Buffer.alloc(100), false))).message).toMatch(/already running/);
    await first;
  });

  it('seekData on a pipe is an error', async () => {
    const fifo = path.join(dir, 'pipe');
    execFileSync('mkfifo', [fifo]);
    // Opened for reading and writing, a FIFO does not wait for a peer (Linux).
    const pipeFd = fs.openSync(fifo, 'r+');
    try {
      expect((await failure(() => addon.seekData!(pipeFd, 0))).message).toMatch(/Illegal seek/);
    } finally {
      fs.closeSync(pipeFd);
    }
  });
});

describe('hostile file contents that reach an engine', () => {
  it('a chunk header whose first span + span count wraps is outside its batch', async () => {
    // A CHUNK payload (32-byte header, no data) naming spans 2^64 - 2^31 .. +2^31+1, with a
    // checksum that matches: only the span check stands between it and the states array.
    const payload = Buffer.alloc(32);
    payload[0] = 0; // codec none
    payload.writeUInt32LE(2 ** 31 + 1, 4);
    payload.writeBigUInt64LE(2n ** 64n - 2n ** 31n, 8);
    payload.writeUInt32LE(0, 16);
    const stateFile = path.join(dir, 'hostile.qvms');
    fs.writeFileSync(stateFile, payload);
    const output = path.join(dir, 'out.raw');
    fs.writeFileSync(output, Buffer.alloc(4096));
    const checksum = (addon.hash64!(payload) as bigint);
    const stateFd = fs.openSync(stateFile, 'r');
    const outputFd = fs.openSync(output, 'r+');
    try {
      const error = await failure(() =>
        addon.restoreBatch!({
          stateFd,
          outputFd,
          pageSize: 4096,
          spanPages: 512,
          firstSpan: 2,
          spans: Float64Array.from([1, 0]),
          states: Uint8Array.from([1]),
          chunks: Float64Array.from([0, 32, Number(checksum >> 32n), Number(checksum & 0xffffffffn)]),
          duplicates: new Float64Array(0),
          threads: 1,
        }),
      );
      expect(error.message).toMatch(/chunk outside its batch/);
    } finally {
      fs.closeSync(stateFd);
      fs.closeSync(outputFd);
    }
  });

  it('a compressed run whose offset in the cluster plus its length wraps is a malformed plan', async () => {
    const memory = Buffer.alloc(8192);
    const error = await failure(() =>
      addon.copy!({
        runs: Float64Array.from([0, 8192, 2, 0, 0, 100, 2 ** 53 - 4096]),
        sources: [{ fd: 0, size: 1 << 20, codec: Codec.Zstd, clusterSize: 65536, base: 0 }],
        memory,
        memoryGuestOffset: 0,
        threads: 1,
      }),
    );
    expect(error.message).toMatch(/malformed plan run/);
  });
});

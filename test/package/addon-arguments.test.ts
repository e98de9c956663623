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
import { BenchEngine, Codec, native, PlanKind, UnitKind, ZeroMode } from '../../src/native';
import { PageState } from '../../src/vmstate/format';

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

  it('and every other enum that crosses the boundary as a number', () => {
    const pageState = Object.fromEntries(Object.entries(PageState).map(([name, value]) => [name[0]!.toUpperCase() + name.slice(1), value]));
    expect(native().enums).toEqual({ Codec, ZeroMode, RunKind: PlanKind, BenchEngine, PageState: pageState, UnitKind });
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
    ['startWriteback with a string fd', () => addon.startWriteback!('3', 0, 4096), /fd must be a number/],
    ['hash64 of a number', () => addon.hash64!(5), /Uint8Array or Buffer/],
    ['hash64 of a list holding a string', () => addon.hash64!([Buffer.alloc(1), 'a']), /parts must be Uint8Arrays or Buffers/],
    ['blockDeviceInfo of a regular file', () => addon.blockDeviceInfo!(fd), /Inappropriate ioctl/],
    ['restoreBatch with a negative span', () => addon.restoreBatch!({ spans: Float64Array.from([-1, 0]), states: new Uint8Array(1), chunks: new Float64Array(0), duplicates: new Float64Array(0) }), /spans: element 0/],
    ['writeBench for an endless time', () => addon.writeBench!({ fd, size: 4096, blockSize: 4096, seconds: Infinity }), /seconds must be/],
    ['processDumpBatch with a span of 4 GiB', () => addon.processDumpBatch!({ sourceFd: fd, pageCount: 1, pageSize: 2 ** 31, spanPages: 2 }), /inconsistent batch/],
    // A hole map shorter than the batch would be read past its end for the last pages.
    ['processDumpBatch with a hole map shorter than the batch', () => addon.processDumpBatch!({ sourceFd: fd, pageCount: 16, pageSize: 4096, spanPages: 512, holes: new Uint8Array(15) }), /inconsistent batch/],
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

  // Every enum value is checked on the way in: a number the engine does not define is a RangeError
  // naming the field and the values it takes, never a cast.
  const copyJob = (extra: Record<string, unknown>, source: Record<string, unknown> = {}) => ({
    runs: Float64Array.from([0, 4096, PlanKind.Data, 0, 0, 0, 0]),
    sources: [{ fd, size: 1 << 20, codec: Codec.None, clusterSize: 65536, ...source }],
    memory: Buffer.alloc(4096),
    ...extra,
  });
  const enumCases: [string, () => unknown, RegExp][] = [
    ['copy with a source codec of 3', () => addon.copy!(copyJob({}, { codec: 3 })), /^codec must be one of 0 \(None\), 1 \(Deflate\), 2 \(Zstd\)$/],
    ['copy with a negative source codec', () => addon.copy!(copyJob({}, { codec: -1 })), /^codec must be one of/],
    ['copy with a zero mode of 4', () => addon.copy!(copyJob({ zeroMode: 4 })), /^zeroMode must be one of 0 \(Skip\), 1 \(Write\), 2 \(ZeroOut\), 3 \(PunchHole\)$/],
    ['copy with a fractional zero mode', () => addon.copy!(copyJob({ zeroMode: 1.5 })), /^zeroMode must be one of/],
    ['copy with a run kind of 3', () => addon.copy!(copyJob({ runs: Float64Array.from([0, 4096, 3, 0, 0, 0, 0]) })), /^runs: element 2 \(a kind\) must be one of 0 \(Zero\), 1 \(Data\), 2 \(Compressed\)$/],
    ['copy with a run source past the int range', () => addon.copy!(copyJob({ runs: Float64Array.from([0, 4096, PlanKind.Data, 2 ** 40, 0, 0, 0]) })), /^runs: element 3 \(a source\)/],
    ['capture with a codec of 3', () => addon.capture!({ results: new Float64Array(3), clusterCount: 1, clusterSize: 65536, sourceFd: fd, codec: 3 }), /^codec must be one of 0 \(None\)/],
    ['processDumpBatch with a codec of 7', () => addon.processDumpBatch!({ sourceFd: fd, pageCount: 1, codec: 7 }), /^codec must be one of/],
    ['decompressChunk with a codec of 3', () => addon.decompressChunk!(3, Buffer.alloc(4), 4), /^codec must be one of/],
    ['decompressChunk with a NaN codec', () => addon.decompressChunk!(NaN, Buffer.alloc(4), 4), /^codec must be one of/],
    ['writeBench with an engine of 3', () => addon.writeBench!({ fd, size: 4096, blockSize: 4096, engine: 3 }), /^engine must be one of 0 \(Auto\), 1 \(IoUring\), 2 \(Threads\)$/],
    ['restoreBatch with a page state of 4', () => addon.restoreBatch!({ spans: Float64Array.from([2, 0]), states: Uint8Array.from([1, 4]), chunks: new Float64Array(0), duplicates: new Float64Array(0) }), /^states: element 1 must be one of 0 \(Zero\), 1 \(Data\), 2 \(Duplicate\), 3 \(Parent\)$/],
  ];
  for (const [name, call, message] of enumCases) {
    it(`${name}: a RangeError naming the field`, async () => {
      const error = await failure(call);
      expect(error).toBeInstanceOf(RangeError);
      expect(error.message).toMatch(message);
    });
  }

  it('the enum values the engines define pass the checks', async () => {
    const target = Buffer.alloc(4096);
    await addon.copy!({ ...copyJob({ zeroMode: ZeroMode.Write }, { codec: Codec.Zstd }), memory: target, threads: 1 });
    expect(target.equals(Buffer.alloc(4096, 1))).toBe(true);
    for (const codec of [Codec.Deflate, Codec.Zstd]) {
      // Empty input of a real codec: refused by the engine (a rejection), not by the argument check.
      expect((await failure(() => addon.decompressChunk!(codec, Buffer.alloc(0), 4))).message).toMatch(/does not decompress/);
    }
  });

  it('decompressChunk resolves through the shared worker, and rejects through it', async () => {
    const stored = Buffer.from('stored as is');
    expect(await addon.decompressChunk!(Codec.None, stored, stored.length)).toEqual(stored);
    expect((await failure(() => addon.decompressChunk!(Codec.None, stored, stored.length + 1))).message).toMatch(/does not decompress to its length/);
  });

  it('a second ZstdStream step while one runs is an error', async () => {
    const stream = new addon.ZstdStream(true, 3, 0);
    const first = stream.step(Buffer.alloc(10), Buffer.alloc(100), false);
    expect((await failure(() => stream.step(Buffer.alloc(10), Buffer.alloc(100), false))).message).toMatch(/already running/);
    await first;
  });

  it('hash64 of parts is the hash64 of their bytes one after another', () => {
    const bytes = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 31) & 0xff));
    const parts = [bytes.subarray(0, 1), bytes.subarray(1, 1), bytes.subarray(1, 4097), bytes.subarray(4097)];
    expect(addon.hash64!(parts)).toBe(addon.hash64!(bytes));
    expect(addon.hash64!([bytes.subarray(0, 4096)])).not.toBe(addon.hash64!(bytes));
  });

  it('startWriteback: 0 on a file, the errno on a pipe (off the JavaScript thread)', async () => {
    expect(await addon.startWriteback!(fd, 0, 4096)).toBe(0);
    const fifo = path.join(dir, 'writeback-pipe');
    execFileSync('mkfifo', [fifo]);
    const pipeFd = fs.openSync(fifo, 'r+');
    try {
      expect(await addon.startWriteback!(pipeFd, 0, 4096)).toBe(os.constants.errno.ESPIPE);
    } finally {
      fs.closeSync(pipeFd);
    }
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

/**
 * The byte streams under snapshot archives: a file written or read in order,
 * through zstd (native, libzstd's own threads) or gzip (fflate, on its worker
 * thread). The tar layer above is in ./tar.ts; what goes in it, in ./index.ts.
 */
import type { AsyncGzip } from 'fflate';
import type * as fs from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { crc32 } from 'node:zlib';
import { Qcow2Error, ioError } from '../errors';
import { native } from '../native';
import type { ByteSink } from './tar';

/** fflate takes about 10 ms to load, and only .tar.gz archives need it. */
function fflate(): typeof import('fflate') {
  return require('fflate') as typeof import('fflate');
}

export type ArchiveKind = 'tar' | 'tar.gz' | 'tar.zst';

/** The archive kind a name asks for, by its extension; undefined for a folder bundle. */
export function archiveKind(path: string): ArchiveKind | undefined {
  if (/\.tar$/i.test(path)) return 'tar';
  if (/\.(tar\.gz|tgz)$/i.test(path)) return 'tar.gz';
  if (/\.(tar\.zst|tzst)$/i.test(path)) return 'tar.zst';
  return undefined;
}

const CHUNK_BYTES = 4 << 20;
/** Uncompressed bytes queued on the gzip worker before the writer waits for it. */
const GZIP_QUEUE_BYTES = 16 << 20;
/** Compressed bytes a gunzip push takes, and how many may be in fflate's worker at once. */
const GUNZIP_SLICE_BYTES = 64 << 10;
const GUNZIP_IN_FLIGHT_BYTES = 2 * GUNZIP_SLICE_BYTES;

/** Appends to a file; `bytes` counts what was written. */
export class FileSink implements ByteSink {
  bytes = 0;

  constructor(
    private readonly handle: fs.FileHandle,
    private readonly path: string,
    /** What a failed write could not do. */
    private readonly what = 'cannot write the archive',
  ) {}

  async write(data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, this.bytes + done).catch((error) => {
        throw ioError(error, this.path, this.what);
      });
      done += bytesWritten;
    }
    this.bytes += data.length;
  }
}

/** A sink that compresses into another one; `end` flushes the last bytes. */
export interface CompressingSink extends ByteSink {
  end(): Promise<void>;
  /** Stops without finishing: a worker thread of its own must not keep the process alive. */
  abort(): void;
}

class ZstdSink implements CompressingSink {
  private readonly stream;
  private readonly output = Buffer.allocUnsafe(CHUNK_BYTES);

  constructor(
    private readonly next: ByteSink,
    level: number,
  ) {
    this.stream = new (native().ZstdStream)(true, level, Math.max(1, availableParallelism()));
  }

  async write(data: Buffer): Promise<void> {
    let input = data;
    while (input.length > 0) {
      const step = await this.stream.step(input, this.output, false);
      // The next sink has written the bytes when its write resolves: the buffer is free again.
      if (step.produced > 0) await this.next.write(this.output.subarray(0, step.produced));
      input = input.subarray(step.consumed);
    }
  }

  async end(): Promise<void> {
    for (;;) {
      const step = await this.stream.step(Buffer.alloc(0), this.output, true);
      if (step.produced > 0) await this.next.write(this.output.subarray(0, step.produced));
      if (step.finished) return;
    }
  }

  // libzstd's threads belong to the stream, freed with it: nothing to stop.
  abort(): void {}
}

class GzipSink implements CompressingSink {
  private readonly gzip: AsyncGzip;
  private writes: Promise<void> = Promise.resolve();
  private failure: Error | undefined;
  private finished: (() => void) | undefined;
  private drained: (() => void) | undefined;

  constructor(
    private readonly next: ByteSink,
    level: number,
  ) {
    this.gzip = new (fflate().AsyncGzip)({ level: Math.min(9, Math.max(0, level)) as 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 });
    this.gzip.ondata = (error, data, final) => {
      if (error) this.failure = error;
      else this.writes = this.writes.then(() => this.next.write(Buffer.from(data.buffer, data.byteOffset, data.length))).catch((e: Error) => {
        this.failure ??= e;
      });
      if (final || error) void this.writes.then(() => this.finished?.());
      // A failed worker never drains: wake a writer waiting for it.
      if (error) this.drained?.();
    };
    this.gzip.ondrain = () => this.drained?.();
  }

  async write(data: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    // fflate transfers the chunk's whole ArrayBuffer to its worker: hand it a copy of its own.
    this.gzip.push(new Uint8Array(data));
    while (this.gzip.queuedSize > GZIP_QUEUE_BYTES && !this.failure) {
      await new Promise<void>((resolve) => (this.drained = resolve));
    }
    await this.writes;
  }

  async end(): Promise<void> {
    // After a failure the worker is gone and would never answer the final push.
    if (this.failure) throw this.failure;
    const done = new Promise<void>((resolve) => (this.finished = resolve));
    this.gzip.push(new Uint8Array(0), true);
    await done;
    if (this.failure) throw this.failure;
  }

  abort(): void {
    this.gzip.terminate();
    this.drained?.();
  }
}

/** A compressing sink for the kind (plain tar: none). */
export function compressingSink(kind: ArchiveKind, next: ByteSink, level?: number): CompressingSink | undefined {
  if (kind === 'tar.zst') return new ZstdSink(next, level ?? 3);
  if (kind === 'tar.gz') return new GzipSink(next, level ?? 6);
  return undefined;
}

/** The chunks of a file from `start`, in order. */
export async function* fileChunks(handle: fs.FileHandle, path: string, start = 0): AsyncGenerator<Buffer> {
  let position = start;
  for (;;) {
    const buffer = Buffer.allocUnsafe(CHUNK_BYTES);
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, position).catch((error) => {
      throw ioError(error, path, 'cannot read the archive');
    });
    if (bytesRead === 0) return;
    position += bytesRead;
    yield buffer.subarray(0, bytesRead);
  }
}

async function* zstdChunks(input: AsyncIterable<Buffer>, path: string): AsyncGenerator<Buffer> {
  const stream = new (native().ZstdStream)(false, 0, 0);
  let frameComplete = false;
  let sawInput = false;
  const fail = (error: Error): never => {
    throw new Qcow2Error('BAD_ARCHIVE', `the zstd stream is damaged: ${error.message.replace(/^zstd: /, '')}`, { path });
  };
  const drain = async function* (chunk: Buffer): AsyncGenerator<Buffer> {
    let rest = chunk;
    for (;;) {
      const output = Buffer.allocUnsafe(CHUNK_BYTES);
      const step = await stream.step(rest, output, false).catch(fail);
      if (step.consumed > 0 || step.produced > 0) frameComplete = step.finished;
      rest = rest.subarray(step.consumed);
      if (step.produced > 0) yield output.subarray(0, step.produced);
      // More to come from this input, or output still held inside the decoder.
      if (rest.length === 0 && step.produced < output.length) return;
    }
  };
  for await (const chunk of input) {
    sawInput ||= chunk.length > 0;
    yield* drain(chunk);
  }
  yield* drain(Buffer.alloc(0));
  if (!sawInput || !frameComplete) throw new Qcow2Error('BAD_ARCHIVE', 'the zstd stream ends inside a frame (truncated?)', { path });
}

/**
 * fflate does not check the gzip trailer: the CRC-32 and length of what was
 * decoded are compared with the stream's last 8 bytes here (one gzip member, as
 * `gzip`, `tar -z` and this package write).
 */
async function* gunzipChunks(input: AsyncIterable<Buffer>, path: string): AsyncGenerator<Buffer> {
  let crc = 0;
  let length = 0;
  let tail = Buffer.alloc(0);
  async function* remember(): AsyncGenerator<Buffer> {
    for await (const chunk of input) {
      tail = Buffer.concat([tail, chunk.subarray(Math.max(0, chunk.length - 8))]).subarray(-8);
      yield chunk;
    }
  }
  for await (const chunk of inflateChunks(remember(), path)) {
    crc = crc32(chunk, crc);
    length = (length + chunk.length) % 2 ** 32;
    yield chunk;
  }
  if (tail.length < 8 || tail.readUInt32LE(0) !== crc || tail.readUInt32LE(4) !== length) {
    throw new Qcow2Error('BAD_ARCHIVE', 'the gzip trailer does not match the data (truncated or damaged)', { path });
  }
}

async function* inflateChunks(input: AsyncIterable<Buffer>, path: string): AsyncGenerator<Buffer> {
  const queue: Buffer[] = [];
  let failure: Error | undefined;
  let ended = false;
  let wake: (() => void) | undefined;
  const gunzip = new (fflate().AsyncGunzip)((error, data, final) => {
    if (error) failure = error;
    else if (data.length > 0) queue.push(Buffer.from(data.buffer, data.byteOffset, data.length));
    if (final || error) ended = true;
    wake?.();
  });
  gunzip.ondrain = () => wake?.();
  const fail = (error: Error) => new Qcow2Error('BAD_ARCHIVE', `not a valid gzip stream: ${error.message}`, { path });
  const iterator = input[Symbol.asyncIterator]();
  let inputDone = false;
  let pending: Buffer = Buffer.alloc(0);
  try {
    for (;;) {
      if (failure) throw fail(failure);
      if (queue.length > 0) {
        yield queue.shift()!;
        continue;
      }
      if (ended) return;
      // fflate inflates each push into one buffer, and deflate expands up to about 1032 times:
      // small slices, few in flight, bound the memory whatever the archive holds.
      if (!inputDone && gunzip.queuedSize < GUNZIP_IN_FLIGHT_BYTES) {
        if (pending.length === 0) {
          const next = await iterator.next();
          inputDone = next.done === true;
          if (!inputDone) pending = next.value as Buffer;
        }
        const slice = pending.subarray(0, GUNZIP_SLICE_BYTES);
        pending = pending.subarray(slice.length);
        // The final push makes fflate report a stream that ends early as an error.
        gunzip.push(new Uint8Array(slice), inputDone);
        continue;
      }
      await new Promise<void>((resolve) => (wake = resolve));
      wake = undefined;
    }
  } finally {
    gunzip.terminate();
  }
}

/** The uncompressed tar stream of an archive, in chunks. */
export function tarStream(kind: ArchiveKind, handle: fs.FileHandle, path: string): AsyncGenerator<Buffer> {
  const raw = fileChunks(handle, path);
  if (kind === 'tar.zst') return zstdChunks(raw, path);
  if (kind === 'tar.gz') return gunzipChunks(raw, path);
  return raw;
}

/**
 * `load IMAGE -`: the raw virtual disk, in order, into a stream (stdout, a pipe, a socket).
 * Bytes come from the Image's read path (Image.createReadStream): zero ranges are written as
 * zeros, and the stream's backpressure bounds memory to about two chunks.
 */
import { Transform, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Qcow2Error } from '../errors';
import { JobCounters, ProgressSampler, type ProgressCallback } from '../jobs';
import type { Image, OpenOptions } from '../qcow2/image';
import { open } from '../qcow2/open';

/** How `loadToStream` opens the image, its progress, cancel and chunk size. */
export interface LoadToStreamOptions extends Omit<OpenOptions, 'metadataOnly' | 'region' | 'backingOf'> {
  /** Called about every 250 ms with the bytes written so far, and once at the end. */
  onProgress?: ProgressCallback;
  /** Stops the copy at the next chunk; the promise rejects with CANCELLED. */
  signal?: AbortSignal;
  /** Bytes read from the image at a time (default 4 MiB): with backpressure, about two are in memory. */
  chunkSize?: number;
  /** How the stream is named in errors and in the result (default "-"). */
  name?: string;
}

export interface LoadToStreamResult {
  /** The stream's name ("-" for stdout). */
  target: string;
  virtualSize: number;
  /** Guest bytes that held data. */
  dataBytes: number;
  /** Guest bytes written as zeros. */
  zeroBytes: number;
  seconds: number;
}

/**
 * Writes the raw virtual disk of `source` (a path or an open Image) into `output` in order,
 * from byte 0 to the virtual size, waiting for the stream to drain. The stream is ended when
 * the disk is written.
 *
 * @example
 * await loadToStream('disk.qcow2', process.stdout); // qcow2img load disk.qcow2 - | ssh host dd of=/dev/sdb
 */
export async function loadToStream(source: string | Image, output: Writable, options: LoadToStreamOptions = {}): Promise<LoadToStreamResult> {
  const name = options.name ?? '-';
  const image = typeof source === 'string' ? await open(source, { ...options, metadataOnly: false }) : source;
  try {
    image.checkReadable();
    if (options.signal?.aborted) throw new Qcow2Error('CANCELLED', 'cancelled before the first byte', { path: name });
    const counters = new JobCounters();
    const sampler = new ProgressSampler(counters, image.virtualSize, options.onProgress);
    let zeroBytes = 0;
    let written = 0;
    const count = new Transform({
      transform(chunk: Buffer, _encoding, done) {
        // Counted in 64 KiB pieces (the stream carries the zeros either way).
        zeroBytes += zeroBytesOf(chunk);
        written += chunk.length;
        counters.words[0] = BigInt(written - zeroBytes);
        counters.words[1] = BigInt(zeroBytes);
        done(null, chunk);
      },
    });
    sampler.start();
    try {
      await pipeline(image.createReadStream({ highWaterMark: options.chunkSize ?? 4 * 1024 * 1024 }), count, output, options.signal ? { signal: options.signal } : {});
    } catch (error) {
      if (error instanceof Qcow2Error) throw error;
      const e = error as NodeJS.ErrnoException;
      if (e?.name === 'AbortError') throw new Qcow2Error('CANCELLED', `cancelled after ${written} of ${image.virtualSize} bytes`, { path: name });
      const reason = e?.code === 'EPIPE' ? 'the reader went away' : (e?.message ?? String(error));
      throw new Qcow2Error('IO_ERROR', `writing the disk failed after ${written} of ${image.virtualSize} bytes: ${reason}`, { path: name, cause: error, ...(e?.code ? { syscallCode: e.code } : {}) });
    } finally {
      sampler.stop();
    }
    sampler.emit('done');
    return { target: name, virtualSize: image.virtualSize, dataBytes: written - zeroBytes, zeroBytes, seconds: sampler.elapsedSeconds() };
  } finally {
    if (typeof source === 'string') await image.close();
  }
}

const zeros = Buffer.alloc(64 * 1024);

function zeroBytesOf(chunk: Buffer): number {
  let count = 0;
  for (let i = 0; i < chunk.length; i += zeros.length) {
    const piece = chunk.subarray(i, Math.min(chunk.length, i + zeros.length));
    if (piece.equals(zeros.subarray(0, piece.length))) count += piece.length;
  }
  return count;
}

/**
 * A remote image file seen as an open file. Two ways in:
 *
 * - `read()` (header, L1/L2 tables, refcounts, snapshot tables: what the TypeScript reader and
 *   `check` read through FileHandle.read) goes through a bounded LRU of 1 MiB blocks, so
 *   metadata is fetched once and neighbouring tables come with one request.
 * - `stage()`: before a native copy job runs, the byte ranges its plan reads are fetched
 *   (coalesced, several requests in flight) into one buffer, which the job reads as the file's
 *   extents. Buffers go back to a small pool when the job is done and are filled again by the
 *   next batch: their pages are touched once, not allocated and freed per batch.
 */
import type * as fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import type { OpenFile } from '../qcow2/layers';
import { HttpFile, type HttpOptions, type Piece } from './client';
import { parseUrl } from './url';

const blockSize = 1 << 20;
const cachedBlocks = 32;
/** Ranges closer than this are fetched as one (the gap with them). */
const coalesceGap = 256 * 1024;
/** Largest single request: a large range is split so that several connections share it. */
const pieceBytes = 8 * 1024 * 1024;
/** Stage buffers kept for the next batches once returned. */
const pooledStages = 2;
/** A new stage buffer has this much room beyond the bytes asked for, so that the next batch's usually fits. */
const stageSlack = 1.25;

/** Bytes of a remote file fetched into memory for one native job. */
export interface Stage {
  buffer: Buffer;
  /** fileOffset, length, offset in buffer: per fetched range, sorted. */
  extents: Float64Array;
}

export type Range = [start: number, end: number];

/** Sorted, merged ranges; `gap`: ranges closer than that are merged too. */
export function mergeRanges(ranges: Range[], gap = 0): Range[] {
  const sorted = ranges.filter(([a, b]) => b > a).sort((x, y) => x[0] - y[0]);
  const out: Range[] = [];
  for (const [a, b] of sorted) {
    const last = out[out.length - 1];
    if (last && a <= last[1] + gap) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

/** One identity per URL shown, so a backing chain that loops through URLs is caught. */
const inodes = new Map<string, number>();

/** A FileHandle-shaped view of a remote file (read, stat, close; no descriptor). */
export class RemoteHandle {
  /** No descriptor: native jobs read a remote file from its stages. */
  readonly fd = -1;
  readonly remote = true;
  private readonly blocks = new Map<number, Promise<Buffer>>();
  /** Stage buffers free for the next batch. */
  private readonly pool: Buffer[] = [];
  /** Bytes of the stages lent out and not yet returned. */
  private lent = 0;
  /** The largest stage buffer made: a new one is no smaller. */
  private largestStage = 0;
  private readonly connections: number;

  private constructor(
    readonly http: HttpFile,
    head: Buffer,
    options: HttpOptions,
  ) {
    this.connections = options.connections ?? 8;
    if (head.length >= Math.min(blockSize, http.size)) this.blocks.set(0, Promise.resolve(head.subarray(0, Math.min(blockSize, http.size))));
  }

  static async open(url: URL, options: HttpOptions): Promise<RemoteHandle> {
    const { file, head } = await HttpFile.open(url, options, blockSize);
    return new RemoteHandle(file, head, options);
  }

  private block(index: number): Promise<Buffer> {
    const hit = this.blocks.get(index);
    if (hit) {
      this.blocks.delete(index);
      this.blocks.set(index, hit);
      return hit;
    }
    const start = index * blockSize;
    const length = Math.min(blockSize, this.http.size - start);
    const pending = (async () => {
      const buffer = Buffer.allocUnsafe(length);
      await this.http.fetch(start, length, (chunk, at) => chunk.copy(buffer, at - start));
      return buffer;
    })();
    pending.catch(() => this.blocks.delete(index));
    this.blocks.set(index, pending);
    if (this.blocks.size > cachedBlocks) this.blocks.delete(this.blocks.keys().next().value as number);
    return pending;
  }

  /** FileHandle.read(buffer, offset, length, position): from the block cache. */
  async read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number; buffer: Buffer }> {
    const end = Math.min(position + length, this.http.size);
    let done = 0;
    for (let at = position; at < end; ) {
      const index = Math.floor(at / blockSize);
      const block = await this.block(index);
      const from = at - index * blockSize;
      const take = Math.min(block.length - from, end - at);
      block.copy(buffer, offset + done, from, from + take);
      done += take;
      at += take;
    }
    return { bytesRead: done, buffer };
  }

  async stat(): Promise<fs.Stats> {
    // Not a regular file to the callers that ask (no blocks to count, no holes to seek).
    const size = this.http.size;
    return { size, blocks: Math.ceil(size / 512), dev: 0, ino: 0, isFile: () => false, isBlockDevice: () => false, isDirectory: () => false } as unknown as fs.Stats;
  }

  /**
   * Fetches `ranges` (file offsets, clipped to the file) into a stage buffer, coalesced, with
   * several requests in flight. Give the stage back with `unstage` once its job is done.
   */
  async stage(ranges: Range[], signal?: AbortSignal): Promise<Stage> {
    const clipped = ranges.map(([a, b]) => [Math.max(0, a), Math.min(b, this.http.size)] as Range);
    const exact = mergeRanges(clipped);
    const wanted = exact.reduce((sum, [a, b]) => sum + b - a, 0);
    // Reading through small gaps saves requests, unless the gaps would outweigh the bytes wanted.
    const coalesced = mergeRanges(exact, coalesceGap);
    const extents = coalesced.reduce((sum, [a, b]) => sum + b - a, 0) <= 2 * wanted ? coalesced : exact;
    const stage = this.takeStage(extents.reduce((sum, [a, b]) => sum + b - a, 0), extents);
    try {
      await this.fill(stage, signal);
      return stage;
    } catch (error) {
      this.unstage(stage);
      throw error;
    }
  }

  /** Returns a stage's buffer to the pool, which keeps the largest. */
  unstage(stage: Stage): void {
    this.lent -= stage.buffer.length;
    this.pool.push(stage.buffer);
    this.pool.sort((x, y) => y.length - x.length);
    this.pool.length = Math.min(this.pool.length, pooledStages);
  }

  /** Bytes of stages lent out now (for tests of the memory bound). */
  heldBytes(): number {
    return this.lent;
  }

  private takeStage(bytes: number, ranges: Range[]): Stage {
    const fits = this.pool.filter((b) => b.length >= bytes).sort((x, y) => x.length - y.length)[0];
    if (fits) this.pool.splice(this.pool.indexOf(fits), 1);
    const buffer = fits ?? Buffer.allocUnsafeSlow(Math.max(this.largestStage, Math.ceil((bytes * stageSlack) / 65536) * 65536));
    this.largestStage = Math.max(this.largestStage, buffer.length);
    this.lent += buffer.length;
    const extents = new Float64Array(ranges.length * 3);
    let at = 0;
    ranges.forEach(([a, b], i) => {
      extents.set([a, b - a, at], i * 3);
      at += b - a;
    });
    return { buffer, extents };
  }

  /**
   * Fetches every extent of `stage` into its buffer, in pieces: over plain HTTP first on native
   * threads (fetchDirect), then what that left over the node:http connections, with retries.
   */
  private async fill(stage: Stage, signal: AbortSignal | undefined): Promise<void> {
    const all: Piece[] = [];
    for (let i = 0; i < stage.extents.length; i += 3) {
      const [file, length, into] = [stage.extents[i]!, stage.extents[i + 1]!, stage.extents[i + 2]!];
      for (let at = 0; at < length; at += pieceBytes) {
        const size = Math.min(pieceBytes, length - at);
        all.push({ from: file + at, to: file + at + size, into: stage.buffer.subarray(into + at, into + at + size) });
      }
    }
    const pieces = await this.http.fetchDirect(all, signal);
    // The first failure cuts the other requests, and all of them end before the buffer can go
    // back to the pool: none may write into it once another batch has it.
    const cut = new AbortController();
    const onAbort = () => cut.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    if (signal?.aborted) cut.abort();
    let next = 0;
    let failure: { error: unknown } | undefined;
    const worker = async () => {
      while (next < pieces.length && !failure) {
        const { from, to, into } = pieces[next++]!;
        try {
          await this.http.fetch(from, to - from, (chunk, at) => chunk.copy(into, at - from), cut.signal);
        } catch (error) {
          failure ??= { error };
          cut.abort();
        }
      }
    };
    try {
      await Promise.all(Array.from({ length: Math.min(this.connections, pieces.length) }, worker));
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    if (failure) throw failure.error;
  }

  async close(): Promise<void> {
    this.http.close();
    this.blocks.clear();
    this.pool.length = 0;
  }
}

/** The remote handle of an open file, if it is one. */
export function remoteOf(file: { handle: unknown }): RemoteHandle | undefined {
  return file.handle instanceof RemoteHandle ? file.handle : undefined;
}

/** Opens an http(s) image file as an OpenFile the reader and the copy engine use unchanged. */
export async function openRemoteFile(name: string, options: HttpOptions): Promise<OpenFile> {
  const url = parseUrl(name);
  const handle = await RemoteHandle.open(url, options);
  return { path: handle.http.shown, handle: handle as unknown as FileHandle, size: handle.http.size, base: 0, device: -1, inode: inodes.get(handle.http.shown) ?? inodes.set(handle.http.shown, inodes.size + 1).get(handle.http.shown)! };
}

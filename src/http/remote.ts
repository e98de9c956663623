/**
 * A remote image file seen as an open file. Two ways in:
 *
 * - `read()` (header, L1/L2 tables, refcounts, snapshot tables: what the TypeScript reader and
 *   `check` read through FileHandle.read) goes through a bounded LRU of 1 MiB blocks, so
 *   metadata is fetched once and neighbouring tables come with one request.
 * - `stage()`: before a native copy job runs, the byte ranges its plan reads are fetched
 *   (coalesced, several requests in flight) into chunks of 8 MiB, which the job reads as the
 *   file's extents. Chunks go back to a pool when the job is done and are filled again by the
 *   next batch: their pages are touched once, not allocated and freed per batch. They start on
 *   4 KiB boundaries, so the engine writes whole aligned data windows from them as they lie and
 *   decodes compressed clusters where they lie.
 */
import type * as fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { native, stagedExtentFields } from '../native';
import type { OpenFile } from '../qcow2/layers';
import { HttpFile, type HttpOptions, type Piece } from './client';
import { parseUrl } from './url';

const blockSize = 1 << 20;
const cachedBlocks = 32;
/** Ranges closer than this are fetched as one (the gap with them). */
const coalesceGap = 256 * 1024;
/**
 * Stages are made of chunks of this size, so that every batch reuses the chunks the one before it
 * gave back, whatever its size: none is allocated per batch, none outgrown.
 */
const chunkBytes = 8 * 1024 * 1024;
/**
 * Chunks kept for the next batches once given back: a load holds three stages of a batch that
 * fetches 48 MiB (two being written, one being fetched), 6 or 7 chunks each.
 */
const pooledChunks = 20;

/** Bytes of a remote file fetched into memory for one native job. */
export interface Stage {
  chunks: Buffer[];
  /** fileOffset, length, chunk, offset in the chunk: per extent, sorted by file offset. A range longer than a chunk's room continues in the next extent. */
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
  /** Stage chunks free for the next batch. */
  private readonly pool: Buffer[] = [];
  /** Bytes of the stages lent out and not yet returned. */
  private lent = 0;

  private constructor(
    readonly http: HttpFile,
    head: Buffer,
  ) {
    if (head.length >= Math.min(blockSize, http.size)) this.blocks.set(0, Promise.resolve(head.subarray(0, Math.min(blockSize, http.size))));
  }

  static async open(url: URL, options: HttpOptions): Promise<RemoteHandle> {
    const { file, head } = await HttpFile.open(url, options, blockSize);
    return new RemoteHandle(file, head);
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
   * Fetches `ranges` (file offsets, clipped to the file) into a stage, coalesced, with
   * several requests in flight. Give the stage back with `unstage` once its job is done.
   */
  async stage(ranges: Range[], signal?: AbortSignal): Promise<Stage> {
    const clipped = ranges.map(([a, b]) => [Math.max(0, a), Math.min(b, this.http.size)] as Range);
    const exact = mergeRanges(clipped);
    const wanted = exact.reduce((sum, [a, b]) => sum + b - a, 0);
    // Reading through small gaps saves requests, unless the gaps would outweigh the bytes wanted.
    const coalesced = mergeRanges(exact, coalesceGap);
    const extents = coalesced.reduce((sum, [a, b]) => sum + b - a, 0) <= 2 * wanted ? coalesced : exact;
    const stage = this.takeStage(extents);
    try {
      await this.fill(stage, signal);
      return stage;
    } catch (error) {
      this.unstage(stage);
      throw error;
    }
  }

  /** Gives a stage's chunks back to the pool. */
  unstage(stage: Stage): void {
    this.lent -= stage.chunks.length * chunkBytes;
    this.pool.push(...stage.chunks.slice(0, Math.max(0, pooledChunks - this.pool.length)));
  }

  /** Bytes of stages lent out now (for tests of the memory bound). */
  heldBytes(): number {
    return this.lent;
  }

  /** Chunks enough for `ranges`, laid out one after the other, a range split where a chunk ends. */
  private takeStage(ranges: Range[]): Stage {
    const bytes = ranges.reduce((sum, [a, b]) => sum + b - a, 0);
    const chunks = Array.from({ length: Math.ceil(bytes / chunkBytes) }, () => this.pool.pop() ?? native().alignedBuffer(chunkBytes));
    this.lent += chunks.length * chunkBytes;
    const extents: number[] = [];
    let at = 0;
    for (const [a, b] of ranges) {
      for (let from = a; from < b; ) {
        const length = Math.min(b - from, chunkBytes - (at % chunkBytes));
        extents.push(from, length, Math.floor(at / chunkBytes), at % chunkBytes);
        from += length;
        at += length;
      }
    }
    return { chunks, extents: Float64Array.from(extents) };
  }

  /** Fetches every extent of `stage` into its chunk: one request each, at most a chunk. */
  private async fill(stage: Stage, signal: AbortSignal | undefined): Promise<void> {
    const all: Piece[] = [];
    for (let i = 0; i < stage.extents.length; i += stagedExtentFields) {
      const [from, length, chunk, at] = stage.extents.subarray(i, i + stagedExtentFields) as unknown as [number, number, number, number];
      all.push({ from, to: from + length, into: stage.chunks[chunk]!.subarray(at, at + length) });
    }
    await this.http.fetchAll(all, signal);
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

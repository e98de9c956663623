/**
 * A remote image file seen as an open file. Two ways in:
 *
 * - `read()` (header, L1/L2 tables, refcounts, snapshot tables: what the TypeScript reader and
 *   `check` read through FileHandle.read) goes through a bounded LRU of 1 MiB blocks, so
 *   metadata is fetched once and neighbouring tables come with one request.
 * - `fd` is a memfd as large as the remote file and sparse. Before a native copy job runs,
 *   the byte ranges its plan reads are fetched into the memfd at their file offsets
 *   (coalesced, several requests in flight: `ensure`), so the native engine preads it as it
 *   preads a local image; once the job is done they are punched out (`release`), which bounds
 *   the memory to the batches in flight.
 */
import * as fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { Qcow2Error, ioError } from '../errors';
import { native } from '../native';
import type { OpenFile } from '../qcow2/layers';
import { HttpFile, type HttpOptions } from './client';
import { parseUrl } from './url';

const blockSize = 1 << 20;
const cachedBlocks = 32;
/** Ranges closer than this are fetched as one (the gap with them). */
const coalesceGap = 256 * 1024;
/** Largest single request: a large range is split so that several connections share it. */
const pieceBytes = 8 * 1024 * 1024;

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

/** `ranges` minus `remove` (both merged and sorted). */
export function subtractRanges(ranges: readonly Range[], remove: readonly Range[]): Range[] {
  const out: Range[] = [];
  let j = 0;
  for (const [a0, b] of ranges) {
    let a = a0;
    while (j < remove.length && remove[j]![1] <= a) j++;
    let k = j;
    while (a < b && k < remove.length && remove[k]![0] < b) {
      const [ra, rb] = remove[k]!;
      if (ra > a) out.push([a, Math.min(ra, b)]);
      a = Math.max(a, rb);
      k++;
    }
    if (a < b) out.push([a, b]);
  }
  return out;
}

/** One identity per URL shown, so a backing chain that loops through URLs is caught. */
const inodes = new Map<string, number>();

/** A FileHandle-shaped view of a remote file (read, stat, close, fd). */
export class RemoteHandle {
  readonly fd: number;
  readonly remote = true;
  private readonly blocks = new Map<number, Promise<Buffer>>();
  /** Ranges fetched into the memfd and not yet punched. */
  private present: Range[] = [];
  /** Ranges each prefetch in flight holds. */
  private readonly holds = new Set<Range[]>();
  private readonly connections: number;

  private constructor(
    readonly http: HttpFile,
    head: Buffer,
    options: HttpOptions,
  ) {
    const fd = native().memoryFile(`qcow2img:${http.url.host}`);
    if (fd < 0) {
      http.close();
      throw new Qcow2Error('IO_ERROR', `memfd_create failed (errno ${-fd})`, { path: http.shown });
    }
    this.fd = fd;
    fs.ftruncateSync(fd, http.size);
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
   * Fetches `ranges` (file offsets) into the memfd, coalesced, with several requests in flight,
   * and holds them until `release` is called with the returned token.
   */
  ensure(ranges: Range[], signal?: AbortSignal): Promise<Range[]> {
    // One at a time: a later ensure then never takes as present what an earlier one still fetches.
    const run = this.queue.then(() => this.ensureNow(ranges, signal));
    this.queue = run.catch(() => {});
    return run;
  }

  private queue: Promise<unknown> = Promise.resolve();

  private async ensureNow(ranges: Range[], signal: AbortSignal | undefined): Promise<Range[]> {
    const wanted = mergeRanges(
      ranges.map(([a, b]) => [Math.max(0, a), Math.min(b, this.http.size)] as Range),
      coalesceGap,
    );
    this.holds.add(wanted);
    try {
      const missing = subtractRanges(wanted, this.present);
      // Claimed before fetching: a concurrent ensure of the same bytes waits on none of them,
      // but the copy that needs them awaits this ensure.
      this.present = mergeRanges([...this.present, ...missing]);
      const pieces: Range[] = [];
      for (const [a, b] of missing) for (let at = a; at < b; at += pieceBytes) pieces.push([at, Math.min(b, at + pieceBytes)]);
      let next = 0;
      const worker = async () => {
        while (next < pieces.length) {
          const [a, b] = pieces[next++]!;
          await this.http.fetch(a, b - a, (chunk, at) => {
            let written = 0;
            try {
              while (written < chunk.length) written += fs.writeSync(this.fd, chunk, written, chunk.length - written, at + written);
            } catch (error) {
              // ENOMEM/ENOSPC of the memory file: a Qcow2Error naming the URL, not a raw errno.
              throw ioError(error, this.http.shown, 'cannot hold the fetched bytes in memory');
            }
          }, signal);
        }
      };
      try {
        await Promise.all(Array.from({ length: Math.min(this.connections, pieces.length) }, worker));
      } catch (error) {
        next = pieces.length;
        this.present = subtractRanges(this.present, missing);
        throw error;
      }
      return wanted;
    } catch (error) {
      this.holds.delete(wanted);
      throw error;
    }
  }

  /** Punches out what `ensure` fetched for `token`, except what another prefetch in flight holds. */
  release(token: Range[]): void {
    if (!this.holds.delete(token)) return;
    const others = mergeRanges([...this.holds].flat().map(([a, b]) => [a, b] as Range));
    const free = subtractRanges(token, others);
    for (const [a, b] of free) native().punchHole(this.fd, a, b - a);
    this.present = subtractRanges(this.present, free);
  }

  /** Bytes held in the memfd now (for tests of the memory bound). */
  heldBytes(): number {
    return this.present.reduce((sum, [a, b]) => sum + b - a, 0);
  }

  async close(): Promise<void> {
    this.http.close();
    this.blocks.clear();
    fs.closeSync(this.fd);
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

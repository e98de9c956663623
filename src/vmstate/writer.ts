/**
 * Writing a VM state file in one pass: header, REGIONS, CPU and DEVICE sections,
 * then CHUNK sections as the native engine produces them, then the INDEX and the
 * footer. Memory stays bounded by one batch of guest RAM plus the index.
 */
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { randomUUID } from 'node:crypto';
import { Qcow2Error, ioError, throwIfCancelled } from '../errors';
import { syncFolder, temporaryPathFor } from '../files';
import { native } from '../native';
import { JobCounters, ProgressSampler, threadCount, type ProgressCallback } from '../jobs';
import { type CpuState, encodeCpuState } from './cpu';
import {
  CHUNK_HEADER_BYTES, ChunkCodec, type ChunkMapEntry, encodeFooter, encodeHeader, encodeIndex, encodeRegions,
  encodeSectionHeader, PAGE_SIZE, padding, packStates, type Region, type SectionEntry,
  sameRegions, SECTION_VERSION, SectionType, SPAN_PAGES, stateLimits,
} from './format';
import type { StateFile } from './reader';

export interface MemoryRegion {
  guestBase: number;
  size: number;
  /** Where the region starts in the RAM dump (default: regions back to back from 0). */
  dumpOffset?: number;
}

export interface WriteStateOptions {
  /** Raw guest RAM dump. Without it, the state holds no memory. */
  memory?: string;
  /** How the dump maps to guest-physical memory (default: one region from 0). */
  regions?: MemoryRegion[];
  cpu?: CpuState;
  devices?: { name: string; data: Buffer }[];
  /** Store only what differs from this dump (pages equal to it become PARENT). */
  parent?: StateFile;
  /** With a parent: 1 bit a page (LSB first) over the dump's pages, set = changed. Without it, pages are compared. */
  dirtyBitmap?: Buffer;
  compress?: 'zstd' | 'deflate' | 'none';
  /** zstd 1-19 (default 2), deflate 1-12 (default 6). */
  level?: number;
  threads?: number;
  /** Stops between batches of pages; the state file is then not written. */
  signal?: AbortSignal;
  onProgress?: ProgressCallback;
}

export interface WriteStateResult {
  path: string;
  bytes: number;
  snapshotId: string;
  digest: string;
  /** Guest memory as stored: where each region sits in guest-physical space and in the dump. */
  regions: { guestBase: number; size: number; dumpOffset: number }[];
  pages: { zero: number; data: number; duplicate: number; parent: number };
  seconds: number;
}

/** Guest bytes per native batch: whole spans, so chunks never cross batches. */
const batchBytes = 64 * 1024 * 1024;
const codecs = { none: ChunkCodec.none, zstd: ChunkCodec.zstd, deflate: ChunkCodec.deflate } as const;

export function uuidBytes(id: string): Buffer {
  return Buffer.from(id.replace(/-/g, ''), 'hex');
}

function planRegions(requested: MemoryRegion[] | undefined, dumpSize: number, path: string): Region[] {
  const wanted = requested ?? (dumpSize > 0 ? [{ guestBase: 0, size: Math.floor(dumpSize / PAGE_SIZE) * PAGE_SIZE, dumpOffset: 0 }] : []);
  const regions: Region[] = [];
  let firstPage = 0;
  let nextDump = 0;
  for (const [i, r] of wanted.entries()) {
    const dumpOffset = r.dumpOffset ?? nextDump;
    if (!Number.isSafeInteger(r.guestBase) || !Number.isSafeInteger(r.size) || r.size <= 0 || r.size % PAGE_SIZE || r.guestBase % PAGE_SIZE || dumpOffset % PAGE_SIZE) {
      throw new Qcow2Error('INVALID_ARGUMENT', `memory region ${i} must have page-aligned base, size and dump offset`, { path });
    }
    if (dumpOffset + r.size > dumpSize) {
      throw new Qcow2Error('INVALID_ARGUMENT', `memory region ${i} ends at ${dumpOffset + r.size}, past the end of the RAM dump (${dumpSize} bytes)`, { path });
    }
    for (const other of regions) {
      if (r.guestBase < other.guestBase + other.size && other.guestBase < r.guestBase + r.size) {
        throw new Qcow2Error('INVALID_ARGUMENT', `memory region ${i} overlaps another region`, { path });
      }
    }
    regions.push({ guestBase: r.guestBase, size: r.size, dumpOffset, firstPage });
    firstPage += r.size / PAGE_SIZE;
    nextDump = dumpOffset + r.size;
  }
  return regions;
}

/**
 * Writes a VM state file at `output` (under a temporary name, renamed when complete).
 *
 * @example
 * await writeState('vm/state.qvms', { memory: 'ram.raw', cpu: JSON.parse(cpuJson) });
 */
export async function writeState(output: string, options: WriteStateOptions): Promise<WriteStateResult> {
  const path = nodePath.resolve(output);
  const started = process.hrtime.bigint();
  let source: fs.FileHandle | undefined;
  let out: fs.FileHandle | undefined;
  const temporary = temporaryPathFor(path);
  let renamed = false;
  try {
    let dumpSize = 0;
    if (options.memory !== undefined) {
      source = await fs.open(options.memory, 'r').catch((error) => {
        throw ioError(error, options.memory!, 'cannot open the RAM dump');
      });
      const stats = await source.stat();
      if (!stats.isFile() && !stats.isBlockDevice()) {
        throw new Qcow2Error('INVALID_ARGUMENT', 'the RAM dump must be a regular file or a block device (its pages are mapped, not streamed)', { path: options.memory });
      }
      dumpSize = stats.isBlockDevice() ? native().blockDeviceInfo(source.fd).sizeBytes : stats.size;
      if (dumpSize === 0) throw new Qcow2Error('INVALID_ARGUMENT', 'the RAM dump is empty', { path: options.memory });
      if (options.regions === undefined && dumpSize % PAGE_SIZE !== 0) {
        throw new Qcow2Error('INVALID_ARGUMENT', `the RAM dump's size (${dumpSize} bytes) is not a whole number of ${PAGE_SIZE}-byte pages; a memory map says which bytes are guest memory`, { path: options.memory });
      }
    }
    const regions = planRegions(options.regions, dumpSize, options.memory ?? path);
    const totalPages = regions.reduce((n, r) => n + r.size / PAGE_SIZE, 0);
    if (options.parent) {
      // Restore writes each layer at its own dump offsets, so those must match too.
      if (!sameRegions(options.parent.regions, regions)) {
        throw new Qcow2Error('INVALID_ARGUMENT', 'an incremental dump needs the same memory regions as its parent, at the same places of the RAM dump', { path });
      }
      if (options.dirtyBitmap && options.dirtyBitmap.length * 8 < totalPages) {
        throw new Qcow2Error('INVALID_ARGUMENT', `dirty bitmap covers ${options.dirtyBitmap.length * 8} pages, the regions hold ${totalPages}`, { path });
      }
    }
    out = await fs.open(temporary, 'wx', 0o644).catch((error) => {
      throw ioError(error, path, 'cannot create the state file');
    });
    const addon = native();
    const snapshotId = randomUUID();
    const header = encodeHeader({
      snapshotId: uuidBytes(snapshotId),
      parentId: options.parent ? options.parent.header.snapshotId : Buffer.alloc(16),
      parentDigest: options.parent ? options.parent.digest : Buffer.alloc(16),
    });
    let position = 0;
    const sections: SectionEntry[] = [];
    const write = async (buffer: Buffer) => {
      for (let done = 0; done < buffer.length; ) {
        const { bytesWritten } = await out!.write(buffer, done, buffer.length - done, position + done).catch((error) => {
          throw ioError(error, path, 'cannot write the state file');
        });
        done += bytesWritten;
      }
      position += buffer.length;
    };
    const writeSection = async (type: number, parts: Buffer[]) => {
      const payload = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
      const checksum = addon.hash64(payload);
      const sectionHeader = encodeSectionHeader(type, payload.length, checksum);
      sections.push({ type, flags: sectionHeader.readUInt16LE(6), version: SECTION_VERSION, offset: position, length: payload.length, checksum });
      await write(sectionHeader);
      await write(payload);
      const pad = padding(payload.length);
      if (pad) await write(Buffer.alloc(pad));
    };
    await write(header);
    await writeSection(SectionType.regions, [encodeRegions(regions)]);
    // Within what a reader accepts: a file its own reader refuses would be a lost snapshot.
    if (options.cpu) {
      const cpu = encodeCpuState(options.cpu, path);
      if (cpu.length > stateLimits.maxCpuBytes) throw new Qcow2Error('INVALID_ARGUMENT', `the CPU state takes ${cpu.length} bytes, over the ${stateLimits.maxCpuBytes} a state file holds`, { path });
      await writeSection(SectionType.cpu, [cpu]);
    }
    for (const device of options.devices ?? []) {
      const name = Buffer.from(device.name, 'utf8');
      const prefix = Buffer.alloc(2);
      prefix.writeUInt16LE(name.length);
      if (prefix.length + name.length + device.data.length > stateLimits.maxDeviceBytes) {
        throw new Qcow2Error('INVALID_ARGUMENT', `device blob "${device.name}" (${device.data.length} bytes) is over the ${stateLimits.maxDeviceBytes} bytes a state file holds`, { path });
      }
      await writeSection(SectionType.device, [prefix, name, device.data]);
    }

    const spanCount = regions.reduce((n, r) => n + Math.ceil(r.size / PAGE_SIZE / SPAN_PAGES), 0);
    const states = Buffer.alloc(Math.ceil((spanCount * SPAN_PAGES) / 4));
    const chunks: ChunkMapEntry[] = [];
    const duplicates: number[] = [];
    const pages = { zero: 0, data: 0, duplicate: 0, parent: 0 };
    const dedup = new addon.DedupTable();
    const counters = new JobCounters();
    const sampler = new ProgressSampler(counters, totalPages * PAGE_SIZE, options.onProgress);
    sampler.start();
    try {
      let regionFirstSpan = 0;
      for (const region of regions) {
        const regionPages = region.size / PAGE_SIZE;
        const pagesPerBatch = batchBytes / PAGE_SIZE;
        for (let done = 0; done < regionPages; done += pagesPerBatch) {
          throwIfCancelled(options.signal, path);
          const pageCount = Math.min(pagesPerBatch, regionPages - done);
          const firstSpan = regionFirstSpan + done / SPAN_PAGES;
          const firstPage = region.firstPage + done;
          let parentBytes: Buffer | undefined;
          let dirty: Buffer | undefined;
          if (options.parent && options.dirtyBitmap) {
            dirty = Buffer.alloc(Math.ceil(pageCount / 8));
            for (let i = 0; i < pageCount; i++) {
              const page = firstPage + i;
              if ((options.dirtyBitmap[page >> 3]! >> (page & 7)) & 1) dirty[i >> 3] = dirty[i >> 3]! | (1 << (i & 7));
            }
          } else if (options.parent) {
            parentBytes = Buffer.alloc(pageCount * PAGE_SIZE);
            await options.parent.readGuest(parentBytes, region.guestBase + done * PAGE_SIZE);
          }
          const batch = await addon.processDumpBatch({
            sourceFd: source!.fd,
            dumpOffset: region.dumpOffset + done * PAGE_SIZE,
            firstPage,
            pageCount,
            pageSize: PAGE_SIZE,
            spanPages: SPAN_PAGES,
            firstSpan,
            incremental: options.parent !== undefined,
            ...(parentBytes ? { parent: parentBytes } : {}),
            ...(dirty ? { dirty } : {}),
            dedup,
            codec: codecs[options.compress ?? 'zstd'],
            // zstd 2: measured on a real guest's RAM, smaller than `zstd -3` of the whole dump for 0.02 s more than level 1.
            level: options.level ?? (options.compress === 'deflate' ? 6 : 2),
            chunkTargetBytes: 1 << 20,
            threads: threadCount(options.threads, path),
          }).catch((error: Error) => {
            throw new Qcow2Error('IO_ERROR', error.message, { path: options.memory ?? path });
          });
          packStates(batch.states, states, firstSpan * SPAN_PAGES);
          for (const s of batch.states) pages[(['zero', 'data', 'duplicate', 'parent'] as const)[s]!]++;
          for (const d of batch.duplicates) duplicates.push(d);
          for (const chunk of batch.chunks) {
            const chunkHeader = Buffer.alloc(CHUNK_HEADER_BYTES);
            chunkHeader[0] = chunk.codec;
            chunkHeader.writeUInt32LE(chunk.spanCount, 4);
            chunkHeader.writeBigUInt64LE(BigInt(chunk.firstSpan), 8);
            chunkHeader.writeUInt32LE(chunk.rawLength, 16);
            chunkHeader.writeBigUInt64LE(chunk.rawChecksum, 24);
            chunks.push({ firstSpan: chunk.firstSpan, section: sections.length, spanCount: chunk.spanCount });
            await writeSection(SectionType.chunk, [chunkHeader, chunk.stored]);
          }
          counters.dataBytes = (firstPage + pageCount) * PAGE_SIZE;
        }
        regionFirstSpan += Math.ceil(regionPages / SPAN_PAGES);
      }
    } finally {
      sampler.stop();
    }

    throwIfCancelled(options.signal, path);
    const indexPayload = encodeIndex({ sections: [...sections], spanCount, chunks, states, duplicates: Float64Array.from(duplicates) });
    const indexOffset = position;
    const indexChecksum = addon.hash64(indexPayload);
    await write(encodeSectionHeader(SectionType.index, indexPayload.length, indexChecksum));
    await write(indexPayload);
    const pad = padding(indexPayload.length);
    if (pad) await write(Buffer.alloc(pad));
    const digest = addon.hash128(Buffer.concat([header, indexPayload]));
    await write(encodeFooter({ indexOffset, indexLength: indexPayload.length, digest, dataEnd: position }));
    await out.datasync();
    await out.close();
    out = undefined;
    await fs.rename(temporary, path);
    renamed = true;
    await syncFolder(nodePath.dirname(path));
    return {
      path,
      bytes: position,
      snapshotId,
      digest: digest.toString('hex'),
      regions: regions.map((r) => ({ guestBase: r.guestBase, size: r.size, dumpOffset: r.dumpOffset })),
      pages,
      seconds: Number(process.hrtime.bigint() - started) / 1e9,
    };
  } finally {
    await out?.close().catch(() => {});
    await source?.close().catch(() => {});
    if (!renamed) await fs.unlink(temporary).catch(() => {});
  }
}

/**
 * Writing a VM state file in one pass: header, REGIONS, CPU and DEVICE sections,
 * then CHUNK sections as the native engine produces them, then the INDEX and the
 * footer. Memory stays bounded by one batch's result being written, plus the index, while the
 * next batch is read by the native engine.
 */
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { randomUUID } from 'node:crypto';
import { Qcow2Error, ioError, throwIfCancelled } from '../errors';
import { holeUnits, openToRead, PendingFile, type Seek, seekOf, xxh3Hex } from '../files';
import { JobCounters, jobError, ProgressSampler, cpuThreadCount, type ProgressCallback } from '../jobs';
import { Codec, native, type NativeDedupTable, type NativeDumpBatchResult, type NativeDumpChunk } from '../native';
import { type CpuState, encodeCpuState } from './cpu';
import {
  CHUNK_HEADER_BYTES, chunkCodecByte, type ChunkMapEntry, encodeFooter, encodeHeader, encodeIndex, encodeRegions,
  encodeSectionHeader, PAGE_SIZE, padding, packStates, PageState, type Region, type SectionEntry,
  sameRegions, SECTION_VERSION, SectionType, SPAN_PAGES, stateLimits,
} from './format';
import type { StateFile } from './reader';

export interface MemoryRegion {
  guestBase: number;
  size: number;
  /** Where the region starts in the RAM dump (default: regions back to back from 0). */
  dumpOffset?: number;
}

/** What a state file holds: memory, vCPU state, device blobs; and how it is compressed. */
export interface WriteStateOptions {
  /** Raw guest RAM dump. Without it, the state holds no memory. */
  memory?: string;
  /** How the dump maps to guest-physical memory (default: one region from 0). */
  regions?: MemoryRegion[];
  /** vCPU state, as `cpuStateSchema` describes it. */
  cpu?: CpuState;
  /** Opaque device-state blobs, by name. */
  devices?: {
    /** The blob's name. */
    name: string;
    /** The blob's bytes. */
    data: Buffer;
  }[];
  /** Store only what differs from this dump (pages equal to it become PARENT). */
  parent?: StateFile;
  /** With a parent: 1 bit a page (LSB first) over the dump's pages, set = changed. Without it, pages are compared. */
  dirtyBitmap?: Buffer;
  /** How pages and blobs are compressed (default zstd). */
  compress?: 'zstd' | 'deflate' | 'none';
  /** zstd 1-19 (default 2), deflate 1-12 (default 6). */
  level?: number;
  /** Native worker threads, 1 to 64 (default: one a CPU). */
  threads?: number;
  /** Stops between batches of pages; the state file is then not written. */
  signal?: AbortSignal;
  /** Called about every 250 ms with the RAM bytes done. */
  onProgress?: ProgressCallback;
}

export interface WriteStateResult {
  path: string;
  bytes: number;
  /** The whole file's XXH3-64, 16 hex digits (what snapshot.json records of it). */
  xxh3: string;
  snapshotId: string;
  digest: string;
  /** Guest memory as stored: where each region sits in guest-physical space and in the dump. */
  regions: { guestBase: number; size: number; dumpOffset: number }[];
  pages: { zero: number; data: number; duplicate: number; parent: number };
  seconds: number;
}

/** Guest bytes per native batch: whole spans, so chunks never cross batches. */
const batchBytes = 64 * 1024 * 1024;
const codecs = { none: Codec.None, zstd: Codec.Zstd, deflate: Codec.Deflate } as const;

export function uuidBytes(id: string): Buffer {
  return Buffer.from(id.replace(/-/g, ''), 'hex');
}

const hex = (n: number) => `0x${n.toString(16)}`;
const describeRegion = (i: number, r: { guestBase: number; size: number; dumpOffset: number }) =>
  `region ${i} (guest ${hex(r.guestBase)}-${hex(r.guestBase + r.size)}, dump ${hex(r.dumpOffset)}-${hex(r.dumpOffset + r.size)})`;

/**
 * The regions of the state file from the memory map: each page aligned, and together tiling the
 * dump exactly: none runs past its end, none overlaps another in guest space or in the dump, and
 * no byte of the dump is left out (restore recreates the dump whole, at its recorded size).
 */
function planRegions(requested: MemoryRegion[] | undefined, dumpSize: number, path: string): Region[] {
  const wanted = requested ?? (dumpSize > 0 ? [{ guestBase: 0, size: Math.floor(dumpSize / PAGE_SIZE) * PAGE_SIZE, dumpOffset: 0 }] : []);
  const regions: Region[] = [];
  let firstPage = 0;
  let nextDump = 0;
  for (const [i, r] of wanted.entries()) {
    const dumpOffset = r.dumpOffset ?? nextDump;
    if (!Number.isSafeInteger(r.guestBase) || !Number.isSafeInteger(r.size) || !Number.isSafeInteger(dumpOffset) || r.guestBase < 0 || dumpOffset < 0 || r.size <= 0 || r.size % PAGE_SIZE || r.guestBase % PAGE_SIZE || dumpOffset % PAGE_SIZE) {
      throw new Qcow2Error('INVALID_ARGUMENT', `memory region ${i} must have page-aligned base, size and dump offset`, { path });
    }
    if (dumpOffset + r.size > dumpSize) {
      throw new Qcow2Error('INVALID_ARGUMENT', `memory map: ${describeRegion(i, { ...r, dumpOffset })} runs past the end of the RAM dump (${hex(dumpSize)} bytes)`, { path });
    }
    regions.push({ guestBase: r.guestBase, size: r.size, dumpOffset, firstPage });
    firstPage += r.size / PAGE_SIZE;
    nextDump = dumpOffset + r.size;
  }
  const numbered = regions.map((r, i) => ({ r, i }));
  for (const [space, key] of [['guest space', 'guestBase'], ['the RAM dump', 'dumpOffset']] as const) {
    const sorted = [...numbered].sort((a, b) => a.r[key] - b.r[key]);
    for (let k = 1; k < sorted.length; k++) {
      const a = sorted[k - 1]!;
      const b = sorted[k]!;
      if (b.r[key] < a.r[key] + a.r.size) {
        const [first, second] = a.i < b.i ? [a, b] : [b, a];
        throw new Qcow2Error('INVALID_ARGUMENT', `memory map: ${describeRegion(first.i, first.r)} and ${describeRegion(second.i, second.r)} overlap in ${space}`, { path });
      }
    }
  }
  // No overlap in the dump: sorted by dump offset, any gap between neighbours is uncovered.
  const gaps: string[] = [];
  let covered = 0;
  for (const { r } of [...numbered].sort((a, b) => a.r.dumpOffset - b.r.dumpOffset)) {
    if (r.dumpOffset > covered) gaps.push(`${hex(covered)}-${hex(r.dumpOffset)}`);
    covered = r.dumpOffset + r.size;
  }
  if (covered < dumpSize) gaps.push(`${hex(covered)}-${hex(dumpSize)}`);
  if (gaps.length > 0) {
    const shown = gaps.length > 8 ? [...gaps.slice(0, 8), `and ${gaps.length - 8} more`] : gaps;
    throw new Qcow2Error('INVALID_ARGUMENT', `memory map leaves bytes ${shown.join(', ')} of the RAM dump (${hex(dumpSize)} bytes) uncovered; every byte of the dump must be in a region`, { path });
  }
  return regions;
}

/** An open RAM dump: its size, and whether it is a regular file (whose holes are not read) or a block device. */
interface Dump {
  handle: fs.FileHandle;
  size: number;
  /** A regular file's holes, which are not read (a block device's pages are all read). */
  seek: Seek | undefined;
}

/** The RAM dump, opened for mapping its pages: a regular file or a block device, and its size. */
async function openDump(memory: string, regions: MemoryRegion[] | undefined): Promise<Dump> {
  const handle = await openToRead(memory, 'cannot open the RAM dump');
  try {
    const stats = await handle.stat();
    if (!stats.isFile() && !stats.isBlockDevice()) {
      throw new Qcow2Error('NOT_A_REGULAR_FILE', 'the RAM dump must be a regular file or a block device (its pages are mapped, not streamed)', { path: memory });
    }
    const size = stats.isBlockDevice() ? native().blockDeviceInfo(handle.fd).sizeBytes : stats.size;
    if (size === 0) throw new Qcow2Error('INVALID_ARGUMENT', 'the RAM dump is empty', { path: memory });
    if (regions === undefined && size % PAGE_SIZE !== 0) {
      throw new Qcow2Error('INVALID_ARGUMENT', `the RAM dump's size (${size} bytes) is not a whole number of ${PAGE_SIZE}-byte pages; a memory map says which bytes are guest memory`, { path: memory });
    }
    return { handle, size, seek: stats.isFile() ? seekOf(handle.fd) : undefined };
  } catch (error) {
    await handle.close().catch(() => {});
    throw error;
  }
}

/** An incremental dump is refused unless it has its parent's regions and a bitmap covering its pages. */
function checkParent(options: WriteStateOptions, regions: Region[], dumpSize: number, totalPages: number, path: string): void {
  if (!options.parent) return;
  // Restore writes each layer at its own dump offsets, so those must match too.
  if (!sameRegions(options.parent.regions, regions)) {
    throw new Qcow2Error('INVALID_ARGUMENT', 'an incremental dump needs the same memory regions as its parent, at the same places of the RAM dump', { path });
  }
  if (options.parent.dumpSize !== dumpSize) {
    throw new Qcow2Error('INVALID_ARGUMENT', `the RAM dump is ${dumpSize} bytes, its parent's was ${options.parent.dumpSize}`, { path: options.memory ?? path });
  }
  if (options.dirtyBitmap && options.dirtyBitmap.length * 8 < totalPages) {
    throw new Qcow2Error('INVALID_ARGUMENT', `dirty bitmap covers ${options.dirtyBitmap.length * 8} pages, the regions hold ${totalPages}`, { path });
  }
}

/** What pads a section to 8 bytes. */
const zeroPadding = Buffer.alloc(8);

/** The state file as it is written: sections appended one after another, each listed for the index. */
class StateOutput {
  position = 0;
  private writebackFrom = 0;
  private writeback: Promise<void> = Promise.resolve();
  readonly sections: SectionEntry[] = [];

  private constructor(private readonly file: PendingFile) {}

  static async create(path: string): Promise<StateOutput> {
    const messages = { create: 'cannot create the state file', flush: 'cannot flush the state file', rename: 'cannot rename the finished state file into place' };
    // Read as well as written: the finished file is hashed while it is flushed.
    return new StateOutput(await PendingFile.create(path, messages, (temporary) => fs.open(temporary, 'wx+', 0o644)));
  }

  /** The buffers one after another at the end of the file, in as few calls as the kernel takes them. */
  async write(buffers: Buffer[]): Promise<void> {
    let rest = buffers.filter((b) => b.length > 0);
    while (rest.length > 0) {
      let { bytesWritten } = await this.file.handle.writev(rest, this.position).catch((error) => {
        throw ioError(error, this.file.target, 'cannot write the state file');
      });
      if (bytesWritten === 0) throw new Qcow2Error('IO_ERROR', 'cannot write the state file: the system wrote nothing', { path: this.file.target });
      this.position += bytesWritten;
      // A short write: on from the first byte not written.
      while (rest.length > 0 && bytesWritten >= rest[0]!.length) bytesWritten -= rest.shift()!.length;
      if (bytesWritten > 0) rest[0] = rest[0]!.subarray(bytesWritten);
    }
  }

  /** Starts writing what was written since the last call to the disk: the final flush then waits for little. */
  startWriteback(): void {
    const from = this.writebackFrom;
    this.writebackFrom = this.position;
    // One at a time, and always settled before the descriptor is flushed or closed (finish, abandon).
    this.writeback = this.writeback.then(() => native().startWriteback(this.file.handle.fd, from, this.position - from)).then(() => {}, () => {});
  }

  /** A section: header with the payload's checksum, the payload (`parts` one after another), padding to 8 bytes. Listed unless it is the index. */
  async writeSection(type: number, parts: Buffer[]): Promise<void> {
    const length = parts.reduce((n, part) => n + part.length, 0);
    const checksum = native().hash64(parts);
    const sectionHeader = encodeSectionHeader(type, length, checksum);
    if (type !== SectionType.index) this.sections.push({ type, flags: sectionHeader.readUInt16LE(6), version: SECTION_VERSION, offset: this.position, length, checksum });
    await this.write([sectionHeader, ...parts, zeroPadding.subarray(0, padding(length))]);
  }

  /** The INDEX section, the footer with the digest of header and index, and the rename into place. Returns the digest and the whole file's XXH3-64. */
  async finish(header: Buffer, index: Buffer): Promise<{ digest: Buffer; fileHash: bigint }> {
    const indexOffset = this.position;
    await this.writeSection(SectionType.index, [index]);
    const digest = native().hash128(Buffer.concat([header, index]));
    await this.write([encodeFooter({ indexOffset, indexLength: index.length, digest, dataEnd: this.position })]);
    await this.writeback;
    // The file is read back for its hash while it is flushed, not after; both settle before the
    // descriptor can be closed (a failed flush abandons the file).
    const [hashed, flushed] = await Promise.allSettled([native().hashFile(this.file.handle.fd, 0, this.position), this.file.flush()]);
    if (flushed.status === 'rejected') throw flushed.reason;
    if (hashed.status === 'rejected') throw ioError(hashed.reason, this.file.target, 'cannot read the state file back for its hash');
    await this.file.commit({ flushed: true });
    return { digest, fileHash: hashed.value };
  }

  async abandon(): Promise<void> {
    await this.writeback;
    await this.file.abandon();
  }
}

/** REGIONS, then CPU and DEVICE sections, each within what a reader accepts: a file its own reader refuses would be a lost snapshot. */
async function writeDescription(out: StateOutput, regions: Region[], dumpSize: number, options: WriteStateOptions, path: string): Promise<void> {
  await out.writeSection(SectionType.regions, [encodeRegions(regions, dumpSize)]);
  if (options.cpu) {
    const cpu = encodeCpuState(options.cpu, path);
    if (cpu.length > stateLimits.maxCpuBytes) throw new Qcow2Error('INVALID_ARGUMENT', `the CPU state takes ${cpu.length} bytes, over the ${stateLimits.maxCpuBytes} a state file holds`, { path });
    await out.writeSection(SectionType.cpu, [cpu]);
  }
  for (const device of options.devices ?? []) {
    const name = Buffer.from(device.name, 'utf8');
    const prefix = Buffer.alloc(2);
    prefix.writeUInt16LE(name.length);
    if (prefix.length + name.length + device.data.length > stateLimits.maxDeviceBytes) {
      throw new Qcow2Error('INVALID_ARGUMENT', `device blob "${device.name}" (${device.data.length} bytes) is over the ${stateLimits.maxDeviceBytes} bytes a state file holds`, { path });
    }
    await out.writeSection(SectionType.device, [prefix, name, device.data]);
  }
}

/** What the pages of the dump became: the index's page states, chunks and duplicates, and the counts. */
class PageIndex {
  readonly states: Buffer;
  readonly chunks: ChunkMapEntry[] = [];
  readonly duplicates: number[] = [];
  readonly pages = { zero: 0, data: 0, duplicate: 0, parent: 0 };

  constructor(readonly spanCount: number) {
    this.states = Buffer.alloc(Math.ceil((spanCount * SPAN_PAGES) / 4));
  }

  add(states: Uint8Array, duplicates: Float64Array, firstSpan: number): void {
    packStates(states, this.states, firstSpan * SPAN_PAGES);
    const counts = [0, 0, 0, 0];
    for (let i = 0; i < states.length; i++) counts[states[i]!]!++;
    for (const name of ['zero', 'data', 'duplicate', 'parent'] as const) this.pages[name] += counts[PageState[name]]!;
    for (const d of duplicates) this.duplicates.push(d);
  }

  encode(sections: SectionEntry[]): Buffer {
    return encodeIndex({ sections: [...sections], spanCount: this.spanCount, chunks: this.chunks, states: this.states, duplicates: Float64Array.from(this.duplicates) });
  }
}

/** One batch of pages, as a native job reads them: where in the dump, and what it is compared with. */
interface PageBatch {
  region: Region;
  /** Pages of the region before the batch. */
  done: number;
  pageCount: number;
  firstSpan: number;
}

/** What a batch is compared with: the parent's pages, or the dirty bitmap's bits for its pages. */
async function parentInput(options: WriteStateOptions, batch: PageBatch): Promise<{ parent?: Buffer; dirty?: Buffer }> {
  if (!options.parent) return {};
  const firstPage = batch.region.firstPage + batch.done;
  if (options.dirtyBitmap) {
    const dirty = Buffer.alloc(Math.ceil(batch.pageCount / 8));
    for (let i = 0; i < batch.pageCount; i++) {
      const page = firstPage + i;
      if ((options.dirtyBitmap[page >> 3]! >> (page & 7)) & 1) dirty[i >> 3] = dirty[i >> 3]! | (1 << (i & 7));
    }
    return { dirty };
  }
  const parent = Buffer.alloc(batch.pageCount * PAGE_SIZE);
  await options.parent.readGuest(parent, batch.region.guestBase + batch.done * PAGE_SIZE);
  return { parent };
}

/** The holes of a regular file's batch; a block device's pages are all read. */
function batchHoles(dump: Dump, dumpOffset: number, pageCount: number): { holes?: Uint8Array } {
  if (!dump.seek) return {};
  // A file that shrank below the batch is refused by the native batch, which checks the size before it maps the pages.
  const holes = holeUnits(dump.seek, dumpOffset, pageCount, PAGE_SIZE);
  return holes ? { holes } : {};
}

/** Classifies and compresses one batch of pages (native); the CHUNK sections it made are written by writeChunks. */
async function processBatch(dump: Dump, batch: PageBatch, dedup: NativeDedupTable, options: WriteStateOptions, path: string): Promise<NativeDumpBatchResult> {
  const dumpOffset = batch.region.dumpOffset + batch.done * PAGE_SIZE;
  return native().processDumpBatch({
    sourceFd: dump.handle.fd,
    dumpOffset,
    firstPage: batch.region.firstPage + batch.done,
    pageCount: batch.pageCount,
    pageSize: PAGE_SIZE,
    spanPages: SPAN_PAGES,
    firstSpan: batch.firstSpan,
    incremental: options.parent !== undefined,
    ...(await parentInput(options, batch)),
    ...batchHoles(dump, dumpOffset, batch.pageCount),
    dedup,
    codec: codecs[options.compress ?? 'zstd'],
    // zstd 2: measured on a real guest's RAM, smaller than `zstd -3` of the whole dump for 0.02 s more than level 1.
    level: options.level ?? (options.compress === 'deflate' ? 6 : 2),
    chunkTargetBytes: 1 << 20,
    threads: cpuThreadCount(options.threads, path),
  }).catch((error: unknown) => {
    throw jobError('pages', error, { path: options.memory ?? path });
  });
}

async function writeChunks(out: StateOutput, index: PageIndex, result: NativeDumpBatchResult, batch: PageBatch): Promise<void> {
  index.add(result.states, result.duplicates, batch.firstSpan);
  for (const chunk of result.chunks) {
    index.chunks.push({ firstSpan: chunk.firstSpan, section: out.sections.length, spanCount: chunk.spanCount });
    await out.writeSection(SectionType.chunk, [chunkHeader(chunk), chunk.stored]);
  }
  if (result.chunks.length > 0) out.startWriteback();
}

function chunkHeader(chunk: NativeDumpChunk): Buffer {
  const header = Buffer.alloc(CHUNK_HEADER_BYTES);
  header[0] = chunkCodecByte(chunk.codec);
  header.writeUInt32LE(chunk.spanCount, 4);
  header.writeBigUInt64LE(BigInt(chunk.firstSpan), 8);
  header.writeUInt32LE(chunk.rawLength, 16);
  header.writeBigUInt64LE(chunk.rawChecksum, 24);
  return header;
}

/** Every page of every region, a batch at a time (whole spans, so that no chunk crosses batches); stops between batches when cancelled. */
async function writePages(out: StateOutput, dump: Dump | undefined, regions: Region[], options: WriteStateOptions, path: string): Promise<PageIndex> {
  const index = new PageIndex(regions.reduce((n, r) => n + Math.ceil(r.size / PAGE_SIZE / SPAN_PAGES), 0));
  const dedup = new (native().DedupTable)();
  const counters = new JobCounters();
  const sampler = new ProgressSampler(counters, regions.reduce((n, r) => n + r.size, 0), options.onProgress);
  const pagesPerBatch = batchBytes / PAGE_SIZE;
  sampler.start();
  // A batch's chunks are written while the next batch runs: the native threads do not wait for the
  // writes or the index. The next batch starts once the chunks before are out, so that two batches'
  // results are held at most, not three (--compress none of a busy dump: 420 MiB at peak, not 510).
  // The batches themselves run one after another (the dedup table is filled in dump order).
  const batches = pageBatches(regions, pagesPerBatch);
  const start = (batch: PageBatch | undefined) => {
    if (!batch) return undefined;
    throwIfCancelled(options.signal, path);
    const job = processBatch(dump!, batch, dedup, options, path);
    job.catch(() => {}); // awaited below; a failure is not unhandled meanwhile
    return { batch, job };
  };
  let writing: Promise<void> | undefined;
  let running: ReturnType<typeof start> | undefined;
  try {
    running = start(batches.next().value);
    while (running) {
      const { batch, job } = running;
      const result = await job;
      await writing;
      running = start(batches.next().value);
      writing = writeChunks(out, index, result, batch);
      writing.catch(() => {}); // awaited below; a failed write is not unhandled while a batch runs
      counters.dataBytes = (batch.region.firstPage + batch.done + batch.pageCount) * PAGE_SIZE;
    }
    await writing;
  } finally {
    // A failed batch or write: what is under way finishes (or fails) before the output is abandoned.
    await Promise.allSettled([writing, running?.job]);
    sampler.stop();
  }
  return index;
}

/** The batches of every region in dump order: whole spans, so that no chunk crosses batches. */
function* pageBatches(regions: Region[], pagesPerBatch: number): Generator<PageBatch> {
  let regionFirstSpan = 0;
  for (const region of regions) {
    const regionPages = region.size / PAGE_SIZE;
    for (let done = 0; done < regionPages; done += pagesPerBatch) {
      yield { region, done, pageCount: Math.min(pagesPerBatch, regionPages - done), firstSpan: regionFirstSpan + done / SPAN_PAGES };
    }
    regionFirstSpan += Math.ceil(regionPages / SPAN_PAGES);
  }
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
  const dump = options.memory !== undefined ? await openDump(options.memory, options.regions) : undefined;
  let out: StateOutput | undefined;
  try {
    const regions = planRegions(options.regions, dump?.size ?? 0, options.memory ?? path);
    checkParent(options, regions, dump?.size ?? 0, regions.reduce((n, r) => n + r.size / PAGE_SIZE, 0), path);
    out = await StateOutput.create(path);
    const snapshotId = randomUUID();
    const header = encodeHeader({
      snapshotId: uuidBytes(snapshotId),
      parentId: options.parent ? options.parent.header.snapshotId : Buffer.alloc(16),
      parentDigest: options.parent ? options.parent.digest : Buffer.alloc(16),
    });
    await out.write([header]);
    await writeDescription(out, regions, dump?.size ?? 0, options, path);
    const index = await writePages(out, dump, regions, options, path);
    throwIfCancelled(options.signal, path);
    const { digest, fileHash } = await out.finish(header, index.encode(out.sections));
    return {
      path,
      bytes: out.position,
      xxh3: xxh3Hex(fileHash),
      snapshotId,
      digest: digest.toString('hex'),
      regions: regions.map((r) => ({ guestBase: r.guestBase, size: r.size, dumpOffset: r.dumpOffset })),
      pages: index.pages,
      seconds: Number(process.hrtime.bigint() - started) / 1e9,
    };
  } finally {
    await out?.abandon();
    await dump?.handle.close().catch(() => {});
  }
}

/**
 * Reading a VM state file: open (footer, index, digest), random access to any
 * guest-physical range, verification of every checksum, and restore of the RAM
 * dump (pages written in parallel, zero pages left as holes).
 */
import * as fs from 'node:fs/promises';
import * as fsSync from 'node:fs';
import * as nodePath from 'node:path';
import { Qcow2Error, ioError, throwIfCancelled } from '../errors';
import { memoryFilesystem, openToRead, PendingFile } from '../files';
import { native } from '../native';
import { JobCounters, jobError, ProgressSampler, cpuThreadCount, type ProgressCallback } from '../jobs';
import { type CpuState, decodeCpuState } from './cpu';
import {
  CHUNK_HEADER_BYTES, codecOfChunkByte, decodeFooter, decodeHeader, decodeIndex, decodeRegions, FOOTER_BYTES, HEADER_BYTES,
  type Header, type Index, isRequired, PAGE_SIZE, PageState, type Region, SECTION_HEADER_BYTES, type SectionEntry,
  encodeSectionHeader, SECTION_VERSION, sameRegions, sectionName, SectionType, SPAN_PAGES, stateOf, stateLimits,
} from './format';

const knownTypes = new Set<number>(Object.values(SectionType));

/** The options of StateFile.restoreInto. */
type RestoreOptions = Parameters<StateFile['restoreInto']>[1];

/** One native restore job: spans [span, end) of a region, the chunks they need, and their duplicate pages. */
interface RestoreBatch {
  span: number;
  end: number;
  /** Chunk numbers of the index. */
  chunks: number[];
  /** Per span: its page count and its dump offset. */
  spans: Float64Array;
  states: Uint8Array;
  lastPage: number;
  duplicates: Float64Array;
}

/** How many of the four 2-bit page states of a byte are `state`. */
const statesInByte = (state: number) => Uint8Array.from({ length: 256 }, (_, byte) => [0, 2, 4, 6].filter((shift) => ((byte >> shift) & 3) === state).length);
const duplicatesInByte = statesInByte(PageState.duplicate);
const dataInByte = statesInByte(PageState.data);
const parentsInByte = statesInByte(PageState.parent);

/** A section this reader can read: a known type at the payload version it knows. */
function understood(section: SectionEntry): boolean {
  return knownTypes.has(section.type) && section.version === SECTION_VERSION;
}

/** How `StateFile.open` reads a state file: its parent, or alone; inside a tar. */
export interface OpenStateOptions {
  /** The parent dump, for incremental files (checked against the id and digest this file names). */
  parent?: StateFile;
  /** Open an incremental file without its parent, to check it alone (its PARENT pages cannot be read). */
  withoutParent?: boolean;
  /** The state file is bytes [offset, offset + length) of the file (a member of an uncompressed tar). */
  region?: {
    /** Byte of the file where the state file starts. */
    offset: number;
    /** Bytes of the state file. */
    length: number;
  };
}

export interface StateProblem {
  /** Which part: "header", "INDEX", "REGIONS", "CPU", "DEVICE name", "CHUNK n". */
  part: string;
  message: string;
  /** For chunks: the guest-physical ranges whose bytes it holds. */
  guestRanges?: { start: number; end: number }[];
}

interface DecodedChunk {
  raw: Buffer;
  /** Byte offset in raw of each slot's page, or -1 for slots with no page in the chunk. */
  slotOffsets: Map<number, number>;
}

export class StateFile {
  private readonly chunkCache = new Map<number, Promise<DecodedChunk>>();
  /** Global span number where each region's spans start. */
  private readonly regionFirstSpan: number[];

  private constructor(
    readonly path: string,
    private readonly handle: fs.FileHandle,
    readonly fileSize: number,
    readonly header: Header,
    readonly regions: Region[],
    readonly index: Index,
    readonly digest: Buffer,
    readonly parent: StateFile | undefined,
    /** Where the state file's byte 0 sits in the file opened. */
    private readonly base: number,
    /** Bytes of the RAM dump this state restores: as recorded (1.1), else the end of the last region in the dump. */
    readonly dumpSize: number,
    /** Whether the file records the dump's size (1.1) rather than leaving it to the regions. */
    readonly dumpSizeRecorded: boolean,
  ) {
    this.regionFirstSpan = [];
    let span = 0;
    for (const region of regions) {
      this.regionFirstSpan.push(span);
      span += Math.ceil(region.size / PAGE_SIZE / SPAN_PAGES);
    }
  }

  get snapshotId(): Buffer {
    return this.header.snapshotId;
  }

  get hasParent(): boolean {
    return this.header.parentId.some((b) => b !== 0);
  }

  static async open(path: string, options: OpenStateOptions = {}): Promise<StateFile> {
    const handle = await openToRead(path, 'cannot open the state file');
    try {
      const base = options.region?.offset ?? 0;
      const wholeFile = (await handle.stat()).size;
      const fileSize = options.region?.length ?? wholeFile;
      if (base + fileSize > wholeFile) throw new Qcow2Error('TRUNCATED', `state file region at ${base} (+${fileSize} bytes) runs past the end of the file`, { path, offset: base });
      if (fileSize < HEADER_BYTES + FOOTER_BYTES) throw new Qcow2Error('TRUNCATED', 'file is too short to be a VM state file', { path });
      const read = async (offset: number, length: number) => {
        const buffer = Buffer.alloc(length);
        const { bytesRead } = await handle.read(buffer, 0, length, base + offset);
        if (bytesRead !== length) throw new Qcow2Error('TRUNCATED', `file ends inside a structure at ${offset}`, { path, offset });
        return buffer;
      };
      const headerBytes = await read(0, HEADER_BYTES);
      const header = decodeHeader(headerBytes, path);
      const footer = decodeFooter(await read(fileSize - FOOTER_BYTES, FOOTER_BYTES), path, fileSize);
      const indexHeader = await read(footer.indexOffset, SECTION_HEADER_BYTES);
      if (indexHeader.readUInt32LE(0) !== SectionType.index || Number(indexHeader.readBigUInt64LE(8)) !== footer.indexLength) {
        throw new Qcow2Error('BAD_HEADER_FIELD', 'footer does not point at the INDEX section', { path, offset: footer.indexOffset });
      }
      const indexPayload = await read(footer.indexOffset + SECTION_HEADER_BYTES, footer.indexLength);
      const addon = native();
      if (addon.hash64(indexPayload) !== indexHeader.readBigUInt64LE(16)) {
        throw new Qcow2Error('CHECKSUM_MISMATCH', 'INDEX section checksum mismatch: the index is damaged', { path, offset: footer.indexOffset });
      }
      const digest = addon.hash128(Buffer.concat([headerBytes, indexPayload]));
      if (!digest.equals(footer.digest)) {
        throw new Qcow2Error('CHECKSUM_MISMATCH', 'digest mismatch: the header or index is damaged', { path, offset: 0 });
      }
      const preliminary = decodeIndex(indexPayload, path, 0);
      const regionsEntry = preliminary.sections[0];
      if (!regionsEntry || regionsEntry.type !== SectionType.regions || regionsEntry.version !== SECTION_VERSION) {
        throw new Qcow2Error('BAD_HEADER_FIELD', `the first section is not REGIONS of version ${SECTION_VERSION}`, { path });
      }
      for (const section of preliminary.sections) {
        if (section.offset + SECTION_HEADER_BYTES + section.length > footer.indexOffset) {
          throw new Qcow2Error('OFFSET_BEYOND_FILE', `${sectionName(section.type)} section at ${section.offset} runs past the index`, { path, offset: section.offset });
        }
        // Not understood and optional: skipped (verify still checks its checksum).
        if (!understood(section) && isRequired(section.flags)) {
          const what = knownTypes.has(section.type) ? `${sectionName(section.type)} section of unknown version ${section.version}` : `section type ${section.type}`;
          throw new Qcow2Error('UNKNOWN_INCOMPATIBLE_FEATURE', `unknown required ${what}`, { path, offset: section.offset });
        }
      }
      const regionsPayload = await read(regionsEntry.offset + SECTION_HEADER_BYTES, regionsEntry.length);
      if (addon.hash64(regionsPayload) !== regionsEntry.checksum) {
        throw new Qcow2Error('CHECKSUM_MISMATCH', 'REGIONS section checksum mismatch', { path, offset: regionsEntry.offset });
      }
      const { regions, dumpSize, recorded } = decodeRegions(regionsPayload, path);
      const spans = regions.reduce((n, r) => n + Math.ceil(r.size / PAGE_SIZE / SPAN_PAGES), 0);
      const index = decodeIndex(indexPayload, path, spans * SPAN_PAGES);
      if (index.spanCount !== spans) throw new Qcow2Error('BAD_HEADER_FIELD', `INDEX has ${index.spanCount} spans, the regions ${spans}`, { path });
      const state = new StateFile(path, handle, fileSize, header, regions, index, digest, options.parent, base, dumpSize, recorded);
      state.checkDuplicates();
      state.checkStates();
      if (state.hasParent && !options.withoutParent) {
        const parent = options.parent;
        if (!parent) throw new Qcow2Error('INVALID_ARGUMENT', 'this incremental state file needs its parent', { path });
        if (!parent.snapshotId.equals(header.parentId) || !parent.digest.equals(header.parentDigest)) {
          throw new Qcow2Error('PARENT_MISMATCH', `parent ${parent.path} is not the dump this file was taken over (id or digest differs)`, { path });
        }
        // Each layer restores at its own dump offsets: the layouts must be one.
        if (!sameRegions(parent.regions, regions)) {
          throw new Qcow2Error('PARENT_MISMATCH', `parent ${parent.path} lays out memory differently (regions, or where they lie in the RAM dump)`, { path });
        }
        if (recorded && parent.dumpSizeRecorded && parent.dumpSize !== dumpSize) {
          throw new Qcow2Error('PARENT_MISMATCH', `parent ${parent.path} was taken from a RAM dump of ${parent.dumpSize} bytes, this file from one of ${dumpSize}`, { path });
        }
      }
      return state;
    } catch (error) {
      await handle.close();
      throw error;
    }
  }

  async close(): Promise<void> {
    await this.handle.close();
  }

  private async readSection(section: SectionEntry): Promise<Buffer> {
    const buffer = Buffer.alloc(section.length);
    const { bytesRead } = await this.handle.read(buffer, 0, section.length, this.base + section.offset + SECTION_HEADER_BYTES);
    if (bytesRead !== section.length) throw new Qcow2Error('TRUNCATED', `${sectionName(section.type)} section is cut short`, { path: this.path, offset: section.offset });
    return buffer;
  }

  private async checkedSection(section: SectionEntry): Promise<Buffer> {
    const payload = await this.readSection(section);
    if (native().hash64(payload) !== section.checksum) {
      throw new Qcow2Error('CHECKSUM_MISMATCH', `${sectionName(section.type)} section at ${section.offset} checksum mismatch`, { path: this.path, offset: section.offset });
    }
    return payload;
  }

  async cpu(): Promise<CpuState | undefined> {
    const section = this.index.sections.find((s) => s.type === SectionType.cpu && understood(s));
    if (!section) return undefined;
    if (section.length > stateLimits.maxCpuBytes) throw new Qcow2Error('BAD_HEADER_FIELD', 'CPU section is too large', { path: this.path });
    return decodeCpuState(await this.checkedSection(section), this.path);
  }

  async devices(): Promise<{ name: string; data: Buffer }[]> {
    const devices: { name: string; data: Buffer }[] = [];
    for (const section of this.index.sections.filter((s) => s.type === SectionType.device && understood(s))) {
      if (section.length > stateLimits.maxDeviceBytes) throw new Qcow2Error('BAD_HEADER_FIELD', 'DEVICE section is too large', { path: this.path });
      const payload = await this.checkedSection(section);
      const length = payload.readUInt16LE(0);
      devices.push({ name: payload.toString('utf8', 2, 2 + length), data: payload.subarray(2 + length) });
    }
    return devices;
  }

  /** Global page number and state slot of a guest-physical address, or undefined outside the regions. */
  private locate(address: number): { page: number; slot: number; region: Region } | undefined {
    for (const [i, region] of this.regions.entries()) {
      if (address >= region.guestBase && address < region.guestBase + region.size) {
        const pageInRegion = Math.floor((address - region.guestBase) / PAGE_SIZE);
        return { page: region.firstPage + pageInRegion, slot: this.regionFirstSpan[i]! * SPAN_PAGES + pageInRegion, region };
      }
    }
    return undefined;
  }

  private slotOfPage(page: number): number {
    // Regions number their pages consecutively: a binary search (open checks every duplicate pair).
    let low = 0;
    let high = this.regions.length - 1;
    while (low <= high) {
      const mid = (low + high) >> 1;
      const region = this.regions[mid]!;
      if (page < region.firstPage) high = mid - 1;
      else if (page >= region.firstPage + region.size / PAGE_SIZE) low = mid + 1;
      else return this.regionFirstSpan[mid]! * SPAN_PAGES + (page - region.firstPage);
    }
    throw new Qcow2Error('BAD_HEADER_FIELD', `page ${page} lies outside every region`, { path: this.path });
  }

  private chunkOfSpan(span: number): number {
    let low = 0;
    let high = this.index.chunks.length - 1;
    while (low <= high) {
      const mid = (low + high) >> 1;
      const chunk = this.index.chunks[mid]!;
      if (span < chunk.firstSpan) high = mid - 1;
      else if (span >= chunk.firstSpan + chunk.spanCount) low = mid + 1;
      else return mid;
    }
    throw new Qcow2Error('BAD_HEADER_FIELD', `span ${span} has DATA pages but no chunk`, { path: this.path });
  }

  private decodeChunk(number: number): Promise<DecodedChunk> {
    const cached = this.chunkCache.get(number);
    if (cached) return cached;
    const pending = (async () => {
      const entry = this.index.chunks[number]!;
      const payload = await this.checkedSection(this.index.sections[entry.section]!);
      const rawLength = payload.readUInt32LE(16);
      if (rawLength > stateLimits.maxChunkRawBytes || rawLength % PAGE_SIZE) throw new Qcow2Error('BAD_HEADER_FIELD', `chunk ${number} claims ${rawLength} bytes`, { path: this.path });
      const codec = codecOfChunkByte(payload[0]!);
      if (codec === undefined) throw new Qcow2Error('CHECKSUM_MISMATCH', `chunk ${number} does not decompress (codec ${payload[0]})`, { path: this.path });
      const raw = await native().decompressChunk(codec, payload.subarray(CHUNK_HEADER_BYTES), rawLength).catch(() => {
        throw new Qcow2Error('CHECKSUM_MISMATCH', `chunk ${number} does not decompress`, { path: this.path });
      });
      if (native().hash64(raw) !== payload.readBigUInt64LE(24)) throw new Qcow2Error('CHECKSUM_MISMATCH', `chunk ${number} decompresses to the wrong bytes`, { path: this.path });
      const slotOffsets = new Map<number, number>();
      let offset = 0;
      for (let slot = entry.firstSpan * SPAN_PAGES; slot < (entry.firstSpan + entry.spanCount) * SPAN_PAGES; slot++) {
        if (stateOf(this.index.states, slot) === PageState.data) {
          slotOffsets.set(slot, offset);
          offset += PAGE_SIZE;
        }
      }
      if (offset !== rawLength) throw new Qcow2Error('BAD_HEADER_FIELD', `chunk ${number} holds ${rawLength / PAGE_SIZE} pages, its spans ${offset / PAGE_SIZE}`, { path: this.path });
      return { raw, slotOffsets };
    })();
    pending.catch(() => this.chunkCache.delete(number));
    this.chunkCache.set(number, pending);
    if (this.chunkCache.size > 16) this.chunkCache.delete(this.chunkCache.keys().next().value as number);
    return pending;
  }

  private async readPage(page: number, slot: number, address: number, out: Buffer): Promise<void> {
    switch (stateOf(this.index.states, slot)) {
      case PageState.zero:
        out.fill(0);
        return;
      case PageState.data: {
        const chunk = await this.decodeChunk(this.chunkOfSpan(Math.floor(slot / SPAN_PAGES)));
        const offset = chunk.slotOffsets.get(slot)!;
        chunk.raw.copy(out, 0, offset, offset + PAGE_SIZE);
        return;
      }
      case PageState.duplicate: {
        const source = this.duplicateSource(page);
        const sourceSlot = this.slotOfPage(source);
        if (source >= page || stateOf(this.index.states, sourceSlot) !== PageState.data) {
          throw new Qcow2Error('BAD_HEADER_FIELD', `page ${page} duplicates page ${source}, which holds no data`, { path: this.path });
        }
        return this.readPage(source, sourceSlot, address, out);
      }
      default: {
        if (!this.parent) throw new Qcow2Error('INVALID_ARGUMENT', 'PARENT page without a parent dump', { path: this.path });
        await this.parent.readGuest(out, address);
      }
    }
  }

  /**
   * Each duplicate pair names a DUPLICATE page and, below it, a DATA page, in increasing page
   * order, as the format says: restore copies the pairs in parallel and relies on it.
   */
  private checkDuplicates(): void {
    const pairs = this.index.duplicates;
    let previous = -1;
    for (let i = 0; i < pairs.length; i += 2) {
      const page = pairs[i]!;
      const source = pairs[i + 1]!;
      if (page <= previous || source >= page || stateOf(this.index.states, this.slotOfPage(page)) !== PageState.duplicate || stateOf(this.index.states, this.slotOfPage(source)) !== PageState.data) {
        throw new Qcow2Error('BAD_HEADER_FIELD', `INDEX: duplicate ${i / 2} (page ${page} from page ${source}) is out of order or not a DUPLICATE of a lower DATA page`, { path: this.path });
      }
      previous = page;
    }
    // And every DUPLICATE page has its pair: one without would be restored as nothing at all.
    let duplicateStates = 0;
    for (const byte of this.index.states) duplicateStates += duplicatesInByte[byte]!;
    if (duplicateStates !== pairs.length / 2) {
      throw new Qcow2Error('BAD_HEADER_FIELD', `INDEX: ${duplicateStates} DUPLICATE pages but ${pairs.length / 2} duplicate pairs`, { path: this.path });
    }
  }

  /**
   * Restore writes what the index says, so the index must say it whole: DATA pages only in
   * spans a chunk holds, PARENT pages only in an incremental file, nothing in the slots past
   * the last page of a region.
   */
  private checkStates(): void {
    const states = this.index.states;
    const bytesPerSpan = SPAN_PAGES / 4;
    const fail = (message: string): never => {
      throw new Qcow2Error('BAD_HEADER_FIELD', `INDEX: ${message}`, { path: this.path });
    };
    let chunk = 0;
    for (const [r, region] of this.regions.entries()) {
      const pages = region.size / PAGE_SIZE;
      const firstSpan = this.regionFirstSpan[r]!;
      for (let s = 0; s * SPAN_PAGES < pages; s++) {
        const span = firstSpan + s;
        let data = 0;
        let parents = 0;
        for (let at = span * bytesPerSpan; at < (span + 1) * bytesPerSpan; at++) {
          data += dataInByte[states[at]!]!;
          parents += parentsInByte[states[at]!]!;
        }
        if (parents > 0 && !this.hasParent) fail(`span ${span} has PARENT pages in a dump without a parent`);
        for (let slot = pages - s * SPAN_PAGES; slot < SPAN_PAGES; slot++) {
          if (stateOf(states, span * SPAN_PAGES + slot) !== PageState.zero) fail(`span ${span} has a page state past the end of region ${r}`);
        }
        if (data === 0) continue;
        while (chunk < this.index.chunks.length && this.index.chunks[chunk]!.firstSpan + this.index.chunks[chunk]!.spanCount <= span) chunk++;
        const holder = this.index.chunks[chunk];
        if (!holder || holder.firstSpan > span) fail(`span ${span} has DATA pages that no chunk holds`);
      }
    }
  }

  private duplicateSource(page: number): number {
    const pairs = this.index.duplicates;
    let low = 0;
    let high = pairs.length / 2 - 1;
    while (low <= high) {
      const mid = (low + high) >> 1;
      const at = pairs[mid * 2]!;
      if (at === page) return pairs[mid * 2 + 1]!;
      if (at < page) low = mid + 1;
      else high = mid - 1;
    }
    throw new Qcow2Error('BAD_HEADER_FIELD', `page ${page} is a duplicate with no source`, { path: this.path });
  }

  /**
   * Reads guest-physical bytes at `address` into `buffer`, decompressing only the
   * chunks that hold them. The whole range must lie inside the memory regions.
   */
  async readGuest(buffer: Buffer, address: number): Promise<void> {
    const page = Buffer.alloc(PAGE_SIZE);
    let done = 0;
    while (done < buffer.length) {
      const at = address + done;
      const located = this.locate(at);
      if (!located) throw new Qcow2Error('INVALID_ARGUMENT', `guest address ${at} lies outside the memory regions`, { path: this.path });
      const pageStart = located.region.guestBase + (located.page - located.region.firstPage) * PAGE_SIZE;
      await this.readPage(located.page, located.slot, pageStart, page);
      const from = at - pageStart;
      const n = Math.min(PAGE_SIZE - from, buffer.length - done);
      page.copy(buffer, done, from, from + n);
      done += n;
    }
  }

  /** Checks every section's checksum and, with `deep`, that every chunk decompresses to its own. */
  async verify(deep = true): Promise<StateProblem[]> {
    const problems: StateProblem[] = [];
    const chunkNumbers = new Map(this.index.chunks.map((c, i) => [c.section, i]));
    for (const [i, section] of this.index.sections.entries()) {
      const chunkNumber = chunkNumbers.get(i);
      const part = chunkNumber !== undefined ? `CHUNK ${chunkNumber}` : sectionName(section.type);
      try {
        await this.checkSectionHeader(section);
        if (chunkNumber !== undefined && deep) {
          this.chunkCache.delete(chunkNumber);
          await this.decodeChunk(chunkNumber);
          this.chunkCache.delete(chunkNumber);
        } else {
          await this.checkedSection(section);
        }
      } catch (error) {
        const problem: StateProblem = { part, message: (error as Error).message.replace(`${this.path}: `, '') };
        if (chunkNumber !== undefined) problem.guestRanges = this.guestRangesOfSpans(this.index.chunks[chunkNumber]!.firstSpan, this.index.chunks[chunkNumber]!.spanCount);
        problems.push(problem);
      }
    }
    return problems;
  }

  /** The header before a section's payload says what the INDEX says of it (the digest covers only the INDEX). */
  private async checkSectionHeader(section: SectionEntry): Promise<void> {
    const header = Buffer.alloc(SECTION_HEADER_BYTES);
    const { bytesRead } = await this.handle.read(header, 0, SECTION_HEADER_BYTES, this.base + section.offset);
    const expected = encodeSectionHeader(section.type, section.length, section.checksum);
    expected.writeUInt16LE(section.version, 4);
    expected.writeUInt16LE(section.flags, 6);
    if (bytesRead !== SECTION_HEADER_BYTES || !header.equals(expected)) {
      throw new Qcow2Error('CHECKSUM_MISMATCH', `${sectionName(section.type)} section header at ${section.offset} does not match the INDEX`, { path: this.path, offset: section.offset });
    }
  }

  private guestRangesOfSpans(firstSpan: number, spanCount: number): { start: number; end: number }[] {
    const ranges: { start: number; end: number }[] = [];
    for (const [i, region] of this.regions.entries()) {
      const regionSpans = Math.ceil(region.size / PAGE_SIZE / SPAN_PAGES);
      const from = Math.max(firstSpan, this.regionFirstSpan[i]!);
      const to = Math.min(firstSpan + spanCount, this.regionFirstSpan[i]! + regionSpans);
      if (from >= to) continue;
      const start = region.guestBase + (from - this.regionFirstSpan[i]!) * SPAN_PAGES * PAGE_SIZE;
      const end = Math.min(region.guestBase + region.size, region.guestBase + (to - this.regionFirstSpan[i]!) * SPAN_PAGES * PAGE_SIZE);
      ranges.push({ start, end });
    }
    return ranges;
  }

  /**
   * Writes the RAM dump into the open file `outputFd` (already sized): the parent
   * chain first, then this file's pages over it. Zero pages stay holes in a new file.
   */
  async restoreInto(outputFd: number, options: { threads?: number; fresh: boolean; counters?: BigUint64Array; writeback?: boolean; signal?: AbortSignal; outputBuffer?: Uint8Array; mapOutput?: { length: number }; target?: string }): Promise<number> {
    let written = 0;
    // A parent's pages may be overwritten by its child's: only the last layer starts writeback.
    if (this.parent) written += await this.parent.restoreInto(outputFd, { ...options, writeback: false });
    const cursors = { chunk: 0, duplicate: 0 };
    for (const [regionNumber, region] of this.regions.entries()) {
      const firstRegionSpan = this.regionFirstSpan[regionNumber]!;
      const endSpan = firstRegionSpan + Math.ceil(region.size / PAGE_SIZE / SPAN_PAGES);
      cursors.chunk = this.index.chunks.findIndex((c) => c.firstSpan >= firstRegionSpan);
      if (cursors.chunk < 0) cursors.chunk = this.index.chunks.length;
      for (let span = firstRegionSpan; span < endSpan; ) {
        throwIfCancelled(options.signal, this.path);
        const batch = this.restoreBatch(region, firstRegionSpan, span, endSpan, cursors);
        written += await this.runRestoreBatch(outputFd, batch, options);
        if (options.counters) options.counters[0] = BigInt(this.dumpOffsetOfPage(batch.lastPage - 1) + PAGE_SIZE);
        span = batch.end;
      }
    }
    return written;
  }

  /**
   * The next batch of a region's restore from `span`: about 32 spans, stretched so that no
   * chunk is cut, with the chunks it reads and the duplicate pages it copies.
   */
  private restoreBatch(region: Region, firstRegionSpan: number, span: number, endSpan: number, cursors: { chunk: number; duplicate: number }): RestoreBatch {
    let end = Math.min(span + 32, endSpan);
    const chunks: number[] = [];
    while (cursors.chunk < this.index.chunks.length && this.index.chunks[cursors.chunk]!.firstSpan < end) {
      const chunk = this.index.chunks[cursors.chunk]!;
      end = Math.max(end, chunk.firstSpan + chunk.spanCount);
      chunks.push(cursors.chunk++);
    }
    end = Math.min(end, endSpan);
    const spans = new Float64Array((end - span) * 2);
    let pageCount = 0;
    for (let s = span; s < end; s++) {
      const inRegion = s - firstRegionSpan;
      const pages = Math.min(SPAN_PAGES, region.size / PAGE_SIZE - inRegion * SPAN_PAGES);
      spans[(s - span) * 2] = pages;
      spans[(s - span) * 2 + 1] = region.dumpOffset + inRegion * SPAN_PAGES * PAGE_SIZE;
      pageCount += pages;
    }
    const states = new Uint8Array(pageCount);
    let at = 0;
    for (let s = span; s < end; s++) {
      for (let p = 0; p < spans[(s - span) * 2]!; p++) states[at++] = stateOf(this.index.states, s * SPAN_PAGES + p);
    }
    const firstPage = region.firstPage + (span - firstRegionSpan) * SPAN_PAGES;
    return { span, end, chunks, spans, states, lastPage: firstPage + pageCount, duplicates: this.duplicatesIn(firstPage, firstPage + pageCount, cursors) };
  }

  /** Duplicate pages in [firstPage, lastPage), as pairs of dump offsets (page, the page it copies). */
  private duplicatesIn(firstPage: number, lastPage: number, cursors: { duplicate: number }): Float64Array {
    const pairs = this.index.duplicates;
    const duplicates: number[] = [];
    while (cursors.duplicate < pairs.length / 2 && pairs[cursors.duplicate * 2]! < lastPage) {
      const page = pairs[cursors.duplicate * 2]!;
      const source = pairs[cursors.duplicate * 2 + 1]!;
      if (page >= firstPage) duplicates.push(this.dumpOffsetOfPage(page), this.dumpOffsetOfPage(source));
      cursors.duplicate++;
    }
    return Float64Array.from(duplicates);
  }

  private async runRestoreBatch(outputFd: number, batch: RestoreBatch, options: RestoreOptions): Promise<number> {
    const chunkSpecs = new Float64Array(batch.chunks.length * 4);
    batch.chunks.forEach((c, i) => {
      const section = this.index.sections[this.index.chunks[c]!.section]!;
      chunkSpecs[i * 4] = this.base + section.offset + SECTION_HEADER_BYTES;
      chunkSpecs[i * 4 + 1] = section.length;
      chunkSpecs[i * 4 + 2] = Number(section.checksum >> 32n);
      chunkSpecs[i * 4 + 3] = Number(section.checksum & 0xffffffffn);
    });
    const describeChunk = (bad: number) => {
      const chunk = this.index.chunks[batch.chunks[bad]!]!;
      return `chunk ${batch.chunks[bad]}, guest ${this.guestRangesOfSpans(chunk.firstSpan, chunk.spanCount).map((r) => `0x${r.start.toString(16)}-0x${r.end.toString(16)}`).join(', ')}`;
    };
    try {
      return await native().restoreBatch({
        stateFd: this.handle.fd,
        outputFd,
        pageSize: PAGE_SIZE,
        spanPages: SPAN_PAGES,
        firstSpan: batch.span,
        spans: batch.spans,
        states: batch.states,
        chunks: chunkSpecs,
        duplicates: batch.duplicates,
        punchZeros: !options.fresh || this.parent !== undefined,
        ...(options.outputBuffer ? { outputBuffer: options.outputBuffer } : {}),
        ...(options.mapOutput ? { mapOutput: true, outputLength: options.mapOutput.length } : {}),
        // The batch's pages go to the disk while the next batch decompresses, not all at the final fdatasync.
        startWriteback: options.writeback !== false,
        threads: cpuThreadCount(options.threads, this.path),
      });
    } catch (error) {
      throw jobError('restore', error, { path: this.path, describeChunk, ...(options.target !== undefined ? { target: options.target } : {}) });
    }
  }

  private dumpOffsetOfPage(page: number): number {
    for (const region of this.regions) {
      const pages = region.size / PAGE_SIZE;
      if (page >= region.firstPage && page < region.firstPage + pages) return region.dumpOffset + (page - region.firstPage) * PAGE_SIZE;
    }
    throw new Qcow2Error('BAD_HEADER_FIELD', `page ${page} lies outside every region`, { path: this.path });
  }
}

/**
 * Where a RAM dump may be restored besides a new file: a file descriptor the caller opened
 * read-write (a memory backend file on tmpfs or hugetlbfs, a block device), or guest memory in
 * this process (an ArrayBuffer, a SharedArrayBuffer, or a Uint8Array over either). Dump offset 0
 * lands at its byte 0; it must hold the whole dump. Do not transfer or detach a buffer meanwhile.
 */
export type MemoryTarget = { fd: number } | ArrayBuffer | SharedArrayBuffer | Uint8Array;

/** How a RAM dump is restored into memory that already exists. */
export interface RestoreMemoryOptions {
  /** Native worker threads, 1 to 64 (default: one a CPU). */
  threads?: number;
  /** Stops between batches of pages; the target is then partly restored. */
  signal?: AbortSignal;
  /** Called about every 250 ms with the bytes restored so far, then once with phase 'done'. */
  onProgress?: ProgressCallback;
  /**
   * The target is known to hold only zeros (a fresh mapping, a new file): pages that are zero in
   * the snapshot are then left untouched. Otherwise they are zeroed (holes punched in a file
   * that takes them, zeros written or stored elsewhere).
   */
  zeroed?: boolean;
}

export interface RestoreMemoryResult {
  /** The file restored (absent for a file descriptor or a buffer). */
  path?: string;
  /** Bytes of the RAM dump. */
  bytes: number;
  /** Bytes of pages that held data, written. */
  dataBytes: number;
  /** How the pages were written: write() to a file, through a shared mapping of it, or into memory. */
  method: 'write' | 'mmap' | 'memory';
}

/** hugetlbfs takes no write(): its files are written through a mapping. */
async function isHugetlbfs(path: string): Promise<boolean> {
  return (await memoryFilesystem(path)) === 'hugetlbfs';
}

/** Runs `state.restoreInto` with progress sampled from its counters. */
async function restoreWithProgress(state: StateFile, outputFd: number, options: RestoreMemoryOptions, extra: { fresh: boolean; outputBuffer?: Uint8Array; mapOutput?: { length: number }; target?: string }): Promise<number> {
  const counters = new JobCounters();
  const sampler = new ProgressSampler(counters, state.dumpSize, options.onProgress);
  sampler.start();
  try {
    const dataBytes = await state.restoreInto(outputFd, {
      fresh: extra.fresh,
      counters: counters.words,
      ...(options.threads ? { threads: options.threads } : {}),
      ...(options.signal ? { signal: options.signal } : {}),
      ...(extra.outputBuffer ? { outputBuffer: extra.outputBuffer } : {}),
      ...(extra.mapOutput ? { mapOutput: extra.mapOutput } : {}),
      ...(extra.target !== undefined ? { target: extra.target } : {}),
    });
    counters.dataBytes = state.dumpSize;
    sampler.emit('done');
    return dataBytes;
  } finally {
    sampler.stop();
  }
}

/** The bytes of a memory target, checked to hold the dump. */
function targetBytes(target: ArrayBuffer | SharedArrayBuffer | Uint8Array, state: StateFile): Uint8Array {
  const bytes = target instanceof Uint8Array ? target : new Uint8Array(target);
  if (bytes.byteLength < state.dumpSize) {
    throw new Qcow2Error('INVALID_ARGUMENT', `the memory buffer holds ${bytes.byteLength} bytes, the RAM dump ${state.dumpSize}`, { path: state.path });
  }
  return bytes;
}

/**
 * Restores the RAM dump of `state` (and its parents) into memory that already exists: a file
 * descriptor (written in place with pwrite, or through a shared mapping on hugetlbfs) or a
 * buffer. Nothing is renamed or created; a target smaller than the dump is refused.
 *
 * @example
 * const guest = new SharedArrayBuffer(state.dumpSize);
 * await restoreMemoryInto(state, guest, { zeroed: true, onProgress: (p) => console.log(p.bytesDone) });
 */
export async function restoreMemoryInto(state: StateFile, target: MemoryTarget, options: RestoreMemoryOptions = {}): Promise<RestoreMemoryResult> {
  if (target instanceof ArrayBuffer || target instanceof Uint8Array || (typeof SharedArrayBuffer !== 'undefined' && target instanceof SharedArrayBuffer)) {
    const outputBuffer = targetBytes(target as ArrayBuffer | SharedArrayBuffer | Uint8Array, state);
    const dataBytes = await restoreWithProgress(state, -1, options, { fresh: options.zeroed === true, outputBuffer });
    return { bytes: state.dumpSize, dataBytes, method: 'memory' };
  }
  const fd = (target as { fd: number }).fd;
  const where = `/proc/self/fd/${fd}`;
  if (!Number.isInteger(fd) || fd < 0) throw new Qcow2Error('INVALID_ARGUMENT', `memory target fd ${fd} is not a file descriptor`, { path: state.path });
  return restoreIntoFd(state, fd, where, options);
}

async function restoreIntoFd(state: StateFile, fd: number, path: string, options: RestoreMemoryOptions & { sized?: boolean }): Promise<RestoreMemoryResult> {
  const stats = await new Promise<import('node:fs').Stats>((resolve, reject) => fsSync.fstat(fd, (error, st) => (error ? reject(ioError(error, path, 'cannot stat the memory target')) : resolve(st))));
  if (!stats.isFile() && !stats.isBlockDevice()) throw new Qcow2Error('INVALID_ARGUMENT', 'the memory target must be a regular file (tmpfs, hugetlbfs, ...) or a block device', { path });
  const size = stats.isBlockDevice() ? native().blockDeviceInfo(fd).sizeBytes : stats.size;
  if (size < state.dumpSize) throw new Qcow2Error('INVALID_ARGUMENT', `the memory target holds ${size} bytes, the RAM dump ${state.dumpSize}`, { path });
  const mapped = stats.isFile() && (await isHugetlbfs(path));
  const dataBytes = await restoreWithProgress(state, fd, options, { fresh: options.zeroed === true, target: path, ...(mapped ? { mapOutput: { length: size } } : {}) });
  if (!mapped) {
    await new Promise<void>((resolve, reject) => fsSync.fdatasync(fd, (error) => (error ? reject(ioError(error, path, 'cannot flush the memory target')) : resolve())));
  }
  return { bytes: state.dumpSize, dataBytes, method: mapped ? 'mmap' : 'write' };
}

/**
 * Writes the RAM dump of `state` (and its parents) to a new file at `output`, under a temporary
 * name renamed into place. With `inPlace`, into the existing file at `output` instead (its bytes
 * rewritten where they stand, through a mapping on hugetlbfs; an empty file is first sized to the
 * dump and counts as zeroed).
 */
export async function restoreMemory(state: StateFile, output: string, options: RestoreMemoryOptions & { overwrite?: boolean; inPlace?: boolean } = {}): Promise<RestoreMemoryResult & { path: string }> {
  const path = nodePath.resolve(output);
  if (options.inPlace) {
    const handle = await fs.open(path, fsSync.constants.O_RDWR).catch((error) => {
      throw ioError(error, path, 'cannot open the memory file to restore in place');
    });
    try {
      let zeroed = options.zeroed === true;
      const st = await handle.stat();
      if (st.isFile() && st.size === 0) {
        // Sized here: a new file reads as zeros (on hugetlbfs, sized in whole huge pages).
        const block = (await isHugetlbfs(path)) ? st.blksize : 1;
        await handle.truncate(Math.ceil(state.dumpSize / block) * block).catch((error) => {
          throw ioError(error, path, 'cannot size the memory file');
        });
        zeroed = true;
      }
      return { ...(await restoreIntoFd(state, handle.fd, path, { ...options, zeroed })), path };
    } finally {
      await handle.close();
    }
  }
  const exists = await fs.stat(path).catch(() => undefined);
  if (exists && !options.overwrite) throw new Qcow2Error('TARGET_EXISTS', 'output exists; pass --overwrite to replace it, or --in-place to restore into it', { path });
  // Read and write: duplicate pages are copied from pages already restored.
  const file = await PendingFile.create(path, { create: 'cannot create the memory file', flush: 'cannot flush the memory file', rename: 'cannot rename the finished memory file into place' }, (temporary) => fs.open(temporary, 'wx+', 0o644));
  try {
    await file.handle.truncate(state.dumpSize);
    const dataBytes = await restoreWithProgress(state, file.handle.fd, options, { fresh: true, target: path });
    await file.commit();
    return { path, bytes: state.dumpSize, dataBytes, method: 'write' };
  } finally {
    await file.abandon();
  }
}

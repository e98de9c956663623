/**
 * Byte layouts of the VM state file: docs/formats/vmstate.md. Little-endian.
 */
import { Qcow2Error } from '../errors';
import { Codec } from '../native';

export const HEADER_MAGIC = 'QVMSTATE';
export const FOOTER_MAGIC = 'QVMSTEND';
export const MAJOR_VERSION = 1;
/** 1: the REGIONS payload ends with the RAM dump's size. */
export const MINOR_VERSION = 1;
export const HEADER_BYTES = 64;
export const FOOTER_BYTES = 64;
export const SECTION_HEADER_BYTES = 32;
export const CHUNK_HEADER_BYTES = 32;
export const PAGE_SIZE = 4096;
export const SPAN_PAGES = 512;

export const SectionType = { regions: 1, cpu: 2, device: 3, chunk: 4, index: 5 } as const;
const requiredTypes = new Set<number>([SectionType.regions, SectionType.cpu, SectionType.chunk, SectionType.index]);
export const SECTION_REQUIRED = 1;
/** The payload layout version of every section type this reader and writer know. */
export const SECTION_VERSION = 1;

export const PageState = { zero: 0, data: 1, duplicate: 2, parent: 3 } as const;
/**
 * A CHUNK's codec byte: the file's own numbering (docs/formats/vmstate.md), which the addon's
 * in-memory Codec does not share. Mapped both ways here (and in native/core/page_engine.cc,
 * which reads it on restore), never cast.
 */
export const ChunkCodec = { none: 0, zstd: 1, deflate: 2 } as const;
const chunkCodecOf = { [Codec.None]: ChunkCodec.none, [Codec.Deflate]: ChunkCodec.deflate, [Codec.Zstd]: ChunkCodec.zstd } as const;
const codecOfChunk = new Map<number, Codec>([[ChunkCodec.none, Codec.None], [ChunkCodec.zstd, Codec.Zstd], [ChunkCodec.deflate, Codec.Deflate]]);

/** The codec byte a CHUNK written with `codec` holds. */
export function chunkCodecByte(codec: Codec): number {
  return chunkCodecOf[codec];
}

/** The codec of a CHUNK's codec byte; undefined for a byte the format does not define. */
export function codecOfChunkByte(byte: number): Codec | undefined {
  return codecOfChunk.get(byte);
}

/** Limits on what a state file may claim, checked before allocating. */
export const stateLimits = {
  maxRegions: 4096,
  maxSections: 16 * 1024 * 1024,
  maxIndexBytes: 1024 * 1024 * 1024,
  maxChunkRawBytes: 64 * 1024 * 1024,
  maxCpuBytes: 64 * 1024 * 1024,
  maxDeviceBytes: 1024 * 1024 * 1024,
  maxChainDepth: 64,
} as const;

export interface Header {
  major: number;
  minor: number;
  snapshotId: Buffer;
  parentId: Buffer;
  parentDigest: Buffer;
}

export function encodeHeader(header: Omit<Header, 'major' | 'minor'>): Buffer {
  const out = Buffer.alloc(HEADER_BYTES);
  out.write(HEADER_MAGIC, 0, 'latin1');
  out.writeUInt16LE(MAJOR_VERSION, 8);
  out.writeUInt16LE(MINOR_VERSION, 10);
  out.writeUInt32LE(HEADER_BYTES, 12);
  header.snapshotId.copy(out, 16);
  header.parentId.copy(out, 32);
  header.parentDigest.copy(out, 48);
  return out;
}

export function decodeHeader(bytes: Buffer, path: string): Header {
  if (bytes.length < HEADER_BYTES || bytes.toString('latin1', 0, 8) !== HEADER_MAGIC) {
    throw new Qcow2Error('BAD_MAGIC', 'not a qcow2img VM state file (bad magic)', { path, offset: 0 });
  }
  const major = bytes.readUInt16LE(8);
  if (major !== MAJOR_VERSION) {
    throw new Qcow2Error('UNSUPPORTED_VERSION', `VM state file version ${major}.${bytes.readUInt16LE(10)} is not supported (major ${MAJOR_VERSION} is)`, { path, offset: 8 });
  }
  return {
    major,
    minor: bytes.readUInt16LE(10),
    snapshotId: Buffer.from(bytes.subarray(16, 32)),
    parentId: Buffer.from(bytes.subarray(32, 48)),
    parentDigest: Buffer.from(bytes.subarray(48, 64)),
  };
}

export function encodeSectionHeader(type: number, payloadLength: number, checksum: bigint): Buffer {
  const out = Buffer.alloc(SECTION_HEADER_BYTES);
  out.writeUInt32LE(type, 0);
  out.writeUInt16LE(SECTION_VERSION, 4);
  out.writeUInt16LE(requiredTypes.has(type) ? SECTION_REQUIRED : 0, 6);
  writeU64(out, payloadLength, 8);
  out.writeBigUInt64LE(checksum, 16);
  return out;
}

export function isRequired(flags: number): boolean {
  return (flags & SECTION_REQUIRED) !== 0;
}

export function sectionName(type: number): string {
  const names: Record<number, string> = { 1: 'REGIONS', 2: 'CPU', 3: 'DEVICE', 4: 'CHUNK', 5: 'INDEX' };
  return names[type] ?? `type ${type}`;
}

/** A u64 that is a safe integer (a count, an offset, a page number), little-endian, without a BigInt. */
function writeU64(out: Buffer, value: number, at: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`not a u64 that a number holds exactly: ${value}`);
  out.writeUInt32LE(value % 2 ** 32, at);
  out.writeUInt32LE(Math.floor(value / 2 ** 32), at + 4);
}

export function padding(length: number): number {
  return (8 - (length % 8)) % 8;
}

export interface Region {
  guestBase: number;
  size: number;
  dumpOffset: number;
  firstPage: number;
}

/** The REGIONS payload: the table, then (since 1.1) the RAM dump's size. */
export function encodeRegions(regions: readonly Region[], dumpSize: number): Buffer {
  const out = Buffer.alloc(16 + 32 * regions.length + 8);
  out.writeUInt32LE(regions.length, 0);
  out.writeUInt32LE(PAGE_SIZE, 4);
  out.writeUInt32LE(SPAN_PAGES, 8);
  regions.forEach((r, i) => {
    const at = 16 + 32 * i;
    writeU64(out, r.guestBase, at);
    writeU64(out, r.size, at + 8);
    writeU64(out, r.dumpOffset, at + 16);
    writeU64(out, r.firstPage, at + 24);
  });
  writeU64(out, dumpSize, 16 + 32 * regions.length);
  return out;
}

function safe(value: bigint, path: string, what: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new Qcow2Error('BAD_HEADER_FIELD', `${what} ${value} is out of range`, { path });
  return Number(value);
}

/**
 * The REGIONS payload. `dumpSize` is the recorded size of the RAM dump (1.1), or for a 1.0 file
 * (no size after the table) the end of the region that ends last in the dump.
 */
export function decodeRegions(payload: Buffer, path: string): { regions: Region[]; pageSize: number; spanPages: number; dumpSize: number; recorded: boolean } {
  if (payload.length < 16) throw new Qcow2Error('TRUNCATED', 'REGIONS section is too short', { path });
  const count = payload.readUInt32LE(0);
  const pageSize = payload.readUInt32LE(4);
  const spanPages = payload.readUInt32LE(8);
  if (count > stateLimits.maxRegions || payload.length < 16 + 32 * count) {
    throw new Qcow2Error('BAD_HEADER_FIELD', `REGIONS section claims ${count} regions`, { path });
  }
  if (pageSize !== PAGE_SIZE || spanPages !== SPAN_PAGES) {
    throw new Qcow2Error('BAD_HEADER_FIELD', `page size ${pageSize} / span ${spanPages} pages is not supported`, { path });
  }
  const regions: Region[] = [];
  let expectedPage = 0;
  for (let i = 0; i < count; i++) {
    const at = 16 + 32 * i;
    const region = {
      guestBase: safe(payload.readBigUInt64LE(at), path, 'region base'),
      size: safe(payload.readBigUInt64LE(at + 8), path, 'region size'),
      dumpOffset: safe(payload.readBigUInt64LE(at + 16), path, 'region dump offset'),
      firstPage: safe(payload.readBigUInt64LE(at + 24), path, 'region first page'),
    };
    if (region.size % pageSize !== 0 || region.firstPage !== expectedPage) {
      throw new Qcow2Error('BAD_HEADER_FIELD', `region ${i} is not a whole number of pages in order`, { path });
    }
    expectedPage += region.size / pageSize;
    regions.push(region);
  }
  const regionsEnd = regions.reduce((end, r) => Math.max(end, r.dumpOffset + r.size), 0);
  const sizeAt = 16 + 32 * count;
  if (payload.length < sizeAt + 8) return { regions, pageSize, spanPages, dumpSize: regionsEnd, recorded: false };
  const dumpSize = safe(payload.readBigUInt64LE(sizeAt), path, 'RAM dump size');
  if (dumpSize < regionsEnd) {
    throw new Qcow2Error('BAD_HEADER_FIELD', `REGIONS: the RAM dump size ${dumpSize} is smaller than the end of a region in the dump (${regionsEnd})`, { path });
  }
  return { regions, pageSize, spanPages, dumpSize, recorded: true };
}

export interface SectionEntry {
  type: number;
  flags: number;
  version: number;
  /** File offset of the section header. */
  offset: number;
  length: number;
  checksum: bigint;
}

export interface ChunkMapEntry {
  firstSpan: number;
  section: number;
  spanCount: number;
}

export interface Index {
  sections: SectionEntry[];
  spanCount: number;
  chunks: ChunkMapEntry[];
  /** 2 bits a page, span by span. */
  states: Buffer;
  /** page, source page pairs sorted by page. */
  duplicates: Float64Array;
}

export function encodeIndex(index: Index): Buffer {
  const statesBytes = index.states.length;
  const out = Buffer.alloc(32 + 32 * index.sections.length + 16 * index.chunks.length + statesBytes + 8 * index.duplicates.length);
  writeU64(out, index.sections.length, 0);
  writeU64(out, index.spanCount, 8);
  writeU64(out, index.chunks.length, 16);
  writeU64(out, index.duplicates.length / 2, 24);
  let at = 32;
  for (const s of index.sections) {
    out.writeUInt32LE(s.type, at);
    out.writeUInt16LE(s.flags, at + 4);
    out.writeUInt16LE(s.version, at + 6);
    writeU64(out, s.offset, at + 8);
    writeU64(out, s.length, at + 16);
    out.writeBigUInt64LE(s.checksum, at + 24);
    at += 32;
  }
  for (const c of index.chunks) {
    writeU64(out, c.firstSpan, at);
    out.writeUInt32LE(c.section, at + 8);
    out.writeUInt32LE(c.spanCount, at + 12);
    at += 16;
  }
  index.states.copy(out, at);
  at += statesBytes;
  for (let i = 0; i < index.duplicates.length; i++) {
    writeU64(out, index.duplicates[i]!, at);
    at += 8;
  }
  return out;
}

export function decodeIndex(payload: Buffer, path: string, totalPagesInSpans: number): Index {
  const fail = (message: string): never => {
    throw new Qcow2Error('BAD_HEADER_FIELD', `INDEX: ${message}`, { path });
  };
  if (payload.length < 32) fail('too short');
  const sectionCount = safe(payload.readBigUInt64LE(0), path, 'section count');
  const spanCount = safe(payload.readBigUInt64LE(8), path, 'span count');
  const chunkCount = safe(payload.readBigUInt64LE(16), path, 'chunk count');
  const duplicateCount = safe(payload.readBigUInt64LE(24), path, 'duplicate count');
  const statesBytes = Math.ceil((spanCount * SPAN_PAGES) / 4);
  if (sectionCount > stateLimits.maxSections || chunkCount > stateLimits.maxSections) fail('too many sections');
  const expected = 32 + 32 * sectionCount + 16 * chunkCount + statesBytes + 16 * duplicateCount;
  if (payload.length !== expected) fail(`length ${payload.length} does not match its counts (${expected})`);
  if (spanCount * SPAN_PAGES < totalPagesInSpans) fail('fewer spans than the regions need');
  let at = 32;
  const sections: SectionEntry[] = [];
  for (let i = 0; i < sectionCount; i++, at += 32) {
    sections.push({
      type: payload.readUInt32LE(at),
      flags: payload.readUInt16LE(at + 4),
      version: payload.readUInt16LE(at + 6),
      offset: safe(payload.readBigUInt64LE(at + 8), path, 'section offset'),
      length: safe(payload.readBigUInt64LE(at + 16), path, 'section length'),
      checksum: payload.readBigUInt64LE(at + 24),
    });
  }
  const chunks: ChunkMapEntry[] = [];
  let nextSpan = 0;
  for (let i = 0; i < chunkCount; i++, at += 16) {
    const entry = { firstSpan: safe(payload.readBigUInt64LE(at), path, 'chunk span'), section: payload.readUInt32LE(at + 8), spanCount: payload.readUInt32LE(at + 12) };
    if (entry.firstSpan < nextSpan || entry.firstSpan + entry.spanCount > spanCount || entry.section >= sectionCount) {
      fail(`chunk ${i} is out of order or points past the section table`);
    }
    const section = sections[entry.section]!;
    if (section.type !== SectionType.chunk || section.version !== SECTION_VERSION) {
      fail(`chunk ${i} points at a ${sectionName(section.type)} section of version ${section.version}, not a CHUNK of version ${SECTION_VERSION}`);
    }
    nextSpan = entry.firstSpan + entry.spanCount;
    chunks.push(entry);
  }
  const states = Buffer.from(payload.subarray(at, at + statesBytes));
  at += statesBytes;
  const duplicates = new Float64Array(duplicateCount * 2);
  for (let i = 0; i < duplicateCount * 2; i++, at += 8) duplicates[i] = safe(payload.readBigUInt64LE(at), path, 'duplicate page');
  return { sections, spanCount, chunks, states, duplicates };
}

export interface Footer {
  indexOffset: number;
  indexLength: number;
  digest: Buffer;
  dataEnd: number;
}

export function encodeFooter(footer: Footer): Buffer {
  const out = Buffer.alloc(FOOTER_BYTES);
  out.write(FOOTER_MAGIC, 0, 'latin1');
  writeU64(out, footer.indexOffset, 8);
  writeU64(out, footer.indexLength, 16);
  footer.digest.copy(out, 24);
  writeU64(out, footer.dataEnd, 40);
  return out;
}

export function decodeFooter(bytes: Buffer, path: string, fileSize: number): Footer {
  if (bytes.length !== FOOTER_BYTES || bytes.toString('latin1', 0, 8) !== FOOTER_MAGIC) {
    throw new Qcow2Error('TRUNCATED', 'VM state file has no footer (truncated or not finished)', { path, offset: Math.max(0, fileSize - FOOTER_BYTES) });
  }
  const footer = {
    indexOffset: safe(bytes.readBigUInt64LE(8), path, 'index offset'),
    indexLength: safe(bytes.readBigUInt64LE(16), path, 'index length'),
    digest: Buffer.from(bytes.subarray(24, 40)),
    dataEnd: safe(bytes.readBigUInt64LE(40), path, 'data end'),
  };
  if (footer.indexLength > stateLimits.maxIndexBytes || footer.indexOffset + SECTION_HEADER_BYTES + footer.indexLength > fileSize - FOOTER_BYTES) {
    throw new Qcow2Error('OFFSET_BEYOND_FILE', 'footer points past the end of the file', { path, offset: fileSize - FOOTER_BYTES + 8 });
  }
  return footer;
}

/** The same guest regions at the same places of the RAM dump. */
export function sameRegions(a: readonly { guestBase: number; size: number; dumpOffset: number }[], b: readonly { guestBase: number; size: number; dumpOffset: number }[]): boolean {
  return a.length === b.length && a.every((r, i) => r.guestBase === b[i]!.guestBase && r.size === b[i]!.size && r.dumpOffset === b[i]!.dumpOffset);
}

/** Packs one state a page (0..3) into 2 bits a page, least significant first. */
export function packStates(states: Uint8Array, out: Buffer, firstPage: number): void {
  for (let i = 0; i < states.length; i++) {
    const page = firstPage + i;
    out[page >> 2] = out[page >> 2]! | (states[i]! << ((page & 3) * 2));
  }
}

export function stateOf(packed: Buffer, page: number): number {
  return (packed[page >> 2]! >> ((page & 3) * 2)) & 3;
}

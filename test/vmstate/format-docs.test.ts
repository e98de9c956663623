/**
 * An independent reader of docs/formats/vmstate.md and docs/formats/bundle.md, written from the
 * docs alone: no parsing code of src/vmstate or src/snapshot is imported. Files are made with the
 * public API (writeState, createSnapshot) from synthetic RAM dumps, then every byte the docs lay
 * out is read back by the code below and the RAM is rebuilt from the file and compared with the
 * input.
 *
 * Primitives that are not the format: XXH3 comes from the package's addon (hash64/hash128, which
 * wrap xxhash.h's XXH3_64bits/XXH3_128bits) and is checked at the end against the system's
 * libxxhash 0.8 (through python3 ctypes) for every buffer hashed here; zstd frames are decoded by
 * the `zstd` CLI (Node 20 has no zstd in node:zlib) and walked structurally; raw deflate by node:zlib.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshot, inspectSnapshot, writeState } from '../../src/index';
import { sampleCpuState } from '../helpers/cpu';
import { mulberry32 } from '../helpers/prng';

const root = path.join(__dirname, '..', '..');
const addon = createRequire(path.join(root, 'package.json'))('node-gyp-build')(root) as {
  hash64(data: Uint8Array): bigint;
  hash128(data: Uint8Array): Buffer;
};
const packageVersion = (JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { version: string }).version;

// ---------------------------------------------------------------------------------------------
// Hash and codec primitives
// ---------------------------------------------------------------------------------------------

/** Every buffer hashed, with what the addon said, for the libxxhash cross-check at the end. */
const hashLog: { data: Buffer; h64?: bigint; h128?: Buffer }[] = [];
function xxh3_64(data: Buffer): bigint {
  const h = addon.hash64(data);
  hashLog.push({ data, h64: h });
  return h;
}
/** XXH3-128 as the doc stores it: low 64 bits then high 64 bits, each little-endian. */
function xxh3_128(data: Buffer): Buffer {
  const h = addon.hash128(data);
  hashLog.push({ data, h128: h });
  return h;
}

const zstdCli = spawnSync('zstd', ['--version']).status === 0;
const pythonXxhash = spawnSync('python3', ['-c', 'import ctypes; ctypes.CDLL("libxxhash.so.0")']).status === 0;

/** Walks one zstd frame (RFC 8878): its header and blocks. Returns where it ends. */
function zstdFrame(b: Buffer, start = 0): { end: number; contentSize: number | undefined; checksum: boolean } {
  expect(b.readUInt32LE(start), 'zstd frame magic').toBe(0xfd2fb528);
  const fhd = b[start + 4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  expect((fhd >> 3) & 1, 'zstd reserved bit').toBe(0);
  const checksum = ((fhd >> 2) & 1) === 1;
  let at = start + 5 + (single ? 0 : 1) + [0, 1, 2, 4][fhd & 3]!;
  const fcsBytes = fcsFlag === 0 ? (single ? 1 : 0) : [0, 2, 4, 8][fcsFlag]!;
  let contentSize: number | undefined;
  if (fcsBytes === 1) contentSize = b[at]!;
  else if (fcsBytes === 2) contentSize = b.readUInt16LE(at) + 256;
  else if (fcsBytes === 4) contentSize = b.readUInt32LE(at);
  else if (fcsBytes === 8) contentSize = Number(b.readBigUInt64LE(at));
  at += fcsBytes;
  for (;;) {
    const h = b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16);
    at += 3;
    const type = (h >> 1) & 3;
    expect(type, 'zstd block type').not.toBe(3);
    at += type === 1 ? 1 : h >>> 3;
    if (h & 1) break;
  }
  if (checksum) at += 4;
  return { end: at, contentSize, checksum };
}

function decompress(codec: number, stored: Buffer, rawLength: number): Buffer {
  if (codec === 0) return stored;
  if (codec === 2) return zlib.inflateRawSync(stored);
  expect(codec).toBe(1);
  // "one frame": the frame ends exactly where the stored bytes end.
  const frame = zstdFrame(stored);
  expect(frame.end, 'a CHUNK holds exactly one zstd frame').toBe(stored.length);
  if (frame.contentSize !== undefined) expect(frame.contentSize).toBe(rawLength);
  if (!zstdCli) return Buffer.alloc(0); // structural only; the raw checksum check below then fails loudly
  return execFileSync('zstd', ['-d', '-c', '-q'], { input: stored, maxBuffer: 1 << 28 });
}

// ---------------------------------------------------------------------------------------------
// The reader, from docs/formats/vmstate.md
// ---------------------------------------------------------------------------------------------

const T = { REGIONS: 1, CPU: 2, DEVICE: 3, CHUNK: 4, INDEX: 5 } as const;
const REQUIRED: Record<number, number> = { 1: 1, 2: 1, 3: 0, 4: 1, 5: 1 };
const S = { ZERO: 0, DATA: 1, DUPLICATE: 2, PARENT: 3 } as const;
const pad8 = (n: number) => (8 - (n % 8)) % 8;
const allZero = (b: Buffer) => b.every((x) => x === 0);
const u64 = (b: Buffer, at: number) => {
  const v = b.readBigUInt64LE(at);
  expect(v <= BigInt(Number.MAX_SAFE_INTEGER)).toBe(true);
  return Number(v);
};

interface Region { guestBase: number; size: number; dumpOffset: number; firstPage: number }
interface TableEntry { type: number; flags: number; version: number; offset: number; length: number; checksum: bigint }
interface Chunk { firstSpan: number; section: number; spanCount: number; codec: number; rawLength: number; raw: Buffer }
interface Parsed {
  header: { snapshotId: Buffer; parentId: Buffer; parentDigest: Buffer; hasParent: boolean };
  digest: Buffer;
  table: TableEntry[];
  pageSize: number;
  spanPages: number;
  regions: Region[];
  /** The RAM dump's size, after the region table (1.1). */
  dumpSize: number;
  regionFirstSpan: number[];
  spanCount: number;
  cpu?: { value: unknown; tags: Map<string, number> };
  devices: { name: string; data: Buffer }[];
  chunks: Chunk[];
  states: Buffer;
  duplicates: [number, number][];
}

function sectionHeader(bytes: Buffer, at: number) {
  return {
    type: bytes.readUInt32LE(at),
    version: bytes.readUInt16LE(at + 4),
    flags: bytes.readUInt16LE(at + 6),
    length: u64(bytes, at + 8),
    checksum: bytes.readBigUInt64LE(at + 16),
    reserved: bytes.readBigUInt64LE(at + 24),
  };
}

/** The CPU value grammar; records the tag used at each path. */
function decodeCpu(p: Buffer): { value: unknown; tags: Map<string, number> } {
  const tags = new Map<string, number>();
  let at = 0;
  const read = (where: string): unknown => {
    const tag = p[at++]!;
    tags.set(where, tag);
    switch (tag) {
      case 0: return null;
      case 1: return false;
      case 2: return true;
      case 3: {
        const digits = p.readUInt16LE(at);
        const n = Math.ceil(digits / 2);
        const hex = Buffer.from(p.subarray(at + 2, at + 2 + n)).reverse().toString('hex');
        at += 2 + n;
        return `0x${hex.slice(hex.length - digits)}`;
      }
      case 4:
      case 5: {
        const n = p.readUInt32LE(at);
        const body = p.subarray(at + 4, at + 4 + n);
        at += 4 + n;
        return tag === 4 ? body.toString('utf8') : body.toString('base64');
      }
      case 6: {
        const n = p.readUInt32LE(at);
        at += 4;
        return Array.from({ length: n }, (_, i) => read(`${where}.${i}`));
      }
      case 7: {
        const n = p.readUInt32LE(at);
        at += 4;
        const object: Record<string, unknown> = {};
        for (let i = 0; i < n; i++) {
          const k = p.readUInt16LE(at);
          const key = p.toString('utf8', at + 2, at + 2 + k);
          at += 2 + k;
          Object.defineProperty(object, key, { value: read(where ? `${where}.${key}` : key), enumerable: true, writable: true, configurable: true });
        }
        return object;
      }
      case 8: {
        at += 8;
        return p.readDoubleLE(at - 8);
      }
      default:
        throw new Error(`unknown CPU tag ${tag}`);
    }
  };
  const value = read('');
  expect(at, 'the CPU payload is one value').toBe(p.length);
  return { value, tags };
}

function stateAt(states: Buffer, slot: number): number {
  return (states[slot >> 2]! >> ((slot & 3) * 2)) & 3;
}

function slotOfPage(p: Parsed, page: number): number {
  const r = p.regions.findIndex((g) => page >= g.firstPage && page < g.firstPage + g.size / p.pageSize);
  expect(r, `page ${page} lies in a region`).toBeGreaterThanOrEqual(0);
  return p.regionFirstSpan[r]! * p.spanPages + (page - p.regions[r]!.firstPage);
}

function parseStateFile(bytes: Buffer): Parsed {
  // Header
  expect(bytes.toString('latin1', 0, 8)).toBe('QVMSTATE');
  expect(bytes.readUInt16LE(8), 'major').toBe(1);
  expect(bytes.readUInt16LE(10), 'minor').toBe(1);
  expect(bytes.readUInt32LE(12), 'header size').toBe(64);
  const snapshotId = bytes.subarray(16, 32);
  expect(snapshotId[6]! >> 4, 'UUID v4').toBe(4);
  expect(snapshotId[8]! & 0xc0, 'UUID variant').toBe(0x80);
  const parentId = bytes.subarray(32, 48);
  const parentDigest = bytes.subarray(48, 64);
  const hasParent = !allZero(parentId);
  expect(allZero(parentDigest), 'parent digest is zero exactly without a parent').toBe(!hasParent);

  // Footer: the last 64 bytes
  const footer = bytes.subarray(bytes.length - 64);
  expect(footer.toString('latin1', 0, 8)).toBe('QVMSTEND');
  const indexOffset = u64(footer, 8);
  const indexLength = u64(footer, 16);
  const digest = footer.subarray(24, 40);
  const dataEnd = u64(footer, 40);
  expect(allZero(footer.subarray(48, 64)), 'footer reserved').toBe(true);
  expect(indexOffset % 8).toBe(0);

  // INDEX section
  const ih = sectionHeader(bytes, indexOffset);
  expect([ih.type, ih.version, ih.flags, ih.length, ih.reserved]).toEqual([T.INDEX, 1, 1, indexLength, 0n]);
  const index = bytes.subarray(indexOffset + 32, indexOffset + 32 + indexLength);
  expect(xxh3_64(index), 'INDEX checksum').toBe(ih.checksum);
  expect(allZero(bytes.subarray(indexOffset + 32 + indexLength, indexOffset + 32 + indexLength + pad8(indexLength))), 'INDEX padding').toBe(true);
  expect(dataEnd, 'footer: first byte after the INDEX section').toBe(indexOffset + 32 + indexLength + pad8(indexLength));
  expect(allZero(bytes.subarray(dataEnd, bytes.length - 64)), 'optional padding before the footer is zero').toBe(true);
  // Digest: XXH3-128 of the 64 header bytes then the INDEX payload, low 64 bits first, each LE.
  expect(digest.equals(xxh3_128(Buffer.concat([bytes.subarray(0, 64), index]))), 'digest').toBe(true);

  const sectionCount = u64(index, 0);
  const spanCount = u64(index, 8);
  const chunkCount = u64(index, 16);
  const duplicateCount = u64(index, 24);
  let at = 32;
  const table: TableEntry[] = [];
  for (let i = 0; i < sectionCount; i++, at += 32) {
    table.push({ type: index.readUInt32LE(at), flags: index.readUInt16LE(at + 4), version: index.readUInt16LE(at + 6), offset: u64(index, at + 8), length: u64(index, at + 16), checksum: index.readBigUInt64LE(at + 24) });
  }
  const map: { firstSpan: number; section: number; spanCount: number }[] = [];
  for (let i = 0; i < chunkCount; i++, at += 16) map.push({ firstSpan: u64(index, at), section: index.readUInt32LE(at + 8), spanCount: index.readUInt32LE(at + 12) });

  // Sections, walked one after the other from the header: each matches its table entry.
  let walk = 64;
  for (const [i, entry] of table.entries()) {
    const h = sectionHeader(bytes, walk);
    expect(entry.offset, `section ${i} offset`).toBe(walk);
    expect({ type: h.type, version: h.version, flags: h.flags, length: h.length, checksum: h.checksum }, `section ${i} header repeats its table entry`).toEqual({
      type: entry.type, version: entry.version, flags: entry.flags, length: entry.length, checksum: entry.checksum,
    });
    expect(h.reserved).toBe(0n);
    expect(entry.version, 'version 1 for every type').toBe(1);
    expect(entry.flags, `flags of a ${entry.type} section`).toBe(REQUIRED[entry.type]);
    const payload = bytes.subarray(walk + 32, walk + 32 + entry.length);
    expect(xxh3_64(payload), `section ${i} checksum`).toBe(entry.checksum);
    expect(allZero(bytes.subarray(walk + 32 + entry.length, walk + 32 + entry.length + pad8(entry.length))), 'section padding').toBe(true);
    walk += 32 + entry.length + pad8(entry.length);
  }
  expect(walk, 'the INDEX follows the last section').toBe(indexOffset);
  // Order: REGIONS, then CPU and DEVICE, then CHUNK; at most one CPU; INDEX not in the table.
  expect(table.map((e) => e.type).join(''), 'section order').toMatch(/^1[23]*4*$/);
  expect(table.filter((e) => e.type === T.CPU).length).toBeLessThanOrEqual(1);
  expect(table.filter((e) => e.type === T.CHUNK).length, 'one chunk map entry a CHUNK section').toBe(chunkCount);
  const payloadOf = (e: TableEntry) => bytes.subarray(e.offset + 32, e.offset + 32 + e.length);

  // REGIONS
  const rp = payloadOf(table[0]!);
  const regionCount = rp.readUInt32LE(0);
  const pageSize = rp.readUInt32LE(4);
  const spanPages = rp.readUInt32LE(8);
  expect([pageSize, spanPages, rp.readUInt32LE(12)]).toEqual([4096, 512, 0]);
  expect(rp.length, 'the region table, then the dump size (1.1)').toBe(16 + 32 * regionCount + 8);
  const dumpSize = u64(rp, 16 + 32 * regionCount);
  const regions: Region[] = [];
  const regionFirstSpan: number[] = [];
  let nextPage = 0;
  let spans = 0;
  for (let i = 0; i < regionCount; i++) {
    const o = 16 + 32 * i;
    const r = { guestBase: u64(rp, o), size: u64(rp, o + 8), dumpOffset: u64(rp, o + 16), firstPage: u64(rp, o + 24) };
    expect(r.size % pageSize).toBe(0);
    expect(r.firstPage, 'pages are numbered globally, region by region').toBe(nextPage);
    nextPage += r.size / pageSize;
    regionFirstSpan.push(spans);
    spans += Math.ceil(r.size / pageSize / spanPages);
    regions.push(r);
  }
  expect(spanCount, 'INDEX span count').toBe(spans);
  const statesBytes = (spanCount * spanPages) / 4;
  expect(index.length, 'INDEX length from its counts').toBe(32 + 32 * sectionCount + 16 * chunkCount + statesBytes + 16 * duplicateCount);
  const states = index.subarray(at, at + statesBytes);
  at += statesBytes;
  const duplicates: [number, number][] = [];
  for (let i = 0; i < duplicateCount; i++, at += 16) duplicates.push([u64(index, at), u64(index, at + 8)]);

  // CPU and DEVICE
  let cpu: Parsed['cpu'];
  const devices: { name: string; data: Buffer }[] = [];
  for (const e of table) {
    if (e.type === T.CPU) cpu = decodeCpu(payloadOf(e));
    if (e.type === T.DEVICE) {
      const p = payloadOf(e);
      const n = p.readUInt16LE(0);
      devices.push({ name: p.toString('utf8', 2, 2 + n), data: Buffer.from(p.subarray(2 + n)) });
    }
  }

  const parsed: Parsed = { header: { snapshotId, parentId, parentDigest, hasParent }, digest, table, pageSize, spanPages, regions, dumpSize, regionFirstSpan, spanCount, ...(cpu ? { cpu } : {}), devices, chunks: [], states, duplicates };

  // Page states: padding slots of a short last span are ZERO; PARENT only with a parent.
  for (const [r, region] of regions.entries()) {
    const pages = region.size / pageSize;
    const used = regionFirstSpan[r]! * spanPages + pages;
    const end = (regionFirstSpan[r]! + Math.ceil(pages / spanPages)) * spanPages;
    for (let slot = used; slot < end; slot++) expect(stateAt(states, slot), `padding slot ${slot}`).toBe(S.ZERO);
  }
  if (!hasParent) for (let slot = 0; slot < spanCount * spanPages; slot++) expect(stateAt(states, slot)).not.toBe(S.PARENT);

  // Chunk map in span order; each entry points at a CHUNK v1 whose header agrees; raw length = DATA pages.
  let nextSpan = 0;
  for (const [i, m] of map.entries()) {
    expect(m.firstSpan, `chunk ${i} in span order`).toBeGreaterThanOrEqual(nextSpan);
    expect(m.firstSpan + m.spanCount).toBeLessThanOrEqual(spanCount);
    nextSpan = m.firstSpan + m.spanCount;
    const e = table[m.section]!;
    expect([e.type, e.version]).toEqual([T.CHUNK, 1]);
    const p = payloadOf(e);
    const codec = p[0]!;
    expect([0, 1, 2]).toContain(codec);
    expect(allZero(p.subarray(1, 4)) && allZero(p.subarray(20, 24)), 'chunk reserved bytes').toBe(true);
    expect({ spanCount: p.readUInt32LE(4), firstSpan: u64(p, 8) }).toEqual({ spanCount: m.spanCount, firstSpan: m.firstSpan });
    const rawLength = p.readUInt32LE(16);
    let dataPages = 0;
    for (let slot = m.firstSpan * spanPages; slot < (m.firstSpan + m.spanCount) * spanPages; slot++) dataPages += stateAt(states, slot) === S.DATA ? 1 : 0;
    expect(rawLength, `chunk ${i}: raw length = its spans' DATA pages x page size`).toBe(dataPages * pageSize);
    const raw = decompress(codec, p.subarray(32), rawLength);
    expect(raw.length).toBe(rawLength);
    expect(xxh3_64(raw), `chunk ${i} raw checksum`).toBe(p.readBigUInt64LE(24));
    parsed.chunks.push({ ...m, codec, rawLength, raw });
  }
  // Every span with a DATA page lies in a chunk.
  for (let span = 0; span < spanCount; span++) {
    let data = false;
    for (let s = span * spanPages; s < (span + 1) * spanPages; s++) data ||= stateAt(states, s) === S.DATA;
    if (data) expect(map.some((m) => span >= m.firstSpan && span < m.firstSpan + m.spanCount), `span ${span} is in a chunk`).toBe(true);
  }
  // Duplicates: sorted by page, one pair a DUPLICATE page, source a lower DATA page.
  let previous = -1;
  for (const [page, source] of duplicates) {
    expect(page).toBeGreaterThan(previous);
    previous = page;
    expect(source).toBeLessThan(page);
    expect(stateAt(states, slotOfPage(parsed, page))).toBe(S.DUPLICATE);
    expect(stateAt(states, slotOfPage(parsed, source))).toBe(S.DATA);
  }
  let duplicateStates = 0;
  for (let slot = 0; slot < spanCount * spanPages; slot++) duplicateStates += stateAt(states, slot) === S.DUPLICATE ? 1 : 0;
  expect(duplicateStates, 'every DUPLICATE page has exactly one pair').toBe(duplicateCount);
  return parsed;
}

const uuidOf = (b: Buffer) => b.toString('hex').replace(/^(.{8})(.{4})(.{4})(.{4})(.{12})$/, '$1-$2-$3-$4-$5');

/** The RAM dump, rebuilt: each region at its dump offset; PARENT pages from the parent's dump. */
function rebuildDump(p: Parsed, parentDump?: Buffer): Buffer {
  expect(p.dumpSize, 'the dump size covers every region').toBeGreaterThanOrEqual(p.regions.reduce((n, r) => Math.max(n, r.dumpOffset + r.size), 0));
  const out = Buffer.alloc(p.dumpSize);
  const slotToDump = new Map<number, number>();
  for (const [r, region] of p.regions.entries()) {
    for (let i = 0; i < region.size / p.pageSize; i++) slotToDump.set(p.regionFirstSpan[r]! * p.spanPages + i, region.dumpOffset + i * p.pageSize);
  }
  for (const chunk of p.chunks) {
    let cursor = 0;
    for (let slot = chunk.firstSpan * p.spanPages; slot < (chunk.firstSpan + chunk.spanCount) * p.spanPages; slot++) {
      if (stateAt(p.states, slot) !== S.DATA) continue;
      chunk.raw.copy(out, slotToDump.get(slot)!, cursor, cursor + p.pageSize);
      cursor += p.pageSize;
    }
  }
  for (const [slot, at] of slotToDump) {
    if (stateAt(p.states, slot) === S.PARENT) parentDump!.copy(out, at, at, at + p.pageSize);
  }
  for (const [page, source] of p.duplicates) {
    const from = slotToDump.get(slotOfPage(p, source))!;
    out.copy(out, slotToDump.get(slotOfPage(p, page))!, from, from + p.pageSize);
  }
  return out;
}

/** "Reading a guest-physical range without qcow2img", step by step. */
function readGuest(p: Parsed, address: number, length: number, parent?: (address: number, length: number) => Buffer): Buffer {
  const out = Buffer.alloc(length);
  for (let done = 0; done < length; ) {
    const a = address + done;
    const r = p.regions.findIndex((g) => a >= g.guestBase && a < g.guestBase + g.size);
    expect(r).toBeGreaterThanOrEqual(0);
    const region = p.regions[r]!;
    const inRegion = Math.floor((a - region.guestBase) / p.pageSize);
    const pageBytes = readPage(p, region.firstPage + inRegion, p.regionFirstSpan[r]! * p.spanPages + inRegion, region.guestBase + inRegion * p.pageSize, parent);
    const from = a - (region.guestBase + inRegion * p.pageSize);
    const n = Math.min(p.pageSize - from, length - done);
    pageBytes.copy(out, done, from, from + n);
    done += n;
  }
  return out;
}

function readPage(p: Parsed, page: number, slot: number, pageAddress: number, parent?: (address: number, length: number) => Buffer): Buffer {
  const state = stateAt(p.states, slot);
  if (state === S.ZERO) return Buffer.alloc(p.pageSize);
  if (state === S.PARENT) return parent!(pageAddress, p.pageSize);
  if (state === S.DUPLICATE) {
    const pair = p.duplicates.find(([d]) => d === page)!;
    return readPage(p, pair[1], slotOfPage(p, pair[1]), -1, parent);
  }
  const span = Math.floor(slot / p.spanPages);
  let low = 0;
  let high = p.chunks.length - 1;
  let chunk: Chunk | undefined;
  while (low <= high) {
    const mid = (low + high) >> 1;
    const c = p.chunks[mid]!;
    if (span < c.firstSpan) high = mid - 1;
    else if (span >= c.firstSpan + c.spanCount) low = mid + 1;
    else { chunk = c; break; }
  }
  expect(chunk, `a chunk holds span ${span}`).toBeDefined();
  let position = 0;
  for (let s = chunk!.firstSpan * p.spanPages; s < slot; s++) position += stateAt(p.states, s) === S.DATA ? 1 : 0;
  return chunk!.raw.subarray(position * p.pageSize, (position + 1) * p.pageSize);
}

// ---------------------------------------------------------------------------------------------
// Synthetic RAM
// ---------------------------------------------------------------------------------------------

const PAGE = 4096;
type Kind = 'zero' | 'random' | 'text' | { dup: number };


/** A dump of `pages` pages; `kind(p)` says what dump page p holds (`dup` copies an earlier dump page). */
function makeDump(pages: number, seed: number, kind: (p: number) => Kind, base?: Buffer): Buffer {
  const next = mulberry32(seed);
  const out = base ? Buffer.from(base) : Buffer.alloc(pages * PAGE);
  for (let p = 0; p < pages; p++) {
    const k = kind(p);
    const page = out.subarray(p * PAGE, (p + 1) * PAGE);
    if (k === 'zero') { if (!base) page.fill(0); continue; }
    if (k === 'random') { for (let i = 0; i < PAGE; i += 4) page.writeUInt32LE(next(), i); continue; }
    if (k === 'text') {
      const line = Buffer.from(`seed ${seed} page ${p}: the quick brown fox ${next()} jumps over the lazy dog\n`);
      for (let i = 0; i < PAGE; i += line.length) line.copy(page, i);
      continue;
    }
    if (typeof k === 'object') out.copy(page, 0, k.dup * PAGE, (k.dup + 1) * PAGE);
  }
  return out;
}

/**
 * 1612 pages, spans 512/512/512/76: span 0 holds 270 DATA pages (random, text) and duplicates;
 * span 1 is all zero; spans 2-3 hold a few pages, duplicates across chunks and a duplicate of a
 * duplicate (its source must be the first, DATA, page).
 */
const kindA = (p: number): Kind => {
  if (p < 60) return 'random';
  if (p < 270) return 'text';
  if (p < 320) return { dup: ((p - 270) * 7) % 270 };
  if (p >= 1024 && p < 1064) return 'text';
  if (p >= 1064 && p < 1074) return { dup: p - 1064 };
  if (p === 1080) return { dup: 270 }; // 270 duplicates page 0
  if (p === 1540) return 'text';
  if (p === 1541) return { dup: 1540 };
  if (p === 1600) return 'random';
  return 'zero';
};
const PAGES_A = 1612;

/** Expected states in global page order: first occurrence DATA, later equal pages DUPLICATE of it. */
function expectedStates(dump: Buffer, regions: { dumpOffset: number; size: number }[]): { states: number[]; pairs: [number, number][] } {
  const seen = new Map<string, number>();
  const states: number[] = [];
  const pairs: [number, number][] = [];
  let page = 0;
  for (const r of regions) {
    for (let i = 0; i < r.size / PAGE; i++, page++) {
      const bytes = dump.subarray(r.dumpOffset + i * PAGE, r.dumpOffset + (i + 1) * PAGE);
      if (allZero(bytes)) { states.push(S.ZERO); continue; }
      const key = bytes.toString('base64');
      const first = seen.get(key);
      if (first !== undefined) { states.push(S.DUPLICATE); pairs.push([page, first]); continue; }
      seen.set(key, page);
      states.push(S.DATA);
    }
  }
  return { states, pairs };
}

function statesByPage(p: Parsed): number[] {
  const out: number[] = [];
  for (const [r, region] of p.regions.entries()) {
    for (let i = 0; i < region.size / p.pageSize; i++) out.push(stateAt(p.states, p.regionFirstSpan[r]! * p.spanPages + i));
  }
  return out;
}

/** The dump bytes the regions cover (the rest of a dump is not stored). */
function regionBytes(dump: Buffer, regions: { dumpOffset: number; size: number }[]): Buffer[] {
  return regions.map((r) => dump.subarray(r.dumpOffset, r.dumpOffset + r.size));
}

let dir: string;
const write = (name: string, data: Buffer) => {
  const file = path.join(dir, name);
  fs.writeFileSync(file, data);
  return file;
};

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-format-docs-'));
});
afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// vmstate.md
// ---------------------------------------------------------------------------------------------

describe('vmstate.md, read by an independent parser', () => {
  let dumpA: Buffer;
  let dumpB: Buffer;
  let dumpC: Buffer;
  beforeAll(() => {
    dumpA = makeDump(PAGES_A, 11, kindA);
    write('a.raw', dumpA);
    // B: 700 dump pages. Region 0 (4 GiB up) is dump pages 100-699 (600 pages: spans 512 + 88),
    // region 1 (guest 0) is dump pages 0-99: listed after region 0, so out of guest order, and its
    // global page numbers (600-699) differ from its state slots (1024-1123).
    dumpB = makeDump(700, 23, (p) => {
      if (p < 10) return 'random';
      if (p < 100) return 'zero'; // 10-14: copies of region 0's pages, below
      if (p < 400) return 'text';
      if (p < 450) return { dup: p - 300 };
      if (p >= 612 && p < 620) return 'text';
      if (p === 620) return { dup: 612 };
      return 'zero';
    });
    // Duplicates of region 0's first pages in region 1: their sources have lower global numbers.
    dumpB.copy(dumpB, 10 * PAGE, 100 * PAGE, 105 * PAGE);
    write('b.raw', dumpB);
    // C: incompressible, 520 pages (spans 512 + 8).
    dumpC = makeDump(520, 37, () => 'random');
    write('c.raw', dumpC);
  });

  const regionsB = [
    { guestBase: 4 * 1024 ** 3, size: 600 * PAGE, dumpOffset: 100 * PAGE },
    { guestBase: 0, size: 100 * PAGE, dumpOffset: 0 },
  ];

  const cases: { name: string; dump: () => Buffer; file: string; options: Parameters<typeof writeState>[1]; regions: () => { guestBase: number; size: number; dumpOffset: number }[]; codecs: number[] }[] = [
    { name: 'A zstd (default level), 4 threads', dump: () => dumpA, file: 'a.raw', options: { compress: 'zstd', threads: 4 }, regions: () => [{ guestBase: 0, size: PAGES_A * PAGE, dumpOffset: 0 }], codecs: [1] },
    { name: 'A deflate level 12', dump: () => dumpA, file: 'a.raw', options: { compress: 'deflate', level: 12 }, regions: () => [{ guestBase: 0, size: PAGES_A * PAGE, dumpOffset: 0 }], codecs: [2] },
    { name: 'A none', dump: () => dumpA, file: 'a.raw', options: { compress: 'none' }, regions: () => [{ guestBase: 0, size: PAGES_A * PAGE, dumpOffset: 0 }], codecs: [0] },
    { name: 'B two regions out of guest order, dump gaps, deflate', dump: () => dumpB, file: 'b.raw', options: { compress: 'deflate', regions: regionsB }, regions: () => regionsB, codecs: [2, 0] },
    { name: 'C incompressible, zstd level 19, 1 thread', dump: () => dumpC, file: 'c.raw', options: { compress: 'zstd', level: 19, threads: 1 }, regions: () => [{ guestBase: 0, size: 520 * PAGE, dumpOffset: 0 }], codecs: [0] },
  ];

  for (const c of cases) {
    it(`round-trips ${c.name}`, async () => {
      const out = path.join(dir, `${c.name.replace(/\W+/g, '-')}.qvms`);
      const written = await writeState(out, { memory: path.join(dir, c.file), ...c.options });
      const bytes = fs.readFileSync(out);
      const p = parseStateFile(bytes);
      // What the API says matches the file.
      expect(written.bytes).toBe(bytes.length);
      expect(written.snapshotId).toBe(uuidOf(p.header.snapshotId));
      expect(written.digest).toBe(p.digest.toString('hex'));
      expect(p.header.hasParent).toBe(false);
      const regions = c.regions();
      expect(p.regions.map(({ guestBase, size, dumpOffset }) => ({ guestBase, size, dumpOffset }))).toEqual(regions);
      // States and pairs as the dump's contents say (dedup in global page order).
      const expected = expectedStates(c.dump(), regions);
      expect(statesByPage(p)).toEqual(expected.states);
      expect(p.duplicates).toEqual(expected.pairs);
      // Codecs: the one asked for, or none where compressing did not pay.
      expect(p.chunks.length).toBeGreaterThan(1);
      expect([...new Set(p.chunks.map((ch) => ch.codec))].sort()).toEqual([...c.codecs].sort());
      // The RAM, rebuilt from the file alone.
      const rebuilt = rebuildDump(p);
      expect(p.dumpSize, 'REGIONS records the size of the dump').toBe(c.dump().length);
      expect(rebuilt.equals(c.dump()), 'the whole dump, rebuilt from the file alone').toBe(true);
      expect(regionBytes(rebuilt, regions).every((b, i) => b.equals(regionBytes(c.dump(), regions)[i]!))).toBe(true);
      // Random access: a range over every region, crossing pages of every state.
      for (const r of regions) {
        for (const [start, length] of [[0, r.size], [PAGE - 100, 3 * PAGE], [r.size - 5000, 5000]] as const) {
          const got = readGuest(p, r.guestBase + start, length);
          expect(got.equals(c.dump().subarray(r.dumpOffset + start, r.dumpOffset + start + length)), `guest 0x${(r.guestBase + start).toString(16)}+${length}`).toBe(true);
        }
      }
      if (c.name.startsWith('A')) {
        // A chunk may span spans without DATA pages: spans 1-3 are one chunk.
        expect(p.chunks.map((ch) => [ch.firstSpan, ch.spanCount])).toEqual([[0, 1], [1, 3]]);
        expect(p.duplicates).toContainEqual([1080, 0]);
      }
      if (c.name.startsWith('B')) {
        // Page numbers (duplicates) are global page numbers, not state slots: region 1's page 610
        // sits in slot 1034.
        expect(p.duplicates).toContainEqual([610, 0]);
        expect(slotOfPage(p, 610)).toBe(1034);
        // CHUNK sections come in global span order (REGIONS order).
        expect(p.chunks.map((ch) => ch.firstSpan)).toEqual([0, 1, 2]);
      }
    });
  }

  it('Layout: CHUNK sections in span order (the regions\' listed order), also when that is not guest order', async () => {
    const out = path.join(dir, 'guest-order.qvms');
    await writeState(out, { memory: path.join(dir, 'b.raw'), regions: regionsB, compress: 'deflate' });
    const p = parseStateFile(fs.readFileSync(out));
    expect(p.regions.map((r) => r.guestBase), 'regions listed out of guest order').not.toEqual([...p.regions.map((r) => r.guestBase)].sort((a, b) => a - b));
    // The first span of each CHUNK section, in file order.
    const chunkSections = p.table.filter((e) => e.type === T.CHUNK).map((e) => p.chunks.find((c) => p.table[c.section] === e)!);
    const firstSpans = chunkSections.map((c) => c.firstSpan);
    expect(firstSpans).toEqual([...firstSpans].sort((a, b) => a - b));
  });

  it('the parser is not vacuous: one flipped byte in the header, a chunk or the INDEX is caught', async () => {
    const out = path.join(dir, 'flip.qvms');
    await writeState(out, { memory: path.join(dir, 'a.raw') });
    const good = fs.readFileSync(out);
    const p = parseStateFile(good);
    const chunkSection = p.table[p.chunks[0]!.section]!;
    const indexOffset = Number(good.readBigUInt64LE(good.length - 64 + 8));
    for (const at of [20, chunkSection.offset + 32 + 40, indexOffset + 32 + 40]) {
      const bad = Buffer.from(good);
      bad[at] = bad[at]! ^ 0x01;
      expect(() => parseStateFile(bad), `byte ${at}`).toThrow();
    }
  });

  it('writes a state without memory: REGIONS with no region, the CPU tree and DEVICE blobs', async () => {
    // Keys in an order of their own, an unknown key, a non-canonical base64 xsave, a hex string
    // in an unknown key: writeState keeps them as given.
    const vcpu0 = sampleCpuState.vcpus[0]!;
    const { id, ...rest } = vcpu0;
    const cpu = {
      vcpus: [{ ...rest, id }, { ...sampleCpuState.vcpus[1]!, xsave: 'AAE', extra: { xsave: Buffer.alloc(8).toString('base64'), flag: true, nothing: null, no: false, ratio: 0.5, upper: '0xABCD', odd: '0x00f' } }],
      arch: 'x86_64',
    };
    const devices = [{ name: 'virtio-net.0', data: Buffer.from('device blob \u00e9') }, { name: 'empty', data: Buffer.alloc(0) }];
    const out = path.join(dir, 'cpu-only.qvms');
    await writeState(out, { cpu: cpu as never, devices });
    const p = parseStateFile(fs.readFileSync(out));
    expect(p.regions).toEqual([]);
    expect(p.spanCount).toBe(0);
    expect(p.chunks).toEqual([]);
    expect(p.table.map((e) => e.type)).toEqual([T.REGIONS, T.CPU, T.DEVICE, T.DEVICE]);
    expect(p.devices).toEqual(devices);
    // The tree, byte for byte and key order included.
    expect(JSON.stringify(p.cpu!.value)).toBe(JSON.stringify(cpu));
    const tags = p.cpu!.tags;
    expect(tags.get('')).toBe(7);
    expect(tags.get('vcpus')).toBe(6);
    expect(tags.get('vcpus.0.regs.rax')).toBe(3);
    expect(tags.get('vcpus.0.id')).toBe(8);
    expect(tags.get('vcpus.0.xsave'), 'canonical base64 xsave is bytes').toBe(5);
    expect(tags.get('vcpus.0.lapic')).toBe(5);
    expect(tags.get('vcpus.1.xsave'), 'non-canonical base64 stays a string').toBe(4);
    expect(tags.get('vcpus.1.extra.xsave'), 'only a vCPU\'s own xsave is bytes').toBe(4);
    expect(tags.get('vcpus.0.hypervisorSpecific.kvmClock')).toBe(3);
    expect(tags.get('vcpus.0.hypervisorSpecific.note')).toBe(4);
    expect([tags.get('vcpus.1.extra.flag'), tags.get('vcpus.1.extra.nothing'), tags.get('vcpus.1.extra.no'), tags.get('vcpus.1.extra.ratio')]).toEqual([2, 0, 1, 8]);
    // Not in the doc: only lowercase "0x" strings are hex integers; "0xABCD" is kept as a string.
    expect([tags.get('vcpus.1.extra.upper'), tags.get('vcpus.1.extra.odd')]).toEqual([4, 3]);
    // Hex: digits kept, leading zeros too (16 digits for rax).
    expect((p.cpu!.value as typeof cpu).vcpus[0]!.regs.rax).toBe(vcpu0.regs.rax);
  });
});

// ---------------------------------------------------------------------------------------------
// bundle.md
// ---------------------------------------------------------------------------------------------

const documentedFields = ['formatVersion', 'id', 'created', 'parent', 'producer', 'vcpuCount', 'memoryRegions', 'machine', 'devices', 'files'];
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** qcow2 header: virtual size and backing file name (docs/formats/qcow2.md; big-endian). */
function qcow2Header(file: string): { virtualSize: number; backing: string | undefined } {
  const b = fs.readFileSync(file);
  expect(b.subarray(0, 4).equals(Buffer.from([0x51, 0x46, 0x49, 0xfb]))).toBe(true);
  const backingOffset = Number(b.readBigUInt64BE(8));
  const backingSize = b.readUInt32BE(16);
  return { virtualSize: Number(b.readBigUInt64BE(24)), backing: backingOffset ? b.toString('utf8', backingOffset, backingOffset + backingSize) : undefined };
}

type Metadata = Record<string, unknown> & {
  id: string;
  parent: { id: string; path: string } | null;
  files: Record<string, Record<string, unknown>>;
  memoryRegions: Record<string, unknown>[];
};

/** snapshot.json against bundle.md's table; `members` gives each member's bytes. */
function checkMetadata(text: string, members: Map<string, Buffer>, given: { vcpus: number; machine: Record<string, unknown>; devices: string[]; diskSize?: number }): Metadata {
  const m = JSON.parse(text) as Metadata;
  expect(Object.keys(m).sort(), 'exactly the documented fields').toEqual([...documentedFields].sort());
  expect(m.formatVersion).toBe(1);
  expect(m.id).toMatch(UUID);
  expect(typeof m.created).toBe('string');
  expect(m.created as string).toMatch(/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/);
  expect(Math.abs(Date.parse(m.created as string) - Date.now())).toBeLessThan(10 * 60_000);
  expect(m.producer).toBe(`qcow2img ${packageVersion}`);
  expect(Number.isInteger(m.vcpuCount)).toBe(true);
  expect(m.vcpuCount).toBe(given.vcpus);
  expect(m.machine).toEqual(given.machine);
  expect(m.devices).toEqual(given.devices);
  if (m.parent !== null) {
    expect(Object.keys(m.parent).sort()).toEqual(['id', 'path']);
    expect(m.parent.id).toMatch(UUID);
  }
  expect(Object.keys(m.files).every((k) => k === 'disk.qcow2' || k === 'state.qvms')).toBe(true);
  expect(Object.keys(m.files).sort()).toEqual([...members.keys()].filter((k) => k !== 'snapshot.json').sort());
  const hex16 = (b: Buffer) => xxh3_64(b).toString(16).padStart(16, '0');
  const disk = members.get('disk.qcow2');
  if (disk) {
    const entry = m.files['disk.qcow2']!;
    expect(Object.keys(entry).sort()).toEqual(['size', 'virtualSize', 'xxh3']);
    expect(entry.size).toBe(disk.length);
    expect(entry.xxh3).toMatch(/^[0-9a-f]{16}$/);
    expect(entry.xxh3).toBe(hex16(disk));
    expect(entry.virtualSize).toBe(given.diskSize);
    expect(disk.readBigUInt64BE(24)).toBe(BigInt(given.diskSize!));
  }
  const state = members.get('state.qvms');
  if (state) {
    const entry = m.files['state.qvms']!;
    expect(Object.keys(entry).sort()).toEqual(['digest', 'size', 'snapshotId', 'xxh3']);
    expect(entry.size).toBe(state.length);
    expect(entry.xxh3).toBe(hex16(state));
    const p = parseStateFile(state);
    expect(entry.snapshotId).toBe(uuidOf(p.header.snapshotId));
    // "the state file's footer digest (XXH3-128, 32 hex digits)": the 16 footer bytes in hex
    // (low 64 bits first, each LE), not XXH128's canonical big-endian text.
    expect(entry.digest).toMatch(/^[0-9a-f]{32}$/);
    expect(entry.digest).toBe(p.digest.toString('hex'));
    expect(m.memoryRegions).toEqual(p.regions.map(({ guestBase, size, dumpOffset }) => ({ guestBase, size, dumpOffset })));
    expect(p.devices.map((d) => d.name)).toEqual(m.devices);
    expect(p.cpu ? (p.cpu.value as { vcpus: unknown[] }).vcpus.length : 0).toBe(m.vcpuCount);
  }
  return m;
}

function folderMembers(folder: string): Map<string, Buffer> {
  return new Map(fs.readdirSync(folder).map((f) => [f, fs.readFileSync(path.join(folder, f))]));
}

describe('bundle.md: snapshot.json and members', () => {
  const DISK = 4 * 1024 * 1024;
  let disk: Buffer;
  let ramParent: Buffer;
  let ramChild: Buffer;
  let s1: string;
  let s2: string;
  const machine = { vmm: 'firecracker', memoryMiB: 6, nested: { list: [1, 'two'] } };
  const devices = [{ name: 'virtio-blk', data: Buffer.from('blk state') }, { name: 'serial_0', data: Buffer.alloc(300, 7) }];

  beforeAll(async () => {
    disk = makeDump(DISK / PAGE, 5, (p) => (p % 17 === 0 ? 'text' : p % 31 === 0 ? 'random' : 'zero'));
    write('disk.raw', disk);
    ramParent = makeDump(PAGES_A, 11, kindA);
    write('ram1.raw', ramParent);
    // The child: some pages rewritten, some zeroed, some new, one copy of a new page, one copy
    // of a page it keeps from the parent.
    ramChild = makeDump(PAGES_A, 99, (p) => {
      if (p >= 60 && p < 70) return 'text';
      if (p === 600) return 'random';
      if (p === 601) return { dup: 600 };
      if (p === 602) return { dup: 100 };
      return 'zero';
    }, ramParent);
    ramChild.fill(0, 0, 5 * PAGE);
    write('ram2.raw', ramChild);
    s1 = path.join(dir, 's1');
    await createSnapshot(s1, { disk: path.join(dir, 'disk.raw'), memory: path.join(dir, 'ram1.raw'), cpu: sampleCpuState, devices, machine });
    const disk2 = Buffer.from(disk);
    disk2.fill(0x42, 8192, 12288);
    write('disk2.raw', disk2);
    s2 = path.join(dir, 's2');
    await createSnapshot(s2, { parent: s1, disk: path.join(dir, 'disk2.raw'), memory: path.join(dir, 'ram2.raw'), cpu: sampleCpuState });
  });

  it('a full bundle: the three members, every documented field and nothing else', () => {
    expect(fs.readdirSync(s1).sort()).toEqual(['disk.qcow2', 'snapshot.json', 'state.qvms']);
    const members = folderMembers(s1);
    const m = checkMetadata(members.get('snapshot.json')!.toString('utf8'), members, { vcpus: 2, machine, devices: devices.map((d) => d.name), diskSize: DISK });
    expect(m.parent).toBeNull();
    expect(qcow2Header(path.join(s1, 'disk.qcow2')).backing).toBeUndefined();
    const p = parseStateFile(members.get('state.qvms')!);
    expect(p.devices).toEqual(devices);
    expect(rebuildDump(p).equals(ramParent)).toBe(true);
  });

  it('an incremental bundle: parent link, relative backing file, state file over its parent', () => {
    const m1 = JSON.parse(fs.readFileSync(path.join(s1, 'snapshot.json'), 'utf8')) as Metadata;
    const members = folderMembers(s2);
    const m2 = checkMetadata(members.get('snapshot.json')!.toString('utf8'), members, { vcpus: 2, machine: {}, devices: [], diskSize: DISK });
    expect(m2.parent!.id).toBe(m1.id);
    expect(path.isAbsolute(m2.parent!.path)).toBe(false);
    expect(path.resolve(s2, m2.parent!.path), 'parent path is relative to this folder').toBe(s1);
    const backing = qcow2Header(path.join(s2, 'disk.qcow2')).backing!;
    expect(backing).toBe('../s1/disk.qcow2');
    const parent = parseStateFile(fs.readFileSync(path.join(s1, 'state.qvms')));
    const child = parseStateFile(members.get('state.qvms')!);
    expect(child.header.hasParent).toBe(true);
    expect(child.header.parentId.equals(parent.header.snapshotId)).toBe(true);
    expect(child.header.parentDigest.equals(parent.digest)).toBe(true);
    expect(uuidOf(child.header.parentId)).toBe(m1.files['state.qvms']!.snapshotId);
    expect(child.regions).toEqual(parent.regions);
    const states = statesByPage(child);
    expect(states.slice(0, 5), 'pages zeroed since the parent are ZERO').toEqual([S.ZERO, S.ZERO, S.ZERO, S.ZERO, S.ZERO]);
    expect(states.slice(60, 70).every((s) => s === S.DATA)).toBe(true);
    expect([states[600], states[601], states[602]], 'a copy of a PARENT page is DATA: only DATA pages are sources').toEqual([S.DATA, S.DUPLICATE, S.DATA]);
    expect(child.duplicates).toEqual([[601, 600]]);
    expect(states[5]).toBe(S.PARENT);
    const parentDump = rebuildDump(parent);
    expect(rebuildDump(child, parentDump).equals(ramChild)).toBe(true);
    const got = readGuest(child, 0, PAGES_A * PAGE, (a, n) => readGuest(parent, a, n));
    expect(got.equals(ramChild)).toBe(true);
  });

  it('--dirty-bitmap: one bit a page, LSB first, indexed by global page number (region order)', async () => {
    // Ambiguous in the doc ("in the dump's page order"): a region at dump offset 4 pages makes
    // the RAM dump's page order and the state file's page order differ. This asserts what the
    // code does: bit i is global page i (region pages in REGIONS order), not dump page i.
    const parentRam = makeDump(12, 3, (p) => (p >= 4 ? 'text' : 'zero'));
    write('bm-ram1.raw', parentRam);
    // The dump's first 4 pages come last (a map must cover the whole dump).
    const regions = [{ guestBase: 0x100000, size: 8 * PAGE, dumpOffset: 4 * PAGE }, { guestBase: 0, size: 4 * PAGE, dumpOffset: 0 }];
    const b1 = path.join(dir, 'bm1');
    await createSnapshot(b1, { memory: path.join(dir, 'bm-ram1.raw'), memoryRegions: regions });
    const childRam = makeDump(12, 4, (p) => (p === 5 || p === 9 ? 'text' : 'zero'), parentRam);
    write('bm-ram2.raw', childRam);
    const b2 = path.join(dir, 'bm2');
    await createSnapshot(b2, { parent: b1, memory: path.join(dir, 'bm-ram2.raw'), memoryRegions: regions, dirtyBitmap: Buffer.from([1 << 5, 0]) });
    const child = parseStateFile(fs.readFileSync(path.join(b2, 'state.qvms')));
    const states = statesByPage(child);
    expect(states[5], 'bit 5 = global page 5 (dump page 9)').toBe(S.DATA);
    expect(states[1], 'global page 1 (dump page 5) is taken from the parent').toBe(S.PARENT);
  });

  it('vmstate.md, CPU: "keys are kept in the order given" for the JSON given to createSnapshot', async () => {
    const cpu = { vcpus: sampleCpuState.vcpus.map(({ id, ...rest }) => ({ ...rest, id })), arch: 'x86_64' };
    const out = path.join(dir, 'cpu-order');
    await createSnapshot(out, { cpu });
    const p = parseStateFile(fs.readFileSync(path.join(out, 'state.qvms')));
    expect(Object.keys(p.cpu!.value as object)).toEqual(['vcpus', 'arch']);
    expect(JSON.stringify(p.cpu!.value)).toBe(JSON.stringify(cpu));
  });
});

// ---------------------------------------------------------------------------------------------
// bundle.md, Archives
// ---------------------------------------------------------------------------------------------

interface TarMember { name: string; type: string; mode: number; size: number; sizeField: string; data: Buffer }

/** A POSIX ustar stream as bundle.md lays it out. */
function parseTar(tar: Buffer): { members: TarMember[]; endAt: number } {
  const members: TarMember[] = [];
  let at = 0;
  for (;;) {
    const block = tar.subarray(at, at + 512);
    if (allZero(block)) break;
    const field = (s: number, n: number) => block.toString('latin1', s, s + n).replace(/\0.*$/s, '');
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : block[i]!;
    expect(parseInt(field(148, 8).trim(), 8), 'tar header checksum').toBe(sum);
    expect(block.toString('latin1', 257, 265)).toBe('ustar\u000000');
    const sizeField = block.toString('latin1', 124, 136);
    const size = parseInt(sizeField, 8);
    const type = block.toString('latin1', 156, 157);
    const data = tar.subarray(at + 512, at + 512 + size);
    expect(allZero(tar.subarray(at + 512 + size, at + 512 + size + ((512 - (size % 512)) % 512))), 'entry padding').toBe(true);
    members.push({ name: field(0, 100), type, mode: parseInt(field(100, 8), 8), size, sizeField, data });
    at += 512 + size + ((512 - (size % 512)) % 512);
  }
  expect(allZero(tar.subarray(at, at + 1024)) && at + 1024 <= tar.length, 'two zero blocks').toBe(true);
  expect(tar.length % 10240, 'whole records of 10240 bytes').toBe(0);
  expect(allZero(tar.subarray(at)), 'nothing after the end blocks but zeros').toBe(true);
  return { members, endAt: at };
}

describe('bundle.md: archives', () => {
  const archives: [string, (b: Buffer) => Buffer][] = [
    ['s-arch.tar', (b) => b],
    ['s-arch.tar.gz', (b) => zlib.gunzipSync(b)],
    ...(zstdCli
      ? [['s-arch.tar.zst', (b: Buffer) => {
          // Checksummed frames, every one of them.
          for (let at = 0; at < b.length; ) {
            if (b.readUInt32LE(at) >>> 4 === 0x184d2a5) { at += 8 + b.readUInt32LE(at + 4); continue; } // skippable frame
            const frame = zstdFrame(b, at);
            expect(frame.checksum, 'zstd frame checksum flag').toBe(true);
            at = frame.end;
          }
          return execFileSync('zstd', ['-d', '-c', '-q'], { input: b, maxBuffer: 1 << 28 });
        }] as [string, (b: Buffer) => Buffer]]
      : []),
  ];
  for (const [name, untar] of archives) {
    it(`${name}: top folder, member order, modes, sizes, end blocks; members match snapshot.json`, async () => {
      const sub = fs.mkdtempSync(path.join(dir, 'arch-'));
      write('arch-ram.raw', makeDump(PAGES_A, 11, kindA));
      write('arch-disk.raw', makeDump(1024, 5, (p) => (p % 17 === 0 ? 'text' : 'zero')));
      const archive = path.join(sub, name);
      await createSnapshot(archive, { disk: path.join(dir, 'arch-disk.raw'), memory: path.join(dir, 'arch-ram.raw'), cpu: sampleCpuState });
      expect(fs.readdirSync(sub), 'no leftovers beside the archive').toEqual([name]);
      const { members } = parseTar(untar(fs.readFileSync(archive)));
      expect(members.map((m) => [m.name, m.type, m.mode])).toEqual([
        ['s-arch/', '5', 0o755],
        ['s-arch/disk.qcow2', '0', 0o644],
        ['s-arch/state.qvms', '0', 0o644],
        ['s-arch/snapshot.json', '0', 0o644],
      ]);
      for (const m of members.slice(1)) expect(m.sizeField, 'size: 11 octal digits').toMatch(/^[0-7]{11}\0$/);
      const byName = new Map(members.filter((m) => m.type === '0').map((m) => [m.name.slice('s-arch/'.length), m.data]));
      const meta = checkMetadata(byName.get('snapshot.json')!.toString('utf8'), byName, { vcpus: 2, machine: {}, devices: [], diskSize: 4 * 1024 * 1024 });
      expect(meta.parent).toBeNull();
    });
  }

  it('an archive with every member at the root is read; one with members in two places is BAD_ARCHIVE', async () => {
    const bundle = path.join(dir, 'flat-src');
    await createSnapshot(bundle, { cpu: sampleCpuState });
    const flat = path.join(dir, 'flat.tar');
    execFileSync('tar', ['-cf', flat, '-C', bundle, 'state.qvms', 'snapshot.json']);
    expect((await inspectSnapshot(flat)).metadata.vcpuCount).toBe(sampleCpuState.vcpus.length);
    const mixed = path.join(dir, 'mixed.tar');
    execFileSync('tar', ['-cf', mixed, '-C', dir, 'flat-src/state.qvms', '-C', bundle, 'snapshot.json']);
    await expect(inspectSnapshot(mixed)).rejects.toMatchObject({ code: 'BAD_ARCHIVE' });
  });
});

// ---------------------------------------------------------------------------------------------
// The hash oracle
// ---------------------------------------------------------------------------------------------

describe('XXH3 as xxHash 0.8 defines it', () => {
  it('the addon gives the reference values for the empty input', () => {
    expect(addon.hash64(Buffer.alloc(0)).toString(16)).toBe('2d06800538d394c2');
    // XXH128(empty) = 0x99aa06d3014798d8_6001c324468d497f: low 64 bits first, each little-endian.
    expect(addon.hash128(Buffer.alloc(0)).toString('hex')).toBe(Buffer.concat([Buffer.from('6001c324468d497f', 'hex').reverse(), Buffer.from('99aa06d3014798d8', 'hex').reverse()]).toString('hex'));
  });

  it.skipIf(!pythonXxhash)('every hash checked above equals libxxhash (python3 ctypes, seed 0)', () => {
    expect(hashLog.length).toBeGreaterThan(50);
    const blob = path.join(dir, 'hashes.bin');
    const list: [number, number][] = [];
    let offset = 0;
    fs.writeFileSync(blob, Buffer.concat(hashLog.map((h) => {
      list.push([offset, h.data.length]);
      offset += h.data.length;
      return h.data;
    })));
    const script = [
      'import ctypes, json, sys',
      'lib = ctypes.CDLL("libxxhash.so.0")',
      'class H(ctypes.Structure): _fields_ = [("low", ctypes.c_uint64), ("high", ctypes.c_uint64)]',
      'lib.XXH3_64bits.restype = ctypes.c_uint64',
      'lib.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]',
      'lib.XXH3_128bits.restype = H',
      'lib.XXH3_128bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]',
      'data = open(sys.argv[1], "rb").read()',
      'out = []',
      'for o, n in json.load(sys.stdin):',
      '    b = data[o:o + n]',
      '    h = lib.XXH3_128bits(b, n)',
      '    out.append([format(lib.XXH3_64bits(b, n), "016x"), (h.low.to_bytes(8, "little") + h.high.to_bytes(8, "little")).hex()])',
      'print(json.dumps(out))',
    ].join('\n');
    const result = JSON.parse(execFileSync('python3', ['-c', script, blob], { input: JSON.stringify(list), maxBuffer: 1 << 26 }).toString()) as [string, string][];
    hashLog.forEach((h, i) => {
      if (h.h64 !== undefined) expect(h.h64.toString(16).padStart(16, '0'), `hash ${i}`).toBe(result[i]![0]);
      if (h.h128 !== undefined) expect(h.h128.toString('hex'), `hash ${i}`).toBe(result[i]![1]);
    });
  });
});

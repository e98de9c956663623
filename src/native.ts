/** The one place the addon is loaded: a prebuild first, then the local build. */
import * as path from 'node:path';

/**
 * Compression codecs as the addon takes and reports them (native/core/codec.h, one numbering for
 * every engine; test/package/addon-arguments.test.ts holds it equal to the addon's `enums.Codec`). Not a
 * file format: qcow2's compression_type and a VM state chunk's codec byte are mapped to it.
 */
export const Codec = { None: 0, Deflate: 1, Zstd: 2 } as const;
export type Codec = (typeof Codec)[keyof typeof Codec];

/** What the native side of `copy` reports when a job fails. */
export interface NativeCopyError extends Error {
  operation: string;
  errno: number;
  sourceIndex: number;
  guestOffset: number;
  hostOffset: number;
  cancelled: boolean;
}

export interface NativeSource {
  fd: number;
  size: number;
  /** Codec of its compressed clusters (None: it has none). */
  codec: Codec;
  /** Decompressed size of its compressed clusters. */
  clusterSize: number;
  /** Where the image's byte 0 sits in fd (an image that is a member of an uncompressed tar). */
  base?: number;
  /** Read from these instead of fd (a remote file's fetched ranges): the bytes of `extents`. */
  stage?: Buffer[];
  /** fileOffset, length, index in `stage`, offset there: per extent, sorted and disjoint. */
  extents?: Float64Array;
}

/** A copy plan as the engine takes it: runs (planRunFields numbers each) over the image's files. */
export interface NativePlan {
  runs: Float64Array;
  sources: NativeSource[];
}

export interface NativeCopyJob {
  /** 7 numbers per run: guestOffset, length, kind (0 zero, 1 data, 2 compressed), source, hostOffset, compressedBytes, offsetInCluster. */
  runs: Float64Array;
  sources: NativeSource[];
  targetFd?: number;
  targetTailFd?: number;
  memory?: Buffer;
  memoryGuestOffset?: number;
  targetBase?: number;
  limitStart?: number;
  limitEnd?: number;
  alignment?: number;
  /** 0 skip, 1 write, 2 BLKZEROOUT, 3 punch hole. */
  zeroMode?: number;
  threads?: number;
  windowSize?: number;
  /** [dataBytes, zeroBytes, cancel, stagedBytes], shared with the native threads. */
  counters?: BigUint64Array;
  /** Two words per window of the guest disk: [written, xxh3-64], for verification. */
  windowHashes?: BigUint64Array;
  /** Guest bytes the hashes cover (the virtual size). */
  hashedSize?: number;
}

export interface NativeVerifyJob {
  fd: number;
  base: number;
  size: number;
  windowSize: number;
  alignment: number;
  threads: number;
  windowHashes: BigUint64Array;
  counters?: BigUint64Array;
}

export interface NativeCaptureJob {
  sourceFd: number;
  /** O_DIRECT unit of sourceFd, 0 when buffered. */
  sourceAlignment: number;
  sourceSize: number;
  guestStart: number;
  clusterCount: number;
  clusterSize: number;
  /** One byte per cluster: 1 = a hole of the source, zero without reading it. */
  holes?: Uint8Array;
  /** The base's bytes for the range, for incremental captures. */
  base?: Uint8Array;
  /** qcow2 v2 has no zero flag: store zeros that hide base data as data. */
  zeroAsData: boolean;
  /** Deflate: a 4 KiB window, as QEMU writes. */
  codec: Codec;
  level: number;
  outputFd: number;
  /** The output opened again with O_DIRECT, for chunks of whole aligned clusters. */
  outputDirectFd?: number;
  outputDirectAlignment?: number;
  outputPosition: number;
  threads: number;
  /** 3 numbers per cluster: kind (0 unallocated, 1 zero, 2 data, 3 compressed), hostOffset, compressedBytes. */
  results: Float64Array;
  counters?: BigUint64Array;
}

export interface NativeWriteBenchJob {
  fd: number;
  offset: number;
  size: number;
  blockSize: number;
  queueDepth: number;
  random: boolean;
  /** > 0: keep writing until this much time has run. */
  seconds: number;
  /** BenchEngine: Auto is io_uring, else threads. */
  engine: number;
  seed?: number;
  counters?: BigUint64Array;
}

export interface NativeWriteBenchResult {
  bytes: number;
  writes: number;
  seconds: number;
  p50Us: number;
  p99Us: number;
  p999Us: number;
  engine: 'io_uring' | 'threads';
}

/** What a batch of a dump became: a state per page, duplicate references, and chunks of stored pages. */
export interface NativeDumpBatchResult {
  states: Uint8Array;
  duplicates: Float64Array;
  chunks: NativeDumpChunk[];
}

export interface NativeDumpChunk {
  firstSpan: number;
  spanCount: number;
  rawLength: number;
  rawChecksum: bigint;
  /** The batch's codec, or None where compressing did not pay. */
  codec: Codec;
  stored: Buffer;
}

export interface NativeDumpBatch {
  sourceFd: number;
  dumpOffset: number;
  firstPage: number;
  pageCount: number;
  pageSize: number;
  spanPages: number;
  firstSpan: number;
  incremental: boolean;
  parent?: Uint8Array;
  dirty?: Uint8Array;
  /** One byte per page: 1 = inside a hole of the dump, a zero page without reading it. */
  holes?: Uint8Array;
  dedup?: NativeDedupTable;
  codec: Codec;
  level: number;
  chunkTargetBytes: number;
  threads: number;
}

export interface NativeZstdStream {
  /** One step on a worker thread: takes input, fills output; `end` closes the encoder's frame. */
  step(input: Buffer, output: Buffer, end: boolean): Promise<{ consumed: number; produced: number; finished: boolean }>;
}

export interface NativeDedupTable {
  readonly size: number;
}

export interface NativeRestoreBatch {
  stateFd: number;
  outputFd: number;
  pageSize: number;
  spanPages: number;
  firstSpan: number;
  /** Pairs: page count, dump offset of the span's first page. */
  spans: Float64Array;
  /** One state a page of those spans. */
  states: Uint8Array;
  /** Quads: payload offset, payload length, checksum high 32 bits, checksum low 32 bits. */
  chunks: Float64Array;
  /** Pairs: dump offset of a duplicate page, dump offset of its source. */
  duplicates: Float64Array;
  punchZeros: boolean;
  /** Start the batch's writeback at its end (sync_file_range), for a faster final fdatasync. */
  startWriteback?: boolean;
  threads: number;
  /** Restore into this memory (dump offset 0 at its byte 0) instead of writing outputFd. */
  outputBuffer?: Uint8Array;
  /** Map outputFd (its first outputLength bytes) shared for the batch and write through the mapping (hugetlbfs). */
  mapOutput?: boolean;
  outputLength?: number;
}

export interface NativeAddon {
  /** The native enums' values by name (native/binding.cc EnumTable), to compare with the copies here. */
  enums: Record<'Codec' | 'ZeroMode' | 'RunKind' | 'BenchEngine' | 'PageState' | 'UnitKind', Record<string, number>>;
  /** The L2 entry bits walkL2 reads (native/core/l2_walk.h), to compare with src/qcow2/entries.ts. */
  l2EntryBits: {
    copied: bigint;
    compressed: bigint;
    zero: bigint;
    offsetMask: bigint;
    subclustersPerCluster: number;
    compressedSectorBytes: number;
    /** By cluster bits, 9 to 21. */
    compressedOffsetBits: Record<number, number>;
  };
  walkL2(
    table: Buffer,
    firstEntry: number,
    entryCount: number,
    clusterBits: number,
    extendedL2: boolean,
    externalDataFile: boolean,
  ): { runs: Float64Array; defect: number; defectEntry: number; defectName?: string };
  /** With extraTargets: one entry per target (the job's own first), null or the error that stopped it. */
  copy(job: NativeCopyJob & { extraTargets: object[] }): Promise<(object | null)[]>;
  copy(job: NativeCopyJob): Promise<void>;
  /** Stores a range of source clusters; resolves to the output position after them. */
  capture(job: NativeCaptureJob): Promise<number>;
  /** Timed writes with a queue of writes in flight (fio-like). */
  writeBench(job: NativeWriteBenchJob): Promise<NativeWriteBenchResult>;
  DedupTable: new () => NativeDedupTable;
  /** Classifies and compresses one batch of RAM pages. */
  processDumpBatch(batch: NativeDumpBatch): Promise<NativeDumpBatchResult>;
  /** Writes the pages of a batch of spans back into a RAM dump; resolves to bytes written. */
  restoreBatch(batch: NativeRestoreBatch): Promise<number>;
  decompressChunk(codec: Codec, stored: Buffer, rawLength: number): Promise<Buffer>;
  /** Streaming zstd (compress: level and libzstd worker threads; else a decoder of any zstd stream). */
  ZstdStream: new (compress: boolean, level: number, workers: number) => NativeZstdStream;
  /** XXH3-64 of the bytes; of several buffers, of their bytes one after another (not joined in memory). */
  hash64(data: Uint8Array | readonly Uint8Array[]): bigint;
  /** XXH3-64 of a file's bytes [offset, offset + length) (default: all of it). */
  hashFile(fd: number, offset?: number, length?: number): Promise<bigint>;
  /** XXH3-128: 16 bytes, low half first, little-endian. */
  hash128(data: Uint8Array): Buffer;
  /** Resolves to the first window whose read-back hash differs, or -1. */
  verify(job: NativeVerifyJob): Promise<number>;
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
  blockDeviceInfo(fd: number): { sizeBytes: number; logicalBlockSize: number; physicalBlockSize: number };
  directIoAlignment(fd: number): number;
  /** A Buffer of `bytes` starting on a 4 KiB boundary (writable with O_DIRECT as it lies). */
  alignedBuffer(bytes: number): Buffer;
  /** Takes a shared OFD lock on one byte; 0 or errno (EAGAIN/EACCES: held exclusively elsewhere). */
  lockByte(fd: number, offset: number): number;
  /** 1 when another open file description holds a lock on the byte, 0 when none, -errno on failure. */
  byteLocked(fd: number, offset: number): number;
  /** fallocate(mode 0) of the range; 0 or errno. */
  allocate(fd: number, offset: number, length: number): number;
  /** Starts reading the range into the page cache (posix_fadvise WILLNEED); 0 or errno. */
  willNeed(fd: number, offset: number, length: number): number;
  /** Starts writing the range's dirty pages to the disk without waiting for them (sync_file_range WRITE, on a worker thread); 0 or errno. */
  startWriteback(fd: number, offset: number, length: number): Promise<number>;
  /** Drops cached pages of the range (and a block device's buffer cache); 0 or errno. */
  dropCache(fd: number, offset: number, length: number): number;
  /** Ranged GETs over plain HTTP, bodies straight into memory; src/http/direct.ts judges the heads. */
  httpGet(job: NativeHttpGetJob): Promise<NativeHttpGetResult>;
}

export interface NativeHttpGetJob {
  family: 4 | 6;
  /** Numeric address of the server. */
  address: string;
  port: number;
  /** Kept-alive sockets to use first (the result's `idle` of an earlier job). */
  idle: number[];
  /** Connections at once, one native thread each. */
  connections: number;
  /** Milliseconds without a byte before a piece stops. */
  timeoutMs: number;
  /** JobCounters words: its cancel flag stops every piece. */
  counters: BigUint64Array;
  /** The whole request of each piece, and where its body goes (as long as the body asked for). */
  pieces: { request: Buffer; into: Buffer }[];
}

export interface NativeHttpGetResult {
  /** Per piece: the response head (without its empty line; '' if none came), body bytes in `into`, and why it stopped short ('' when complete). */
  pieces: { head: string; received: number; failure: string }[];
  /** Sockets still usable for the next job (the caller closes them when done). */
  idle: number[];
}

/** Run kinds of the copy plan (native/core/copy_engine.h RunKind). */
export const PlanKind = { Zero: 0, Data: 1, Compressed: 2 } as const;
/** Fields per plan run. */
export const planRunFields = 7;

/** Bytes of its file the plan run at `at` reads: a data run its length, a compressed one its stored cluster, a zero run none. */
export function runFileBytes(runs: Float64Array, at: number): number {
  const kind = runs[at + 2];
  return kind === PlanKind.Data ? runs[at + 1]! : kind === PlanKind.Compressed ? runs[at + 5]! : 0;
}
/** Fields per staged extent of a source (fileOffset, length, chunk, offset in the chunk; copy_engine.h kStagedExtentFields). */
export const stagedExtentFields = 4;
/** Unit kinds of walkL2 output (native/core/l2_walk.h UnitKind). */
export const UnitKind = { Unallocated: 0, Zero: 1, ZeroAllocated: 2, Data: 3, Compressed: 4 } as const;
export const l2RunFields = 5;
export const ZeroMode = { Skip: 0, Write: 1, ZeroOut: 2, PunchHole: 3 } as const;
/** writeBench engines (native/core/write_bench.h BenchEngine). */
export const BenchEngine = { Auto: 0, IoUring: 1, Threads: 2 } as const;

let addon: NativeAddon | undefined;

export function native(): NativeAddon {
  if (addon === undefined) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const load = require('node-gyp-build') as (dir: string) => NativeAddon;
    addon = load(path.join(__dirname, '..'));
  }
  return addon;
}

/**
 * `capture`: a raw disk (file or block device) back into a qcow2 image that QEMU
 * trusts. Native workers read, drop zero clusters (holes of a sparse file are not
 * even read) and clusters equal to a base image, and compress; this module lays
 * out the file: data first, then L2 tables, L1, refcount structures, and the
 * header last, all under a temporary name that is renamed when complete.
 */
import { constants as fsConstants } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { Qcow2Error, ioError } from '../errors';
import { native } from '../native';
import type { Image, OpenOptions } from '../qcow2/image';
import { open } from '../qcow2/open';
import { COPIED, compressedClusters, compressedEntry, encodeHeaderCluster, type HeaderFields, refcountLayout } from '../qcow2/writer';
import { limits } from '../limits';
import { threadCount } from '../load/copy';
import { seekIn, syncFolder, temporaryPathFor } from '../files';
import { ProgressSampler, type ProgressCallback } from '../load/progress';

export interface CaptureOptions extends Omit<OpenOptions, 'snapshot' | 'metadataOnly'> {
  /** Compress clusters (zlib = raw deflate as QEMU writes it). Default: none. */
  compress?: 'zlib' | 'zstd';
  /**
   * Compression level: zlib 0-3 (ISA-L's levels: fastest, about 6% larger than qemu-img's
   * output), 4 (default: ISA-L's 3, then zlib's 6 on the clusters ISA-L shrank least; about
   * 4% larger, half ISA-L's speed) or 5-9 (zlib's own: 6 matches qemu-img's size at zlib's
   * speed); zstd -7 to 19 (default 1).
   */
  level?: number;
  /** 512 B to 2 MiB, a power of two (default 64 KiB). */
  clusterSize?: number;
  /** qcow2 compatibility level: '1.1' (version 3, default) or '0.10' (version 2). */
  compat?: '0.10' | '1.1';
  /** Store only clusters that differ from this image, which becomes the backing file. */
  backing?: string;
  /** Format of the backing file (default: probed between qcow2 and raw). */
  backingFormat?: 'qcow2' | 'raw';
  /** Replace an existing output file. */
  overwrite?: boolean;
  threads?: number;
  onProgress?: ProgressCallback;
  signal?: AbortSignal;
}

export interface CaptureResult {
  output: string;
  virtualSize: number;
  fileSize: number;
  dataClusters: number;
  compressedClusters: number;
  zeroClusters: number;
  seconds: number;
}

/**
 * Guest bytes per native job. Each job ends with its workers draining one by one, so fewer,
 * larger jobs keep the disk and the cores busier (3% on an uncompressed 2 GiB capture); with a
 * base image the job's base bytes are read into one buffer, which keeps that case smaller.
 */
const batchBytes = 256 * 1024 * 1024;
const batchBytesWithBase = 64 * 1024 * 1024;
const codecs = { none: 0, zlib: 1, zstd: 2 } as const;

/** What the capture compares with: qcow2 (through the reader) or raw. */
interface BaseReader {
  read(buffer: Buffer, offset: number): Promise<void>;
  close(): Promise<void>;
  /** Every file it reads (a qcow2 base's whole chain), to refuse an output that is one of them. */
  files: { device: number; inode: number }[];
}

async function openBase(path: string, format: 'qcow2' | 'raw' | undefined, options: OpenOptions): Promise<{ reader: BaseReader; format: 'qcow2' | 'raw' }> {
  let detected = format;
  if (detected === undefined) {
    const handle = await fs.open(path, 'r').catch((error) => {
      throw ioError(error, path, 'cannot open the backing file');
    });
    try {
      const magic = Buffer.alloc(4);
      await handle.read(magic, 0, 4, 0);
      detected = magic.readUInt32BE(0) === 0x514649fb ? 'qcow2' : 'raw';
    } catch (error) {
      throw ioError(error, path, 'cannot read the backing file');
    } finally {
      await handle.close();
    }
    // A raw disk can start with a qcow2 header its guest wrote: say what was guessed.
    options.onWarning?.(`${path}: backing format not given; probed as ${detected} (pass --backing-format to be sure)`);
  }
  if (detected === 'qcow2') {
    const image: Image = await open(path, { ...options, metadataOnly: false });
    return {
      format: detected,
      reader: {
        async read(buffer, offset) {
          const n = await image.read(buffer, offset);
          buffer.fill(0, n);
        },
        close: () => image.close(),
        files: image.files.map((f) => ({ device: f.device, inode: f.inode })),
      },
    };
  }
  const handle = await fs.open(path, 'r').catch((error) => {
    throw ioError(error, path, 'cannot open the backing file');
  });
  const stats = await handle.stat().catch(async (error) => {
    await handle.close();
    throw ioError(error, path, 'cannot read the backing file');
  });
  return {
    format: detected,
    reader: {
      async read(buffer, offset) {
        let done = 0;
        while (done < buffer.length) {
          const { bytesRead } = await handle.read(buffer, done, buffer.length - done, offset + done).catch((error) => {
            throw ioError(error, path, 'cannot read the backing file');
          });
          if (bytesRead === 0) break;
          done += bytesRead;
        }
        buffer.fill(0, done);
      },
      close: () => handle.close(),
      files: [{ device: stats.dev, inode: stats.ino }],
    },
  };
}

/**
 * The backing file's name as the image stores it: relative to the image's folder, so a folder
 * of images can move as one. Taken between real paths (a folder reached through a link would
 * make a wrong "../"), and with "./" before a first part holding ':', which QEMU would read as
 * a protocol.
 */
async function backingName(outputPath: string, backing: string): Promise<string> {
  const real = async (p: string) => fs.realpath(p).catch(() => nodePath.resolve(p));
  const relative = nodePath.relative(await real(nodePath.dirname(outputPath)), await real(backing));
  return relative.split(nodePath.sep)[0]!.includes(':') ? `.${nodePath.sep}${relative}` : relative;
}

function validate(options: CaptureOptions, output: string): { clusterBits: number; version: 2 | 3; level: number } {
  const clusterSize = options.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw new Qcow2Error('INVALID_ARGUMENT', `cluster size ${clusterSize} is not a power of two from 512 to 2097152`, { path: output });
  }
  const version = options.compat === '0.10' ? 2 : 3;
  if (version === 2 && options.compress === 'zstd') {
    throw new Qcow2Error('INVALID_ARGUMENT', 'zstd compression needs compat 1.1 (qcow2 version 3)', { path: output });
  }
  // zstd 1 is about twice as fast as 3 for a few percent more bytes; capture is on the critical path of a snapshot.
  const level = options.level ?? (options.compress === 'zstd' ? 1 : 4);
  const range = options.compress === 'zstd' ? [-7, 19] : [0, 9];
  if (options.compress && (!Number.isInteger(level) || level < range[0]! || level > range[1]!)) {
    throw new Qcow2Error('INVALID_ARGUMENT', `${options.compress} level ${level} is outside ${range[0]}..${range[1]}`, { path: output });
  }
  return { clusterBits, version, level };
}

/** Marks clusters that lie wholly inside holes of a sparse file (SEEK_DATA/SEEK_HOLE). */
function holeMap(fd: number, start: number, clusterCount: number, clusterSize: number, sourceSize: number, path: string): Uint8Array {
  const holes = new Uint8Array(clusterCount);
  const end = start + clusterCount * clusterSize;
  let position = start;
  while (position < end) {
    const data = position < sourceSize ? seekIn(fd, 'data', position, path) : -1;
    const holeEnd = data < 0 ? end : Math.min(data, end);
    // Clusters fully inside [position, holeEnd) are holes.
    for (let c = Math.ceil((position - start) / clusterSize); (c + 1) * clusterSize + start <= holeEnd; c++) holes[c] = 1;
    if (data < 0 || data >= end) break;
    position = Math.min(seekIn(fd, 'hole', data, path), end);
  }
  return holes;
}

/**
 * Captures `source` (raw file or block device) into the qcow2 file `output`.
 *
 * @example
 * await capture('/dev/vg/guest-disk', 'snapshot.qcow2', { compress: 'zstd' });
 */
export async function capture(source: string, output: string, options: CaptureOptions = {}): Promise<CaptureResult> {
  const outputPath = nodePath.resolve(output);
  if (options.signal?.aborted) throw new Qcow2Error('CANCELLED', 'cancelled before the first byte', { path: outputPath });
  const { clusterBits, version, level } = validate(options, outputPath);
  const threads = threadCount(options.threads, outputPath);
  const clusterSize = 2 ** clusterBits;
  const sourcePath = nodePath.resolve(source);

  let sourceHandle: fs.FileHandle;
  let direct = false;
  const sourceStats = await fs.stat(sourcePath).catch((error) => {
    throw ioError(error, sourcePath, 'cannot open the source');
  });
  if (!sourceStats.isFile() && !sourceStats.isBlockDevice()) {
    throw new Qcow2Error('INVALID_ARGUMENT', 'source is neither a regular file nor a block device', { path: sourcePath });
  }
  try {
    sourceHandle = await fs.open(sourcePath, fsConstants.O_RDONLY | (sourceStats.isBlockDevice() ? fsConstants.O_DIRECT : 0));
    direct = sourceStats.isBlockDevice();
  } catch (error) {
    if (!sourceStats.isBlockDevice()) throw ioError(error, sourcePath, 'cannot open the source');
    sourceHandle = await fs.open(sourcePath, 'r');
  }
  const existing = await fs.stat(outputPath).catch(() => undefined);
  if (existing && existing.dev === sourceStats.dev && existing.ino === sourceStats.ino) {
    await sourceHandle.close();
    throw new Qcow2Error('TARGET_IS_SOURCE', 'output is the source itself', { path: outputPath });
  }
  if (existing && !options.overwrite) {
    await sourceHandle.close();
    throw new Qcow2Error('TARGET_EXISTS', 'output exists; pass --overwrite (overwrite: true) to replace it', { path: outputPath });
  }

  const temporary = temporaryPathFor(outputPath);
  let base: { reader: BaseReader; format: 'qcow2' | 'raw' } | undefined;
  let out: fs.FileHandle | undefined;
  let directOut: fs.FileHandle | undefined;
  let renamed = false;
  const counters = new BigUint64Array(4);
  const abort = () => {
    counters[2] = 1n;
  };
  options.signal?.addEventListener('abort', abort, { once: true });
  // Fired before the listener was there (during the awaits above): the same as after.
  if (options.signal?.aborted) abort();
  try {
    const sourceSize = sourceStats.isBlockDevice() ? native().blockDeviceInfo(sourceHandle.fd).sizeBytes : sourceStats.size;
    let sourceAlignment = direct ? native().blockDeviceInfo(sourceHandle.fd).logicalBlockSize : 0;
    if (sourceAlignment > clusterSize) {
      // Clusters smaller than the device's sector cannot be read with O_DIRECT one by one.
      await sourceHandle.close();
      sourceHandle = await fs.open(sourcePath, 'r');
      sourceAlignment = 0;
    }
    // QEMU sees a raw disk in whole sectors; the image has that size.
    const virtualSize = Math.ceil(sourceSize / 512) * 512;
    const l2EntryCount = clusterSize / 8;
    const l2Span = l2EntryCount * clusterSize;
    const l1Size = Math.max(1, Math.ceil(virtualSize / l2Span));
    if (l1Size * 8 > limits.maxL1Bytes) {
      throw new Qcow2Error('INVALID_ARGUMENT', `a ${virtualSize}-byte disk in ${clusterSize}-byte clusters needs an L1 table of ${l1Size} entries, more than QEMU opens (${limits.maxL1Bytes / 8}); use larger clusters`, { path: outputPath });
    }
    // The header's fields but the table offsets, known at the end: encoded once now, so that a
    // backing name it cannot hold is refused before anything is written.
    let headerFields: Omit<HeaderFields, 'l1TableOffset' | 'refcountTableOffset' | 'refcountTableClusters'> = {
      version,
      clusterBits,
      virtualSize,
      l1Size,
      compressionType: options.compress === 'zstd' ? 'zstd' : 'zlib',
    };
    if (options.backing !== undefined) {
      base = await openBase(nodePath.resolve(options.backing), options.backingFormat, options);
      if (existing && base.reader.files.some((f) => f.device === existing.dev && f.inode === existing.ino)) {
        throw new Qcow2Error('TARGET_IS_SOURCE', 'output is the backing file (or in its chain): it would be replaced by an image over itself', { path: outputPath });
      }
      const backingFile = await backingName(outputPath, options.backing);
      headerFields = { ...headerFields, backingFile, backingFormat: base.format };
      try {
        encodeHeaderCluster({ ...headerFields, l1TableOffset: 0, refcountTableOffset: 0, refcountTableClusters: 1 });
      } catch {
        throw new Qcow2Error('INVALID_ARGUMENT', `the backing file's name (${Buffer.byteLength(backingFile)} bytes) does not fit in a ${clusterSize}-byte header cluster; use larger clusters or a shorter path`, { path: outputPath });
      }
    }

    out = await fs.open(temporary, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o644).catch((error) => {
      throw ioError(error, outputPath, 'cannot create the output file');
    });
    // Uncompressed data is whole clusters: written with O_DIRECT it reaches the disk
    // while the source is still being read, instead of all at the final fdatasync.
    let directAlignment = 0;
    if (options.compress === undefined) {
      directOut = await fs.open(temporary, fsConstants.O_WRONLY | fsConstants.O_DIRECT).catch(() => undefined);
      directAlignment = directOut ? Math.max(native().directIoAlignment(directOut.fd), 4096) : 0;
      if (directAlignment > clusterSize) {
        await directOut?.close();
        directOut = undefined;
      }
    }
    // ext4 serialises direct writes that extend a file or fill holes; direct writes into
    // allocated blocks run side by side. So before each batch the most it can store is
    // allocated, and what stays unused is cut off at the end.
    let allocatedEnd = 0;
    let allocateRefused = false;
    const l1 = new Array<number>(l1Size).fill(0);
    // Native jobs of a batch each; tables are emitted a group at a time, a group
    // being one L2 table's span or, with small clusters, many tables.
    const clustersPerBatch = Math.max(1, (options.backing !== undefined ? batchBytesWithBase : batchBytes) / clusterSize);
    const groupClusters = Math.max(l2EntryCount, clustersPerBatch);
    const groupResults = new Float64Array(groupClusters * 3);
    // Host clusters touched by compressed streams, with how many streams touch each.
    let touches = new Uint16Array(1024);
    const touch = (cluster: number) => {
      if (cluster >= touches.length) {
        const grown = new Uint16Array(Math.max(cluster + 1, touches.length * 2));
        grown.set(touches);
        touches = grown;
      }
      touches[cluster]! += 1;
    };
    let position = clusterSize; // cluster 0 is the header, written last
    let dataClusters = 0;
    let compressed = 0;
    let zeroClusters = 0;
    const sampler = new ProgressSampler(counters, virtualSize, options.onProgress);
    sampler.start();
    const baseBuffer = base ? Buffer.alloc(clustersPerBatch * clusterSize) : undefined;
    const alignUp = (value: number) => Math.ceil(value / clusterSize) * clusterSize;
    const writeAt = async (buffer: Buffer, at: number) => {
      await out!.write(buffer, 0, buffer.length, at).catch((error) => {
        throw ioError(error, outputPath, 'cannot write the image');
      });
    };
    try {
      const clusterTotal = Math.ceil(virtualSize / clusterSize);
      for (let groupFirst = 0; groupFirst < clusterTotal; groupFirst += groupClusters) {
        const groupCount = Math.min(groupClusters, clusterTotal - groupFirst);
        groupResults.fill(0);
        for (let done = 0; done < groupCount; done += clustersPerBatch) {
          const count = Math.min(clustersPerBatch, groupCount - done);
          const guestStart = (groupFirst + done) * clusterSize;
          const holes = sourceStats.isFile() ? holeMap(sourceHandle.fd, guestStart, count, clusterSize, sourceSize, sourcePath) : undefined;
          let baseBytes: Buffer | undefined;
          if (base && baseBuffer) {
            baseBytes = baseBuffer.subarray(0, count * clusterSize);
            await base.reader.read(baseBytes, guestStart);
          }
          if (directOut && !allocateRefused && position + count * clusterSize > allocatedEnd) {
            const end = position + count * clusterSize;
            // Refused (no fallocate on this filesystem): the writes work, only slower.
            if (native().allocate(out.fd, allocatedEnd, end - allocatedEnd) === 0) allocatedEnd = end;
            else allocateRefused = true;
          }
          try {
            position = await native().capture({
              sourceFd: sourceHandle.fd,
              sourceAlignment,
              sourceSize,
              guestStart,
              clusterCount: count,
              clusterSize,
              ...(holes ? { holes } : {}),
              ...(baseBytes ? { base: baseBytes } : {}),
              zeroAsData: version === 2,
              codec: codecs[options.compress ?? 'none'],
              level,
              outputFd: out.fd,
              ...(directOut ? { outputDirectFd: directOut.fd, outputDirectAlignment: directAlignment } : {}),
              outputPosition: position,
              threads,
              results: groupResults.subarray(done * 3, (done + count) * 3),
              counters,
            });
          } catch (error) {
            if (error instanceof Qcow2Error) throw error;
            const e = error as { cancelled?: boolean; operation?: string; message?: string; guestOffset?: number };
            if (e.cancelled) throw new Qcow2Error('CANCELLED', 'cancelled; no image was written', { path: outputPath });
            const path = e.operation === 'read' ? sourcePath : outputPath;
            throw new Qcow2Error('IO_ERROR', `${e.operation} failed at offset ${e.guestOffset}: ${e.message}`, { path, ...(e.guestOffset !== undefined ? { offset: e.guestOffset } : {}) });
          }
        }
        // Each table's entries, and the refcounts compressed streams add.
        for (let first = 0; first < groupCount; first += l2EntryCount) {
          const tableIndex = (groupFirst + first) / l2EntryCount;
          const tableClusters = Math.min(l2EntryCount, groupCount - first);
          const table = Buffer.alloc(clusterSize);
          let used = false;
          for (let i = 0; i < tableClusters; i++) {
            const at = (first + i) * 3;
            const kind = groupResults[at]!;
            const host = groupResults[at + 1]!;
            if (kind === 0) continue;
            used = true;
            if (kind === 1) {
              table.writeBigUInt64BE(1n, i * 8); // reads as zero, hides the backing file
              zeroClusters++;
            } else if (kind === 2) {
              table.writeBigUInt64BE(BigInt(host) | COPIED, i * 8);
              dataClusters++;
            } else {
              const bytes = groupResults[at + 2]!;
              table.writeBigUInt64BE(compressedEntry(clusterBits, host, bytes), i * 8);
              const [firstTouched, lastTouched] = compressedClusters(clusterSize, host, bytes);
              for (let c = firstTouched; c <= lastTouched; c++) touch(c);
              compressed++;
            }
          }
          if (used) {
            position = alignUp(position);
            await writeAt(table, position);
            l1[tableIndex] = position;
            position += clusterSize;
          }
        }
      }
    } finally {
      sampler.stop();
    }
    sampler.emit('write');

    // L1, then the refcount table and blocks, which count themselves.
    const l1Offset = alignUp(position);
    const l1Buffer = Buffer.alloc(alignUp(l1Size * 8));
    l1.forEach((offset, i) => {
      if (offset !== 0) l1Buffer.writeBigUInt64BE(BigInt(offset) | COPIED, i * 8);
    });
    await writeAt(l1Buffer, l1Offset);
    const firstFree = (l1Offset + l1Buffer.length) / clusterSize;
    const layout = refcountLayout(firstFree, clusterSize, 16);
    const tableOffset = firstFree * clusterSize;
    const blocksOffset = tableOffset + layout.tableClusters * clusterSize;
    const entriesPerBlock = clusterSize / 2;
    const refcountTable = Buffer.alloc(layout.tableClusters * clusterSize);
    for (let block = 0; block < layout.blockCount; block++) {
      const buffer = Buffer.alloc(clusterSize);
      for (let i = 0; i < entriesPerBlock; i++) {
        const cluster = block * entriesPerBlock + i;
        if (cluster >= layout.totalClusters) break;
        // Every cluster up to the end is in use once, except those holding compressed streams.
        buffer.writeUInt16BE(cluster < touches.length && touches[cluster]! > 0 ? touches[cluster]! : 1, i * 2);
      }
      const blockOffset = blocksOffset + block * clusterSize;
      await writeAt(buffer, blockOffset);
      refcountTable.writeBigUInt64BE(BigInt(blockOffset), block * 8);
    }
    await writeAt(refcountTable, tableOffset);
    const finishing = (what: string) => (error: unknown) => {
      throw ioError(error, outputPath, what);
    };
    // Cuts what was allocated and not used.
    if (allocatedEnd > 0) await out.truncate(layout.totalClusters * clusterSize).catch(finishing('cannot cut the image to size'));
    const header = encodeHeaderCluster({ ...headerFields, l1TableOffset: l1Offset, refcountTableOffset: tableOffset, refcountTableClusters: layout.tableClusters });
    await out.datasync().catch(finishing('cannot flush the image'));
    await writeAt(header, 0);
    await out.datasync().catch(finishing('cannot flush the image'));
    await out.close();
    out = undefined;
    await fs.rename(temporary, outputPath).catch(finishing('cannot rename the finished image into place'));
    renamed = true;
    await syncFolder(nodePath.dirname(outputPath));
    return {
      output: outputPath,
      virtualSize,
      fileSize: layout.totalClusters * clusterSize,
      dataClusters,
      compressedClusters: compressed,
      zeroClusters,
      seconds: sampler.elapsedSeconds(),
    };
  } finally {
    options.signal?.removeEventListener('abort', abort);
    await out?.close().catch(() => {});
    await directOut?.close().catch(() => {});
    if (!renamed) await fs.unlink(temporary).catch(() => {});
    await sourceHandle.close().catch(() => {});
    await base?.reader.close().catch(() => {});
  }
}

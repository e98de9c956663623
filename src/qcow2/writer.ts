/**
 * Encoding what qcow2img writes: header, L1/L2 entries, refcount structures.
 * Layout reference: docs/formats/qcow2.md ("What capture writes").
 */
import { COMPRESSED_SECTOR_BYTES } from './entries';
import { ExtensionType, QCOW2_MAGIC } from './header';

/** The refcount width capture writes (refcount_order 4). */
export const WRITTEN_REFCOUNT_BITS = 16;

export interface HeaderFields {
  version: 2 | 3;
  clusterBits: number;
  virtualSize: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  compressionType: 'zlib' | 'zstd';
  backingFile?: string;
  backingFormat?: string;
}

/** Cluster 0: header, extensions (backing format), then the backing file name. */
export function encodeHeaderCluster(fields: HeaderFields): Buffer {
  const clusterSize = 2 ** fields.clusterBits;
  const cluster = Buffer.alloc(clusterSize);
  const zstd = fields.compressionType === 'zstd';
  // v3 header: 104 bytes, or 112 with the compression type byte (and its padding).
  const headerLength = fields.version === 2 ? 72 : zstd ? 112 : 104;
  cluster.writeUInt32BE(QCOW2_MAGIC, 0);
  cluster.writeUInt32BE(fields.version, 4);
  cluster.writeUInt32BE(fields.clusterBits, 20);
  cluster.writeBigUInt64BE(BigInt(fields.virtualSize), 24);
  cluster.writeUInt32BE(0, 32); // no encryption
  cluster.writeUInt32BE(fields.l1Size, 36);
  cluster.writeBigUInt64BE(BigInt(fields.l1TableOffset), 40);
  cluster.writeBigUInt64BE(BigInt(fields.refcountTableOffset), 48);
  cluster.writeUInt32BE(fields.refcountTableClusters, 56);
  cluster.writeUInt32BE(0, 60); // no snapshots
  cluster.writeBigUInt64BE(0n, 64);
  if (fields.version === 3) {
    cluster.writeBigUInt64BE(zstd ? 1n << 3n : 0n, 72); // incompatible: compression type
    cluster.writeBigUInt64BE(0n, 80);
    cluster.writeBigUInt64BE(0n, 88);
    cluster.writeUInt32BE(Math.log2(WRITTEN_REFCOUNT_BITS), 96); // refcount_order
    cluster.writeUInt32BE(headerLength, 100);
    if (zstd) cluster[104] = 1;
  }
  let offset = headerLength;
  if (fields.backingFormat !== undefined) {
    const name = Buffer.from(fields.backingFormat, 'latin1');
    cluster.writeUInt32BE(ExtensionType.backingFormat, offset);
    cluster.writeUInt32BE(name.length, offset + 4);
    name.copy(cluster, offset + 8);
    offset += 8 + Math.ceil(name.length / 8) * 8;
  }
  cluster.writeUInt32BE(ExtensionType.end, offset);
  cluster.writeUInt32BE(0, offset + 4);
  offset += 8;
  if (fields.backingFile !== undefined) {
    const name = Buffer.from(fields.backingFile, 'utf8');
    if (offset + name.length > clusterSize || name.length > 1023) throw new RangeError('backing file name does not fit in the header cluster');
    cluster.writeBigUInt64BE(BigInt(offset), 8);
    cluster.writeUInt32BE(name.length, 16);
    name.copy(cluster, offset);
  }
  return cluster;
}

/** Host clusters a compressed stream touches, as QEMU counts them: whole sectors. */
export function compressedClusters(clusterSize: number, hostOffset: number, compressedBytes: number): [first: number, last: number] {
  const sector = COMPRESSED_SECTOR_BYTES;
  const sectorStart = Math.floor(hostOffset / sector) * sector;
  const sectorEnd = Math.floor((hostOffset + compressedBytes - 1) / sector) * sector + sector;
  return [Math.floor(sectorStart / clusterSize), Math.floor((sectorEnd - 1) / clusterSize)];
}

/**
 * Refcount structures placed at `firstFree` (in clusters), covering themselves:
 * QEMU's fixed point (qcow2_refcount_metadata_size).
 */
export function refcountLayout(firstFree: number, clusterSize: number, refcountBits: number): { tableClusters: number; blockCount: number; totalClusters: number } {
  const entriesPerBlock = (clusterSize * 8) / refcountBits;
  let blockCount = 0;
  let tableClusters = 0;
  for (;;) {
    const total = firstFree + blockCount + tableClusters;
    const blocks = Math.ceil(total / entriesPerBlock);
    const table = Math.max(1, Math.ceil((blocks * 8) / clusterSize));
    if (blocks === blockCount && table === tableClusters) return { tableClusters, blockCount, totalClusters: total };
    blockCount = blocks;
    tableClusters = table;
  }
}

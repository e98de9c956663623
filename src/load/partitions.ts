/**
 * Locating partition N of a disk or disk image: GPT behind a protective MBR (both
 * CRCs checked, backup header as fallback) and MBR with extended partitions.
 * Numbering as Linux does: GPT entry N-1; MBR primaries 1-4 by slot, logical
 * partitions from 5, one number for each EBR that holds a data partition.
 * Layout reference: docs/formats/partitions.md.
 */
import type { FileHandle } from 'node:fs/promises';
import { crc32 } from 'node:zlib';
import { Qcow2Error } from '../errors';

export interface Partition {
  number: number;
  /** Byte offset of the first byte on the disk. */
  start: number;
  sizeBytes: number;
  scheme: 'gpt' | 'mbr';
  /** GPT type GUID, or the MBR type byte as two hex digits. */
  type: string;
}

export interface PartitionTable {
  scheme: 'gpt' | 'mbr';
  sectorSize: number;
  partitions: Partition[];
  /** GPT: the bytes [start, end) the header lets partitions use (outside lie the tables). */
  usable?: { start: number; end: number };
  /** MBR: a slot has type 0xEE (whatever its size, as for the kernel): a GPT is behind it. */
  protective?: boolean;
}

const maxGptEntries = 4096;
const maxGptEntryArrayBytes = 4 * 1024 * 1024;
const maxLogicalPartitions = 256;
const extendedTypes = new Set([0x05, 0x0f, 0x85]);

/** An MBR extended partition: a container of logical partitions, never a target. */
function isExtendedContainer(partition: Partition): boolean {
  return partition.scheme === 'mbr' && extendedTypes.has(parseInt(partition.type, 16));
}

/**
 * Up to `length` bytes at `offset`, nothing past the disk's end. Node reads a position that is
 * not a safe integer >= 0 at the file's current position: such an offset, which a hostile table
 * gives easily, reads nothing here.
 */
async function readAt(handle: FileHandle, diskSize: number, offset: number, length: number): Promise<Buffer> {
  if (!Number.isSafeInteger(offset) || offset < 0 || offset >= diskSize) return Buffer.alloc(0);
  length = Math.min(length, diskSize - offset);
  const buffer = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await handle.read(buffer, done, length - done, offset + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return buffer.subarray(0, done);
}

function guid(bytes: Buffer): string {
  const hex = (b: Buffer) => b.toString('hex');
  const le = (b: Buffer) => hex(Buffer.from(b).reverse());
  return `${le(bytes.subarray(0, 4))}-${le(bytes.subarray(4, 6))}-${le(bytes.subarray(6, 8))}-${hex(bytes.subarray(8, 10))}-${hex(bytes.subarray(10, 16))}`;
}

/**
 * Reads a GPT header at `lba`, checking its signature, size, CRC and usable range (inside the
 * disk, first before last, as the kernel does); undefined if invalid.
 */
async function gptHeader(handle: FileHandle, diskSize: number, lba: number, sectorSize: number) {
  const header = await readAt(handle, diskSize, lba * sectorSize, sectorSize);
  if (header.length < 92 || header.toString('latin1', 0, 8) !== 'EFI PART') return undefined;
  const headerSize = header.readUInt32LE(12);
  if (headerSize < 92 || headerSize > sectorSize) return undefined;
  const stored = header.readUInt32LE(16);
  const copy = Buffer.from(header.subarray(0, headerSize));
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== stored) return undefined;
  const firstUsableLba = Number(header.readBigUInt64LE(40));
  const lastUsableLba = Number(header.readBigUInt64LE(48));
  if (firstUsableLba > lastUsableLba || lastUsableLba >= diskSize / sectorSize) return undefined;
  return {
    usable: { start: firstUsableLba * sectorSize, end: (lastUsableLba + 1) * sectorSize },
    entriesLba: Number(header.readBigUInt64LE(72)),
    entryCount: header.readUInt32LE(80),
    entrySize: header.readUInt32LE(84),
    entriesCrc: header.readUInt32LE(88),
  };
}

async function readGpt(handle: FileHandle, diskSize: number, sectorSize: number, path: string): Promise<PartitionTable | undefined> {
  const lastLba = Math.floor(diskSize / sectorSize) - 1;
  // A disk of fewer than 3 sectors has no room for a GPT; its "backup" would be the primary.
  for (const lba of lastLba >= 2 ? [1, lastLba] : []) {
    const header = await gptHeader(handle, diskSize, lba, sectorSize);
    if (!header) continue;
    const { entriesLba, entryCount, entrySize, entriesCrc, usable } = header;
    if (entrySize < 128 || entrySize % 128 !== 0 || entryCount > maxGptEntries || entryCount * entrySize > maxGptEntryArrayBytes) continue;
    const entries = await readAt(handle, diskSize, entriesLba * sectorSize, entryCount * entrySize);
    if (entries.length !== entryCount * entrySize || crc32(entries) !== entriesCrc) continue;
    const partitions: Partition[] = [];
    for (let i = 0; i < entryCount; i++) {
      const entry = entries.subarray(i * entrySize, (i + 1) * entrySize);
      if (entry.subarray(0, 16).every((b) => b === 0)) continue;
      const firstLba = Number(entry.readBigUInt64LE(32));
      const lastEntryLba = Number(entry.readBigUInt64LE(40));
      if (lastEntryLba < firstLba) {
        throw new Qcow2Error('INVALID_ARGUMENT', `GPT entry ${i + 1} ends before it starts`, { path });
      }
      partitions.push({ number: i + 1, start: firstLba * sectorSize, sizeBytes: (lastEntryLba - firstLba + 1) * sectorSize, scheme: 'gpt', type: guid(entry.subarray(0, 16)) });
    }
    return { scheme: 'gpt', sectorSize, partitions, usable };
  }
  return undefined;
}

async function readMbr(handle: FileHandle, diskSize: number, sectorSize: number): Promise<PartitionTable | undefined> {
  const mbr = await readAt(handle, diskSize, 0, 512);
  if (mbr.length < 512 || mbr[510] !== 0x55 || mbr[511] !== 0xaa) return undefined;
  const partitions: Partition[] = [];
  let extended: { start: number; size: number } | undefined;
  for (let slot = 0; slot < 4; slot++) {
    const entry = mbr.subarray(446 + slot * 16, 446 + (slot + 1) * 16);
    const type = entry[4]!;
    const startLba = entry.readUInt32LE(8);
    const sectors = entry.readUInt32LE(12);
    if (type === 0 || sectors === 0) continue;
    if (extendedTypes.has(type)) extended ??= { start: startLba, size: sectors };
    partitions.push({ number: slot + 1, start: startLba * sectorSize, sizeBytes: sectors * sectorSize, scheme: 'mbr', type: type.toString(16).padStart(2, '0') });
  }
  if (extended) {
    // Each EBR: entry 0 relative to this EBR, entry 1 (the next EBR) relative to the extended start.
    // Linux numbers only the EBRs that hold a data partition: an emptied one takes no number.
    let ebrLba = extended.start;
    let number = 5;
    const visited = new Set<number>();
    while (visited.size < maxLogicalPartitions && !visited.has(ebrLba)) {
      visited.add(ebrLba);
      const ebr = await readAt(handle, diskSize, ebrLba * sectorSize, 512);
      if (ebr.length < 512 || ebr[510] !== 0x55 || ebr[511] !== 0xaa) break;
      const logical = ebr.subarray(446, 462);
      const next = ebr.subarray(462, 478);
      // Linux, libblkid and sfdisk go by the size, not the type: type 0 with sectors is a partition.
      if (logical.readUInt32LE(12) > 0 && !extendedTypes.has(logical[4]!)) {
        partitions.push({
          number: number++,
          start: (ebrLba + logical.readUInt32LE(8)) * sectorSize,
          sizeBytes: logical.readUInt32LE(12) * sectorSize,
          scheme: 'mbr',
          type: logical[4]!.toString(16).padStart(2, '0'),
        });
      }
      if (next[4] === 0 || next.readUInt32LE(8) === 0) break;
      ebrLba = extended.start + next.readUInt32LE(8);
    }
  }
  const protective = [0, 1, 2, 3].some((slot) => mbr[446 + slot * 16 + 4] === 0xee);
  return { scheme: 'mbr', sectorSize, partitions, protective };
}

/**
 * Reads the partition table of a disk (logical sector size known) or a disk image
 * (GPT probed at 512 and 4096 bytes per sector). As for the kernel and libblkid, a GPT
 * counts only behind a protective MBR (an 0xEE entry): a disk relabelled DOS keeps its old
 * backup GPT at the end, and that stale table must not win over the MBR.
 */
export async function readPartitionTable(handle: FileHandle, diskSize: number, path: string, logicalSectorSize?: number): Promise<PartitionTable> {
  const mbr = await readMbr(handle, diskSize, logicalSectorSize ?? 512);
  if (!mbr) throw new Qcow2Error('INVALID_ARGUMENT', 'no GPT or MBR partition table', { path });
  if (!mbr.protective) return mbr;
  for (const sectorSize of logicalSectorSize ? [logicalSectorSize] : [512, 4096]) {
    const gpt = await readGpt(handle, diskSize, sectorSize, path);
    if (gpt) return gpt;
  }
  throw new Qcow2Error('INVALID_ARGUMENT', 'protective MBR without a valid GPT', { path });
}

/** Partition `number` of the disk, checked to lie inside it. */
export async function findPartition(handle: FileHandle, diskSize: number, number: number, path: string, logicalSectorSize?: number): Promise<Partition> {
  const table = await readPartitionTable(handle, diskSize, path, logicalSectorSize);
  const partition = table.partitions.find((p) => p.number === number);
  if (!partition) {
    const numbers = table.partitions.map((p) => p.number).join(', ') || 'none';
    throw new Qcow2Error('INVALID_ARGUMENT', `no partition ${number} in the ${table.scheme.toUpperCase()} table (partitions: ${numbers})`, { path });
  }
  if (isExtendedContainer(partition)) {
    throw new Qcow2Error('INVALID_ARGUMENT', `partition ${number} is an extended partition (a container of logical partitions), not a target`, { path });
  }
  if (partition.start + partition.sizeBytes > diskSize) {
    throw new Qcow2Error('INVALID_ARGUMENT', `partition ${number} extends past the end of the disk`, { path });
  }
  if (table.usable && (partition.start < table.usable.start || partition.start + partition.sizeBytes > table.usable.end)) {
    throw new Qcow2Error('INVALID_ARGUMENT', `partition ${number} lies outside the GPT's usable sectors: writing it would overwrite the partition table`, { path });
  }
  // The safety checks see the partition's own device node: an overlapping partition that is
  // mounted would not be. Extended containers hold their logical partitions by design.
  const overlapping = table.partitions.find((p) => p !== partition && !isExtendedContainer(p) &&
    p.start < partition.start + partition.sizeBytes && partition.start < p.start + p.sizeBytes);
  if (overlapping) {
    throw new Qcow2Error('INVALID_ARGUMENT', `partition ${number} overlaps partition ${overlapping.number}: the table is damaged`, { path });
  }
  return partition;
}

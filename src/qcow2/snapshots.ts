/** The internal snapshot table. Layout: docs/formats/qcow2.md ("Snapshot table"). */
import { Qcow2Error } from '../errors';
import { limits } from '../limits';
import { u32, u64BigInt, u64Safe } from './bytes';
import type { Qcow2Header } from './header';

export interface Qcow2Snapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** The disk size when the snapshot was taken (extra data), else the image's. */
  virtualSize: number;
  /** Instruction count, or -1 when record/replay was off. */
  icount: number;
  /** Bytes of this entry in the table, without the padding after it. */
  entryBytes: number;
  extraDataSize: number;
}

const entryHeaderBytes = 40;

/** Parses the snapshot table from `table`, which starts at header.snapshotsOffset. */
export function parseSnapshotTable(table: Buffer, header: Qcow2Header, path: string): Qcow2Snapshot[] {
  const snapshots: Qcow2Snapshot[] = [];
  let offset = 0;
  const fail = (message: string, at: number): never => {
    throw new Qcow2Error('BAD_SNAPSHOT_TABLE', message, { path, offset: header.snapshotsOffset + at });
  };
  for (let index = 0; index < header.snapshotCount; index++) {
    offset = Math.ceil(offset / 8) * 8;
    if (offset + entryHeaderBytes > table.length) fail(`snapshot ${index + 1} runs past the end of the snapshot table`, offset);
    const l1TableOffset = u64Safe(table, offset, path, 'snapshot L1 table offset', 'BAD_SNAPSHOT_TABLE');
    const l1Size = u32(table, offset + 8);
    const idLength = table.readUInt16BE(offset + 12);
    const nameLength = table.readUInt16BE(offset + 14);
    const dateSec = u32(table, offset + 16);
    const dateNsec = u32(table, offset + 20);
    const vmClockNsec = u64Safe(table, offset + 24, path, 'snapshot VM clock', 'BAD_SNAPSHOT_TABLE');
    let vmStateSize = u32(table, offset + 32);
    const extraDataSize = u32(table, offset + 36);
    if (extraDataSize > limits.maxSnapshotExtraData) {
      fail(`snapshot ${index + 1} has ${extraDataSize} bytes of extra data (limit ${limits.maxSnapshotExtraData})`, offset + 36);
    }
    const extra = offset + entryHeaderBytes;
    if (extra + extraDataSize + idLength + nameLength > table.length) {
      fail(`snapshot ${index + 1} runs past the end of the snapshot table`, offset);
    }
    let virtualSize = header.virtualSize;
    let icount = -1;
    if (extraDataSize >= 8) vmStateSize = u64Safe(table, extra, path, 'snapshot VM state size', 'BAD_SNAPSHOT_TABLE');
    if (extraDataSize >= 16) virtualSize = u64Safe(table, extra + 8, path, 'snapshot disk size', 'BAD_SNAPSHOT_TABLE');
    if (extraDataSize >= 24) {
      const raw = u64BigInt(table, extra + 16);
      icount = raw === 0xffffffffffffffffn ? -1 : Number(raw);
    }
    const idStart = extra + extraDataSize;
    const id = table.toString('utf8', idStart, idStart + idLength);
    const name = table.toString('utf8', idStart + idLength, idStart + idLength + nameLength);
    const entryBytes = idStart + idLength + nameLength - offset;
    snapshots.push({ id, name, l1TableOffset, l1Size, dateSec, dateNsec, vmClockNsec, vmStateSize, virtualSize, icount, entryBytes, extraDataSize });
    offset = idStart + idLength + nameLength;
  }
  return snapshots;
}

/** Bytes the table occupies: entries padded to 8 bytes, the last one unpadded (QEMU's snapshots_size). */
export function snapshotTableBytes(snapshots: readonly Qcow2Snapshot[]): number {
  let bytes = 0;
  for (const snapshot of snapshots) bytes = Math.ceil(bytes / 8) * 8 + snapshot.entryBytes;
  return bytes;
}

/**
 * Upper bound on the bytes the table can occupy, for reading it in one go; within
 * the file unless `pastEnd` (the checker reads past the end as zeros, like QEMU).
 */
export function snapshotTableReadSize(header: Qcow2Header, fileSize: number, pastEnd = false): number {
  const perEntryMax = entryHeaderBytes + limits.maxSnapshotExtraData + 2 * 65535 + 7;
  const bound = Math.min(header.snapshotCount * perEntryMax, limits.maxSnapshotTableBytes);
  return pastEnd ? bound : Math.max(0, Math.min(bound, fileSize - header.snapshotsOffset));
}

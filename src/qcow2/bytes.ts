/** Big-endian readers for untrusted on-disk structures. */
import { Qcow2Error, type Qcow2ErrorCode } from '../errors';
import { limits } from '../limits';

export function u32(buffer: Buffer, offset: number): number {
  return buffer.readUInt32BE(offset);
}

export function u64BigInt(buffer: Buffer, offset: number): bigint {
  return buffer.readBigUInt64BE(offset);
}

/**
 * A u64 that must be an offset or size: exact as a number, or the image is refused.
 * qcow2 offsets have 56 bits, but nothing real comes near 2^53 bytes.
 */
export function u64Safe(buffer: Buffer, offset: number, path: string, field: string, code: Qcow2ErrorCode = 'BAD_HEADER_FIELD'): number {
  const value = buffer.readBigUInt64BE(offset);
  if (value > BigInt(limits.maxOffset)) {
    throw new Qcow2Error(code, `${field} ${value} is out of range`, { path, offset });
  }
  return Number(value);
}

/** Bits 9-55 of the big-endian table entry at `at`: the offset an L1, L2, refcount or bitmap table entry holds. */
export function entryOffset(table: Buffer, at: number): number {
  return (table.readUInt32BE(at) & 0x00ffffff) * 2 ** 32 + ((table.readUInt32BE(at + 4) & 0xfffffe00) >>> 0);
}

/** hi * 2^32 + lo of an entry whose masked value is known to be below 2^56. */
export function u64Parts(buffer: Buffer, offset: number): { hi: number; lo: number } {
  return { hi: buffer.readUInt32BE(offset), lo: buffer.readUInt32BE(offset + 4) };
}

export function isPowerOfTwoAligned(value: number, alignment: number): boolean {
  return value % alignment === 0;
}

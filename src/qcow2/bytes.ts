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

/**
 * The LUKS1 header of a LUKS-encrypted qcow2 image, read to describe the encryption as
 * `qemu-img info` does. No key is derived and nothing is decrypted: reading such an image's
 * data is refused elsewhere.
 */
import { Qcow2Error } from '../errors';

/** How an image is encrypted, in qemu-img info's terms. */
export type EncryptionInfo = { format: 'aes' } | LuksInfo;

export interface LuksInfo {
  format: 'luks';
  /** Cipher and key size, as QEMU names them: `aes-256`, `twofish-128`, `sm4`, ... */
  cipherAlg: string;
  /** Block cipher mode: `xts`, `cbc`, `ecb` or `ctr`. */
  cipherMode: string;
  /** IV generator: `plain`, `plain64` or `essiv`. */
  ivgenAlg: string;
  /** The hash essiv takes the key through; only for essiv. */
  ivgenHashAlg?: string;
  /** The hash of the key derivation (PBKDF2). */
  hashAlg: string;
  uuid: string;
  /** Byte offset of the encrypted payload in the LUKS volume. */
  payloadOffset: number;
  masterKeyIters: number;
  slots: LuksSlot[];
}

export interface LuksSlot {
  active: boolean;
  /** PBKDF2 iterations; only for an active slot. */
  iters?: number;
  /** Byte offset of the slot's key material. */
  keyOffset: number;
  /** Anti-forensic stripes; only for an active slot. */
  stripes?: number;
}

/** Bytes of a LUKS1 header: 208 of fields, then 8 key slots of 48. */
export const luksHeaderSize = 592;

const luksMagic = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
const sectorSize = 512;
const slotCount = 8;
const slotActive = 0x00ac71f3;
const slotInactive = 0x0000dead;
/** Anti-forensic stripes of every key slot LUKS1 (and QEMU) writes. */
const stripesPerSlot = 4000;
/** Key material starts past the first 4 KiB, the header's own sectors. */
const headerSectors = 4096 / sectorSize;

/** Key sizes in bytes of each cipher QEMU's LUKS driver knows, and the name it gives each. */
const cipherNames: Record<string, Record<number, string>> = {
  aes: { 16: 'aes-128', 24: 'aes-192', 32: 'aes-256' },
  cast5: { 16: 'cast5-128' },
  serpent: { 16: 'serpent-128', 24: 'serpent-192', 32: 'serpent-256' },
  twofish: { 16: 'twofish-128', 24: 'twofish-192', 32: 'twofish-256' },
  sm4: { 16: 'sm4' },
};
const modes = new Set(['ecb', 'cbc', 'xts', 'ctr']);
const ivgens = new Set(['plain', 'plain64', 'essiv']);
const hashes = new Set(['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160']);

/** A NUL-padded ASCII field. */
function text(header: Buffer, offset: number, length: number): string {
  const field = header.subarray(offset, offset + length);
  const end = field.indexOf(0);
  return field.subarray(0, end < 0 ? length : end).toString('latin1');
}

/**
 * Parses the LUKS1 header QEMU keeps at `offset` of the image (its encryption header
 * extension). Names QEMU's LUKS driver would not open are errors, as they are for qemu-img.
 */
export function parseLuksHeader(header: Buffer, path: string, offset: number): LuksInfo {
  const bad = (message: string, at = 0) => new Qcow2Error('BAD_ENCRYPTION_HEADER', `LUKS header: ${message}`, { path, offset: offset + at });
  if (header.length < luksHeaderSize) throw bad(`${header.length} bytes, not ${luksHeaderSize}`);
  if (!header.subarray(0, 6).equals(luksMagic)) throw bad('bad magic');
  const version = header.readUInt16BE(6);
  if (version !== 1) throw bad(`version ${version} (QEMU writes version 1)`, 6);

  const cipherName = text(header, 8, 32);
  const [mode, ivgenSpec, ...rest] = text(header, 40, 32).split('-');
  const [ivgen, ivgenHash, ...ivgenRest] = (ivgenSpec ?? '').split(':');
  if (!mode || !modes.has(mode) || !ivgen || !ivgens.has(ivgen) || rest.length > 0 || ivgenRest.length > 0 ||
      (ivgen === 'essiv') !== (ivgenHash !== undefined) || (ivgenHash !== undefined && !hashes.has(ivgenHash))) {
    throw bad(`unsupported cipher mode "${text(header, 40, 32)}"`, 40);
  }
  const hashAlg = text(header, 72, 32);
  if (!hashes.has(hashAlg)) throw bad(`unsupported hash "${hashAlg}"`, 72);
  // XTS splits its key in two halves of the cipher's key size.
  const keyBytes = header.readUInt32BE(108) / (mode === 'xts' ? 2 : 1);
  const cipherAlg = cipherNames[cipherName]?.[keyBytes];
  if (cipherAlg === undefined) throw bad(`unsupported cipher "${cipherName}" with ${keyBytes}-byte keys`, 8);

  // The layout checks QEMU makes before it describes a LUKS header (qemu-img info refuses the rest).
  const payloadSector = header.readUInt32BE(104);
  if (payloadSector < headerSectors) throw bad(`payload at sector ${payloadSector} overlaps the header`, 104);
  if (header.readUInt32BE(164) === 0) throw bad('master key digest iterations are 0', 164);
  // Each slot's split key, in whole sectors rounded up to the header's 8.
  const keyMaterialSectors = Math.ceil(Math.ceil((header.readUInt32BE(108) * stripesPerSlot) / sectorSize) / headerSectors) * headerSectors;
  const slots: LuksSlot[] = [];
  const taken: { index: number; start: number }[] = [];
  for (let index = 0; index < slotCount; index++) {
    const at = 208 + index * 48;
    const state = header.readUInt32BE(at);
    if (state !== slotActive && state !== slotInactive) throw bad(`key slot ${index} is neither active nor inactive (0x${state.toString(16)})`, at);
    const stripes = header.readUInt32BE(at + 44);
    if (stripes !== stripesPerSlot) throw bad(`key slot ${index} has ${stripes} stripes, not ${stripesPerSlot}`, at + 44);
    const iters = header.readUInt32BE(at + 4);
    if (state === slotActive && iters === 0) throw bad(`key slot ${index} is active with 0 iterations`, at + 4);
    const start = header.readUInt32BE(at + 40);
    if (start < headerSectors) throw bad(`key slot ${index} overlaps the header`, at + 40);
    if (start + keyMaterialSectors > payloadSector) throw bad(`key slot ${index} overlaps the encrypted payload`, at + 40);
    const overlapped = taken.find((other) => start < other.start + keyMaterialSectors && other.start < start + keyMaterialSectors);
    if (overlapped) throw bad(`key slots ${overlapped.index} and ${index} overlap`, at + 40);
    taken.push({ index, start });
    slots.push(state === slotActive ? { active: true, iters, keyOffset: start * sectorSize, stripes } : { active: false, keyOffset: start * sectorSize });
  }
  return {
    format: 'luks',
    cipherAlg,
    cipherMode: mode,
    ivgenAlg: ivgen,
    ...(ivgenHash !== undefined ? { ivgenHashAlg: ivgenHash } : {}),
    hashAlg,
    uuid: text(header, 168, 40),
    payloadOffset: payloadSector * sectorSize,
    masterKeyIters: header.readUInt32BE(164),
    slots,
  };
}

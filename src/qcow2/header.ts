/**
 * The qcow2 header, its feature bits and header extensions.
 * Layout: docs/formats/qcow2.md; QEMU docs/interop/qcow2.rst.
 */
import { Qcow2Error } from '../errors';
import { limits } from '../limits';
import { u32, u64BigInt, u64Safe } from './bytes';
import { EXTENDED_L2_ENTRY_BYTES, STANDARD_L2_ENTRY_BYTES } from './entries';

export const QCOW2_MAGIC = 0x514649fb;

export const IncompatibleFeature = {
  dirty: 0n,
  corrupt: 1n,
  externalDataFile: 2n,
  compressionType: 3n,
  extendedL2: 4n,
} as const;
const knownIncompatibleMask = 0b11111n;

export const CompatibleFeature = { lazyRefcounts: 0n } as const;
export const AutoclearFeature = { bitmaps: 0n, dataFileRaw: 1n } as const;

export const ExtensionType = {
  end: 0,
  backingFormat: 0xe2792aca,
  featureNameTable: 0x6803f857,
  bitmaps: 0x23852875,
  fullDiskEncryption: 0x0537be77,
  externalDataFile: 0x44415441,
} as const;

export type CompressionType = 'zlib' | 'zstd';

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  count: number;
  directorySize: number;
  directoryOffset: number;
}

export interface HeaderExtension {
  type: number;
  offset: number;
  length: number;
}

/** What the header extensions say (docs/formats/qcow2.md, "Header extensions"). */
interface ParsedExtensions {
  backingFormat: string | undefined;
  externalDataFile: string | undefined;
  featureNames: FeatureName[];
  /** The bitmaps extension, while autoclear bit 0 says the bitmaps are consistent (QEMU ignores them otherwise). */
  bitmaps: BitmapsExtension | undefined;
  /** Full-disk encryption header pointer (LUKS), if present. */
  encryptionHeader: { offset: number; length: number } | undefined;
  extensions: HeaderExtension[];
}

export interface Qcow2Header extends ParsedExtensions {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  backingFile: string | undefined;
  clusterBits: number;
  clusterSize: number;
  /** As QEMU sees it: the header's size rounded down to whole 512-byte sectors. */
  virtualSize: number;
  /** The header's own size field. */
  headerSize: number;
  cryptMethod: number;
  /** How the image's data is encrypted (header field crypt_method 1 or 2), if it is. */
  encryption: 'aes' | 'luks' | undefined;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  snapshotCount: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  refcountBits: number;
  headerLength: number;
  compressionType: CompressionType;
  extendedL2: boolean;
  dirty: boolean;
  corrupt: boolean;
  lazyRefcounts: boolean;
  hasExternalDataFile: boolean;
  dataFileRaw: boolean;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  l2EntryBytes: number;
  /** Entries per L2 table (one cluster). */
  l2EntryCount: number;
  /** L1 entries the virtual size needs. */
  l1EntriesNeeded: number;
}

const bit = (features: bigint, index: bigint) => ((features >> index) & 1n) === 1n;

/** Bytes of cluster 0 that parseHeader needs at most. */
export const headerReadSize = 1 << limits.maxClusterBits;

export interface ParseHeaderOptions {
  /**
   * Open as qemu-img check opens an image (QEMU's BDRV_O_CHECK): an image without a refcount
   * table is accepted, for the check to report every cluster it uses as corrupt.
   */
  forCheck?: boolean;
  /**
   * Open only to describe the image, as qemu-img info does (QEMU's BDRV_O_NO_IO): an encrypted
   * image is accepted (its data must not be read), and so is the data-file-raw bit without an
   * external data file. Default: both refused.
   */
  metadataOnly?: boolean;
}

/** The refusal to read an encrypted image's data. */
export function encryptedError(encryption: 'aes' | 'luks', path: string): Qcow2Error {
  return new Qcow2Error('ENCRYPTED', `image is encrypted (${encryption === 'aes' ? 'AES' : 'LUKS'}); encrypted images are not supported`, { path, offset: 32 });
}

/**
 * Parses and validates the header from the first bytes of the file
 * (`start` holds at least min(fileSize, clusterSize) bytes, or all of cluster 0).
 */
export function parseHeader(start: Buffer, path: string, fileSize: number, options: ParseHeaderOptions = {}): Qcow2Header {
  const need = (length: number, what: string) => {
    if (start.length < length) {
      throw new Qcow2Error('TRUNCATED', `file ends inside the ${what} (${start.length} of ${length} bytes)`, { path, offset: start.length });
    }
  };
  // The magic first: a short file that is no qcow2 image (a text file) is "not a qcow2 image", not a cut one.
  if (start.length < 4 || u32(start, 0) !== QCOW2_MAGIC) {
    throw new Qcow2Error('BAD_MAGIC', start.length < 4 ? `not a qcow2 image (${start.length === 0 ? 'the file is empty' : `only ${start.length} bytes`})` : 'not a qcow2 image (bad magic)', { path, offset: 0 });
  }
  need(72, 'qcow2 header');
  const version = u32(start, 4);
  if (version !== 2 && version !== 3) {
    throw new Qcow2Error('UNSUPPORTED_VERSION', `unsupported qcow2 version ${version} (2 and 3 are supported)`, { path, offset: 4 });
  }
  const clusterBits = u32(start, 20);
  if (clusterBits < limits.minClusterBits || clusterBits > limits.maxClusterBits) {
    throw new Qcow2Error('BAD_CLUSTER_BITS', `cluster_bits ${clusterBits} is outside 9..21 (512 B to 2 MiB clusters)`, { path, offset: 20 });
  }
  const clusterSize = 2 ** clusterBits;
  const backingFileOffset = u64Safe(start, 8, path, 'backing file offset', 'BAD_BACKING_NAME');
  const backingFileSize = u32(start, 16);
  const headerSize = u64Safe(start, 24, path, 'virtual size', 'VIRTUAL_SIZE_TOO_LARGE');
  const cryptMethod = u32(start, 32);
  const l1Size = u32(start, 36);
  const l1TableOffset = u64Safe(start, 40, path, 'L1 table offset', 'OFFSET_BEYOND_FILE');
  const refcountTableOffset = u64Safe(start, 48, path, 'refcount table offset', 'OFFSET_BEYOND_FILE');
  const refcountTableClusters = u32(start, 56);
  const snapshotCount = u32(start, 60);
  const snapshotsOffset = u64Safe(start, 64, path, 'snapshot table offset', 'OFFSET_BEYOND_FILE');

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = 72;
  let compressionByte = 0;
  if (version === 3) {
    need(104, 'version 3 header');
    incompatibleFeatures = u64BigInt(start, 72);
    compatibleFeatures = u64BigInt(start, 80);
    autoclearFeatures = u64BigInt(start, 88);
    refcountOrder = u32(start, 96);
    headerLength = u32(start, 100);
    if (headerLength < 104) {
      throw new Qcow2Error('BAD_HEADER_LENGTH', `header length ${headerLength} is shorter than 104 bytes`, { path, offset: 100 });
    }
    if (headerLength > clusterSize) {
      throw new Qcow2Error('BAD_HEADER_LENGTH', `header length ${headerLength} exceeds the cluster size ${clusterSize}`, { path, offset: 100 });
    }
    need(Math.min(headerLength, 112), 'version 3 header');
    if (headerLength > 104) compressionByte = start[104]!;
  }
  if (refcountOrder > limits.maxRefcountOrder) {
    throw new Qcow2Error('BAD_REFCOUNT_ORDER', `refcount_order ${refcountOrder} is larger than 6 (64-bit refcounts)`, { path, offset: 96 });
  }

  // Extensions sit between the header and the backing name (or the end of cluster 0).
  const extensionsEnd = backingFileOffset !== 0 ? backingFileOffset : clusterSize;
  // As QEMU (qcow2_do_open): the offset is bounded by the cluster size only; one inside the
  // header reads the name from the header's own bytes, and leaves no room for extensions.
  if (backingFileOffset > clusterSize) {
    throw new Qcow2Error('BAD_BACKING_NAME', `backing file name offset ${backingFileOffset} is outside the header cluster`, { path, offset: 8 });
  }
  if (backingFileOffset !== 0 && (backingFileSize > limits.maxBackingNameLength || backingFileSize > clusterSize - backingFileOffset)) {
    throw new Qcow2Error('BAD_BACKING_NAME', `backing file name length ${backingFileSize} is too long`, { path, offset: 16 });
  }
  const parsed = parseExtensions(start, path, headerLength, Math.min(extensionsEnd, start.length), clusterSize, autoclearFeatures, cryptMethod);

  let backingFile: string | undefined;
  if (backingFileOffset !== 0 && backingFileSize > 0) {
    need(backingFileOffset + backingFileSize, 'backing file name');
    // QEMU keeps the name as a C string: it ends at the first NUL, and an empty name is none.
    backingFile = cString(start.subarray(backingFileOffset, backingFileOffset + backingFileSize), 'utf8') || undefined;
  }

  // Incompatible features: refuse what we cannot read correctly.
  const unknown = incompatibleFeatures & ~knownIncompatibleMask;
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let b = 0n; b < 64n; b++) {
      if (!bit(unknown, b)) continue;
      const named = parsed.featureNames.find((f) => f.type === 'incompatible' && BigInt(f.bit) === b);
      names.push(named ? `bit ${b} "${named.name}"` : `bit ${b}`);
    }
    throw new Qcow2Error('UNKNOWN_INCOMPATIBLE_FEATURE', `unsupported incompatible feature ${names.join(', ')}`, { path, offset: 72 });
  }
  const extendedL2 = bit(incompatibleFeatures, IncompatibleFeature.extendedL2);
  if (extendedL2 && clusterBits < limits.minClusterBitsExtendedL2) {
    throw new Qcow2Error('BAD_CLUSTER_BITS', `extended L2 entries need clusters of at least 16 KiB (cluster_bits ${clusterBits})`, { path, offset: 20 });
  }
  const compressionBit = bit(incompatibleFeatures, IncompatibleFeature.compressionType);
  let compressionType: CompressionType;
  if (compressionByte === 0) {
    if (compressionBit) {
      throw new Qcow2Error('BAD_COMPRESSION_TYPE', 'compression type feature bit is set but the type is zlib', { path, offset: 104 });
    }
    compressionType = 'zlib';
  } else if (compressionByte === 1) {
    if (!compressionBit) {
      throw new Qcow2Error('BAD_COMPRESSION_TYPE', 'compression type zstd without its incompatible feature bit', { path, offset: 104 });
    }
    compressionType = 'zstd';
  } else {
    throw new Qcow2Error('BAD_COMPRESSION_TYPE', `unknown compression type ${compressionByte}`, { path, offset: 104 });
  }
  const encryption = cryptMethod === 0 ? undefined : cryptMethod === 1 ? 'aes' : cryptMethod === 2 ? 'luks' : null;
  if (encryption === null) throw new Qcow2Error('ENCRYPTED', `image is encrypted by an unknown method ${cryptMethod}`, { path, offset: 32 });
  if (encryption !== undefined && !options.metadataOnly) throw encryptedError(encryption, path);
  if (encryption === 'luks' && parsed.encryptionHeader === undefined) {
    throw new Qcow2Error('BAD_ENCRYPTION_HEADER', 'LUKS-encrypted image without its encryption header extension', { path, offset: 32 });
  }
  const hasExternalDataFile = bit(incompatibleFeatures, IncompatibleFeature.externalDataFile);
  if (hasExternalDataFile && parsed.externalDataFile === undefined) {
    throw new Qcow2Error('MISSING_DATA_FILE', 'image uses an external data file but does not name it', { path, offset: 72 });
  }
  const dataFileRaw = bit(autoclearFeatures, AutoclearFeature.dataFileRaw);
  // As qcow2_do_open, which checks it only where it opens the data file (not for qemu-img info).
  if (dataFileRaw && !hasExternalDataFile && !options.metadataOnly) {
    throw new Qcow2Error('BAD_HEADER_FIELD', 'the data-file-raw bit is set but the image has no external data file', { path, offset: 88 });
  }

  // Sizes and tables, checked before anything is allocated from them.
  const virtualSize = Math.floor(headerSize / 512) * 512;
  if (virtualSize > limits.maxVirtualSize) {
    throw new Qcow2Error('VIRTUAL_SIZE_TOO_LARGE', `virtual size ${headerSize} is too large`, { path, offset: 24 });
  }
  const l2EntryBytes = extendedL2 ? EXTENDED_L2_ENTRY_BYTES : STANDARD_L2_ENTRY_BYTES;
  const l2EntryCount = clusterSize / l2EntryBytes;
  const bytesPerL1Entry = l2EntryCount * clusterSize;
  const l1EntriesNeeded = Math.ceil(virtualSize / bytesPerL1Entry);
  if (l1Size * 8 > limits.maxL1Bytes) {
    throw new Qcow2Error('L1_TOO_LARGE', `L1 table of ${l1Size} entries exceeds ${limits.maxL1Bytes / 8}`, { path, offset: 36 });
  }
  if (l1EntriesNeeded * 8 > limits.maxL1Bytes) {
    throw new Qcow2Error('VIRTUAL_SIZE_TOO_LARGE', `virtual size ${headerSize} needs an L1 table larger than QEMU allows`, { path, offset: 24 });
  }
  if (l1Size < l1EntriesNeeded) {
    throw new Qcow2Error('L1_TOO_SMALL', `L1 table of ${l1Size} entries is too small for the virtual size (needs ${l1EntriesNeeded})`, { path, offset: 36 });
  }
  // QEMU's qcow2_validate_table: each table's offset is cluster aligned, whatever its size (the
  // snapshot table's is checked by qemu-img check too, as a check error). Where a table lies is not
  // checked: one at offset 0 reads the header, one past the end of the file reads as zeros.
  checkTableOffset(path, 'L1 table', l1TableOffset, clusterSize, 40);
  if (refcountTableClusters * clusterSize > limits.maxRefcountTableBytes) {
    throw new Qcow2Error('REFCOUNT_TABLE_TOO_LARGE', `refcount table of ${refcountTableClusters} clusters exceeds ${limits.maxRefcountTableBytes} bytes`, { path, offset: 56 });
  }
  if (refcountTableClusters === 0 && !options.forCheck) {
    throw new Qcow2Error('BAD_HEADER_FIELD', 'image has no refcount table', { path, offset: 56 });
  }
  checkTableOffset(path, 'refcount table', refcountTableOffset, clusterSize, 48);
  if (snapshotCount > limits.maxSnapshots) {
    throw new Qcow2Error('TOO_MANY_SNAPSHOTS', `${snapshotCount} snapshots exceed the limit of ${limits.maxSnapshots}`, { path, offset: 60 });
  }
  checkTableOffset(path, 'snapshot table', snapshotsOffset, clusterSize, 64);

  return {
    version,
    backingFileOffset,
    backingFileSize,
    backingFile,
    clusterBits,
    clusterSize,
    virtualSize,
    headerSize,
    cryptMethod,
    encryption,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    snapshotCount,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    refcountBits: 2 ** refcountOrder,
    headerLength,
    compressionType,
    extendedL2,
    dirty: bit(incompatibleFeatures, IncompatibleFeature.dirty),
    corrupt: bit(incompatibleFeatures, IncompatibleFeature.corrupt),
    lazyRefcounts: bit(compatibleFeatures, CompatibleFeature.lazyRefcounts),
    hasExternalDataFile,
    dataFileRaw,
    backingFormat: parsed.backingFormat,
    externalDataFile: hasExternalDataFile ? parsed.externalDataFile : undefined,
    featureNames: parsed.featureNames,
    bitmaps: parsed.bitmaps,
    encryptionHeader: parsed.encryptionHeader,
    extensions: parsed.extensions,
    l2EntryBytes,
    l2EntryCount,
    l1EntriesNeeded,
  };
}

/** A table's offset must be cluster aligned (QEMU's qcow2_validate_table). */
export function checkTableOffset(path: string, what: string, offset: number, clusterSize: number, fieldOffset?: number): void {
  if (offset % clusterSize !== 0) {
    throw new Qcow2Error('UNALIGNED_OFFSET', `${what} offset ${offset} is not cluster aligned`, { path, offset: fieldOffset ?? offset });
  }
}

/** Bytes up to the first NUL: how QEMU reads the names it keeps as C strings. */
function cString(bytes: Buffer, encoding: 'utf8' | 'latin1'): string {
  const nul = bytes.indexOf(0);
  return bytes.toString(encoding, 0, nul < 0 ? bytes.length : nul);
}


function parseExtensions(start: Buffer, path: string, from: number, end: number, clusterSize: number, autoclearFeatures: bigint, cryptMethod: number): ParsedExtensions {
  const result: ParsedExtensions = {
    backingFormat: undefined,
    externalDataFile: undefined,
    featureNames: [],
    bitmaps: undefined,
    encryptionHeader: undefined,
    extensions: [],
  };
  let offset = from;
  while (offset < end) {
    if (offset + 8 > end) {
      throw new Qcow2Error('BAD_EXTENSION', `header extension at ${offset} runs past the end of the header area`, { path, offset });
    }
    const type = u32(start, offset);
    const length = u32(start, offset + 4);
    const dataStart = offset + 8;
    // Checked before the type, as QEMU does: even the end marker's length must fit the area.
    if (length > end - dataStart) {
      throw new Qcow2Error('BAD_EXTENSION', `header extension 0x${type.toString(16)} at ${offset} is too large (${length} bytes)`, { path, offset });
    }
    if (type === ExtensionType.end) break;
    // A type that appears again replaces what the earlier one said, as in QEMU (qcow2_read_extensions).
    result.extensions.push({ type, offset, length });
    const data = start.subarray(dataStart, dataStart + length);
    switch (type) {
      case ExtensionType.backingFormat:
        if (length > limits.maxBackingFormatLength) {
          throw new Qcow2Error('BAD_EXTENSION', `backing format name of ${length} bytes is too long`, { path, offset });
        }
        // An empty name (or one that starts with NUL) records no format: the backing file is probed.
        result.backingFormat = cString(data, 'latin1') || undefined;
        break;
      case ExtensionType.externalDataFile:
        if (length > limits.maxExternalDataFileNameLength) {
          throw new Qcow2Error('BAD_EXTENSION', `external data file name of ${length} bytes is too long`, { path, offset });
        }
        result.externalDataFile = cString(data, 'utf8');
        break;
      case ExtensionType.featureNameTable:
        result.featureNames = [];
        for (let at = 0; at + 48 <= length; at += 48) {
          const kind = data[at]!;
          const name = cString(data.subarray(at + 2, at + 48), 'utf8');
          if (kind <= 2) {
            result.featureNames.push({ type: (['incompatible', 'compatible', 'autoclear'] as const)[kind]!, bit: data[at + 1]!, name });
          }
        }
        break;
      case ExtensionType.bitmaps:
        result.bitmaps = parseBitmapsExtension(data, path, offset, clusterSize, autoclearFeatures);
        break;
      case ExtensionType.fullDiskEncryption:
        if (cryptMethod !== 2) {
          throw new Qcow2Error('BAD_EXTENSION', 'a full disk encryption header extension in an image not encrypted with LUKS', { path, offset });
        }
        if (length !== 16) {
          throw new Qcow2Error('BAD_EXTENSION', `encryption header extension has ${length} bytes, not 16`, { path, offset });
        }
        result.encryptionHeader = {
          offset: u64Safe(data, 0, path, 'encryption header offset', 'BAD_EXTENSION'),
          length: u64Safe(data, 8, path, 'encryption header length', 'BAD_EXTENSION'),
        };
        break;
      default:
        break; // unknown extensions are skipped
    }
    offset = dataStart + Math.ceil(length / 8) * 8;
  }
  return result;
}

/**
 * The bitmaps extension, as QEMU's qcow2_read_extensions takes it: its length is always
 * checked; the rest only while autoclear bit 0 says the bitmaps are consistent (otherwise
 * QEMU warns and ignores them, and so does this: undefined).
 */
function parseBitmapsExtension(data: Buffer, path: string, offset: number, clusterSize: number, autoclearFeatures: bigint): BitmapsExtension | undefined {
  const fail = (message: string): never => {
    throw new Qcow2Error('BAD_EXTENSION', `bitmaps extension: ${message}`, { path, offset });
  };
  if (data.length !== 24) fail(`${data.length} bytes, not 24`);
  if (!bit(autoclearFeatures, AutoclearFeature.bitmaps)) return undefined;
  if (u32(data, 4) !== 0) fail('its reserved field is not zero');
  const count = u32(data, 0);
  if (count > limits.maxBitmaps) fail(`${count} bitmaps exceed the limit of ${limits.maxBitmaps}`);
  if (count === 0) fail('no bitmaps');
  const directorySize = u64Safe(data, 8, path, 'bitmap directory size', 'BAD_EXTENSION');
  const directoryOffset = u64Safe(data, 16, path, 'bitmap directory offset', 'BAD_EXTENSION');
  if (directoryOffset % clusterSize !== 0) fail('the directory offset is not cluster aligned');
  if (directorySize > limits.maxBitmapDirectoryBytes) fail(`a directory of ${directorySize} bytes exceeds ${limits.maxBitmapDirectoryBytes}`);
  return { count, directorySize, directoryOffset };
}

/**
 * The one error class of qcow2img. `code` is stable: scripts match on it.
 * The message is one line that names the file and the problem.
 */
export type Qcow2ErrorCode =
  // header and structure
  | 'BAD_MAGIC'
  | 'UNSUPPORTED_VERSION'
  | 'BAD_CLUSTER_BITS'
  | 'BAD_HEADER_LENGTH'
  | 'BAD_HEADER_FIELD'
  | 'BAD_EXTENSION'
  | 'BAD_BACKING_NAME'
  | 'BAD_REFCOUNT_ORDER'
  | 'BAD_COMPRESSION_TYPE'
  | 'UNKNOWN_INCOMPATIBLE_FEATURE'
  | 'ENCRYPTED'
  | 'BAD_ENCRYPTION_HEADER'
  | 'MISSING_DATA_FILE'
  | 'VIRTUAL_SIZE_TOO_LARGE'
  | 'L1_TOO_LARGE'
  | 'L1_TOO_SMALL'
  | 'REFCOUNT_TABLE_TOO_LARGE'
  | 'TOO_MANY_SNAPSHOTS'
  | 'BAD_SNAPSHOT_TABLE'
  | 'UNALIGNED_OFFSET'
  | 'OFFSET_BEYOND_FILE'
  | 'BAD_L1_ENTRY'
  | 'BAD_L2_ENTRY'
  | 'BAD_COMPRESSED_CLUSTER'
  | 'TRUNCATED'
  // chains and external files
  | 'BACKING_CHAIN_LOOP'
  | 'BACKING_CHAIN_TOO_DEEP'
  | 'BACKING_FILE_NOT_FOUND'
  | 'UNSUPPORTED_BACKING_FORMAT'
  | 'UNSUPPORTED_PROTOCOL'
  | 'PATH_NOT_ALLOWED'
  | 'NOT_A_REGULAR_FILE'
  // use
  | 'SNAPSHOT_NOT_FOUND'
  | 'TARGET_EXISTS'
  | 'TARGET_TOO_SMALL'
  | 'TARGET_IS_SOURCE'
  | 'TARGET_IN_USE'
  | 'LOCKED'
  | 'VERIFY_FAILED'
  | 'CHECKSUM_MISMATCH'
  | 'BAD_ARCHIVE'
  | 'PARENT_MISMATCH'
  | 'INVALID_ARGUMENT'
  | 'CLOSED'
  | 'CANCELLED'
  | 'IO_ERROR'
  // http(s) sources
  | 'HTTP_ERROR'
  | 'SOURCE_CHANGED'
  | 'RANGE_NOT_SUPPORTED';

const brand = Symbol.for('qcow2img.Qcow2Error');

/** Control characters escaped as in JSON strings (\n, \u0000, ...). */
function oneLine(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f]/g, (c) => JSON.stringify(c).slice(1, -1));
}

export interface Qcow2ErrorDetails {
  /** The file the problem is in. */
  path?: string;
  /** Byte offset in that file (or guest offset, as the message says) where it was found. */
  offset?: number;
  /** The underlying OS error, if any. */
  cause?: unknown;
  /** errno name of the OS error (ENOENT, EBUSY, ...). */
  syscallCode?: string;
}

export class Qcow2Error extends Error {
  readonly code: Qcow2ErrorCode;
  readonly path: string | undefined;
  readonly offset: number | undefined;
  readonly syscallCode: string | undefined;

  constructor(code: Qcow2ErrorCode, message: string, details: Qcow2ErrorDetails = {}) {
    const where = details.path !== undefined ? `${details.path}: ` : '';
    // Names come from untrusted images: control characters must not split the one-line message.
    super(oneLine(`${where}${message}`), details.cause !== undefined ? { cause: details.cause } : undefined);
    this.name = 'Qcow2Error';
    this.code = code;
    this.path = details.path;
    this.offset = details.offset;
    this.syscallCode = details.syscallCode;
  }

  /** True for a Qcow2Error from any copy of this package loaded in the process. */
  static override [Symbol.hasInstance](value: unknown): boolean {
    return typeof value === 'object' && value !== null && (value as Record<symbol, unknown>)[brand] === true;
  }

  get [brand](): boolean {
    return true;
  }
}

/** Throws CANCELLED when `signal` has fired: long operations call it between steps. */
export function throwIfCancelled(signal: AbortSignal | undefined, path: string): void {
  if (signal?.aborted) throw new Qcow2Error('CANCELLED', 'cancelled', { path });
}

const reasons: Record<string, string> = {
  ENOENT: 'no such file',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  ENOTDIR: 'a part of the path is not a folder',
  EISDIR: 'it is a folder',
  EEXIST: 'it already exists',
  ENOSPC: 'no space left on the device',
  EDQUOT: 'disk quota exceeded',
  EROFS: 'read-only file system',
  ELOOP: 'too many levels of symbolic links',
  ENAMETOOLONG: 'file name too long',
  EIO: 'input/output error',
  EBUSY: 'device or resource busy',
  ENXIO: 'no such device',
  ENODEV: 'no such device',
  EMFILE: 'too many open files',
};

/** Wraps an fs error as a Qcow2Error naming the file. */
export function ioError(error: unknown, path: string, what: string): Qcow2Error {
  if (error instanceof Qcow2Error) return error;
  const err = error as NodeJS.ErrnoException;
  const code = err?.code;
  // In words, without Node's "ENOTDIR: ..., open '/the/path'" (the path is said once, first).
  const reason = (code !== undefined ? reasons[code] : undefined) ?? (err?.message ?? String(error)).replace(/, \w+ '.*'$/, '');
  return new Qcow2Error('IO_ERROR', `${what}: ${reason}`, { path, cause: error, ...(code ? { syscallCode: code } : {}) });
}

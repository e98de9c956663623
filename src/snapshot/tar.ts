/**
 * POSIX tar (pax interchange format) for snapshot archives: a streaming writer and a
 * streaming reader that refuses what a bundle never holds (links, devices, absolute
 * names, `..`). Layout notes: docs/formats/bundle.md, "Archives".
 */
import { Qcow2Error } from '../errors';

export const BLOCK = 512;
/** GNU tar and bsdtar pad archives to records of 20 blocks. */
const RECORD = 20 * BLOCK;
/** The largest size the 11 octal digits of a ustar header hold; larger members get a pax size record. */
const USTAR_MAX_SIZE = 8 ** 11 - 1;
/** Bounds on what a hostile archive can make the reader hold in memory. */
const MAX_PAX_BYTES = 1 << 20;
const MAX_NAME_BYTES = 4096;

/** Where bytes go: written in order, each write complete before the next starts. */
export interface ByteSink {
  write(data: Buffer): Promise<void>;
}

function octal(value: number, width: number): string {
  return value.toString(8).padStart(width - 1, '0') + '\0';
}

function paxRecord(key: string, value: string): string {
  // The length prefix counts itself: grow it until it is stable.
  const body = ` ${key}=${value}\n`;
  let length = body.length + 1;
  while (String(length).length + Buffer.byteLength(body) !== length) length = String(length).length + Buffer.byteLength(body);
  return `${length}${body}`;
}

function header(name: string, size: number, type: '0' | '5' | 'x', mtime: number): Buffer {
  const block = Buffer.alloc(BLOCK);
  block.write(name, 0, 100, 'utf8');
  block.write(octal(type === '5' ? 0o755 : 0o644, 8), 100, 'ascii');
  block.write(octal(0, 8), 108, 'ascii');
  block.write(octal(0, 8), 116, 'ascii');
  block.write(octal(Math.min(size, USTAR_MAX_SIZE), 12), 124, 'ascii');
  block.write(octal(mtime, 12), 136, 'ascii');
  block.write(type, 156, 'ascii');
  block.write('ustar\u000000', 257, 'ascii');
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (const byte of block) sum += byte;
  block.write(octal(sum, 7) + ' ', 148, 'ascii');
  return block;
}

/** Writes tar entries to a sink, one after the other. */
export class TarWriter {
  private readonly mtime = Math.floor(Date.now() / 1000);

  constructor(private readonly sink: ByteSink) {}

  async addDirectory(name: string): Promise<void> {
    await this.sink.write(header(name.endsWith('/') ? name : `${name}/`, 0, '5', this.mtime));
  }

  /**
   * One regular file of exactly `size` bytes; `body` writes them through the sink
   * it is given (the count is checked), then the entry is padded to a block.
   */
  async addFile(name: string, size: number, body: (sink: ByteSink) => Promise<void>): Promise<void> {
    if (Buffer.byteLength(name) > 100 || size > USTAR_MAX_SIZE) {
      const records = Buffer.from(paxRecord('path', name) + (size > USTAR_MAX_SIZE ? paxRecord('size', String(size)) : ''));
      await this.sink.write(header(`PaxHeaders/${name}`.slice(0, 100), records.length, 'x', this.mtime));
      await this.sink.write(Buffer.concat([records, Buffer.alloc(padding(records.length))]));
    }
    await this.sink.write(header(name.slice(0, 100), size, '0', this.mtime));
    let written = 0;
    await body({
      write: async (data) => {
        written += data.length;
        if (written > size) throw new Error(`tar entry ${name} is longer than its ${size} bytes`);
        await this.sink.write(data);
      },
    });
    if (written !== size) throw new Error(`tar entry ${name} has ${written} bytes, its header says ${size}`);
    if (padding(size)) await this.sink.write(Buffer.alloc(padding(size)));
  }

  /** The two zero blocks that end an archive, padded to a whole record. */
  async finish(bytesSoFar: number): Promise<void> {
    const end = bytesSoFar + 2 * BLOCK;
    await this.sink.write(Buffer.alloc(2 * BLOCK + ((RECORD - (end % RECORD)) % RECORD)));
  }
}

export function padding(size: number): number {
  return (BLOCK - (size % BLOCK)) % BLOCK;
}

/** Where tar entries are read from: a stream (ChunkReader) or a file that can skip ahead. */
export interface TarSource {
  /** Offset of the next byte in the tar stream. */
  readonly position: number;
  /** Up to `max` bytes (fewer at the end; empty at the end). */
  some(max: number): Promise<Buffer>;
  /** Exactly `length` bytes, or null when the stream ends first. */
  exactly(length: number): Promise<Buffer | null>;
  /** Moves `length` bytes ahead without reading them; false when that is past the end. */
  skip?(length: number): Promise<boolean>;
}

/** Reads a tar file in place with positional reads, skipping entry data without reading it. */
export class FileTarSource implements TarSource {
  position = 0;

  constructor(
    private readonly handle: { read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }> },
    private readonly size: number,
  ) {}

  async some(max: number): Promise<Buffer> {
    const buffer = Buffer.allocUnsafe(Math.max(0, Math.min(max, this.size - this.position)));
    let done = 0;
    while (done < buffer.length) {
      const { bytesRead } = await this.handle.read(buffer, done, buffer.length - done, this.position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    this.position += done;
    return buffer.subarray(0, done);
  }

  async exactly(length: number): Promise<Buffer | null> {
    if (this.position + length > this.size) return null;
    const data = await this.some(length);
    return data.length === length ? data : null;
  }

  async skip(length: number): Promise<boolean> {
    if (this.position + length > this.size) return false;
    this.position += length;
    return true;
  }
}

/** Pulls exact byte counts out of a stream of chunks. */
export class ChunkReader implements TarSource {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private ended = false;
  /** Bytes handed out so far: the offset of the next byte in the stream. */
  position = 0;

  constructor(private readonly chunks: AsyncIterator<Buffer>) {}

  private async fill(wanted: number): Promise<boolean> {
    while (this.pendingBytes < wanted && !this.ended) {
      const next = await this.chunks.next();
      if (next.done) this.ended = true;
      else if (next.value.length > 0) {
        this.pending.push(next.value);
        this.pendingBytes += next.value.length;
      }
    }
    return this.pendingBytes >= wanted;
  }

  /** Up to `max` bytes (fewer at the end of the stream; empty at its end). */
  async some(max: number): Promise<Buffer> {
    await this.fill(1);
    if (this.pendingBytes === 0) return Buffer.alloc(0);
    const first = this.pending[0]!;
    const taken = first.length <= max ? first : first.subarray(0, max);
    if (taken === first) this.pending.shift();
    else this.pending[0] = first.subarray(max);
    this.pendingBytes -= taken.length;
    this.position += taken.length;
    return taken;
  }

  /** Exactly `length` bytes, or null when the stream ends first. */
  async exactly(length: number): Promise<Buffer | null> {
    if (!(await this.fill(length))) return null;
    const parts: Buffer[] = [];
    let left = length;
    while (left > 0) {
      const part = await this.some(left);
      parts.push(part);
      left -= part.length;
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }
}

export interface TarEntry {
  /** The name as stored (after pax and GNU long names). */
  name: string;
  type: 'file' | 'directory';
  size: number;
  /** Offset of the entry's data in the (uncompressed) tar stream. */
  dataOffset: number;
}

function field(block: Buffer, start: number, length: number): string {
  const raw = block.subarray(start, start + length);
  const end = raw.indexOf(0);
  return raw.subarray(0, end < 0 ? length : end).toString('utf8');
}

function numeric(block: Buffer, start: number, length: number, what: string, fail: (message: string) => never): number {
  if (block[start]! & 0x80) {
    // GNU base-256: big-endian, the top bit of the first byte marks it.
    let value = block[start]! & 0x7f;
    for (let i = start + 1; i < start + length; i++) value = value * 256 + block[i]!;
    if (!Number.isSafeInteger(value)) fail(`${what} out of range`);
    return value;
  }
  const text = field(block, start, length).trim();
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) fail(`${what} is not an octal number`);
  return parseInt(text, 8);
}

/** A decimal byte count as tar writes one: digits only (Number() would take "0x200", "1e3", " 512 "). */
function decimal(text: string): number | undefined {
  const value = /^[0-9]+$/.test(text) ? Number(text) : NaN;
  return Number.isSafeInteger(value) ? value : undefined;
}

function parsePax(data: Buffer, fail: (message: string) => never): Map<string, string> {
  const records = new Map<string, string>();
  let at = 0;
  while (at < data.length) {
    const space = data.indexOf(0x20, at);
    if (space < 0) fail('pax header is malformed');
    const length = decimal(data.subarray(at, space).toString('ascii'));
    if (length === undefined || length <= space - at || at + length > data.length) fail('pax record length is malformed');
    const record = data.subarray(space + 1, at + length - 1).toString('utf8');
    const equals = record.indexOf('=');
    if (equals < 0) fail('pax record has no "="');
    records.set(record.slice(0, equals), record.slice(equals + 1));
    at += length;
  }
  return records;
}

/**
 * The entries of a tar stream. The caller reads each file's data from `reader`
 * (exactly `size` bytes) before asking for the next entry; `skipData` helps.
 * Links, devices, FIFOs and unknown entry types are refused.
 */
export async function* tarEntries(reader: TarSource, archivePath: string): AsyncGenerator<TarEntry> {
  let paxPath: string | undefined;
  let paxSize: number | undefined;
  let longName: string | undefined;
  const fail = (message: string): never => {
    throw new Qcow2Error('BAD_ARCHIVE', message, { path: archivePath, offset: reader.position });
  };
  for (;;) {
    const headerOffset = reader.position;
    const block = await reader.exactly(BLOCK);
    if (!block) fail('the archive ends without its end-of-archive blocks (truncated?)');
    if (block!.every((byte) => byte === 0)) return;
    const storedText = field(block!, 148, 8).trim();
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : block![i]!;
    if (!/^[0-7]+$/.test(storedText) || sum !== parseInt(storedText, 8)) throw new Qcow2Error('BAD_ARCHIVE', 'tar header checksum mismatch (damaged or not a tar archive)', { path: archivePath, offset: headerOffset });
    const type = String.fromCharCode(block![156]!);
    const size = paxSize ?? numeric(block!, 124, 12, 'entry size', fail);
    // Only POSIX ustar has the prefix field; GNU tar keeps other things there.
    const prefix = block!.subarray(257, 263).toString('latin1') === 'ustar\u0000' ? field(block!, 345, 155) : '';
    const name = paxPath ?? longName ?? (prefix ? `${prefix}/${field(block!, 0, 100)}` : field(block!, 0, 100));
    if (type === 'x' || type === 'g' || type === 'L') {
      if (size > (type === 'L' ? MAX_NAME_BYTES : MAX_PAX_BYTES)) fail(`${type === 'L' ? 'long name' : 'pax header'} of ${size} bytes is too large`);
      const data = await reader.exactly(size + padding(size));
      if (!data) fail('the archive ends inside an entry (truncated?)');
      if (type === 'x') {
        const records = parsePax(data!.subarray(0, size), fail);
        if (records.has('path')) paxPath = records.get('path');
        // POSIX: an empty value removes the record, and the ustar size field counts.
        if (records.get('size')) {
          const value = decimal(records.get('size')!);
          if (value === undefined) fail('pax size is not a byte count');
          paxSize = value;
        }
      } else if (type === 'L') {
        longName = field(data!, 0, size);
      }
      continue;
    }
    paxPath = undefined;
    paxSize = undefined;
    longName = undefined;
    if (type === '0' || type === '\0' || type === '7') yield { name, type: 'file', size, dataOffset: reader.position };
    else if (type === '5') yield { name, type: 'directory', size: 0, dataOffset: reader.position };
    else {
      const kinds: Record<string, string> = { '1': 'a hard link', '2': 'a symbolic link', '3': 'a character device', '4': 'a block device', '6': 'a FIFO' };
      throw new Qcow2Error('BAD_ARCHIVE', `entry "${name}" is ${kinds[type] ?? `of unknown type "${type}"`}; a snapshot archive holds regular files only`, { path: archivePath, offset: headerOffset });
    }
  }
}

/**
 * Passes an entry's `size` bytes to `sink` (or drops them without one), then
 * drops the padding after them.
 */
export async function entryData(reader: TarSource, size: number, archivePath: string, sink?: ByteSink): Promise<void> {
  if (!sink && reader.skip) {
    if (!(await reader.skip(size + padding(size)))) throw new Qcow2Error('BAD_ARCHIVE', 'the archive ends inside an entry (truncated?)', { path: archivePath, offset: reader.position });
    return;
  }
  let left = size + padding(size);
  while (left > 0) {
    const part = await reader.some(Math.min(left, 1 << 22));
    if (part.length === 0) throw new Qcow2Error('BAD_ARCHIVE', 'the archive ends inside an entry (truncated?)', { path: archivePath, offset: reader.position });
    const dataLeft = left - padding(size);
    if (sink && dataLeft > 0) await sink.write(part.length <= dataLeft ? part : part.subarray(0, dataLeft));
    left -= part.length;
  }
}

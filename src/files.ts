import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { ioError } from './errors';
import { native } from './native';

/**
 * The name every output is written under until it is complete, then renamed to `target`:
 * hidden, in the same folder (so the rename is atomic), unique to this process and call.
 */
function temporaryPathFor(target: string): string {
  return nodePath.join(nodePath.dirname(target), `.${nodePath.basename(target)}.qcow2img-${process.pid}-${randomBytes(4).toString('hex')}.tmp`);
}

/** statfs f_type of the filesystems whose files behave unlike a disk's (linux/magic.h). */
const filesystemMagic = { tmpfs: 0x01021994, hugetlbfs: 0x958458f6 } as const;

/**
 * Which of those filesystems holds `path`, if one does. Both keep files in memory (no unwritten
 * extents, nothing for fallocate to gain); hugetlbfs takes no write(), only mappings.
 */
export async function memoryFilesystem(path: string): Promise<keyof typeof filesystemMagic | undefined> {
  const stats = await fs.statfs(path).catch(() => undefined);
  return (Object.keys(filesystemMagic) as (keyof typeof filesystemMagic)[]).find((name) => filesystemMagic[name] === stats?.type);
}

/** A file's XXH3-64 as snapshot.json records it: 16 hex digits. */
export function xxh3Hex(hash: bigint): string {
  return hash.toString(16).padStart(16, '0');
}

/** Opens `path` for reading; a failure is an IO_ERROR naming it, saying `what` could not be done. */
export async function openToRead(path: string, what: string): Promise<fs.FileHandle> {
  return fs.open(path, 'r').catch((error) => {
    throw ioError(error, path, what);
  });
}

/** fsync of a folder, so that a rename in it survives a crash. */
async function syncFolder(folder: string): Promise<void> {
  const handle = await fs.open(folder, 'r').catch(() => undefined);
  if (!handle) return;
  await handle.sync().catch(() => {});
  await handle.close();
}

/** What the errors of a PendingFile say, each followed by the OS's reason. */
export interface PendingMessages {
  /** Default: "cannot create the file". */
  create?: string;
  /** Default: "cannot flush the file". */
  flush?: string;
  /** Default: "cannot rename the finished file into place". */
  rename?: string;
}

/**
 * An output written under its temporary name (temporaryPathFor) and renamed into place only
 * when complete, so that a file under the final name is always a whole one. `commit` flushes,
 * closes, renames and syncs the folder; `abandon` closes and removes what was written. Errors
 * name the final path.
 */
export class PendingFile {
  private readonly extra: fs.FileHandle[] = [];
  private state: 'open' | 'closed' | 'committed' = 'open';

  private constructor(
    /** The final name. */
    readonly target: string,
    /** Where the bytes are written until `commit`. */
    readonly temporary: string,
    /** The descriptor it was created with. */
    readonly handle: fs.FileHandle,
    private readonly messages: PendingMessages,
  ) {}

  /**
   * Creates the temporary file (exclusively: `open` must fail on an existing name; default
   * `wx`, mode 0644).
   */
  static async create(target: string, messages: PendingMessages = {}, open: (temporary: string) => Promise<fs.FileHandle> = (t) => fs.open(t, 'wx', 0o644)): Promise<PendingFile> {
    const temporary = temporaryPathFor(target);
    const handle = await open(temporary).catch((error) => {
      throw ioError(error, target, messages.create ?? 'cannot create the file');
    });
    return new PendingFile(target, temporary, handle, messages);
  }

  /** Another descriptor of the temporary file (O_DIRECT, a buffered tail), closed with it. */
  async openAgain(flags: number): Promise<fs.FileHandle> {
    const handle = await fs.open(this.temporary, flags);
    this.extra.push(handle);
    return handle;
  }

  /** fdatasync of every descriptor: what was written is on the disk. Never retried into a success. */
  async flush(): Promise<void> {
    try {
      for (const handle of [...this.extra, this.handle]) await handle.datasync();
    } catch (error) {
      throw ioError(error, this.target, this.messages.flush ?? 'cannot flush the file');
    }
  }

  /** Flushes (unless the caller just did, with nothing written since), closes and renames the file into place. */
  async commit(options: { flushed?: boolean } = {}): Promise<void> {
    if (!options.flushed) await this.flush();
    await this.close().catch((error) => {
      throw ioError(error, this.target, this.messages.flush ?? 'cannot flush the file');
    });
    await renameIntoPlace(this.temporary, this.target, this.messages.rename ?? 'cannot rename the finished file into place');
    this.state = 'committed';
  }

  /** Closes and removes the temporary file; nothing is left behind. After a commit, nothing is done. */
  async abandon(): Promise<void> {
    if (this.state === 'committed') return;
    await this.close().catch(() => {});
    await fs.unlink(this.temporary).catch(() => {});
  }

  private async close(): Promise<void> {
    if (this.state !== 'open') return;
    this.state = 'closed';
    for (const handle of this.extra) await handle.close().catch(() => {});
    await this.handle.close();
  }
}

/**
 * A folder built under its temporary name and renamed into place when complete (a snapshot
 * bundle): `commit` syncs it and renames it, `abandon` removes it with all it holds.
 */
export class PendingFolder {
  private committed = false;

  private constructor(
    readonly target: string,
    readonly temporary: string,
  ) {}

  static async create(target: string, what: string): Promise<PendingFolder> {
    const temporary = temporaryPathFor(target);
    await fs.mkdir(temporary).catch((error) => {
      throw ioError(error, target, what);
    });
    return new PendingFolder(target, temporary);
  }

  /**
   * Syncs the folder (the names of the files in it) and renames it into place. With `replace`,
   * a folder already there steps aside first (a rename cannot go over a non-empty folder) and
   * is removed once the new one is in place.
   */
  async commit(replace = false): Promise<void> {
    await syncFolder(this.temporary);
    if (!replace) {
      await renameIntoPlace(this.temporary, this.target, 'cannot rename the finished folder into place');
    } else {
      const aside = temporaryPathFor(this.target);
      await fs.rename(this.target, aside).catch((error) => {
        throw ioError(error, this.target, 'cannot move the old folder aside');
      });
      await renameIntoPlace(this.temporary, this.target, 'cannot rename the finished folder into place').catch(async (error: unknown) => {
        await fs.rename(aside, this.target).catch(() => {});
        throw error;
      });
      await fs.rm(aside, { recursive: true, force: true });
    }
    this.committed = true;
  }

  async abandon(): Promise<void> {
    if (!this.committed) await fs.rm(this.temporary, { recursive: true, force: true }).catch(() => {});
  }
}

/** The last step of every output: the rename, then the folder's fsync so that it survives a crash. */
async function renameIntoPlace(temporary: string, target: string, what: string): Promise<void> {
  await fs.rename(temporary, target).catch((error) => {
    throw ioError(error, target, what);
  });
  await syncFolder(nodePath.dirname(target));
}

/** The next data (SEEK_DATA) or hole (SEEK_HOLE) of a file at or after `offset`, or -1 when there is none (ENXIO); throws when the file system cannot say. */
export type Seek = (what: 'data' | 'hole', offset: number) => number;

/**
 * Seek over an open file's descriptor. It remembers the last data range it found: batches walk a
 * file in order, and on tmpfs a SEEK_HOLE from inside a data range walks the page cache to the
 * range's end each time (16 batches of a fully allocated 1 GiB RAM file: 75 ms, against none).
 */
export function seekOf(fd: number): Seek {
  let known: [from: number, to: number] | undefined;
  return (what, offset) => {
    if (known && offset >= known[0] && offset < known[1]) return what === 'data' ? offset : known[1];
    if (what === 'data') return native().seekData(fd, offset);
    const hole = native().seekHole(fd, offset);
    if (hole > offset) known = [offset, hole];
    return hole;
  };
}

/**
 * The data ranges of `[start, end)` of a file, sorted; the rest is holes (past the file's end too).
 * An answer that cannot be trusted (an error, an offset that goes back, data with no hole after it,
 * as when the file shrinks meanwhile) makes everything from there on data: reading a hole gives the
 * same zeros, so only the cost of reading it differs.
 */
export function dataRanges(seek: Seek, start: number, end: number): [from: number, to: number][] {
  const ranges: [number, number][] = [];
  // Everything before `position` is known.
  let position = start;
  try {
    while (position < end) {
      const data = seek('data', position);
      if (data < 0 || data >= end) return ranges;
      if (data < position) break;
      position = data;
      const hole = seek('hole', data);
      if (hole <= data) break;
      ranges.push([data, Math.min(hole, end)]);
      position = hole;
    }
  } catch {
    // A file system that cannot say where its holes are: the rest is read.
  }
  if (position < end) ranges.push([position, end]);
  return ranges;
}

/**
 * The units of `[start, start + count · unitSize)` that lie wholly inside holes of a file, one byte
 * a unit (1 = hole), or undefined when there are none. File systems report holes in their own
 * blocks, which may be smaller than a unit: a unit with any data in it is read.
 */
export function holeUnits(seek: Seek, start: number, count: number, unitSize: number): Uint8Array | undefined {
  let holes: Uint8Array | undefined;
  const mark = (from: number, to: number) => {
    for (let u = Math.ceil((from - start) / unitSize); start + (u + 1) * unitSize <= to; u++) (holes ??= new Uint8Array(count))[u] = 1;
  };
  let position = start;
  for (const [from, to] of dataRanges(seek, start, start + count * unitSize)) {
    mark(position, from);
    position = to;
  }
  mark(position, start + count * unitSize);
  return holes;
}

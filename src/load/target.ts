/**
 * Where `load` writes: a new regular file (temporary name, renamed when done), a
 * region of an existing file (--offset, --partition of a disk image), or a block
 * device (whole, a partition, or an offset), with every refusal made before the
 * first byte is written.
 */
import { constants as fsConstants } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { Qcow2Error, ioError } from '../errors';
import { memoryFilesystem, openToRead, PendingFile } from '../files';
import { holdLocks, type HeldLocks } from '../locks';
import { native, ZeroMode } from '../native';
import type { Image } from '../qcow2/image';
import { findPartition, type Partition } from './partitions';
import { deviceInUse, majorMinor, type SourceFile, sysfsFolder } from './safety';

export type DirectMode = 'auto' | 'always' | 'never';

/** Where in the target `load` writes, and what it may replace. */
export interface TargetOptions {
  /** Replace an existing regular file (default: refuse). */
  overwrite?: boolean;
  /** O_DIRECT where the target allows it (auto, the default), required, or never. */
  direct?: DirectMode;
  /** Write into partition N of the disk or disk image (GPT or MBR). */
  partition?: number;
  /** Write starting at this byte of the device or file. */
  offset?: number;
  /** Write to a device even when it is mounted or in use (never when it holds /). */
  force?: boolean;
  /** The target already reads as zeros: skip zero ranges instead of zeroing them. */
  targetIsZero?: boolean;
  /** Notices such as "O_DIRECT refused, writing buffered". */
  onNotice?: (message: string) => void;
}

export interface OpenTarget {
  kind: 'file' | 'file-region' | 'device';
  /** The target as the user named it (resolved). */
  path: string;
  fd: number;
  tailFd: number;
  /** Target byte where guest offset 0 lands. */
  base: number;
  alignment: number;
  zeroMode: number;
  direct: boolean;
  /**
   * A new file written with O_DIRECT: its data ranges are allocated before they are written (see
   * CopyTarget.preallocate). Not on tmpfs or hugetlbfs: in memory there are no unwritten extents to
   * gain, fallocate only takes the pages early, and a load stops its jobs for it at every span.
   */
  preallocate: boolean;
  /** Opens the target for reading back what was written. */
  openForVerify(): Promise<{ fd: number; alignment: number; close(): Promise<void> }>;
  /** fdatasync: the bytes written so far are on the device. */
  flush(): Promise<void>;
  /** Flushes and, for new files, renames into place. */
  finish(): Promise<void>;
  /** Closes and removes what a new file left behind. */
  abort(): Promise<void>;
}

const O_DIRECT = fsConstants.O_DIRECT;
/** O_EXCL on a block device: the kernel refuses it while mounted or claimed. */
const O_EXCL = fsConstants.O_EXCL;

async function openMaybeDirect(path: string, flags: number, mode: DirectMode, notice: (m: string) => void, why: string): Promise<{ handle: fs.FileHandle; direct: boolean }> {
  if (mode !== 'never') {
    try {
      return { handle: await fs.open(path, flags | O_DIRECT, 0o644), direct: true };
    } catch (error) {
      if (mode === 'always' || (error as NodeJS.ErrnoException).code !== 'EINVAL') throw error;
      notice(`${path}: O_DIRECT refused (${why}); writing through the page cache`);
    }
  }
  return { handle: await fs.open(path, flags, 0o644), direct: false };
}

/**
 * Refuses an offset that is not a byte position, and an offset given with a partition; before
 * anything is opened (loadMany checks every target's with it before the first is written).
 */
export function checkPlacement(options: Pick<TargetOptions, 'partition' | 'offset'>, path: string): void {
  const { offset } = options;
  if (offset !== undefined && (!Number.isSafeInteger(offset) || offset < 0)) {
    throw new Qcow2Error('INVALID_ARGUMENT', `offset ${offset} is not a non-negative integer`, { path });
  }
  if (offset !== undefined && options.partition !== undefined) {
    throw new Qcow2Error('INVALID_ARGUMENT', '--offset and --partition cannot be combined', { path });
  }
}

export async function openTarget(image: Image, targetPath: string, options: TargetOptions): Promise<OpenTarget> {
  const path = nodePath.resolve(targetPath);
  checkPlacement(options, path);
  const stats = await fs.stat(path).catch(() => undefined);
  if (stats && image.files.some((f) => f.device === stats.dev && f.inode === stats.ino)) {
    throw new Qcow2Error('TARGET_IS_SOURCE', 'target is the image itself or one of its backing or data files', { path });
  }
  if (stats?.isBlockDevice()) return openDevice(image, path, stats.rdev, options);
  if (stats && !stats.isFile()) {
    throw new Qcow2Error('NOT_A_REGULAR_FILE', `target is ${stats.isDirectory() ? 'a folder' : 'neither a regular file nor a block device'}`, { path });
  }
  // A symbolic link is written through, as cp and dd do: the file it names is the target (and
  // the temporary name and the rename are beside that file); the link stays as it is.
  const file = await throughLinks(path);
  if (options.partition !== undefined || options.offset !== undefined) return openFileRegion(image, file, stats !== undefined, options);
  if (stats && !options.overwrite) {
    throw new Qcow2Error('TARGET_EXISTS', 'target exists; pass --overwrite (overwrite: true) to replace it', { path });
  }
  return openNewFile(image, file, stats !== undefined, options);
}

/** The file `path` names through any symbolic links: its real path, or for a dangling link the (new) file the link names. */
async function throughLinks(path: string): Promise<string> {
  let current = path;
  for (let hops = 0; hops < 40; hops++) {
    const stats = await fs.lstat(current).catch(() => undefined);
    if (!stats?.isSymbolicLink()) break;
    const real = await fs.realpath(current).catch(() => undefined);
    if (real) return real;
    current = nodePath.resolve(nodePath.dirname(current), await fs.readlink(current));
  }
  return current;
}

async function openNewFile(image: Image, path: string, exists: boolean, options: TargetOptions): Promise<OpenTarget> {
  let direct = false;
  let inMemory = false;
  // The file being replaced may be a running VM's disk: refused, and held until the rename so
  // that none starts on it meanwhile.
  const locks = exists ? await holdLocks(path, 'write') : undefined;
  const release = () => locks?.close().catch(() => {});
  let file: PendingFile | undefined;
  let tail: fs.FileHandle;
  try {
    file = await PendingFile.create(path, { create: 'cannot create the target file', flush: 'flushing the target failed' }, async (temporary) => {
      const opened = await openMaybeDirect(temporary, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, options.direct ?? 'auto', options.onNotice ?? (() => {}), 'filesystem');
      direct = opened.direct;
      inMemory = (await memoryFilesystem(temporary)) !== undefined;
      return opened.handle;
    });
    tail = await file.openAgain(fsConstants.O_WRONLY);
    // A new file of the exact size reads zeros everywhere: zero ranges stay holes.
    await file.handle.truncate(image.virtualSize);
  } catch (error) {
    await file?.abandon();
    await release();
    throw ioError(error, path, 'cannot create the target file');
  }
  const pending = file;
  return {
    kind: 'file',
    path,
    fd: pending.handle.fd,
    tailFd: tail.fd,
    base: 0,
    alignment: direct ? Math.max(native().directIoAlignment(pending.handle.fd), 512) : 0,
    zeroMode: ZeroMode.Skip,
    direct,
    preallocate: direct && !inMemory,
    openForVerify: () => openReadBack(pending.temporary, direct, image.virtualSize, 0),
    flush: () => pending.flush(),
    async finish() {
      try {
        await pending.commit();
      } finally {
        await release();
      }
    },
    async abort() {
      await pending.abandon();
      await release();
    },
  };
}

async function flushBoth(main: fs.FileHandle, tail: fs.FileHandle, path: string): Promise<void> {
  try {
    await tail.datasync();
    await main.datasync();
  } catch (error) {
    // A failed fdatasync leaves the data in doubt; it is never retried into a success.
    throw ioError(error, path, 'flushing the target failed');
  }
}

async function openReadBack(path: string, direct: boolean, length: number, base: number) {
  const { handle, direct: readDirect } = await openMaybeDirect(path, fsConstants.O_RDONLY, direct ? 'auto' : 'never', () => {}, 'read-back');
  // Without O_DIRECT a read-back could be served from the page cache and prove nothing.
  if (!readDirect) native().dropCache(handle.fd, base, length);
  const stats = await handle.stat();
  const alignment = readDirect ? (stats.isBlockDevice() ? native().blockDeviceInfo(handle.fd).logicalBlockSize : Math.max(native().directIoAlignment(handle.fd), 512)) : 0;
  return { fd: handle.fd, alignment, close: () => handle.close() };
}

/** Shared by file regions and devices: a target written in place, flushed at the end. */
interface InPlace {
  kind: 'file-region' | 'device';
  path: string;
  /** Writes whole O_DIRECT units (or everything, buffered). */
  main: fs.FileHandle;
  /** Buffered: the bytes of a last partial unit. */
  tail: fs.FileHandle;
  /** Held open to keep the device's exclusive claim when `main` is not the descriptor that made it. */
  claim?: fs.FileHandle;
  /** QEMU's write locks on the target, held until the last flush. */
  locks: HeldLocks;
  base: number;
  alignment: number;
  zeroMode: number;
  /** The image's virtual size. */
  length: number;
  /** The file did not exist before this load: removed again if the load fails. */
  created?: boolean;
}

function inPlaceTarget({ kind, path, main, tail, claim, locks, base, alignment, zeroMode, length, created = false }: InPlace): OpenTarget {
  const direct = alignment !== 0;
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await tail.close().catch(() => {});
    await main.close().catch(() => {});
    await claim?.close().catch(() => {});
    await locks.close().catch(() => {});
  };
  return {
    kind,
    path,
    fd: main.fd,
    tailFd: tail.fd,
    base,
    alignment,
    zeroMode,
    direct,
    preallocate: false,
    openForVerify: () => openReadBack(path, direct, length, base),
    flush: () => flushBoth(main, tail, path),
    async finish() {
      await flushBoth(main, tail, path);
      await close();
    },
    async abort() {
      await close();
      // A file this load created holds nothing of the user's: do not leave a partial disk behind.
      if (created) await fs.unlink(path).catch(() => {});
    },
  };
}

async function openFileRegion(image: Image, path: string, exists: boolean, options: TargetOptions): Promise<OpenTarget> {
  const notice = options.onNotice ?? (() => {});
  if (options.partition !== undefined && !exists) {
    throw new Qcow2Error('INVALID_ARGUMENT', 'target does not exist; --partition needs a disk image', { path });
  }
  let base = options.offset ?? 0;
  if (options.partition !== undefined) {
    const handle = await openToRead(path, 'cannot open the target file');
    try {
      const size = (await handle.stat()).size;
      const partition = await findPartition(handle, size, options.partition, path);
      if (partition.sizeBytes < image.virtualSize) {
        throw new Qcow2Error('TARGET_TOO_SMALL', `partition ${options.partition} (${partition.sizeBytes} bytes) is smaller than the image's virtual size (${image.virtualSize} bytes)`, { path });
      }
      base = partition.start;
    } finally {
      await handle.close();
    }
  }
  const flags = fsConstants.O_WRONLY;
  let main: fs.FileHandle | undefined;
  let tail: fs.FileHandle | undefined;
  let locks: HeldLocks | undefined;
  let created = false;
  try {
    if (!exists) {
      // Made here, exclusively (O_EXCL), before the O_DIRECT open: only a file this load made
      // is removed if it fails.
      await (await fs.open(path, 'wx', 0o644)).close();
      created = true;
    }
    locks = await holdLocks(path, 'write');
    const direct = options.direct ?? 'auto';
    const opened = await openMaybeDirect(path, flags, direct, notice, 'filesystem');
    main = opened.handle;
    let alignment = opened.direct ? Math.max(native().directIoAlignment(main.fd), 512) : 0;
    if (alignment && base % alignment !== 0) {
      if (direct === 'always') throw new Qcow2Error('INVALID_ARGUMENT', `offset ${base} is not a multiple of the O_DIRECT unit ${alignment}`, { path });
      notice(`${path}: offset ${base} is not a multiple of ${alignment}; writing through the page cache`);
      await main.close();
      main = await fs.open(path, flags);
      alignment = 0;
    }
    tail = await fs.open(path, fsConstants.O_WRONLY);
    // The region must read as the whole disk, trailing zeros included: holes punched
    // (KEEP_SIZE) or skipped past the end would leave the file short.
    if ((await main.stat()).size < base + image.virtualSize) await main.truncate(base + image.virtualSize);
    // Old bytes in the region must read back as zeros where the image has none.
    const zeroMode = options.targetIsZero ? ZeroMode.Skip : ZeroMode.PunchHole;
    return inPlaceTarget({ kind: 'file-region', path, main, tail, locks, base, alignment, zeroMode, length: image.virtualSize, created });
  } catch (error) {
    await tail?.close().catch(() => {});
    await main?.close().catch(() => {});
    await locks?.close().catch(() => {});
    if (created) await fs.unlink(path).catch(() => {});
    throw ioError(error, path, 'cannot open the target file');
  }
}

/**
 * The partition's own device node (sda2, nvme0n1p2), when the kernel made one
 * for exactly the extent the table gives; else the whole disk and an offset.
 */
async function partitionNode(diskRdev: number, partition: Partition): Promise<{ node: string; rdev: number } | undefined> {
  const sysfs = await sysfsFolder(diskRdev);
  if (!sysfs) return undefined;
  try {
    for (const entry of await fs.readdir(sysfs)) {
      const read = (file: string) => fs.readFile(nodePath.join(sysfs, entry, file), 'utf8').then((v) => v.trim(), () => undefined);
      // sysfs counts start and size in 512-byte units whatever the sector size.
      if ((await read('partition')) === String(partition.number) && Number(await read('start')) * 512 === partition.start && Number(await read('size')) * 512 === partition.sizeBytes) {
        // A /dev name can be stale (a static /dev, a reused minor): the node must be the device
        // sysfs names, or the load would write, and the safety checks look, somewhere else.
        const node = `/dev/${entry}`;
        const stats = await fs.stat(node).catch(() => undefined);
        if (stats?.isBlockDevice() && majorMinor(stats.rdev) === (await read('dev'))) return { node, rdev: stats.rdev };
      }
    }
  } catch {
    // no sysfs: fall back to the whole disk and an offset
  }
  return undefined;
}

/**
 * A loop device (or a partition of one) that writes through its backing file's page cache
 * (losetup without --direct-io=on): its kernel worker copies every block on the cores a load
 * decodes on (zstd image, measured: 1.86 s against 1.05 s with direct I/O).
 */
async function bufferedLoop(rdev: number): Promise<boolean> {
  const sysfs = await sysfsFolder(rdev);
  if (!sysfs) return false;
  for (const folder of [sysfs, nodePath.dirname(sysfs)]) {
    const dio = await fs.readFile(nodePath.join(folder, 'loop', 'dio'), 'utf8').catch(() => undefined);
    if (dio !== undefined) return dio.trim() === '0';
  }
  return false;
}

async function openDevice(image: Image, path: string, rdev: number, options: TargetOptions): Promise<OpenTarget> {
  const notice = options.onNotice ?? (() => {});
  let devicePath = path;
  let deviceRdev = rdev;
  let base = options.offset ?? 0;
  let limit: number | undefined;
  let what = 'device';
  const probe = await openToRead(path, 'cannot open the target device');
  try {
    const device = native().blockDeviceInfo(probe.fd);
    limit = device.sizeBytes;
    if (options.partition !== undefined) {
      const partition = await findPartition(probe, device.sizeBytes, options.partition, path, device.logicalBlockSize);
      what = `partition ${options.partition}`;
      if (partition.sizeBytes < image.virtualSize) {
        throw new Qcow2Error('TARGET_TOO_SMALL', `${what} (${partition.sizeBytes} bytes) is smaller than the image's virtual size (${image.virtualSize} bytes)`, { path });
      }
      const node = await partitionNode(rdev, partition);
      if (node) {
        devicePath = node.node;
        deviceRdev = node.rdev;
        base = 0;
        limit = partition.sizeBytes;
      } else {
        base = partition.start;
        limit = partition.start + partition.sizeBytes;
      }
    }
  } finally {
    await probe.close();
  }
  if (base + image.virtualSize > limit) {
    throw new Qcow2Error('TARGET_TOO_SMALL', `${what} (${limit - base} bytes from offset ${base}) is smaller than the image's virtual size (${image.virtualSize} bytes)`, { path });
  }
  const claimed = await claimDevice(devicePath, deviceRdev, options, image.files);
  const locks = claimed.locks;
  let main: fs.FileHandle = claimed.handle;
  let claim: fs.FileHandle | undefined;
  let tail: fs.FileHandle | undefined;
  const direct = options.direct ?? 'auto';
  try {
    // Said once the device is ours to write: a refusal stays one line.
    if (await bufferedLoop(rdev)) notice(`${path}: a loop device without direct I/O: its writes are copied through the backing file's page cache, which slows loads (losetup --direct-io=on makes it faster)`);
    let alignment = claimed.direct ? native().blockDeviceInfo(main.fd).logicalBlockSize : 0;
    if (alignment && base % alignment !== 0) {
      if (direct === 'always') throw new Qcow2Error('INVALID_ARGUMENT', `offset ${base} is not a multiple of the logical block size ${alignment}`, { path });
      notice(`${devicePath}: offset ${base} is not a multiple of ${alignment}; writing through the page cache`);
      // The descriptor that claimed the device stays open (a moment without it would let a
      // mount in); the writes go through a buffered one.
      claim = main;
      main = await fs.open(devicePath, fsConstants.O_WRONLY);
      alignment = 0;
    }
    // A buffered descriptor for the bytes of a last partial block; not exclusive, since the
    // first one already holds the claim.
    tail = await fs.open(devicePath, fsConstants.O_WRONLY);
    const zeroMode = options.targetIsZero ? ZeroMode.Skip : ZeroMode.ZeroOut;
    return inPlaceTarget({ kind: 'device', path: devicePath, main, tail, ...(claim ? { claim } : {}), locks, base, alignment, zeroMode, length: image.virtualSize });
  } catch (error) {
    await tail?.close().catch(() => {});
    await main.close().catch(() => {});
    await claim?.close().catch(() => {});
    await locks.close().catch(() => {});
    throw ioError(error, devicePath, 'cannot open the target device');
  }
}

/**
 * Opens a block device for writing after every refusal: locked by QEMU (never overridden),
 * mounted, swap, held, open for writing elsewhere, the root disk, backed by one of
 * `sourceFiles`. Exclusive (O_EXCL) unless forced, so the kernel refuses a device that is
 * mounted or claimed at this moment. The caller closes `locks` after its last flush.
 */
export async function claimDevice(
  devicePath: string,
  rdev: number,
  options: Pick<TargetOptions, 'force' | 'direct' | 'onNotice'>,
  sourceFiles: readonly SourceFile[],
): Promise<{ handle: fs.FileHandle; direct: boolean; locks: HeldLocks }> {
  const locks = await holdLocks(devicePath, 'write');
  try {
    const use = await deviceInUse(devicePath, rdev, sourceFiles);
    if (use.holdsRoot) throw new Qcow2Error('TARGET_IN_USE', `refusing to write: ${devicePath} holds the root filesystem`, { path: devicePath });
    if (use.reason && !options.force) {
      throw new Qcow2Error('TARGET_IN_USE', `refusing to write: ${devicePath} is ${use.reason}; pass --force to write anyway`, { path: devicePath });
    }
    return { ...(await openClaimed(devicePath, options)), locks };
  } catch (error) {
    await locks.close();
    throw error;
  }
}

async function openClaimed(devicePath: string, options: Pick<TargetOptions, 'force' | 'direct' | 'onNotice'>): Promise<{ handle: fs.FileHandle; direct: boolean }> {
  const exclusive = options.force ? 0 : O_EXCL;
  try {
    return await openMaybeDirect(devicePath, fsConstants.O_WRONLY | exclusive, options.direct ?? 'auto', options.onNotice ?? (() => {}), 'device');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EBUSY') {
      throw new Qcow2Error('TARGET_IN_USE', 'refusing to write: the kernel reports the device busy (mounted or claimed)', { path: devicePath, cause: error });
    }
    throw ioError(error, devicePath, 'cannot open the target device');
  }
}

/**
 * Loading an image into a regular file: written under a temporary name in the
 * target's folder, zeros left as holes, flushed, then renamed into place.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import * as nodePath from 'node:path';
import { Qcow2Error, ioError } from '../errors';
import { native, ZeroMode } from '../native';
import type { Image } from '../qcow2/image';
import { copyImage, type CopyOptions } from './copy';

export type DirectMode = 'auto' | 'always' | 'never';

export interface LoadToFileOptions extends CopyOptions {
  /** Replace an existing file (default: refuse). */
  overwrite?: boolean;
  /** O_DIRECT: where the filesystem allows it (auto, the default), required, or never. */
  direct?: DirectMode;
  /** Called with notices (O_DIRECT refused, ...). */
  onNotice?: (message: string) => void;
}

export interface LoadResult {
  target: string;
  virtualSize: number;
  dataBytes: number;
  zeroBytes: number;
  seconds: number;
  direct: boolean;
}

async function openDirect(path: string, flags: number, mode: DirectMode, notice: (m: string) => void): Promise<{ handle: fs.FileHandle; direct: boolean }> {
  if (mode !== 'never') {
    try {
      return { handle: await fs.open(path, flags | fsConstants.O_DIRECT, 0o644), direct: true };
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (mode === 'always' || code !== 'EINVAL') throw error;
      notice(`${path}: the filesystem refuses O_DIRECT; writing through the page cache`);
    }
  }
  return { handle: await fs.open(path, flags, 0o644), direct: false };
}

export async function loadToFile(image: Image, targetPath: string, options: LoadToFileOptions = {}): Promise<LoadResult> {
  const target = nodePath.resolve(targetPath);
  const existing = await fs.stat(target).catch(() => undefined);
  if (existing) {
    if (!existing.isFile()) {
      throw new Qcow2Error('INVALID_ARGUMENT', 'target exists and is not a regular file', { path: target });
    }
    if (image.files.some((f) => f.device === existing.dev && f.inode === existing.ino)) {
      throw new Qcow2Error('TARGET_IS_SOURCE', 'target is the image itself or one of its backing or data files', { path: target });
    }
    if (!options.overwrite) {
      throw new Qcow2Error('TARGET_EXISTS', 'target exists; pass --overwrite (overwrite: true) to replace it', { path: target });
    }
  }
  const temporary = nodePath.join(nodePath.dirname(target), `.${nodePath.basename(target)}.qcow2img-${process.pid}-${randomBytes(4).toString('hex')}.tmp`);
  const notice = options.onNotice ?? (() => {});
  let main: fs.FileHandle | undefined;
  let tail: fs.FileHandle | undefined;
  let renamed = false;
  try {
    let direct: boolean;
    try {
      ({ handle: main, direct } = await openDirect(temporary, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, options.direct ?? 'auto', notice));
      tail = await fs.open(temporary, fsConstants.O_WRONLY);
      await main.truncate(image.virtualSize);
    } catch (error) {
      throw ioError(error, target, 'cannot create the target file');
    }
    const alignment = direct ? Math.max(native().directIoAlignment(main.fd), 512) : 0;
    const copied = await copyImage(image, { fd: main.fd, tailFd: tail.fd, base: 0, alignment, zeroMode: ZeroMode.Skip }, options);
    options.onProgress?.({ phase: 'flush', bytesDone: image.virtualSize, bytesTotal: image.virtualSize, dataBytes: copied.dataBytes, zeroBytes: copied.zeroBytes, elapsedSeconds: copied.seconds, bytesPerSecond: 0, etaSeconds: 0 });
    try {
      await tail.datasync();
      await main.datasync();
    } catch (error) {
      throw ioError(error, target, 'flushing the target failed');
    }
    await tail.close();
    tail = undefined;
    await main.close();
    main = undefined;
    await fs.rename(temporary, target).catch((error) => {
      throw ioError(error, target, 'cannot rename the finished file into place');
    });
    renamed = true;
    return { target, virtualSize: image.virtualSize, dataBytes: copied.dataBytes, zeroBytes: copied.zeroBytes, seconds: copied.seconds, direct };
  } finally {
    await tail?.close().catch(() => {});
    await main?.close().catch(() => {});
    if (!renamed) await fs.unlink(temporary).catch(() => {});
  }
}

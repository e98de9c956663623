/** Small fixtures that tests of several features share. */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'vitest';
import { Qcow2Error } from '../../src/index';
import { qemuImg, qemuIo } from './qemu';

/** The bytes of abImage's disk. */
export const abBytes = Buffer.alloc(1024 * 1024, 0xab);

/** A 1 MiB qcow2 image of 0xab bytes, written by qemu-img and qemu-io, in `dir`. */
export function abImage(dir: string): string {
  const image = path.join(dir, 'image.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', image, '1M']);
  qemuIo(image, ['write -P 0xab 0 1M']);
  return image;
}

/** A disk image of `size` bytes holding old data (0x5c) everywhere. */
export function oldDisk(dir: string, name: string, size: number): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, Buffer.alloc(size, 0x5c));
  return file;
}

export function sha(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** The Qcow2Error `promise` rejects with; fails the test when it resolves or rejects otherwise. */
export async function failure(promise: Promise<unknown>): Promise<Qcow2Error> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error, 'expected a refusal').toBeInstanceOf(Qcow2Error);
  return error as Qcow2Error;
}

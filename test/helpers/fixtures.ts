/** Small fixtures that tests of several features share. */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'vitest';
import { Qcow2Error } from '../../src/index';
import { partition } from './loop';
import { firstDifference, qemuImg, qemuIo } from './qemu';

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

/** A 24 MiB disk image file of old bytes (0x5c) with a GPT of two 8 MiB partitions (sfdisk), in `dir`. */
export function gptDisk(dir: string, name: string): string {
  const disk = oldDisk(dir, name, 24 * 1024 * 1024);
  partition(disk, 'label: gpt\n,8M\n,8M\n');
  return disk;
}

/** `file` holds what it held `before` with the raw disk file `expected` at byte `at`, and not a byte else changed. */
export function expectPlaced(file: string, before: Buffer, at: number, expected: string): void {
  const want = Buffer.from(before);
  fs.readFileSync(expected).copy(want, at);
  const actual = fs.readFileSync(file);
  expect(actual.length, file).toBe(want.length);
  expect(firstDifference(actual, want), `first byte of ${file} that differs`).toBe(-1);
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

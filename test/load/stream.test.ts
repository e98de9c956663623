/**
 * loadToStream (`load IMAGE -`): the disk in order into a slow stream; backpressure keeps what
 * was read ahead of what was written to a few chunks, and the bytes equal qemu-img convert's.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { open } from '../../src/qcow2/open';
import { loadToStream } from '../../src/load/stream';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-stream-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));
const image = path.join(work, 'disk.qcow2');
const raw = path.join(work, 'disk.raw');

beforeAll(() => {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '24M']);
});

it('a slow reader: at most a few chunks are read ahead of what was written; the bytes are qemu-img convert\'s', async () => {
  execFileSync('qemu-io', ['-c', 'write -P 7 1M 3M', '-c', 'write -z 8M 1M', '-c', 'write -c -P 3 20M 1M', image], { stdio: 'ignore' });
  execFileSync('qemu-img', ['convert', '-O', 'raw', image, raw]);
  const opened = await open(image);
  const chunk = 1 << 20;
  let readEnd = 0;
  let written = 0;
  let aheadMost = 0;
  const read = opened.read.bind(opened);
  opened.read = async (buffer, offset) => {
    const n = await read(buffer, offset);
    readEnd = Math.max(readEnd, offset + n);
    aheadMost = Math.max(aheadMost, readEnd - written);
    return n;
  };
  const hash = createHash('sha256');
  const slow = new Writable({
    highWaterMark: chunk,
    write(data: Buffer, _encoding, done) {
      hash.update(data);
      setTimeout(() => {
        written += data.length;
        done();
      }, 5);
    },
  });
  const progress: number[] = [];
  try {
    const result = await loadToStream(opened, slow, { chunkSize: chunk, onProgress: (p) => progress.push(p.bytesDone) });
    expect(result.virtualSize).toBe(24 << 20);
    expect(result.dataBytes + result.zeroBytes).toBe(24 << 20);
    // 3 MiB of 7s and 1 MiB of compressed 3s; the rest, zero clusters and unallocated, reads as zeros.
    expect(result.dataBytes).toBe(4 << 20);
  } finally {
    await opened.close();
  }
  expect(hash.digest('hex')).toBe(createHash('sha256').update(fs.readFileSync(raw)).digest('hex'));
  // The readable's buffer, the transform's and the writable's: a few chunks, never the disk.
  expect(aheadMost).toBeLessThanOrEqual(5 * chunk);
  expect(progress.at(-1)).toBe(24 << 20);
});

it('cancelled: CANCELLED naming the stream, and the stream is not written to the end', async () => {
  const controller = new AbortController();
  let written = 0;
  const sink = new Writable({
    write(data: Buffer, _encoding, done) {
      written += data.length;
      if (written >= 2 << 20) controller.abort();
      done();
    },
  });
  await expect(loadToStream(image, sink, { chunkSize: 1 << 20, signal: controller.signal, name: 'sink' })).rejects.toMatchObject({ code: 'CANCELLED', path: 'sink' });
  expect(written).toBeLessThan(24 << 20);
});

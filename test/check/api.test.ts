/**
 * check() as the other long operations: a signal (CANCELLED naming the image) and onProgress
 * (guest bytes whose tables were walked, then 'done'); a folder is NOT_A_REGULAR_FILE.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { check } from '../../src/check/index';
import type { Progress } from '../../src/jobs';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-check-api-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));
const image = path.join(work, 'disk.qcow2');

beforeAll(() => {
  // 512-byte clusters: an L2 table covers 32 KiB, so 16 MiB of data is 512 tables to walk.
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', image, '16M']);
  execFileSync('qemu-io', ['-c', 'write -P 1 0 16M', image], { stdio: 'ignore' });
});

it('onProgress: bytes rise to the virtual size, the last event is done', async () => {
  const events: Progress[] = [];
  const result = await check(image, { onProgress: (p) => events.push(p) });
  expect(result.corruptions + result.leaks + result.checkErrors).toBe(0);
  expect(events.length).toBeGreaterThan(0);
  expect(events.at(-1)).toMatchObject({ phase: 'done', bytesDone: 16 << 20, bytesTotal: 16 << 20 });
  for (const event of events.slice(0, -1)) expect(event.phase).toBe('check');
  for (let i = 1; i < events.length; i++) expect(events[i]!.bytesDone).toBeGreaterThanOrEqual(events[i - 1]!.bytesDone);
});

it('signal: aborted before or during the walk, CANCELLED naming the image, no done event', async () => {
  const before = new AbortController();
  before.abort();
  await expect(check(image, { signal: before.signal })).rejects.toMatchObject({ code: 'CANCELLED', path: image });
  const during = new AbortController();
  const events: Progress[] = [];
  const checking = check(image, { signal: during.signal, onProgress: (p) => events.push(p) });
  // Aborted while the file is being opened: the first table's step sees it.
  during.abort();
  await expect(checking).rejects.toMatchObject({ code: 'CANCELLED', path: image });
  expect(events.filter((e) => e.phase === 'done')).toEqual([]);
});

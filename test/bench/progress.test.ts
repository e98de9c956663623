/** bench's progress events: a run bounded by time reports a total that tracks what it will write. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { bench, type Progress } from '../../src/index';

const MiB = 1024 * 1024;
let dir: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-bench-progress-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

it('a run bounded by --time: bytesTotal is bytes done plus the pace over the time left, eta the time left', async () => {
  const events: Progress[] = [];
  const result = await bench(path.join(dir, 'timed.bin'), { size: 16 * MiB, blockSize: MiB, queueDepth: 4, time: 1.2, onProgress: (p) => events.push(p) });
  expect(events.length).toBeGreaterThan(1);
  for (const event of events) {
    expect(event.bytesTotal).toBeGreaterThanOrEqual(event.bytesDone);
    // What the run can write in its time at the pace seen, not a placeholder total.
    expect(event.bytesTotal).toBeLessThanOrEqual(event.bytesDone + Math.ceil(event.bytesPerSecond * 1.2));
    expect(event.etaSeconds).toBeDefined();
    expect(event.etaSeconds!).toBeCloseTo(Math.max(0, 1.2 - event.elapsedSeconds), 6);
  }
  expect(events.at(-1)!.bytesDone).toBeLessThanOrEqual(result.bytes);
});

it('a run bounded by size: bytesTotal is the size', async () => {
  const events: Progress[] = [];
  // Slow enough for a few 250 ms samples: small blocks at queue depth 1.
  await bench(path.join(dir, 'sized.bin'), { size: 64 * MiB, blockSize: 4096, queueDepth: 1, onProgress: (p) => events.push(p) });
  expect(events.length).toBeGreaterThan(0);
  for (const event of events) expect(event.bytesTotal).toBe(64 * MiB);
});

/**
 * A copy's plan cut into batches: runs cut at a batch's edges keep pointing at the same bytes,
 * a remote image's batches are sized by the bytes they fetch, and they cover the disk in order,
 * each span's runs (for preallocation) carried by its first batch.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { open } from '../../src/index';
import { fetchedBatchEnd, plannedBatches, slicePlanRuns } from '../../src/load/copy';
import { PlanKind, planRunFields } from '../../src/native';
import { MiB, qemuImg, qemuIo } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-batches-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

const rows = (runs: Float64Array) => Array.from({ length: runs.length / planRunFields }, (_, i) => Array.from(runs.subarray(i * planRunFields, (i + 1) * planRunFields)));

describe('slicePlanRuns', () => {
  // [guest, length, kind, source, host, compressedBytes, offsetInCluster]
  const runs = Float64Array.from([
    [0, 100, PlanKind.Zero, 0, 0, 0, 0],
    [100, 300, PlanKind.Data, 1, 5000, 0, 0],
    [400, 50, PlanKind.Compressed, 0, 9000, 700, 10],
  ].flat());

  it('cuts runs at the edges: a data run further into its file, a compressed one further into its cluster', () => {
    expect(rows(slicePlanRuns(runs, 50, 420))).toEqual([
      [50, 50, PlanKind.Zero, 0, 0, 0, 0],
      [100, 300, PlanKind.Data, 1, 5000, 0, 0],
      [400, 20, PlanKind.Compressed, 0, 9000, 700, 10],
    ]);
    expect(rows(slicePlanRuns(runs, 250, 430))).toEqual([
      [250, 150, PlanKind.Data, 1, 5150, 0, 0],
      [400, 30, PlanKind.Compressed, 0, 9000, 700, 10],
    ]);
    expect(rows(slicePlanRuns(runs, 420, 1000))).toEqual([[420, 30, PlanKind.Compressed, 0, 9000, 700, 30]]);
    expect(rows(slicePlanRuns(runs, 450, 1000))).toEqual([]);
  });
});

describe('fetchedBatchEnd', () => {
  const window = 1000;
  const onWindows = (bytes: number) => Math.ceil(bytes / window) * window;
  // [guest, length, kind, source, host, compressedBytes, offsetInCluster]
  const runs = Float64Array.from([
    [0, 5000, PlanKind.Zero, 0, 0, 0, 0],
    [5000, 4000, PlanKind.Compressed, 0, 100, 700, 0],
    [9000, 2500, PlanKind.Compressed, 0, 800, 900, 0],
    [11500, 1500, PlanKind.Zero, 0, 0, 0, 0],
    [13000, 20000, PlanKind.Data, 0, 2000, 0, 0],
  ].flat());

  it('counts a compressed run its stored bytes and a zero run none, and ends on the first window edge after the run that reaches the budget', () => {
    expect(fetchedBatchEnd(runs, 0, 40000, 700, onWindows)).toBe(9000);
    // The second cluster ends at 11500, inside a window.
    expect(fetchedBatchEnd(runs, 0, 40000, 1500, onWindows)).toBe(12000);
  });

  it('cuts a data run where the budget runs out, rounded up to a window, and counts only its part after the start', () => {
    expect(fetchedBatchEnd(runs, 0, 40000, 1600 + 4500, onWindows)).toBe(18000);
    expect(fetchedBatchEnd(runs, 18000, 40000, 2500, onWindows)).toBe(21000);
    // A budget that runs out exactly at a data run's end.
    expect(fetchedBatchEnd(runs, 18000, 40000, 15000, onWindows)).toBe(33000);
  });

  it('never passes the limit, and ends there when the budget is not reached', () => {
    expect(fetchedBatchEnd(runs, 18000, 30000, 100000, onWindows)).toBe(30000);
    expect(fetchedBatchEnd(runs, 0, 4000, 100, onWindows)).toBe(4000);
    expect(fetchedBatchEnd(runs, 0, 10000, 1500, onWindows)).toBe(10000);
    expect(fetchedBatchEnd(new Float64Array(0), 0, 5000, 100, onWindows)).toBe(5000);
  });
});

describe('plannedBatches', () => {
  it('puts every batch edge on the copy window grid, whatever the window', async () => {
    const file = path.join(work, 'grid.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', file, '1500M']);
    qemuIo(file, ['write -P 0x11 0 200M']);
    const image = await open(file);
    try {
      const edges: number[] = [];
      for await (const batch of plannedBatches(image, true, 5 * MiB)) edges.push(batch.end);
      // 12 and 48 MiB of data, rounded up to 5 MiB windows; past the data, at most 4 x 48 MiB of
      // guest (195 MiB on the windows) a batch, to the end of each span (1 GiB on the windows).
      expect(edges).toEqual([15, 65, 115, 165, 360, 555, 750, 945, 1025, 1220, 1415, 1500].map((m) => m * MiB));
    } finally {
      await image.close();
    }
  });

  it('of a remote 2.5 GiB disk: batches that fetch up to 12 MiB, then 48 MiB, and cover at most 4x that in guest bytes (zeros fetch nothing), cut from 1 GiB spans, the runs of each span on its first batch, the cut runs adding up to the span', async () => {
    const file = path.join(work, 'disk.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', file, '2560M']);
    qemuIo(file, ['write -P 0x11 1000M 100M', 'write -P 0x22 2047M 2M']);
    const image = await open(file);
    try {
      const events: string[] = [];
      const copyRuns = image.copyRuns.bind(image);
      image.copyRuns = (start, end) => {
        events.push(`plan ${start / MiB}`);
        return copyRuns(start, end);
      };
      const spans: Float64Array[] = [];
      const pieces: Float64Array[][] = [];
      for await (const batch of plannedBatches(image, true, MiB)) {
        if (batch.spanRuns) {
          spans.push(batch.spanRuns);
          pieces.push([]);
          events.push(`span ${spans.length - 1}`);
        }
        events.push(`batch ${batch.start / MiB}-${batch.end / MiB}`);
        pieces[Math.floor(batch.start / (1024 * MiB))]!.push(batch.plan.runs);
        for (const [guest, length] of rows(batch.plan.runs)) {
          expect(guest).toBeGreaterThanOrEqual(batch.start);
          expect(guest! + length!).toBeLessThanOrEqual(batch.end);
        }
      }
      // Data at 1000-1100 MiB and 2047-2049 MiB. Over zeros a batch ends after 4 x its fetch
      // budget in guest bytes (48 MiB first, then 192); the second span's first batch ends where
      // it has fetched 48 MiB. A span is planned when its predecessor's second batch is asked for
      // (while the first is written); its runs come with its own first batch, only there.
      expect(events).toEqual([
        'plan 0', 'span 0', 'batch 0-48', 'plan 1024', 'batch 48-240', 'batch 240-432', 'batch 432-624', 'batch 624-816', 'batch 816-1008', 'batch 1008-1024',
        'span 1', 'batch 1024-1072', 'plan 2048', 'batch 1072-1264', 'batch 1264-1456', 'batch 1456-1648', 'batch 1648-1840', 'batch 1840-2032', 'batch 2032-2048',
        'span 2', 'batch 2048-2240', 'batch 2240-2432', 'batch 2432-2560',
      ]);
      // Put back together, the batches' runs cover each span as its own plan does, byte for byte.
      const bytesOf = (all: Float64Array[]) => all.flatMap(rows).filter((r) => r[2] !== PlanKind.Zero).map((r) => [r[0]!, r[1]!, r[4]!]);
      const merged = (list: number[][]) => list.reduce<number[][]>((out, [g, l, h]) => {
        const last = out.at(-1);
        if (last && last[0]! + last[1]! === g && last[2]! + last[1]! === h) last[1]! += l!;
        else out.push([g!, l!, h!]);
        return out;
      }, []);
      spans.forEach((span, i) => expect(merged(bytesOf(pieces[i]!))).toEqual(merged(bytesOf([span]))));
    } finally {
      await image.close();
    }
  });
});

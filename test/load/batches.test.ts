/**
 * A copy's plan cut into batches: runs cut at a batch's edges keep pointing at the same bytes,
 * and the batches of a remote image cover the disk in order, each span's runs (for
 * preallocation) carried by its first batch.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { open } from '../../src/index';
import { plannedBatches, slicePlanRuns } from '../../src/load/copy';
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

describe('plannedBatches', () => {
  it('puts every batch edge on the copy window grid, whatever the window', async () => {
    const file = path.join(work, 'grid.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', file, '1500M']);
    const image = await open(file);
    try {
      const edges: number[] = [];
      for await (const batch of plannedBatches(image, true, 5 * MiB)) edges.push(batch.end);
      expect(edges.slice(0, 3)).toEqual([15 * MiB, 65 * MiB, 115 * MiB]);
      expect(edges.at(-1)).toBe(1500 * MiB);
      expect(edges.slice(0, -1).filter((e) => e % (5 * MiB) !== 0)).toEqual([]);
    } finally {
      await image.close();
    }
  });

  it('of a remote-sized 2.5 GiB disk: a 12 MiB batch, then 48 MiB ones cut from 1 GiB spans, the runs of each span on its first batch, the cut runs adding up to the span', async () => {
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
      const batches = events.filter((e) => e.startsWith('batch'));
      expect(batches[0]).toBe('batch 0-12');
      expect(batches[1]).toBe('batch 12-60');
      expect(batches.at(-1)).toBe('batch 2528-2560');
      expect(batches.length).toBe(1 + Math.ceil((1024 - 12) / 48) + Math.ceil(1024 / 48) + Math.ceil(512 / 48));
      // A span is planned when its predecessor's second batch is asked for (while the first is
      // written), and its runs come with its own first batch, only there.
      expect(events.slice(0, 3)).toEqual(['plan 0', 'span 0', 'batch 0-12']);
      expect(events.slice(3, 5)).toEqual(['plan 1024', 'batch 12-60']);
      expect(events.slice(events.indexOf('batch 1024-1072') - 1, events.indexOf('batch 1024-1072') + 3)).toEqual(['span 1', 'batch 1024-1072', 'plan 2048', 'batch 1072-1120']);
      expect(events.indexOf('batch 2048-2096')).toBe(events.indexOf('span 2') + 1);
      expect(events.filter((e) => e.startsWith('plan'))).toEqual(['plan 0', 'plan 1024', 'plan 2048']);
      expect(events.filter((e) => e.startsWith('span'))).toEqual(['span 0', 'span 1', 'span 2']);
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

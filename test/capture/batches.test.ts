/**
 * `capture` of a source larger than one native job (256 MiB of guest bytes) and than one L2
 * table's span: data lying across both boundaries, at the first and last byte, must come out
 * exactly as `qemu-img compare` and `check` see the source. The source is sparse, so only the
 * few MiB of data are read and written.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { type CaptureOptions, capture } from '../../src/index';
import { noise } from '../helpers/damage';

const KiB = 1024;
const MiB = 1024 * KiB;
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-capture-batches-'));

afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

function qemuImg(args: readonly string[]): { status: number | null; stdout: string; stderr: string } {
  const ran = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (ran.error) throw ran.error;
  return { status: ran.status, stdout: ran.stdout, stderr: ran.stderr };
}

/** 600 MiB + 4608 bytes: data across 256 MiB (a job boundary) and 512 MiB (a job and an L2 span with 64 KiB clusters). */
function makeSource(): string {
  const file = path.join(work, 'source.raw');
  const size = 600 * MiB + 4608;
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, 'r+');
  try {
    const pieces: [number, number][] = [
      [0, 100 * KiB],
      [256 * MiB - 70 * KiB, 200 * KiB],
      [300 * MiB + 12345, 3 * MiB],
      [512 * MiB - 1, 2],
      [512 * MiB + 64 * KiB, 64 * KiB],
      [size - 3000, 3000],
    ];
    for (const [at, length] of pieces) fs.writeSync(fd, noise(`batches/${at}`, length), 0, length, at);
  } finally {
    fs.closeSync(fd);
  }
  return file;
}

const source = makeSource();

const variants: { name: string; options: CaptureOptions }[] = [
  { name: 'uncompressed', options: {} },
  { name: 'zstd', options: { compress: 'zstd' } },
  { name: 'zlib, 4 KiB clusters', options: { compress: 'zlib', clusterSize: 4 * KiB } },
  { name: 'uncompressed, 2 MiB clusters', options: { clusterSize: 2 * MiB } },
];

describe('capture across native jobs and L2 tables', () => {
  for (const variant of variants) {
    it(`${variant.name}: qemu-img check is clean and compare says identical`, async () => {
      const out = path.join(work, `${variant.name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`);
      const result = await capture(source, out, variant.options);
      const check = qemuImg(['check', '--output=json', out]);
      expect(check.status, check.stderr).toBe(0);
      const report = JSON.parse(check.stdout) as Record<string, unknown>;
      expect(report['check-errors']).toBe(0);
      expect(report['leaks'] ?? 0).toBe(0);
      expect(report['corruptions'] ?? 0).toBe(0);
      const compare = qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', source, out]);
      expect(compare.stdout + compare.stderr).toContain('Images are identical');
      expect(compare.status).toBe(0);
      // Only the data was stored: the sparse gaps did not become clusters.
      expect(result.fileSize).toBeLessThan(32 * MiB);
      fs.rmSync(out);
    });
  }
});

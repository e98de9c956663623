/** Loop devices made by a test, and only those: created on files the test owns, detached after. */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';

export interface LoopDevice {
  device: string;
  file: string;
  detach(): void;
}

/** Why loop tests cannot run here, or undefined when they can. */
export function loopUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'loop device tests need root';
  try {
    execFileSync('losetup', ['--version'], { stdio: 'ignore' });
  } catch {
    return 'losetup is not installed';
  }
  return undefined;
}

export function attachLoop(file: string): LoopDevice {
  const device = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
  let attached = true;
  return {
    device,
    file,
    detach() {
      if (!attached) return;
      attached = false;
      execFileSync('losetup', ['-d', device]);
    },
  };
}

/** A zero-filled (sparse) file of `size` bytes with a loop device over it. */
export function makeLoop(file: string, size: number): LoopDevice {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  return attachLoop(file);
}

/** Writes `sfdiskScript` as the partition table of a device or file. */
export function partition(target: string, sfdiskScript: string): void {
  execFileSync('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', target], { input: sfdiskScript, stdio: ['pipe', 'ignore', 'ignore'] });
}

/** Partitions as sfdisk sees them: number -> start and size in bytes. */
export function partitionsOf(target: string): Map<number, { start: number; size: number }> {
  const dump = JSON.parse(execFileSync('sfdisk', ['--json', target], { encoding: 'utf8' })) as {
    partitiontable: { sectorsize?: number; partitions: { node: string; start: number; size: number }[] };
  };
  const sector = dump.partitiontable.sectorsize ?? 512;
  const result = new Map<number, { start: number; size: number }>();
  for (const p of dump.partitiontable.partitions) {
    const number = Number(/(\d+)$/.exec(p.node)![1]);
    result.set(number, { start: p.start * sector, size: p.size * sector });
  }
  return result;
}

export function readRange(path: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(path, 'r');
  try {
    const buffer = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, buffer, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return buffer.subarray(0, done);
  } finally {
    fs.closeSync(fd);
  }
}

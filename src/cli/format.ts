/** Human-readable output for the CLI. */
import type { ImageInfo, MapEntry } from '../qcow2/image';
import type { Progress } from '../load/progress';

export function humanBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 2 : value < 100 ? 1 : 0).replace(/\.0+$|(\.\d*?)0+$/, '$1')} ${units[unit]}`;
}

export function formatInfo(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanBytes(info.virtualSize)} (${info.virtualSize} bytes)`,
    `disk size: ${humanBytes(info.allocatedBytes)}`,
  ];
  if (info.clusterSize !== undefined) lines.push(`cluster_size: ${info.clusterSize}`);
  if (info.backingFile !== undefined) lines.push(`backing file: ${info.backingFile}`);
  if (info.backingFormat !== undefined) lines.push(`backing file format: ${info.backingFormat}`);
  if (info.snapshots && info.snapshots.length > 0) {
    lines.push('Snapshot list:');
    lines.push('ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT');
    for (const s of info.snapshots) {
      const clock = new Date(Math.floor(s.vmClockNsec / 1e6)).toISOString().slice(11, 23);
      lines.push(`${s.id.padEnd(9)} ${s.name.padEnd(17)} ${humanBytes(s.vmStateSize).padStart(7)} ${s.date.replace('T', ' ').slice(0, 19)} ${clock} ${s.icount < 0 ? '--' : s.icount}`);
    }
  }
  if (info.format === 'qcow2') {
    lines.push('Format specific information:');
    lines.push(`    compat: ${info.version === 2 ? '0.10' : '1.1'}`);
    lines.push(`    compression type: ${info.compressionType}`);
    lines.push(`    lazy refcounts: ${info.lazyRefcounts}`);
    lines.push(`    refcount bits: ${info.refcountBits}`);
    lines.push(`    corrupt: ${info.corrupt}`);
    lines.push(`    extended l2: ${info.extendedL2}`);
    if (info.dataFile !== undefined) {
      lines.push(`    data file: ${info.dataFile}`);
      lines.push(`    data file raw: ${info.dataFileRaw}`);
    }
    if (info.dirty) lines.push('    dirty: true');
    if (info.encrypted) lines.push('    encrypted: true');
  }
  return lines.join('\n');
}

export function formatMap(entries: MapEntry[]): string {
  const header = `${'Start'.padEnd(20)}${'Length'.padEnd(20)}${'Depth'.padEnd(7)}${'Present'.padEnd(9)}${'Zero'.padEnd(6)}${'Data'.padEnd(6)}Offset / file`;
  const rows = entries.map(
    (e) =>
      `${('0x' + e.start.toString(16)).padEnd(20)}${('0x' + e.length.toString(16)).padEnd(20)}${String(e.depth).padEnd(7)}${String(e.present).padEnd(9)}${String(e.zero).padEnd(6)}${String(e.data).padEnd(6)}${e.offset !== undefined ? `0x${e.offset.toString(16)} ${e.filename}` : ''}`,
  );
  return [header, ...rows].join('\n');
}

export function progressLine(p: Progress): string {
  const percent = p.bytesTotal > 0 ? (100 * p.bytesDone) / p.bytesTotal : 100;
  const width = 30;
  const filled = Math.round((percent / 100) * width);
  const bar = '#'.repeat(filled) + '-'.repeat(width - filled);
  const eta = p.etaSeconds !== undefined && Number.isFinite(p.etaSeconds) ? `ETA ${Math.ceil(p.etaSeconds)}s` : '';
  return `[${bar}] ${percent.toFixed(1).padStart(5)}% ${humanBytes(p.bytesDone)}/${humanBytes(p.bytesTotal)} ${humanBytes(p.bytesPerSecond)}/s ${eta} ${p.phase}`;
}

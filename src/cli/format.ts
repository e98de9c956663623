/** Human-readable output for the CLI. */
import type { ImageInfo, MapEntry } from '../qcow2/image';
import type { EncryptionInfo } from '../qcow2/luks';
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

/**
 * C's printf("%.Nf"): the double's exact value rounded, an exact tie to even. toFixed rounds the
 * exact value too but a tie up, so only an exact tie (its exact digits past the last kept are 5
 * then zeros) needs a look.
 */
function cFixed(value: number, decimals: number): string {
  const [whole = '', fraction = ''] = value.toFixed(100).split('.');
  if (/^50*$/.test(fraction.slice(decimals))) {
    const kept = decimals > 0 ? fraction[decimals - 1]! : whole.at(-1)!;
    if (Number(kept) % 2 === 0) return decimals > 0 ? `${whole}.${fraction.slice(0, decimals)}` : whole;
  }
  return value.toFixed(decimals);
}

/** C's printf("%0.3g"). */
function cG3(value: number): string {
  if (value === 0) return '0';
  const [mantissa, exponentText] = value.toExponential(2).split('e');
  const exponent = Number(exponentText);
  if (exponent < -4 || exponent >= 3) {
    return `${mantissa!.replace(/\.?0+$/, '')}e${exponent < 0 ? '-' : '+'}${String(Math.abs(exponent)).padStart(2, '0')}`;
  }
  const fixed = cFixed(value, 2 - exponent);
  return fixed.includes('.') ? fixed.replace(/\.?0+$/, '') : fixed;
}

/** A size as qemu-img prints it (QEMU's size_to_str): the next unit from 1000 of one, 3 significant digits. */
export function qemuSize(bytes: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  // frexp's exponent of bytes / (1000 / 1024), minus one, is floor(log2) of it.
  const scaled = bytes / (1000 / 1024);
  let exponent = 0;
  while (exponent < 1100 && 2 ** exponent <= scaled) exponent++;
  const unit = Math.min(suffixes.length - 1, Math.trunc((exponent - 1) / 10));
  return `${cG3(bytes / 2 ** (unit * 10))} ${suffixes[unit]}B`;
}

/** QEMU's path_combine: a relative backing name taken from the folder of the image's name as given. */
export function combinedPath(imageName: string, backing: string): string {
  if (backing.startsWith('/')) return backing;
  const slash = imageName.lastIndexOf('/');
  return slash < 0 ? backing : imageName.slice(0, slash + 1) + backing;
}

/**
 * `qemu-img info [--backing-chain]`'s human output, line for line. QEMU names a backing file
 * by joining its name to the folder of the name its child was given by: so do these lines.
 */
export function formatInfoChain(infos: readonly ImageInfo[]): string {
  const names = chainNames(infos);
  return infos.map((info, i) => formatInfo(info, names[i]!)).join('\n\n');
}

/** The name qemu-img gives each file of a chain: the image's as given, each backing file's joined to its child's folder. */
export function chainNames(infos: readonly ImageInfo[]): string[] {
  const names: string[] = [];
  infos.forEach((info, i) => names.push(i === 0 ? info.filename : combinedPath(names[i - 1]!, infos[i - 1]!.backingFile ?? info.filename)));
  return names;
}

function formatInfo(info: ImageInfo, name: string): string {
  const lines = [
    `image: ${name}`,
    `file format: ${info.format}`,
    `virtual size: ${qemuSize(info.virtualSize)} (${info.virtualSize} bytes)`,
    `disk size: ${info.allocatedBytes === undefined ? 'unavailable' : qemuSize(info.allocatedBytes)}`,
  ];
  if (info.encrypted) lines.push('encrypted: yes');
  if (info.clusterSize !== undefined) lines.push(`cluster_size: ${info.clusterSize}`);
  if (info.dirty) lines.push('cleanly shut down: no');
  if (info.backingFile !== undefined) {
    const actual = combinedPath(name, info.backingFile);
    lines.push(`backing file: ${info.backingFile}${actual !== info.backingFile ? ` (actual path: ${actual})` : ''}`);
  }
  if (info.backingFormat !== undefined) lines.push(`backing file format: ${info.backingFormat}`);
  if (info.snapshots && info.snapshots.length > 0) {
    lines.push('Snapshot list:');
    lines.push(`${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`);
    for (const s of info.snapshots) {
      const seconds = Math.floor(s.vmClockNsec / 1e9);
      const two = (n: number) => String(n).padStart(2, '0');
      const clock = `${two(Math.floor(seconds / 3600))}:${two(Math.floor(seconds / 60) % 60)}:${two(seconds % 60)}.${String(Math.floor(s.vmClockNsec / 1e6) % 1000).padStart(3, '0')}`;
      // Local time, as QEMU prints it.
      const d = new Date(s.dateSec * 1000);
      const date = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
      const icount = s.icount < 0 ? '' : String(s.icount);
      lines.push(`${s.id.padEnd(9)} ${s.name.padEnd(16)} ${qemuSize(s.vmStateSize).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`);
    }
  }
  if (info.format === 'qcow2') {
    // Version 2 has no feature bits: qemu-img leaves out what they would say.
    lines.push('Format specific information:');
    lines.push(`    compat: ${info.version === 2 ? '0.10' : '1.1'}`);
    lines.push(`    compression type: ${info.compressionType}`);
    if (info.version !== 2) lines.push(`    lazy refcounts: ${info.lazyRefcounts}`);
    lines.push(`    refcount bits: ${info.refcountBits}`);
    // qemu-img's order: the encryption block sits between the data file's two lines.
    if (info.dataFile !== undefined) lines.push(`    data file: ${info.dataFile}`);
    if (info.encryption) lines.push(...encryptionLines(info.encryption));
    if (info.dataFile !== undefined) lines.push(`    data file raw: ${info.dataFileRaw}`);
    if (info.version !== 2) {
      lines.push(`    corrupt: ${info.corrupt}`);
      lines.push(`    extended l2: ${info.extendedL2}`);
    }
  }
  return lines.join('\n');
}

/** The `encrypt:` block of qemu-img info's format specific information. */
function encryptionLines(encryption: EncryptionInfo): string[] {
  const lines = ['    encrypt:'];
  if (encryption.format === 'aes') return [...lines, '        format: aes'];
  lines.push(
    `        ivgen alg: ${encryption.ivgenAlg}`,
    `        hash alg: ${encryption.hashAlg}`,
    `        cipher alg: ${encryption.cipherAlg}`,
    `        uuid: ${encryption.uuid}`,
  );
  if (encryption.ivgenHashAlg !== undefined) lines.push(`        ivgen hash alg: ${encryption.ivgenHashAlg}`);
  lines.push('        format: luks', `        cipher mode: ${encryption.cipherMode}`, '        slots:');
  encryption.slots.forEach((slot, index) => {
    lines.push(`            [${index}]:`, `                active: ${slot.active}`);
    if (slot.iters !== undefined) lines.push(`                iters: ${slot.iters}`);
    lines.push(`                key offset: ${slot.keyOffset}`);
    if (slot.stripes !== undefined) lines.push(`                stripes: ${slot.stripes}`);
  });
  lines.push(`        payload offset: ${encryption.payloadOffset}`, `        master key iters: ${encryption.masterKeyIters}`);
  return lines;
}

export function formatMap(entries: MapEntry[]): string {
  const header = `${'Start'.padEnd(20)}${'Length'.padEnd(20)}${'Depth'.padEnd(7)}${'Present'.padEnd(9)}${'Zero'.padEnd(6)}${'Data'.padEnd(6)}Offset / file`;
  const rows = entries.map(
    (e) =>
      `${('0x' + e.start.toString(16)).padEnd(20)}${('0x' + e.length.toString(16)).padEnd(20)}${String(e.depth).padEnd(7)}${String(e.present).padEnd(9)}${String(e.zero).padEnd(6)}${String(e.data).padEnd(6)}${e.offset !== undefined ? `0x${e.offset.toString(16)} ${e.filename}` : ''}`,
  );
  return [header, ...rows].join('\n');
}

/** Percent of an event's bytes done (100 when there are none to do). */
function percentDone(p: Progress): number {
  return p.bytesTotal > 0 ? (100 * p.bytesDone) / p.bytesTotal : 100;
}

/** How far an event is: " 42.0% 1.2 GiB/2.0 GiB". */
function doneText(p: Progress): string {
  return `${percentDone(p).toFixed(1).padStart(5)}% ${humanBytes(p.bytesDone)}/${humanBytes(p.bytesTotal)}`;
}

/**
 * One line of progress that fits `columns` (the terminal's width) without wrapping: the bar
 * takes what the words leave; under 40 columns only the percentage and what fits of the rest.
 */
export function progressLine(p: Progress, columns = 80): string {
  const width = Math.max(1, columns - 1);
  const percent = percentDone(p);
  const eta = p.etaSeconds !== undefined && Number.isFinite(p.etaSeconds) ? ` ETA ${Math.ceil(p.etaSeconds)}s` : '';
  const words = `${doneText(p)} ${humanBytes(p.bytesPerSecond)}/s${eta} ${p.phase}`;
  const barWidth = Math.min(30, width - words.length - 3);
  if (columns < 40 || barWidth < 10) return words.slice(0, width);
  const filled = Math.round((percent / 100) * barWidth);
  return `[${'#'.repeat(filled)}${'-'.repeat(barWidth - filled)}] ${words}`;
}

/**
 * The progress of a many-target load: one line per target (its latest event, in the order given),
 * each fitting `columns`: the target's path (its end, when long), then what it is doing. Past
 * `rows` lines, the last says how many more there are and how they stand.
 */
export function targetProgressLines(events: readonly Progress[], columns = 80, rows = 24): string[] {
  const width = Math.max(1, columns - 1);
  const shown = events.length > rows ? events.slice(0, Math.max(0, rows - 1)) : events;
  const nameWidth = Math.max(8, Math.min(Math.max(...shown.map((e) => (e.target ?? '').length)), Math.floor(width / 2)));
  const lines = shown.map((p) => {
    const name = p.target ?? '';
    const fitted = name.length > nameWidth ? `...${name.slice(name.length - nameWidth + 3)}` : name.padEnd(nameWidth);
    return `${fitted}  ${targetState(p)}`.slice(0, width);
  });
  const rest = events.slice(shown.length);
  if (rest.length > 0) {
    const count = (phase: Progress['phase']) => rest.filter((p) => p.phase === phase).length;
    lines.push(`... and ${rest.length} more: ${count('done')} done, ${count('failed')} failed`.slice(0, width));
  }
  return lines;
}

/** writing or verifying with its percent and bytes, flushing, done, or failed and why. */
function targetState(p: Progress): string {
  const counts = () => `${doneText(p)}${p.bytesPerSecond > 0 ? ` ${humanBytes(p.bytesPerSecond)}/s` : ''}`;
  switch (p.phase) {
    case 'write':
      return `writing   ${counts()}`;
    case 'verify':
      return `verifying ${counts()}`;
    case 'flush':
      return 'flushing';
    case 'done':
      return 'done';
    case 'failed': {
      // The message names its file first; the line already names the target.
      const message = p.error?.message ?? 'failed';
      const prefix = p.error?.path !== undefined ? `${p.error.path}: ` : undefined;
      return `failed: ${prefix && message.startsWith(prefix) ? message.slice(prefix.length) : message}`;
    }
    default:
      return p.phase;
  }
}

/** n·100.0/d as C's printf("%0.2f") prints it (qemu-img check's percentages). */
export function percent(n: number, d: number): string {
  return cFixed((n * 100) / d, 2);
}

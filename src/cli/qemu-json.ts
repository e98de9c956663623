/**
 * `qemu-img info|map|check --output=json`, byte for byte (QEMU 7.2).
 *
 * info and check print a QAPI object through QEMU's QDict, a hash table of 512 buckets: its keys
 * come out in bucket order (tdb_hash of the key, qobject/qdict.c), and keys sharing a bucket in
 * the reverse of the order they were added (the QAPI schema's field order). The pretty printer
 * (qobject/qjson.c) indents 4 spaces and escapes every character outside printable ASCII as
 * \uXXXX. map prints its own lines (qemu-img.c dump_map_entry).
 */
import type { CheckResult } from '../check/index';
import type { ImageInfo, MapEntry } from '../qcow2/image';
import type { EncryptionInfo } from '../qcow2/luks';
import { combinedPath } from './format';

/** A QAPI object: its keys in the schema's order, which is the order they go into the QDict. */
type QValue = string | number | boolean | QValue[] | QDict;
interface QDict {
  [key: string]: QValue;
}

/** QEMU's tdb_hash (qobject/qdict.c), over the key's UTF-8 bytes. */
function tdbHash(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) value = (value + ((bytes[i]! * 2 ** ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

const bucketCount = 512;

/** The keys of a QDict as qdict_first/qdict_next visit them. */
function qdictOrder(keys: readonly string[]): string[] {
  return keys
    .map((key, index) => ({ key, index, bucket: tdbHash(key) % bucketCount }))
    .sort((a, b) => a.bucket - b.bucket || b.index - a.index)
    .map((entry) => entry.key);
}

/** qjson.c's quoted_str: printable ASCII as is, the rest as \uXXXX (upper-case hex, surrogate pairs). */
function quoted(text: string): string {
  let out = '"';
  for (const char of text) {
    const cp = char.codePointAt(0)!;
    if (char === '"') out += '\\"';
    else if (char === '\\') out += '\\\\';
    else if (char === '\b') out += '\\b';
    else if (char === '\f') out += '\\f';
    else if (char === '\n') out += '\\n';
    else if (char === '\r') out += '\\r';
    else if (char === '\t') out += '\\t';
    else if (cp > 0xffff) out += `\\u${hex4(0xd800 + ((cp - 0x10000) >> 10))}\\u${hex4(0xdc00 + ((cp - 0x10000) & 0x3ff))}`;
    else if (cp < 0x20 || cp >= 0x7f) out += `\\u${hex4(cp)}`;
    else out += char;
  }
  return out + '"';
}

function hex4(n: number): string {
  return n.toString(16).toUpperCase().padStart(4, '0');
}

/** qobject_to_json_pretty. */
function pretty(value: QValue, indent = 0): string {
  const newline = (level: number) => `\n${' '.repeat(level * 4)}`;
  if (typeof value === 'string') return quoted(value);
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  if (Array.isArray(value)) return `[${value.map((item) => newline(indent + 1) + pretty(item, indent + 1)).join(',')}${newline(indent)}]`;
  const keys = qdictOrder(Object.keys(value));
  return `{${keys.map((key) => `${newline(indent + 1)}${quoted(key)}: ${pretty(value[key]!, indent + 1)}`).join(',')}${newline(indent)}}`;
}

/** The qcow2 encrypt block (QCryptoBlockInfo, a flat union on "format"). */
function encryptDict(encryption: EncryptionInfo): QDict {
  if (encryption.format === 'aes') return { format: 'aes' };
  return {
    format: 'luks',
    'cipher-alg': encryption.cipherAlg,
    'cipher-mode': encryption.cipherMode,
    'ivgen-alg': encryption.ivgenAlg,
    ...(encryption.ivgenHashAlg !== undefined ? { 'ivgen-hash-alg': encryption.ivgenHashAlg } : {}),
    'hash-alg': encryption.hashAlg,
    'payload-offset': encryption.payloadOffset,
    'master-key-iters': encryption.masterKeyIters,
    uuid: encryption.uuid,
    slots: encryption.slots.map((slot) => ({
      active: slot.active,
      ...(slot.iters !== undefined ? { iters: slot.iters } : {}),
      ...(slot.stripes !== undefined ? { stripes: slot.stripes } : {}),
      'key-offset': slot.keyOffset,
    })),
  };
}

/** ImageInfo (qapi/block-core.json), as bdrv_query_image_info fills it for a file named `name`. */
function infoDict(info: ImageInfo, name: string): QDict {
  // actual-size: left out where the driver cannot say (an http(s) image), as qemu-img does.
  const dict: QDict = {
    filename: name,
    format: info.format,
    'dirty-flag': info.dirty ?? false,
    ...(info.allocatedBytes !== undefined ? { 'actual-size': info.allocatedBytes } : {}),
    'virtual-size': info.virtualSize,
  };
  if (info.clusterSize !== undefined) dict['cluster-size'] = info.clusterSize;
  if (info.encrypted) dict['encrypted'] = true;
  if (info.backingFile !== undefined) {
    dict['backing-filename'] = info.backingFile;
    dict['full-backing-filename'] = combinedPath(name, info.backingFile);
    if (info.backingFormat !== undefined) dict['backing-filename-format'] = info.backingFormat;
  }
  if (info.snapshots && info.snapshots.length > 0) {
    dict['snapshots'] = info.snapshots.map((s) => ({
      id: s.id,
      name: s.name,
      'vm-state-size': s.vmStateSize,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
      'vm-clock-nsec': s.vmClockNsec % 1e9,
      ...(s.icount >= 0 ? { icount: s.icount } : {}),
    }));
  }
  if (info.format === 'qcow2') {
    // ImageInfoSpecificQCow2; compat 0.10 images have no feature bits to report.
    const data: QDict = { compat: info.version === 2 ? '0.10' : '1.1' };
    if (info.dataFile !== undefined) data['data-file'] = info.dataFile;
    if (info.dataFile !== undefined) data['data-file-raw'] = info.dataFileRaw ?? false;
    if (info.version !== 2) {
      data['extended-l2'] = info.extendedL2 ?? false;
      data['lazy-refcounts'] = info.lazyRefcounts ?? false;
      data['corrupt'] = info.corrupt ?? false;
    }
    data['refcount-bits'] = info.refcountBits ?? 16;
    if (info.encryption) data['encrypt'] = encryptDict(info.encryption);
    data['compression-type'] = info.compressionType ?? 'zlib';
    dict['format-specific'] = { type: 'qcow2', data };
  }
  return dict;
}

/** `qemu-img info --output=json [--backing-chain]`; `names` as formatInfoChain gives them. */
export function qemuInfoJson(infos: readonly ImageInfo[], names: readonly string[], chain: boolean): string {
  const dicts = infos.map((info, i) => infoDict(info, names[i]!));
  return pretty(chain ? dicts : dicts[0]!) + '\n';
}

/** `qemu-img map --output=json`. */
export function qemuMapJson(entries: readonly MapEntry[]): string {
  const lines = entries.map(
    (e) =>
      `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${e.offset !== undefined ? `, "offset": ${e.offset}` : ''}}`,
  );
  return `[${lines.join(',\n')}]\n`;
}

/** `qemu-img check --output=json` (ImageCheck: counts that are 0 are left out, as collect_image_check does). */
export function qemuCheckJson(result: CheckResult, name: string): string {
  const dict: QDict = { filename: name, format: result.format, 'check-errors': result.checkErrors };
  const optional: [string, number][] = [
    ['image-end-offset', result.imageEndOffset],
    ['corruptions', result.corruptions],
    ['leaks', result.leaks],
    ['corruptions-fixed', 0],
    ['leaks-fixed', 0],
    ['total-clusters', result.totalClusters],
    ['allocated-clusters', result.allocatedClusters],
    ['fragmented-clusters', result.fragmentedClusters],
    ['compressed-clusters', result.compressedClusters],
  ];
  for (const [key, value] of optional) if (value !== 0) dict[key] = value;
  return pretty(dict) + '\n';
}

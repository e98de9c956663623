/** Opening an image: header, snapshot choice, the backing chain and its files. */
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { Qcow2Error } from '../errors';
import { limits } from '../limits';
import { QCOW2_MAGIC } from './header';
import { Image, type ImageInfo, type OpenOptions, type SnapshotInfo } from './image';
import { type Layer, type OpenFile, Qcow2Layer, RawLayer, readExactly } from './layers';
import { type LuksInfo, luksHeaderSize, parseLuksHeader } from './luks';
import { isUrl } from '../http/url';
import { openChainFile, resolveChainName } from '../http/chain';
import type { Qcow2Snapshot } from './snapshots';

/**
 * Opens a qcow2 image and its backing chain, read-only.
 *
 * @example
 * const image = await open('disk.qcow2');
 * console.log(image.info.virtualSize);
 * await image.close();
 */
export async function open(path: string, options: OpenOptions = {}): Promise<Image> {
  return openChain(path, options, true);
}

/**
 * Opens the image alone, to describe it as `qemu-img info` does (which opens with
 * BDRV_O_NO_BACKING): the header's backing file name and format are reported, the backing
 * file is neither looked up nor opened, so no allow-list applies. Its disk cannot be read
 * (checkReadable refuses). An external data file is still opened, through the allow-list.
 * @internal
 */
export async function openToDescribe(path: string, options: OpenOptions = {}): Promise<Image> {
  return openChain(path, { ...options, metadataOnly: true }, false);
}

async function openChain(path: string, options: OpenOptions, followBacking: boolean): Promise<Image> {
  // Headers (tokens) go to the image's own origin only.
  options = { ...options, http: { ...options.http, headersOrigin: isUrl(path) ? new URL(path).origin : '' } };
  const layers: Layer[] = [];
  const infos: ImageInfo[] = [];
  try {
    const seen = new Set<string>();
    const maxDepth = options.maxChainDepth ?? limits.maxChainDepth;
    let current: ChainFile | undefined = { path, format: 'qcow2', ...(options.region ? { region: options.region } : {}) };
    while (current) {
      if (layers.length > maxDepth) {
        throw new Qcow2Error('BACKING_CHAIN_TOO_DEEP', `backing chain is deeper than ${maxDepth} files`, { path });
      }
      const file = await openChainFile(current.path, layers.length === 0 ? 'image' : 'backing file', { region: current.region, forceShare: options.forceShare }, options);
      const identity = `${file.device}:${file.inode}`;
      if (seen.has(identity)) {
        await file.handle.close();
        throw new Qcow2Error('BACKING_CHAIN_LOOP', `backing chain loops back to ${current.path}`, { path: layers[layers.length - 1]?.file.path ?? path });
      }
      seen.add(identity);
      if (current.format === 'raw') {
        const layer = new RawLayer(file);
        layers.push(layer);
        infos.push(await rawInfo(file, layer.virtualSize));
        current = undefined;
        continue;
      }
      const layer = await openQcow2Layer(file, layers.length === 0 ? options.snapshot : undefined, options, seen);
      layers.push(layer);
      infos.push(await qcow2Info(layer));
      current = followBacking ? await nextInChain(layer, layers.length - 1, options) : undefined;
    }
  } catch (error) {
    for (const layer of layers) await layer.close().catch(() => {});
    throw error;
  }
  const [info, ...backingChain] = infos;
  return new Image(isUrl(path) ? layers[0]!.file.path : path, layers, info!, backingChain, !followBacking && info!.backingFile !== undefined);
}

async function openQcow2Layer(file: OpenFile, snapshotName: string | undefined, options: OpenOptions, seen: Set<string>): Promise<Qcow2Layer> {
  let dataFile: OpenFile | undefined;
  try {
    const { header, snapshots } = await Qcow2Layer.readHeader(file, { metadataOnly: options.metadataOnly });
    if (header.corrupt) options.onWarning?.(`${file.path}: image is marked corrupt; reading it anyway`);
    let snapshot: Qcow2Snapshot | undefined;
    if (snapshotName !== undefined) {
      snapshot = snapshots.find((s) => s.id === snapshotName) ?? snapshots.find((s) => s.name === snapshotName);
      if (!snapshot) throw new Qcow2Error('SNAPSHOT_NOT_FOUND', `no snapshot with id or name "${snapshotName}"`, { path: file.path });
    }
    if (file.base !== 0 && (header.externalDataFile !== undefined || (header.backingFile !== undefined && !options.backingOf))) {
      // Names in an image inside an archive would resolve against the archive's folder: refused
      // (a backing file is found by the caller's resolver, when there is one, never by path).
      throw new Qcow2Error('PATH_NOT_ALLOWED', 'an image inside an archive cannot name backing or data files', { path: file.path });
    }
    if (header.externalDataFile !== undefined) {
      const dataPath = await resolveChainName(file, header.externalDataFile, 'external data file', options);
      dataFile = await openChainFile(dataPath, 'external data file', { forceShare: options.forceShare }, options);
      seen.add(`${dataFile.device}:${dataFile.inode}`);
    }
    return await Qcow2Layer.open(file, header, snapshots, dataFile, snapshot);
  } catch (error) {
    await file.handle.close().catch(() => {});
    await dataFile?.handle.close().catch(() => {});
    throw error;
  }
}

/** A file of the chain still to open: its path, format, and for a member of an archive its byte range. */
interface ChainFile {
  path: string;
  format: 'qcow2' | 'raw';
  region?: { offset: number; length: number };
}

async function nextInChain(layer: Qcow2Layer, depth: number, options: OpenOptions): Promise<ChainFile | undefined> {
  const { backingFile, backingFormat } = layer.header;
  if (backingFile === undefined) return undefined;
  if (options.backingOf) {
    // The resolver's files are qcow2 (a snapshot's disks): a name recording another format is refused.
    if (backingFormat !== undefined && backingFormat !== 'qcow2') {
      throw new Qcow2Error('UNSUPPORTED_BACKING_FORMAT', `backing file format "${backingFormat}" where the chain holds qcow2 images`, { path: layer.file.path });
    }
    const found = await options.backingOf(depth, backingFile);
    return { path: found.path, format: 'qcow2', ...(found.region ? { region: found.region } : {}) };
  }
  const backingPath = await resolveChainName(layer.file, backingFile, 'backing file', options);
  if (backingFormat === 'qcow2' || backingFormat === 'raw') return { path: backingPath, format: backingFormat };
  if (backingFormat !== undefined) {
    throw new Qcow2Error('UNSUPPORTED_BACKING_FORMAT', `backing file format "${backingFormat}" is not supported (qcow2 and raw are)`, { path: layer.file.path });
  }
  // Unrecorded: probe between qcow2 and raw only, and say so.
  const probe = await openChainFile(backingPath, 'backing file', { forceShare: options.forceShare }, options);
  try {
    const magic = probe.size >= 4 ? (await readExactly(probe, 0, 4, 'backing file header')).readUInt32BE(0) : 0;
    const format = magic === QCOW2_MAGIC ? 'qcow2' : 'raw';
    options.onWarning?.(`${layer.file.path}: backing file format not recorded in the image; probed ${probe.path} as ${format}`);
    return { path: backingPath, format };
  } finally {
    await probe.handle.close();
  }
}

async function allocatedBytes(path: string): Promise<{ allocatedBytes?: number }> {
  // A remote file: unknown, as qemu-img's curl driver says ("disk size: unavailable").
  if (isUrl(path)) return {};
  const stats = await fs.stat(path);
  return { allocatedBytes: stats.blocks * 512 };
}

/** How qemu-img names a remote image's backing file: resolved against its URL (shown without a query). */
function fullRemoteName(referrer: string, name: string): string {
  if (name.startsWith('/')) return name;
  try {
    const url = new URL(name, referrer);
    return `${url.protocol}//${url.host}${url.pathname}`;
  } catch {
    return name;
  }
}

async function rawInfo(file: OpenFile, virtualSize: number): Promise<ImageInfo> {
  return { format: 'raw', filename: file.path, virtualSize, fileSize: file.size, ...(await allocatedBytes(file.path)) };
}

function snapshotInfo(snapshot: Qcow2Snapshot): SnapshotInfo {
  return {
    id: snapshot.id,
    name: snapshot.name,
    vmStateSize: snapshot.vmStateSize,
    date: new Date(snapshot.dateSec * 1000 + Math.floor(snapshot.dateNsec / 1e6)).toISOString(),
    dateSec: snapshot.dateSec,
    dateNsec: snapshot.dateNsec,
    vmClockNsec: snapshot.vmClockNsec,
    icount: snapshot.icount,
    virtualSize: snapshot.virtualSize,
  };
}

/** The LUKS header the encryption header extension points at. */
async function luksInfo(layer: Qcow2Layer): Promise<LuksInfo> {
  const { offset, length } = layer.header.encryptionHeader!;
  const path = layer.file.path;
  if (length < luksHeaderSize || offset > layer.file.size || layer.file.size - offset < luksHeaderSize) {
    throw new Qcow2Error('BAD_ENCRYPTION_HEADER', `encryption header of ${length} bytes at ${offset} does not hold a LUKS header inside the file`, { path, offset });
  }
  if (offset % layer.header.clusterSize !== 0) {
    throw new Qcow2Error('BAD_ENCRYPTION_HEADER', `encryption header offset ${offset} is not a multiple of the cluster size`, { path, offset });
  }
  return parseLuksHeader(await readExactly(layer.file, offset, luksHeaderSize, 'LUKS header'), path, offset);
}

async function qcow2Info(layer: Qcow2Layer): Promise<ImageInfo> {
  const h = layer.header;
  const info: ImageInfo = {
    format: 'qcow2',
    filename: layer.file.path,
    version: h.version,
    virtualSize: layer.virtualSize,
    clusterSize: h.clusterSize,
    fileSize: layer.file.size,
    ...(await allocatedBytes(layer.file.path)),
    compressionType: h.compressionType,
    extendedL2: h.extendedL2,
    refcountBits: h.refcountBits,
    lazyRefcounts: h.lazyRefcounts,
    dirty: h.dirty,
    corrupt: h.corrupt,
    encrypted: h.encryption !== undefined,
    snapshots: layer.snapshots.map(snapshotInfo),
  };
  if (h.encryption === 'aes') info.encryption = { format: 'aes' };
  if (h.encryption === 'luks') info.encryption = await luksInfo(layer);
  if (h.backingFile !== undefined) {
    info.backingFile = h.backingFile;
    info.fullBackingFile = isUrl(layer.file.path) ? fullRemoteName(layer.file.path, h.backingFile) : nodePath.resolve(nodePath.dirname(layer.file.path), h.backingFile);
  }
  if (h.backingFormat !== undefined) info.backingFormat = h.backingFormat;
  if (h.externalDataFile !== undefined) {
    info.dataFile = h.externalDataFile;
    info.dataFileRaw = h.dataFileRaw;
  }
  return info;
}

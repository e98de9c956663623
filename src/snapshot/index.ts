/**
 * Snapshot bundles: a folder holding snapshot.json, disk.qcow2 (made by capture;
 * over the parent's disk for an incremental snapshot) and state.qvms (RAM, vCPU
 * and device state). Created under a temporary name and renamed when complete,
 * so a bundle without its metadata never passes as valid.
 */
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as nodePath from 'node:path';
import { Qcow2Error, ioError, throwIfCancelled } from '../errors';
import type { LoadOptions, LoadResult } from '../load/index';
import { openToRead, PendingFile, PendingFolder, xxh3Hex } from '../files';
import { native } from '../native';
import { type CpuState, parseCpuState } from '../vmstate/cpu';
import { stateOf, stateLimits } from '../vmstate/format';
import { restoreMemory, restoreMemoryInto, type MemoryTarget, type RestoreMemoryResult, type StateFile, StateFile as StateFileClass } from '../vmstate/reader';
import type { MemoryRegion } from '../vmstate/writer';
import type { BackingResolver } from '../qcow2/image';
import type { CaptureHooks, CaptureOptions } from '../capture/index';
import { type ArchiveKind, archiveKind, compressingSink, type CompressingSink, FileSink, tarStream } from './archive';
import { DISK_FILE, METADATA_FILE, parseMetadata, type SnapshotMetadata, STATE_FILE, BUNDLE_FORMAT_VERSION } from './metadata';
import { ChunkReader, entryData, FileTarSource, tarEntries, TarWriter, type ByteSink, type TarEntry, type TarSource } from './tar';

// Each verb loads only the parts of the library it uses: start-up is part of every command's time.
const lazy = {
  capture: async () => (await import('../capture/index.js')).captureWith,
  check: () => import('../check/index.js'),
  load: async () => (await import('../load/index.js')).loadWith,
  writeState: async () => (await import('../vmstate/writer.js')).writeState,
};

export type { SnapshotMetadata } from './metadata';
export type { CpuState } from '../vmstate/cpu';
export type { MemoryRegion } from '../vmstate/writer';

/** Device blobs are restored as files of these names. */
const deviceNamePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** What `createSnapshot` saves (disk, memory, vCPU and device state) and how it compresses it. */
export interface CreateSnapshotOptions {
  /** Raw disk (file, block device or partition) to capture as disk.qcow2. */
  disk?: string;
  /** Raw guest RAM dump. */
  memory?: string;
  /** How the dump maps to guest-physical memory (default: one region from 0). */
  memoryRegions?: MemoryRegion[];
  /** vCPU state as JSON ({arch: "x86_64", vcpus: [...]}). */
  cpu?: unknown;
  /** Opaque device-state blobs, by name. */
  devices?: {
    /** A plain file name (letters, digits, . _ -): restore writes the blob under it. */
    name: string;
    /** The blob's bytes. */
    data: Buffer;
  }[];
  /** The previous snapshot: the disk and memory hold only what changed since. */
  parent?: string;
  /** With a parent: 1 bit a RAM page set = changed, instead of comparing with the parent. */
  dirtyBitmap?: Buffer;
  /** Free-form machine description kept in snapshot.json. */
  machine?: Record<string, unknown>;
  /** For the state file and the disk (deflate = zlib clusters). Default zstd. */
  compress?: 'zstd' | 'deflate' | 'none';
  /** Compression level of `compress`, for the disk and the state file (default: each one's own, as `capture` and `writeState` take it). */
  level?: number;
  /** Native worker threads, 1 to 64 (default: for the disk 4 a CPU, at least 8; for the RAM one a CPU). */
  threads?: number;
  /** Compression level of a .tar.zst (default 3) or .tar.gz (default 6) archive. */
  archiveLevel?: number;
  /** Where the members of a compressed parent archive are extracted: its state file with memory, the disks of its chain with a disk (default: the system's temporary folder). */
  tempDir?: string;
  /** Replace a snapshot already at `out` (a bundle folder, or an archive file) once the new one is complete. Default: TARGET_EXISTS. */
  overwrite?: boolean;
  /** Stops the work between steps; nothing is left behind. */
  signal?: AbortSignal;
}

export interface SnapshotChainLink {
  dir: string;
  metadata: SnapshotMetadata;
  /** The bundle as named: the folder, or the archive file (whose members may have been extracted to `dir`). */
  bundle?: string;
  /** A bundle read in place from an uncompressed tar: the archive, and where each member's bytes lie in it. */
  archive?: { path: string; members: Map<string, { offset: number; size: number }> };
  /** An archive's top folder as its entries name it (null: its members lie at the root). */
  top?: string | null;
}

/** A link read from an archive (in place or extracted), not from a folder. */
function isArchiveLink(link: SnapshotChainLink): boolean {
  return link.bundle !== undefined && link.bundle !== link.dir && archiveKind(link.bundle) !== undefined;
}

/**
 * Where a bundle's members lie once it is a folder: the folder itself, or for an archive the
 * folder `tar -xf` makes beside it (its top folder). An incremental disk names its parent's disk
 * relative to these: docs/formats/bundle.md, "Incremental snapshots".
 */
function unpackedFolder(link: SnapshotChainLink): string {
  if (!isArchiveLink(link)) return link.dir;
  const beside = nodePath.dirname(link.bundle!);
  return link.top === null ? beside : nodePath.join(beside, link.top ?? archiveTopFolder(link.bundle!));
}

/** The name a disk in `folder` records for the disk of the bundle unpacked at `parentFolder` ("./" before a first part holding ':', which QEMU would read as a protocol). */
function diskBackingName(folder: string, parentFolder: string): string {
  const relative = nodePath.relative(folder, nodePath.join(parentFolder, DISK_FILE));
  return relative.split(nodePath.sep)[0]!.includes(':') ? `.${nodePath.sep}${relative}` : relative;
}

/**
 * Finds the backing files of the disk of `chain[0]` in the chain itself: the disk at depth N names
 * the disk of chain[N + 1] by its place once the bundles are unpacked (diskBackingName), and gets
 * that disk's file or archive byte range. Any other name (a parent replaced, a disk altered) is refused.
 */
function diskResolver(chain: SnapshotChainLink[]): BackingResolver {
  return async (depth, name) => {
    const link = chain[depth];
    const parent = chain[depth + 1];
    const referrer = link ? memberFile(link, DISK_FILE).label : '?';
    if (!link || !parent?.metadata.files[DISK_FILE]) {
      throw new Qcow2Error('PARENT_MISMATCH', `${DISK_FILE} names backing file "${name}", but ${parent ? 'its parent snapshot holds no disk' : 'its snapshot has no parent'}`, { path: referrer });
    }
    const expected = nodePath.join(unpackedFolder(parent), DISK_FILE);
    if (nodePath.resolve(unpackedFolder(link), name) !== expected) {
      throw new Qcow2Error('PARENT_MISMATCH', `${DISK_FILE} names backing file "${name}", not its parent snapshot's disk (${diskBackingName(unpackedFolder(link), unpackedFolder(parent))})`, { path: referrer });
    }
    const member = memberFile(parent, DISK_FILE);
    return { path: member.path, ...(member.region ? { region: member.region } : {}) };
  };
}

/** Where a member of a bundle is: its own file, or a byte range of the archive holding it. */
function memberFile(link: SnapshotChainLink, name: string): { path: string; label: string; region?: { offset: number; length: number } } {
  const placed = link.archive?.members.get(name);
  if (link.archive && placed) return { path: link.archive.path, label: `${link.archive.path}:${name}`, region: { offset: placed.offset, length: placed.size } };
  if (link.archive) return { path: `${link.archive.path}:${name}`, label: `${link.archive.path}:${name}` };
  const path = nodePath.join(link.dir, name);
  return { path, label: path };
}

function producer(): string {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return `qcow2img ${(require('../../package.json') as { version: string }).version}`;
}

async function hashFile(path: string, region?: { offset: number; length: number }): Promise<{ size: number; xxh3: string }> {
  const handle = await fs.open(path, 'r');
  try {
    const size = region?.length ?? (await handle.stat()).size;
    const hash = await native().hashFile(handle.fd, region?.offset ?? 0, size);
    return { size, xxh3: xxh3Hex(hash) };
  } finally {
    await handle.close();
  }
}

/** Reads and validates snapshot.json of a bundle folder. */
export async function readBundle(dir: string): Promise<SnapshotChainLink> {
  const metadataPath = nodePath.join(dir, METADATA_FILE);
  const text = await fs.readFile(metadataPath, 'utf8').catch((error: NodeJS.ErrnoException) => {
    // A folder without snapshot.json, or a file where a folder was named: the bundle is at fault.
    if (error?.code === 'ENOENT' || error?.code === 'ENOTDIR') {
      throw new Qcow2Error('IO_ERROR', `not a snapshot bundle: ${error.code === 'ENOTDIR' ? 'not a folder' : `no ${METADATA_FILE} in it`}`, { path: nodePath.resolve(dir), cause: error, syscallCode: error.code });
    }
    throw ioError(error, metadataPath, 'not a snapshot bundle (cannot read its metadata)');
  });
  return { dir: nodePath.resolve(dir), metadata: parseMetadata(text, metadataPath) };
}

/** The bundle and its parents, nearest first; loops and excessive depth refused. Folders only: archives go through openBundle. */
export async function readChain(dir: string): Promise<SnapshotChainLink[]> {
  return readChainWith(nodePath.resolve(dir), async (path) => readBundle(path));
}

/**
 * Where a snapshot's `parent.path` is resolved from: a folder bundle's own folder (`../s1`), or
 * the folder holding an archive bundle (`s1.tar.zst`, beside it).
 */
function parentBase(link: SnapshotChainLink): string {
  return link.bundle !== undefined && archiveKind(link.bundle) && link.bundle !== link.dir ? nodePath.dirname(link.bundle) : link.dir;
}

async function readChainWith(first: string, read: (path: string) => Promise<SnapshotChainLink>): Promise<SnapshotChainLink[]> {
  const chain: SnapshotChainLink[] = [];
  const seen = new Set<string>();
  let current: string | undefined = first;
  while (current) {
    if (seen.has(current)) throw new Qcow2Error('BACKING_CHAIN_LOOP', 'snapshot parents loop', { path: current });
    if (chain.length >= stateLimits.maxChainDepth) throw new Qcow2Error('BACKING_CHAIN_TOO_DEEP', `more than ${stateLimits.maxChainDepth} snapshots in the chain`, { path: first });
    seen.add(current);
    const child = chain[chain.length - 1];
    if (child && (await fs.lstat(current).catch((error: NodeJS.ErrnoException) => error.code)) === 'ENOENT') {
      // Say whose parent it is: the path alone does not tell why it was looked for.
      throw new Qcow2Error('IO_ERROR', `parent snapshot not found (${child.bundle ?? child.dir} names it as its parent)`, { path: current, syscallCode: 'ENOENT' });
    }
    const link = await read(current);
    link.bundle ??= current;
    const expectedId = chain.length > 0 ? chain[chain.length - 1]!.metadata.parent?.id : undefined;
    if (expectedId !== undefined && link.metadata.id !== expectedId) {
      throw new Qcow2Error('PARENT_MISMATCH', `parent bundle has id ${link.metadata.id}, the child names ${expectedId}`, { path: current });
    }
    chain.push(link);
    current = link.metadata.parent ? nodePath.resolve(parentBase(link), link.metadata.parent.path) : undefined;
  }
  return chain;
}

/** Opens the state files of a chain, oldest first, each checked against its parent. */
async function openStateChain(chain: SnapshotChainLink[]): Promise<StateFile | undefined> {
  let parent: StateFile | undefined;
  for (const link of [...chain].reverse()) {
    if (!link.metadata.files[STATE_FILE]) {
      if (parent) throw new Qcow2Error('INVALID_ARGUMENT', 'a snapshot without memory cannot sit between snapshots with memory', { path: link.dir });
      continue;
    }
    const member = memberFile(link, STATE_FILE);
    parent = await StateFileClass.open(member.path, { ...(parent ? { parent } : {}), ...(member.region ? { region: member.region } : {}) });
  }
  return parent;
}

async function closeStateChain(state: StateFile | undefined): Promise<void> {
  for (let s = state; s; s = s.parent) await s.close().catch(() => {});
}

/** A member name in an archive is `TOP/member`, TOP being the archive's name without its extension. */
function archiveTopFolder(archivePath: string): string {
  const top = nodePath.basename(archivePath).replace(/\.(tar|tar\.gz|tgz|tar\.zst|tzst)$/i, '');
  return /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/.test(top) ? top : 'snapshot';
}

/**
 * An archive being written: under a temporary name beside its final one, members
 * appended as they are made, renamed into place by `commit`.
 */
class ArchiveOutput {
  private bytes = 0;
  private readonly tar: TarWriter;
  private readonly top: string;

  private constructor(
    private readonly file: PendingFile,
    private readonly compressor: CompressingSink | undefined,
  ) {
    const inner: ByteSink = compressor ?? new FileSink(file.handle, file.target);
    this.tar = new TarWriter({
      write: async (data) => {
        this.bytes += data.length;
        await inner.write(data);
      },
    });
    this.top = archiveTopFolder(file.target);
  }

  static async create(target: string, kind: ArchiveKind, level: number | undefined): Promise<ArchiveOutput> {
    const file = await PendingFile.create(target, { create: 'cannot create the archive', flush: 'cannot flush the archive', rename: 'cannot rename the finished archive into place' });
    // The file sink is the compressor's when there is one, else the tar's own (made by the constructor).
    const output = new ArchiveOutput(file, compressingSink(kind, new FileSink(file.handle, target), level));
    try {
      await output.tar.addDirectory(output.top);
    } catch (error) {
      await output.abort();
      throw error;
    }
    return output;
  }

  /** Appends a finished member file, then removes it: the bundle never exists twice. */
  async addStagedFile(path: string, name: string, signal?: AbortSignal): Promise<void> {
    const source = await fs.open(path, 'r');
    try {
      const size = (await source.stat()).size;
      await this.tar.addFile(`${this.top}/${name}`, size, async (sink) => {
        const buffer = Buffer.allocUnsafe(4 << 20);
        for (let at = 0; at < size; ) {
          throwIfCancelled(signal, this.file.target);
          const { bytesRead } = await source.read(buffer, 0, Math.min(buffer.length, size - at), at);
          if (bytesRead === 0) throw new Qcow2Error('TRUNCATED', `${name} shrank while it was archived`, { path });
          // The sink has taken the bytes when its write resolves: the buffer can be refilled.
          await sink.write(buffer.subarray(0, bytesRead));
          at += bytesRead;
        }
      });
    } finally {
      await source.close();
    }
    await fs.unlink(path);
  }

  async addBuffer(name: string, data: Buffer): Promise<void> {
    await this.tar.addFile(`${this.top}/${name}`, data.length, (sink) => sink.write(data));
  }

  async commit(): Promise<void> {
    await this.tar.finish(this.bytes);
    await this.compressor?.end();
    await this.file.commit();
  }

  async abort(): Promise<void> {
    this.compressor?.abort();
    await this.file.abandon();
  }
}

/** Every refusal of createSnapshot made before anything is written; returns the CPU state, parsed. */
async function checkCreate(target: string, kind: ArchiveKind | undefined, options: CreateSnapshotOptions): Promise<CpuState | undefined> {
  const existing = await fs.lstat(target).catch(() => undefined);
  if (existing && !options.overwrite) throw new Qcow2Error('TARGET_EXISTS', 'snapshot output exists; pass --overwrite (overwrite: true) to replace it', { path: target });
  if (existing) {
    // Only a snapshot is replaced: never a folder or file that merely has the name.
    const isSnapshot = kind ? existing.isFile() : existing.isDirectory() && (await fs.stat(nodePath.join(target, METADATA_FILE)).catch(() => undefined))?.isFile() === true;
    if (!isSnapshot) throw new Qcow2Error('TARGET_EXISTS', `snapshot output exists and is not a snapshot ${kind ? 'archive' : 'folder'}; it is not replaced`, { path: target });
    if (options.parent && nodePath.resolve(options.parent) === target) throw new Qcow2Error('INVALID_ARGUMENT', 'a snapshot cannot replace its own parent', { path: target });
  }
  if (!options.disk && !options.memory && options.cpu === undefined && !options.devices?.length) {
    throw new Qcow2Error('INVALID_ARGUMENT', 'nothing to snapshot: give a disk, memory, CPU state or devices', { path: target });
  }
  const cpu: CpuState | undefined = options.cpu !== undefined ? parseCpuState(options.cpu, target) : undefined;
  const deviceNames = new Set<string>();
  for (const device of options.devices ?? []) {
    if (!deviceNamePattern.test(device.name)) {
      throw new Qcow2Error('INVALID_ARGUMENT', `device name "${device.name}" must be a plain file name (letters, digits, . _ -)`, { path: target });
    }
    // Restore writes one file a name: a second blob of a name would be lost.
    if (deviceNames.has(device.name)) throw new Qcow2Error('INVALID_ARGUMENT', `device name "${device.name}" is given twice`, { path: target });
    deviceNames.add(device.name);
  }
  return cpu;
}

type Files = SnapshotMetadata['files'];

/**
 * The base of an incremental disk. Over a chain of folders: the parent's disk.qcow2, named relative
 * to the disk's folder (the temporary folder sits beside the final one, so the name stays right
 * after the rename). Into an archive, or over a chain holding one: the parent's disk where it lies
 * (a file, an extracted member, or a byte range of a tar), its own parents found through the chain,
 * and named where it lies once the bundles are unpacked, relative to this bundle's unpacked folder.
 */
async function diskBase(chain: SnapshotChainLink[], folder: string, intoArchive: boolean): Promise<CaptureOptions & CaptureHooks> {
  const parentLink = chain[0];
  if (!parentLink?.metadata.files[DISK_FILE]) return {};
  if (!intoArchive && !chain.some(isArchiveLink)) {
    return { backing: nodePath.join(parentLink.dir, DISK_FILE), backingFormat: 'qcow2', allowPaths: chain.map((l) => l.dir) };
  }
  // The new disk holds only what differs from these: each must be the one its snapshot.json names.
  await verifyFiles(chain, new Set([DISK_FILE]));
  const member = memberFile(parentLink, DISK_FILE);
  return {
    backing: member.path,
    backingFormat: 'qcow2',
    ...(member.region ? { backingRegion: member.region } : {}),
    backingOf: diskResolver(chain),
    backingName: diskBackingName(folder, unpackedFolder(parentLink)),
  };
}

/** Captures the disk as disk.qcow2 in the staging folder (over the parent's disk), then moves it into the archive, if any. */
async function snapshotDisk(staging: string, chain: SnapshotChainLink[], options: CreateSnapshotOptions, archive: ArchiveOutput | undefined, folder: string): Promise<Files[typeof DISK_FILE]> {
  const diskPath = nodePath.join(staging, DISK_FILE);
  const captured = await (await lazy.capture())(options.disk!, diskPath, {
    ...(options.compress === 'none' ? {} : { compress: options.compress === 'deflate' ? ('zlib' as const) : ('zstd' as const) }),
    ...(options.threads ? { threads: options.threads } : {}),
    ...(await diskBase(chain, folder, archive !== undefined)),
    ...(options.signal ? { signal: options.signal } : {}),
  });
  const entry = { ...(await hashFile(diskPath)), virtualSize: captured.virtualSize };
  await archive?.addStagedFile(diskPath, DISK_FILE, options.signal);
  return entry;
}

/** Writes state.qvms in the staging folder (over the parent's state when there is memory), then moves it into the archive, if any. */
async function snapshotState(staging: string, chain: SnapshotChainLink[], cpu: CpuState | undefined, options: CreateSnapshotOptions, archive: ArchiveOutput | undefined): Promise<{ entry: Files[typeof STATE_FILE]; regions: SnapshotMetadata['memoryRegions'] }> {
  const parentState = options.memory && chain[0] ? await openStateChain(chain) : undefined;
  try {
    const statePath = nodePath.join(staging, STATE_FILE);
    const written = await (await lazy.writeState())(statePath, {
      ...(options.memory ? { memory: options.memory } : {}),
      ...(options.memoryRegions ? { regions: options.memoryRegions } : {}),
      ...(cpu ? { cpu } : {}),
      ...(options.devices ? { devices: options.devices } : {}),
      ...(parentState ? { parent: parentState } : {}),
      ...(options.dirtyBitmap ? { dirtyBitmap: options.dirtyBitmap } : {}),
      ...(options.compress ? { compress: options.compress } : {}),
      ...(options.level !== undefined ? { level: options.level } : {}),
      ...(options.threads ? { threads: options.threads } : {}),
      ...(options.signal ? { signal: options.signal } : {}),
    });
    const entry = { size: written.bytes, xxh3: written.xxh3, snapshotId: written.snapshotId, digest: written.digest };
    await archive?.addStagedFile(statePath, STATE_FILE, options.signal);
    return { entry, regions: written.regions.map((r) => ({ guestBase: r.guestBase, size: r.size, dumpOffset: r.dumpOffset })) };
  } finally {
    await closeStateChain(parentState);
  }
}

/**
 * The metadata is written last: a bundle without it is never taken for a finished one. An
 * archive gets it as its last member and is renamed into place (the staging folder is then
 * removed); a folder gets it as a file and is renamed into place.
 */
async function commitBundle(staging: PendingFolder, archive: ArchiveOutput | undefined, metadata: SnapshotMetadata, replace: boolean): Promise<void> {
  const metadataText = Buffer.from(JSON.stringify(metadata, null, 2) + '\n');
  if (archive) {
    await archive.addBuffer(METADATA_FILE, metadataText);
    await archive.commit();
    await staging.abandon();
    return;
  }
  const metadataHandle = await fs.open(nodePath.join(staging.temporary, METADATA_FILE), 'wx', 0o644);
  await metadataHandle.writeFile(metadataText);
  await metadataHandle.sync();
  await metadataHandle.close();
  await staging.commit(replace);
}

/**
 * Creates a snapshot bundle at `out`: a folder, or an archive when `out` ends in
 * .tar, .tar.gz or .tar.zst. An archive is written in one pass: each member is
 * made beside it, appended, and removed before the next is made.
 *
 * @example
 * await createSnapshot('snapshots/s1', { disk: '/dev/vg/guest', memory: 'ram.raw', cpu: JSON.parse(cpuJson) });
 */
export async function createSnapshot(out: string, options: CreateSnapshotOptions): Promise<SnapshotMetadata> {
  const target = nodePath.resolve(out);
  if (options.signal?.aborted) throw new Qcow2Error('CANCELLED', 'cancelled; no snapshot was written', { path: target });
  const kind = archiveKind(target);
  const cpu = await checkCreate(target, kind, options);
  // A disk over a compressed parent is captured over the parent chain's disks, extracted.
  const parentMembers = [...(options.disk ? [DISK_FILE] : []), ...(options.memory ? [STATE_FILE] : [])];
  const parentBundle = options.parent ? await openBundle(options.parent, parentMembers, options.tempDir, options.signal) : undefined;
  try {
    return await createWithChain(target, kind, cpu, parentBundle?.chain ?? [], options);
  } catch (error) {
    throw parentBundle ? parentBundle.mapError(error) : error;
  } finally {
    await parentBundle?.close();
  }
}

async function createWithChain(target: string, kind: ArchiveKind | undefined, cpu: CpuState | undefined, chain: SnapshotChainLink[], options: CreateSnapshotOptions): Promise<SnapshotMetadata> {
  const parentLink = chain[0];
  // Where this bundle's members lie once it is a folder (an archive: unpacked beside it).
  const folder = kind ? nodePath.join(nodePath.dirname(target), archiveTopFolder(target)) : target;
  const clash = options.disk ? chain.find((link) => link.metadata.files[DISK_FILE] && unpackedFolder(link) === folder) : undefined;
  if (clash) {
    // Its disk would name itself as its backing file, and unpacking would overwrite the parent's.
    throw new Qcow2Error('INVALID_ARGUMENT', `the snapshot would unpack into the folder of the parent snapshot ${clash.bundle ?? clash.dir} (${folder}): give it another name`, { path: target });
  }
  // A folder bundle is built here and renamed into place; an archive's members pass through it one by one.
  const staging = await PendingFolder.create(target, 'cannot create the snapshot folder');
  let archive: ArchiveOutput | undefined;
  try {
    if (kind) archive = await ArchiveOutput.create(target, kind, options.archiveLevel);
    const files: Files = {};
    if (options.disk) files[DISK_FILE] = await snapshotDisk(staging.temporary, chain, options, archive, folder);
    const state = options.memory || cpu || options.devices?.length ? await snapshotState(staging.temporary, chain, cpu, options, archive) : undefined;
    if (state) files[STATE_FILE] = state.entry;
    const metadata: SnapshotMetadata = {
      formatVersion: BUNDLE_FORMAT_VERSION,
      id: randomUUID(),
      created: new Date().toISOString(),
      // Relative to the folder itself, or for an archive to the folder holding it.
      parent: parentLink ? { id: parentLink.metadata.id, path: nodePath.relative(kind ? nodePath.dirname(target) : target, parentLink.bundle ?? parentLink.dir) } : null,
      producer: producer(),
      vcpuCount: cpu?.vcpus.length ?? 0,
      memoryRegions: state?.regions ?? [],
      machine: options.machine ?? {},
      devices: (options.devices ?? []).map((d) => d.name),
      files,
    };
    // The last moment to stop: after it, the snapshot is committed.
    throwIfCancelled(options.signal, target);
    await commitBundle(staging, archive, metadata, options.overwrite === true);
    return metadata;
  } catch (error) {
    await archive?.abort();
    await staging.abandon();
    // Whichever step noticed, what matters is the snapshot.
    if (error instanceof Qcow2Error && error.code === 'CANCELLED') throw new Qcow2Error('CANCELLED', 'cancelled; no snapshot was written', { path: target });
    throw renamedError(error, (text) => underName(text, staging.temporary, kind ? `${target}:` : target + nodePath.sep));
  }
}

/** `text` with every path under the folder `dir` starting with `shown` instead. */
function underName(text: string, dir: string, shown: string): string {
  return text.split(dir + nodePath.sep).join(shown);
}

/**
 * `error` with its path and message passed through `rename`: paths under a temporary folder
 * shown as `ARCHIVE:MEMBER`, or under the bundle folder the user named. Users know the bundle
 * they named, not the folders it passes through.
 */
function renamedError(error: unknown, rename: (text: string) => string): unknown {
  if (!(error instanceof Qcow2Error)) return error;
  const message = error.path !== undefined && error.message.startsWith(`${error.path}: `) ? error.message.slice(error.path.length + 2) : error.message;
  const path = error.path === undefined ? undefined : rename(error.path);
  const renamed = rename(message);
  if (renamed === message && path === error.path) return error;
  return new Qcow2Error(error.code, renamed, {
    ...(path !== undefined ? { path } : {}),
    ...(error.offset !== undefined ? { offset: error.offset } : {}),
    cause: error,
  });
}

const MEMBERS: readonly string[] = [DISK_FILE, STATE_FILE, METADATA_FILE];
/** snapshot.json is small; a larger one in an archive is refused before it is read. */
const MAX_METADATA_BYTES = 16 << 20;

/** A bundle ready to read: a folder, or the members of an archive extracted to a temporary folder. */
interface OpenedBundle {
  chain: SnapshotChainLink[];
  /** The bundle as the user named it (the archive, not the temporary folder). */
  path: string;
  /** A path inside the temporary folder as `ARCHIVE:MEMBER`; other paths unchanged. */
  displayName(path: string): string;
  /** The same error with temporary paths replaced by `ARCHIVE:MEMBER`. */
  mapError(error: unknown): unknown;
  close(): Promise<void>;
}

/** The member an archive entry holds, by the rules in docs/formats/bundle.md; throws on anything else. */
function memberOf(entryName: string, isDirectory: boolean, archivePath: string, top: { name?: string | null }): string | undefined {
  const refuse = (why: string): never => {
    throw new Qcow2Error('BAD_ARCHIVE', `entry "${entryName}" ${why}`, { path: archivePath });
  };
  if (entryName.startsWith('/')) refuse('has an absolute name');
  const parts = entryName.split('/').filter((part) => part !== '' && part !== '.');
  if (parts.includes('..')) refuse('climbs out with ".."');
  const folder = isDirectory ? parts[0] : parts.length === 2 ? parts[0] : undefined;
  if (parts.length > (isDirectory ? 1 : 2)) refuse('is nested deeper than a snapshot archive goes');
  if (isDirectory && parts.length === 0) return undefined;
  // Every entry sits in the same top folder, or all at the root.
  const entryTop = folder ?? null;
  if (top.name === undefined) top.name = entryTop;
  else if (top.name !== entryTop) refuse('is outside the archive\'s one folder');
  if (isDirectory) return undefined;
  const member = parts[parts.length - 1]!;
  if (!MEMBERS.includes(member)) refuse(`is not part of a snapshot (${MEMBERS.join(', ')})`);
  return member;
}

/**
 * Walks the entries of a snapshot archive, checking each by the rules of memberOf, and
 * calls `take` once for each member with its entry; `take` reads or skips the entry's data.
 */
async function forEachMember(reader: TarSource, archivePath: string, take: (member: string, entry: TarEntry) => Promise<void>): Promise<string | null> {
  const seen = new Set<string>();
  const top: { name?: string | null } = {};
  for await (const entry of tarEntries(reader, archivePath)) {
    const member = memberOf(entry.name, entry.type === 'directory', archivePath, top);
    if (member === undefined) continue;
    if (seen.has(member)) throw new Qcow2Error('BAD_ARCHIVE', `${member} appears twice`, { path: archivePath });
    seen.add(member);
    if (member === METADATA_FILE && entry.size > MAX_METADATA_BYTES) throw new Qcow2Error('BAD_ARCHIVE', `${member} has ${entry.size} bytes, more than a snapshot's metadata can be`, { path: archivePath });
    await take(member, entry);
  }
  if (!seen.has(METADATA_FILE)) throw new Qcow2Error('BAD_ARCHIVE', `the archive holds no ${METADATA_FILE}: not a snapshot archive, or an unfinished one`, { path: archivePath });
  return top.name ?? null;
}

/** Indexes an uncompressed tar: its members are read where they lie, nothing is extracted. */
async function readTarInPlace(archivePath: string): Promise<SnapshotChainLink> {
  const handle = await openToRead(archivePath, 'cannot open the archive');
  try {
    const reader = new FileTarSource(handle, (await handle.stat()).size);
    const members = new Map<string, { offset: number; size: number }>();
    const metadataParts: Buffer[] = [];
    const top = await forEachMember(reader, archivePath, async (member, entry) => {
      members.set(member, { offset: entry.dataOffset, size: entry.size });
      await entryData(reader, entry.size, archivePath, member === METADATA_FILE ? { write: async (data) => void metadataParts.push(data) } : undefined);
    });
    const metadata = parseMetadata(Buffer.concat(metadataParts).toString('utf8'), `${archivePath}:${METADATA_FILE}`);
    return { dir: nodePath.dirname(archivePath), bundle: archivePath, metadata, archive: { path: archivePath, members }, top };
  } finally {
    await handle.close();
  }
}

/** Extracts the `wanted` members of an archive into `dir`, checking every entry on the way; returns the archive's top folder. */
async function extractMembers(archivePath: string, kind: ArchiveKind, dir: string, wanted: Set<string>, signal?: AbortSignal): Promise<string | null> {
  const handle = await openToRead(archivePath, 'cannot open the archive');
  const stream = tarStream(kind, handle, archivePath);
  try {
    const reader = new ChunkReader(stream[Symbol.asyncIterator]());
    // Skipped members still stream through the decoder (a disk's gigabytes): a cancel stops them too.
    const skip = { write: async () => throwIfCancelled(signal, archivePath) };
    const top = await forEachMember(reader, archivePath, async (member, entry) => {
      if (!wanted.has(member)) return entryData(reader, entry.size, archivePath, skip);
      const file = nodePath.join(dir, member);
      const out = await fs.open(file, 'wx', 0o600);
      try {
        const sink = new FileSink(out, file, 'cannot extract it into the temporary folder (tempDir, --temp-dir; TMPDIR by default)');
        await entryData(reader, entry.size, archivePath, {
          write: (data) => {
            throwIfCancelled(signal, archivePath);
            return sink.write(data);
          },
        });
      } finally {
        await out.close();
      }
    });
    // Read to the end, so that the compressed stream's own end checks (frame checksum, gzip trailer) run.
    while ((await reader.some(1 << 22)).length > 0) throwIfCancelled(signal, archivePath);
    return top;
  } finally {
    // Stopped early (a refused entry, a cancel): the decoders' own cleanup runs only when
    // the stream is returned, and fflate's worker would keep the process alive.
    await stream.return(undefined).catch(() => {});
    await handle.close();
  }
}

/**
 * Opens a bundle and its parents, each a folder or an archive: a plain tar is read in place; a
 * compressed archive has its snapshot.json and the `members` asked for extracted into a
 * temporary folder under `tempDir` (default: the system's), which `close` removes.
 */
async function openBundle(bundle: string, members: string[], tempDir?: string, signal?: AbortSignal): Promise<OpenedBundle> {
  const path = nodePath.resolve(bundle);
  const stats = await fs.stat(path).catch((error: unknown) => {
    throw ioError(error, path, 'cannot open the snapshot bundle');
  });
  if (stats.isFile() && !archiveKind(path)) {
    throw new Qcow2Error('INVALID_ARGUMENT', 'not a snapshot bundle: a file that is not an archive (.tar, .tar.gz, .tar.zst); a bundle is a folder or one of those', { path });
  }
  let root: string | undefined;
  /** Each extraction folder, and the archive whose members it holds. */
  const extracted = new Map<string, string>();
  const displayName = (text: string) => [...extracted].reduce((t, [dir, archive]) => underName(t, dir, `${archive}:`), text);
  const mapError = (error: unknown) => renamedError(error, displayName);
  const close = async () => {
    if (root) await fs.rm(root, { recursive: true, force: true }).catch(() => {});
  };
  const read = async (link: string): Promise<SnapshotChainLink> => {
    const kind = archiveKind(link);
    if (!kind || !(await fs.stat(link).catch(() => undefined))?.isFile()) return readBundle(link);
    if (kind === 'tar') return readTarInPlace(link);
    root ??= await fs.mkdtemp(nodePath.join(tempDir ?? tmpdir(), 'qcow2img-bundle-')).catch((error) => {
      throw ioError(error, tempDir ?? tmpdir(), 'cannot make a temporary folder for the archive\'s members');
    });
    const dir = nodePath.join(root, String(extracted.size));
    await fs.mkdir(dir);
    extracted.set(dir, link);
    const top = await extractMembers(link, kind, dir, new Set([METADATA_FILE, ...members]), signal);
    return { ...(await readBundle(dir)), bundle: link, top };
  };
  try {
    return { chain: await readChainWith(path, read), path, displayName, mapError, close };
  } catch (error) {
    await close();
    throw mapError(error);
  }
}

/** Runs `use` on an opened bundle: its errors name archive members as `ARCHIVE:MEMBER`, and the bundle is closed after. */
async function withBundle<T>(opened: OpenedBundle, use: (opened: OpenedBundle) => Promise<T>): Promise<T> {
  try {
    return await use(opened);
  } catch (error) {
    throw opened.mapError(error);
  } finally {
    await opened.close();
  }
}

/** Where `restoreSnapshot` puts each part; the disk goes through the same options and checks as `load`. */
export interface RestoreSnapshotOptions extends Omit<LoadOptions, 'allowPaths' | 'allowAnyPath' | 'snapshot'> {
  /** Where the disk goes: a file, a block device, or a disk with `partition`/`offset` (as `load`). */
  disk?: string;
  /**
   * Where the RAM dump goes: a path (a new file under a temporary name, zero pages left as holes;
   * or with `memoryInPlace`, an existing file rewritten where it stands), or memory that already
   * exists: `{ fd }` opened read-write, an ArrayBuffer, a SharedArrayBuffer or a Uint8Array (a
   * VMM's guest memory).
   */
  memory?: string | MemoryTarget;
  /** Restore into the existing file at `memory` (tmpfs, hugetlbfs through a mapping, a block device) instead of a new one. */
  memoryInPlace?: boolean;
  /** The existing memory holds only zeros: pages that are zero in the snapshot are left untouched (else they are zeroed). */
  memoryZeroed?: boolean;
  /** Where the vCPU state JSON goes. */
  cpu?: string;
  /** Folder that receives one file per device blob. */
  deviceDir?: string;
  /** Where the members of a .tar, .tar.gz or .tar.zst bundle are extracted (default: the system's temporary folder). */
  tempDir?: string;
}

export interface RestoreSnapshotResult {
  disk?: LoadResult;
  memory?: RestoreMemoryResult;
  cpu?: string;
  devices?: string[];
}

/**
 * Restores what a bundle holds, resolving its parent chain: the disk through the
 * same paths and checks as `load`, memory into a new file, CPU state as JSON,
 * device blobs into a folder.
 */
export async function restoreSnapshot(bundle: string, options: RestoreSnapshotOptions): Promise<RestoreSnapshotResult> {
  const wantsState = options.memory || options.cpu || options.deviceDir;
  const kind = archiveKind(bundle);
  if (options.disk && wantsState && kind && kind !== 'tar' && (await fs.stat(bundle).catch(() => undefined))?.isFile()) {
    // One member extracted at a time: the temporary space is never more than the larger
    // member, at the price of streaming the archive twice.
    const { memory, cpu, deviceDir, ...diskOnly } = options;
    const { disk, ...stateOnly } = options;
    const diskResult = await restoreSnapshot(bundle, diskOnly);
    return { ...diskResult, ...(await restoreSnapshot(bundle, stateOnly)) };
  }
  const members = [...(options.disk ? [DISK_FILE] : []), ...(wantsState ? [STATE_FILE] : [])];
  try {
    return await withBundle(await openBundle(bundle, members, options.tempDir, options.signal), (opened) => restoreChain(opened, options, members));
  } catch (error) {
    if (error instanceof Qcow2Error && error.code === 'CANCELLED') throw new Qcow2Error('CANCELLED', 'cancelled; what was being restored is incomplete or was not written', { path: nodePath.resolve(bundle) });
    throw error;
  }
}

async function restoreChain(opened: OpenedBundle, options: RestoreSnapshotOptions, members: string[]): Promise<RestoreSnapshotResult> {
  const { chain } = opened;
  const link = chain[0]!;
  const result: RestoreSnapshotResult = {};
  await verifyFiles(chain, new Set(members));
  if (options.disk) {
    if (!link.metadata.files[DISK_FILE]) throw new Qcow2Error('INVALID_ARGUMENT', 'this snapshot holds no disk', { path: opened.path });
    // The bundle names its parents itself: their folders are the only ones its disk may reach, and
    // through archives, its backing files are found in the chain (diskResolver), never by path.
    const member = memberFile(link, DISK_FILE);
    result.disk = await (await lazy.load())(member.path, options.disk, {
      ...options,
      allowPaths: chain.map((l) => l.dir),
      ...(member.region ? { region: member.region } : {}),
      ...(chain.some(isArchiveLink) ? { backingOf: diskResolver(chain) } : {}),
    });
  }
  if (members.includes(STATE_FILE)) {
    if (!link.metadata.files[STATE_FILE]) throw new Qcow2Error('INVALID_ARGUMENT', 'this snapshot holds no memory, CPU or device state', { path: opened.path });
    const state = await openStateChain(chain);
    try {
      if (options.memory) {
        if (state!.regions.length === 0) throw new Qcow2Error('INVALID_ARGUMENT', 'this snapshot holds no memory', { path: opened.path });
        const memoryOptions = {
          ...(options.threads ? { threads: options.threads } : {}),
          ...(options.signal ? { signal: options.signal } : {}),
          ...(options.onProgress ? { onProgress: options.onProgress } : {}),
          ...(options.memoryZeroed ? { zeroed: true } : {}),
        };
        result.memory = typeof options.memory === 'string'
          ? await restoreMemory(state!, options.memory, { ...memoryOptions, overwrite: options.overwrite === true, inPlace: options.memoryInPlace === true })
          : await restoreMemoryInto(state!, options.memory, memoryOptions);
      }
      if (options.cpu) {
        const cpu = await state!.cpu();
        if (!cpu) throw new Qcow2Error('INVALID_ARGUMENT', 'this snapshot holds no CPU state', { path: opened.path });
        await writeNewFile(options.cpu, JSON.stringify(cpu, null, 2) + '\n', options.overwrite === true);
        result.cpu = nodePath.resolve(options.cpu);
      }
      if (options.deviceDir) {
        await fs.mkdir(options.deviceDir, { recursive: true });
        result.devices = [];
        const devices = await state!.devices();
        for (const [i, device] of devices.entries()) {
          // Names were checked on create; check again, the file may have been altered.
          if (!deviceNamePattern.test(device.name) || devices.findIndex((d) => d.name === device.name) !== i) {
            throw new Qcow2Error('BAD_HEADER_FIELD', `device name "${device.name}" is not a plain file name, or appears twice`, { path: opened.path });
          }
          const file = nodePath.join(options.deviceDir, device.name);
          await writeNewFile(file, device.data, options.overwrite === true);
          result.devices.push(nodePath.resolve(file));
        }
      }
    } finally {
      await closeStateChain(state);
    }
  }
  return result;
}

async function writeNewFile(path: string, data: string | Buffer, overwrite: boolean): Promise<void> {
  await fs.writeFile(path, data, { flag: overwrite ? 'w' : 'wx', mode: 0o644 }).catch((error) => {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') throw new Qcow2Error('TARGET_EXISTS', 'file exists; pass --overwrite to replace it', { path });
    throw ioError(error, path, 'cannot write');
  });
}

/** Every file snapshot.json lists (of those in `only`, when given) is there with its size and checksum. */
async function verifyFiles(chain: SnapshotChainLink[], only?: Set<string>): Promise<void> {
  const problems = await fileProblems(chain, only);
  if (problems.length > 0) throw new Qcow2Error('CHECKSUM_MISMATCH', problems[0]!.message, { path: problems[0]!.file });
}

export interface BundleProblem {
  /** The damaged file. */
  file: string;
  message: string;
  /** State file: the chunk or section, and the guest-physical ranges it holds. */
  part?: string;
  guestRanges?: { start: number; end: number }[];
}

async function fileProblems(chain: SnapshotChainLink[], only?: Set<string>): Promise<BundleProblem[]> {
  const problems: BundleProblem[] = [];
  for (const link of chain) {
    for (const [name, entry] of Object.entries(link.metadata.files)) {
      if (!entry || (only && !only.has(name))) continue;
      const member = memberFile(link, name);
      const file = member.label;
      // A member an archive does not hold has no file to hash.
      const actual = link.archive && !member.region ? undefined : await hashFile(member.path, member.region).catch(() => undefined);
      if (!actual) problems.push({ file, message: `${name} is missing or unreadable` });
      else if (actual.size !== entry.size) problems.push({ file, message: `${name} has ${actual.size} bytes, snapshot.json says ${entry.size}` });
      else if (actual.xxh3 !== entry.xxh3) problems.push({ file, message: `${name} checksum mismatch: the file is damaged` });
    }
  }
  return problems;
}

export interface SnapshotInspection {
  bundle: string;
  metadata: SnapshotMetadata;
  chain: { dir: string; id: string; created: string }[];
  state?: {
    regions: { guestBase: number; size: number; dumpOffset: number }[];
    /** Bytes of the RAM dump restore makes (recorded by the state file since 1.1, else where its last region ends). */
    dumpSize: number;
    pages: { zero: number; data: number; duplicate: number; parent: number };
    chunks: number;
    bytes: number;
    vcpus: number;
    devices: string[];
  };
}

/** What a bundle (folder or archive) holds, from its metadata and its state file's index. */
export async function inspectSnapshot(bundle: string, options: { tempDir?: string } = {}): Promise<SnapshotInspection> {
  return withBundle(await openBundle(bundle, [STATE_FILE], options.tempDir), inspectChain);
}

async function inspectChain(opened: OpenedBundle): Promise<SnapshotInspection> {
  const { chain } = opened;
  const link = chain[0]!;
  const inspection: SnapshotInspection = {
    bundle: opened.path,
    metadata: link.metadata,
    chain: chain.map((l, i) => ({ dir: i === 0 ? opened.path : l.dir, id: l.metadata.id, created: l.metadata.created })),
  };
  if (link.metadata.files[STATE_FILE]) {
    const state = await openStateChain(chain);
    try {
      const pages = { zero: 0, data: 0, duplicate: 0, parent: 0 };
      const names = ['zero', 'data', 'duplicate', 'parent'] as const;
      let span = 0;
      for (const region of state!.regions) {
        const regionPages = region.size / 4096;
        for (let p = 0; p < regionPages; p++) pages[names[stateOf(state!.index.states, span * 512 + p)]!]++;
        span += Math.ceil(regionPages / 512);
      }
      inspection.state = {
        regions: state!.regions.map((r) => ({ guestBase: r.guestBase, size: r.size, dumpOffset: r.dumpOffset })),
        dumpSize: state!.dumpSize,
        pages,
        chunks: state!.index.chunks.length,
        bytes: state!.fileSize,
        vcpus: (await state!.cpu())?.vcpus.length ?? 0,
        devices: (await state!.devices()).map((d) => d.name),
      };
    } finally {
      await closeStateChain(state);
    }
  }
  return inspection;
}

/**
 * Checks a bundle (folder or archive) and its parents: metadata, sizes and checksums of every file,
 * every section and chunk of the state files (naming the chunk and the
 * guest-physical range it holds), and the disk images' consistency.
 */
export async function verifySnapshot(bundle: string, options: { tempDir?: string } = {}): Promise<BundleProblem[]> {
  let opened: OpenedBundle;
  try {
    opened = await openBundle(bundle, [DISK_FILE, STATE_FILE], options.tempDir);
  } catch (error) {
    // A damaged archive is a finding of verify, not a failure to run it.
    if (error instanceof Qcow2Error && error.code === 'BAD_ARCHIVE') return [{ file: error.path ?? nodePath.resolve(bundle), message: error.message.replace(`${error.path}: `, '') }];
    throw error;
  }
  return withBundle(opened, async () => (await verifyChain(opened.chain)).map((p) => ({ ...p, file: opened.displayName(p.file) })));
}

async function verifyChain(chain: SnapshotChainLink[]): Promise<BundleProblem[]> {
  const problems = await fileProblems(chain);
  for (const link of chain) {
    const stateMember = memberFile(link, STATE_FILE);
    const statePath = stateMember.label;
    if (link.metadata.files[STATE_FILE] && !problems.some((p) => p.file === statePath && p.message.includes('missing'))) {
      let state: StateFile | undefined;
      try {
        // Each file alone: the link to its parent is checked by restore.
        state = await StateFileClass.open(stateMember.path, { withoutParent: true, ...(stateMember.region ? { region: stateMember.region } : {}) });
      } catch (error) {
        problems.push({ file: statePath, message: (error as Error).message.replace(`${stateMember.path}: `, '') });
      }
      if (state) {
        for (const p of await state.verify(true)) {
          problems.push({ file: statePath, part: p.part, message: p.message, ...(p.guestRanges ? { guestRanges: p.guestRanges } : {}) });
        }
        await state.close();
      }
    }
    const diskMember = memberFile(link, DISK_FILE);
    const diskPath = diskMember.label;
    if (link.metadata.files[DISK_FILE] && !problems.some((p) => p.file === diskPath)) {
      const { check, checkExitCode } = await lazy.check();
      const result = await check(diskMember.path, diskMember.region ? { region: diskMember.region } : {}).catch((error: Error) => error);
      if (result instanceof Error) problems.push({ file: diskPath, message: result.message.replace(`${diskMember.path}: `, '') });
      else if (checkExitCode(result) !== 0 && checkExitCode(result) !== 3) {
        problems.push({ file: diskPath, message: `qcow2 check: ${result.corruptions} corruptions, ${result.checkErrors} check errors` });
      }
    }
  }
  return problems;
}


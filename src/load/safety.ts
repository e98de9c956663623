/**
 * Refusals before the first byte reaches a block device: mounted (itself or one of
 * its partitions), active swap, held by device-mapper or md, holding the root
 * filesystem, or backed by one of the image's own files (loop devices).
 */
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { Qcow2Error } from '../errors';
import { describeProcess, otherDescriptors } from '../processes';

export interface DeviceUse {
  /** Why the device is in use, for the error message; undefined when it is free. */
  reason: string | undefined;
  /** The device holds the root filesystem: refused even with --force. */
  holdsRoot: boolean;
}

export function majorMinor(rdev: number): string {
  // Linux dev_t: major in bits 8-19 (and 32+), minor in bits 0-7 and 20-31.
  const major = ((rdev >> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >> 12) & ~0xff);
  return `${major}:${minor}`;
}

/** The device's folder in sysfs (/sys/devices/...), or undefined when sysfs has none. */
export async function sysfsFolder(rdev: number): Promise<string | undefined> {
  return fs.realpath(`/sys/dev/block/${majorMinor(rdev)}`).catch(() => undefined);
}

/** maj:min of the device and of each of its partitions, and their sysfs folders. */
async function deviceFamily(rdev: number): Promise<{ self: string; all: Set<string>; sysfs: string | undefined; folders: string[] }> {
  const self = majorMinor(rdev);
  const all = new Set([self]);
  const folders: string[] = [];
  const sysfs = await sysfsFolder(rdev);
  // No sysfs entry: only the device itself can be checked.
  if (!sysfs) return { self, all, sysfs, folders };
  folders.push(sysfs);
  for (const entry of await fs.readdir(sysfs).catch(() => [] as string[])) {
    const dev = await fs.readFile(nodePath.join(sysfs, entry, 'dev'), 'utf8').catch(() => undefined);
    if (dev && (await fs.stat(nodePath.join(sysfs, entry, 'partition')).catch(() => undefined))) {
      all.add(dev.trim());
      folders.push(nodePath.join(sysfs, entry));
    }
  }
  return { self, all, sysfs, folders };
}

/**
 * Devices stacked on the given ones (device-mapper: LVM, dm-crypt; md), through every level:
 * name to maj:min. An LVM root on a partition of the disk is held by the partition, not the disk.
 */
async function stackedDevices(folders: readonly string[]): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  const queue = [...folders];
  // Bounded: sysfs has no cycles, but a count keeps a strange one from running on.
  while (queue.length > 0 && found.size < 1024) {
    const folder = queue.shift()!;
    for (const name of await fs.readdir(nodePath.join(folder, 'holders')).catch(() => [] as string[])) {
      if (found.has(name)) continue;
      const holder = `/sys/class/block/${name}`;
      found.set(name, (await fs.readFile(nodePath.join(holder, 'dev'), 'utf8').catch(() => '')).trim());
      queue.push(holder);
    }
  }
  return found;
}

/**
 * The devices a mountinfo line's filesystem lives on: field 3, and for filesystems that report
 * an anonymous device there (btrfs, bcachefs: 0:N) the block device named as the mount source.
 */
async function mountDevices(fields: readonly string[]): Promise<string[]> {
  const devices = [fields[2]!];
  // After the " - " separator: the filesystem type, then the mount source.
  const separator = fields.indexOf('-');
  const [fstype, source] = [fields[separator + 1], fields[separator + 2]];
  if (!fields[2]!.startsWith('0:') || !source?.startsWith('/')) return devices;
  // A multi-device bcachefs names its members "/dev/A:/dev/B"; a device path may hold ':' itself
  // (/dev/disk/by-path/pci-0000:00:...), so the whole source is tried as well as its parts.
  const whole = unescapeMount(source);
  for (const candidate of new Set([whole, ...whole.split(':')])) {
    const stats = await fs.stat(candidate).catch(() => undefined);
    if (stats?.isBlockDevice()) devices.push(majorMinor(stats.rdev));
  }
  // A multi-device btrfs names one member as its source; sysfs lists them all.
  if (fstype === 'btrfs' && devices.length > 1) devices.push(...(await btrfsMembers(new Set(devices.slice(1)))));
  return devices;
}

/** maj:min of every device of the mounted btrfs filesystem one of `members` belongs to. */
async function btrfsMembers(members: Set<string>): Promise<string[]> {
  for (const fsid of await fs.readdir('/sys/fs/btrfs').catch(() => [] as string[])) {
    const folder = nodePath.join('/sys/fs/btrfs', fsid, 'devices');
    const names = await fs.readdir(folder).catch(() => [] as string[]);
    const devs = await Promise.all(names.map((name) => fs.readFile(nodePath.join(folder, name, 'dev'), 'utf8').then((dev) => dev.trim(), () => '')));
    if (devs.some((dev) => members.has(dev))) return devs.filter(Boolean);
  }
  return [];
}

function unescapeMount(path: string): string {
  return path.replace(/\\([0-7]{3})/g, (_m, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

/** Files the load reads from, by identity: a path compare would miss relative names and links. */
export interface SourceFile {
  path: string;
  device: number;
  inode: number;
}

export async function deviceInUse(devicePath: string, rdev: number, sourceFiles: readonly SourceFile[]): Promise<DeviceUse> {
  const family = await deviceFamily(rdev);
  const stacked = await stackedDevices(family.folders);
  const stackedName = new Map([...stacked].map(([name, dev]) => [dev, name]));
  const mountinfo = await fs.readFile('/proc/self/mountinfo', 'utf8').catch(() => '');
  let reason: string | undefined;
  let holdsRoot = false;
  for (const line of mountinfo.split('\n')) {
    const fields = line.split(' ');
    if (fields.length < 5) continue;
    for (const device of await mountDevices(fields)) {
      const through = stackedName.get(device);
      if (!family.all.has(device) && through === undefined) continue;
      const mountPoint = unescapeMount(fields[4]!);
      if (mountPoint === '/') holdsRoot = true;
      reason ??= `mounted at ${mountPoint}${through !== undefined ? ` (through ${through})` : device === family.self ? '' : ' (a partition of it)'}`;
    }
  }
  if (holdsRoot) return { reason: 'holds the root filesystem', holdsRoot };
  const swaps = await fs.readFile('/proc/swaps', 'utf8').catch(() => '');
  for (const line of swaps.split('\n').slice(1)) {
    const name = line.split(/\s+/)[0];
    if (!name) continue;
    const stats = await fs.stat(unescapeMount(name)).catch(() => undefined);
    if (stats?.isBlockDevice() && (family.all.has(majorMinor(stats.rdev)) || stackedName.has(majorMinor(stats.rdev)))) reason ??= `active swap (${name})`;
  }
  if (stacked.size > 0) reason ??= `held by ${[...stacked.keys()].join(', ')} (device-mapper or md)`;
  const writers = await deviceWriters(new Set([...family.all, ...(await parentDisk(family.sysfs))]));
  if (writers.length > 0) reason ??= `open for writing by ${writers.join(', ')}`;
  if (family.sysfs) {
    // A loop device (or a partition of one) over a file the load reads from.
    const loopDirectory = (await fs.stat(nodePath.join(family.sysfs, 'partition')).catch(() => undefined)) ? nodePath.dirname(family.sysfs) : family.sysfs;
    const backing = await fs.readFile(nodePath.join(loopDirectory, 'loop', 'backing_file'), 'utf8').catch(() => undefined);
    const backingStats = backing ? await fs.stat(backing.trim()).catch(() => undefined) : undefined;
    if (backingStats && sourceFiles.some((f) => f.device === backingStats.dev && f.inode === backingStats.ino)) {
      throw new Qcow2Error('TARGET_IS_SOURCE', `loop device is backed by ${backing!.trim()}, which the image reads from`, { path: devicePath });
    }
  }
  return { reason, holdsRoot };
}

/** maj:min of the whole disk when `sysfs` is a partition's folder. */
async function parentDisk(sysfs: string | undefined): Promise<string[]> {
  if (!sysfs || !(await fs.stat(nodePath.join(sysfs, 'partition')).catch(() => undefined))) return [];
  const dev = await fs.readFile(nodePath.join(nodePath.dirname(sysfs), 'dev'), 'utf8').catch(() => '');
  return dev.trim() ? [dev.trim()] : [];
}

/**
 * Processes other than this one with one of `devices` (maj:min) open for writing: a VM
 * started without QEMU's locks, dd, a partitioning tool, none of which O_EXCL or a mount shows.
 */
async function deviceWriters(devices: ReadonlySet<string>): Promise<string[]> {
  const pids = new Set<number>();
  for await (const { pid, fd, stats } of otherDescriptors()) {
    if (pids.has(pid)) continue;
    if (!stats.isBlockDevice() || !devices.has(majorMinor(stats.rdev))) continue;
    const fdinfo = await fs.readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8').catch(() => '');
    const flags = /^flags:\s+([0-7]+)/m.exec(fdinfo);
    // The access mode (O_ACCMODE): 1 is O_WRONLY, 2 O_RDWR.
    if (flags && (parseInt(flags[1]!, 8) & 3) !== 0) pids.add(pid);
  }
  return Promise.all([...pids].map(describeProcess));
}

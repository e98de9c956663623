/**
 * The byte locks QEMU takes on every image and disk it opens (block/file-posix.c), taken the
 * same way so that neither tool writes under the other: QEMU refuses to start on a disk
 * qcow2img is loading, and qcow2img refuses a disk a running VM uses.
 *
 * Each of QEMU's four block permissions has two lock bytes: holding 100 + p says "I use p",
 * holding 200 + p says "I do not let others use p". All are shared (read) OFD locks, which
 * live as long as the open file description. Whoever takes them then tests the opposite
 * bytes for locks held by any other description.
 */
import * as fs from 'node:fs/promises';
import { Qcow2Error, ioError } from './errors';
import { native } from './native';
import { describeProcess, otherDescriptors } from './processes';

/** QEMU's block permissions (include/block/block-common.h BLK_PERM_*), as bit numbers. */
const Permission = { ConsistentRead: 0, Write: 1, WriteUnchanged: 2, Resize: 3 } as const;
type PermissionBit = (typeof Permission)[keyof typeof Permission];
const permissionNames: Record<PermissionBit, string> = { 0: 'consistent read', 1: 'write', 2: 'write unchanged', 3: 'resize' };
const USES_BASE = 100;
const UNSHARES_BASE = 200;

/**
 * What a job does to a file, as QEMU would open it for the same job:
 * - read: qemu-img info/map/check/convert of an image or a raw source: uses consistent read,
 *   lets nobody write or resize (the data must hold still while it is read);
 * - shared-read: the same with --force-share (qemu-img -U): uses consistent read, shares all;
 * - write: a load or restore target: uses consistent read and write, lets nobody else write
 *   or resize (a VM's disk device takes the same).
 */
export type LockAccess = 'read' | 'shared-read' | 'write';

const accessRules: Record<LockAccess, { uses: PermissionBit[]; unshares: PermissionBit[] }> = {
  read: { uses: [Permission.ConsistentRead], unshares: [Permission.Write, Permission.Resize] },
  'shared-read': { uses: [Permission.ConsistentRead], unshares: [] },
  write: { uses: [Permission.ConsistentRead, Permission.Write], unshares: [Permission.Write, Permission.Resize] },
};

/**
 * Takes QEMU's locks for `access` on the open descriptor `fd` of `path`, held until every
 * descriptor of that open file is closed. A conflict with another process (a VM, qemu-img,
 * another qcow2img) is a LOCKED error naming the process.
 */
export async function lockAsQemu(fd: number, path: string, access: LockAccess): Promise<void> {
  const { uses, unshares } = accessRules[access];
  // As QEMU does: take ours first, then look for theirs, so two starting at once both see it.
  for (const bit of uses) lockOrThrow(fd, path, USES_BASE + bit);
  for (const bit of unshares) lockOrThrow(fd, path, UNSHARES_BASE + bit);
  // QEMU's words: our use against their "does not share" is the lock; our refusal to share
  // against their use is the shared lock.
  const conflict =
    uses.map((bit) => ({ bit, byte: UNSHARES_BASE + bit, lock: '' })).find(({ byte }) => isLocked(fd, path, byte)) ??
    unshares.map((bit) => ({ bit, byte: USES_BASE + bit, lock: 'shared ' })).find(({ byte }) => isLocked(fd, path, byte));
  if (!conflict) return;
  const holders = await lockHolders(path, conflict.byte);
  const who = holders.length > 0 ? holders.join(', ') : 'another process';
  const wayOut = access === 'write' ? 'stop it before writing' : 'pass --force-share (-U) to read it anyway';
  throw new Qcow2Error('LOCKED', `cannot get QEMU's ${conflict.lock}"${permissionNames[conflict.bit]}" lock: in use by ${who}; ${wayOut}`, { path });
}

/** Locks held on a descriptor of their own; close() releases them. */
export interface HeldLocks {
  close(): Promise<void>;
}

/**
 * Opens `path` read-only (OFD read locks need a readable descriptor) only to hold QEMU's
 * locks for `access` while the job runs on other descriptors.
 */
export async function holdLocks(path: string, access: LockAccess): Promise<HeldLocks> {
  const handle = await fs.open(path, 'r').catch((error) => {
    throw ioError(error, path, 'cannot open to lock');
  });
  try {
    await lockAsQemu(handle.fd, path, access);
  } catch (error) {
    await handle.close();
    throw error;
  }
  return { close: () => handle.close() };
}

function lockOrThrow(fd: number, path: string, byte: number): void {
  const err = native().lockByte(fd, byte);
  // A conflicting lock on a byte we take shared means someone holds it exclusively: not QEMU's
  // way, but a holder all the same; the test below names it.
  if (err !== 0 && err !== EAGAIN && err !== EACCES) {
    throw new Qcow2Error('IO_ERROR', `cannot take lock byte ${byte}: errno ${err}`, { path });
  }
}

const EACCES = 13;
const EAGAIN = 11;

function isLocked(fd: number, path: string, byte: number): boolean {
  const result = native().byteLocked(fd, byte);
  if (result < 0) throw new Qcow2Error('IO_ERROR', `cannot test lock byte ${byte}: errno ${-result}`, { path });
  return result === 1;
}

/** Processes whose descriptors of `path` hold a lock covering `byte` (OFD locks show pid -1 in /proc/locks). */
async function lockHolders(path: string, byte: number): Promise<string[]> {
  const target = await fs.stat(path).catch(() => undefined);
  if (!target) return [];
  const pids = new Set<number>();
  for await (const { pid, fd, stats } of otherDescriptors()) {
    if (pids.has(pid)) continue;
    if (stats.dev !== target.dev || stats.ino !== target.ino) continue;
    const fdinfo = await fs.readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8').catch(() => '');
    // "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2164857 100 101": the last two fields are the range.
    const covers = fdinfo.split('\n').some((line) => {
      const fields = line.trim().split(/\s+/);
      if (fields[0] !== 'lock:') return false;
      const [start, end] = [Number(fields[fields.length - 2]), fields[fields.length - 1]];
      return start <= byte && (end === 'EOF' || byte <= Number(end));
    });
    if (covers) pids.add(pid);
  }
  return Promise.all([...pids].map(describeProcess));
}

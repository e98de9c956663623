/** Other processes as /proc shows them: their open descriptors, and a name for messages. */
import * as fsSync from 'node:fs';
import * as fs from 'node:fs/promises';
import { setImmediate as nextTurn } from 'node:timers/promises';

/** A process as a message names it: "PID 123 (qemu-system-x86_64 -m 1G ...)". */
export async function describeProcess(pid: number): Promise<string> {
  const raw = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  const command = raw.replace(/\0+$/, '').split('\0').join(' ');
  const shown = command.length > 120 ? `${command.slice(0, 117)}...` : command;
  return shown ? `PID ${pid} (${shown})` : `PID ${pid}`;
}

/** An open descriptor of another process, and what it opened (the file /proc/PID/fd/FD leads to). */
export interface OtherDescriptor {
  pid: number;
  fd: string;
  stats: fsSync.Stats;
}

/**
 * Every open descriptor of every process but this one. A process's descriptors are looked at
 * synchronously, then the event loop gets its turn: an awaited stat costs 0.08 ms, a synchronous
 * one 0.01 ms (27 ms against 3 ms for this machine's 325 descriptors; a host running many VMs has
 * tens of thousands). Descriptors closed meanwhile, or not ours to look at, are left out.
 */
export async function* otherDescriptors(): AsyncGenerator<OtherDescriptor> {
  for (const entry of await fs.readdir('/proc').catch(() => [] as string[])) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    yield* descriptorsOf(pid);
    await nextTurn();
  }
}

function descriptorsOf(pid: number): OtherDescriptor[] {
  const found: OtherDescriptor[] = [];
  for (const fd of readdirOrNone(`/proc/${pid}/fd`)) {
    const stats = statOrNone(`/proc/${pid}/fd/${fd}`);
    if (stats) found.push({ pid, fd, stats });
  }
  return found;
}

function readdirOrNone(path: string): string[] {
  try {
    return fsSync.readdirSync(path);
  } catch {
    return [];
  }
}

function statOrNone(path: string): fsSync.Stats | undefined {
  try {
    return fsSync.statSync(path, { throwIfNoEntry: false });
  } catch {
    return undefined;
  }
}

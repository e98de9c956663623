/** Other processes as /proc shows them: their open descriptors, and a name for messages. */
import * as fs from 'node:fs/promises';

/** A process as a message names it: "PID 123 (qemu-system-x86_64 -m 1G ...)". */
export async function describeProcess(pid: number): Promise<string> {
  const raw = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  const command = raw.replace(/\0+$/, '').split('\0').join(' ');
  const shown = command.length > 120 ? `${command.slice(0, 117)}...` : command;
  return shown ? `PID ${pid} (${shown})` : `PID ${pid}`;
}

/** Every open descriptor of every process but this one: [pid, fd]. */
export async function* otherDescriptors(): AsyncGenerator<{ pid: number; fd: string }> {
  for (const entry of await fs.readdir('/proc').catch(() => [] as string[])) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    for (const fd of await fs.readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) yield { pid, fd };
  }
}


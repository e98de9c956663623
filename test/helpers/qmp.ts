/** A QEMU started by a test, paused (-S), with a QMP socket the test talks to. */
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as readline from 'node:readline';

export interface Qmp {
  vm: ChildProcess;
  /** Runs one QMP command; rejects with QEMU's error description. */
  call(command: string, args?: Record<string, unknown>): Promise<unknown>;
  close(): Promise<void>;
}

export async function startQemu(dir: string, args: readonly string[]): Promise<Qmp> {
  const socketPath = path.join(dir, `qmp-${process.pid}-${Date.now()}.sock`);
  const vm = spawn('qemu-system-x86_64', ['-accel', 'tcg', '-S', '-display', 'none', '-nodefaults', '-no-user-config', '-qmp', `unix:${socketPath},server=on,wait=off`, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  vm.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  for (let tries = 0; !fs.existsSync(socketPath); tries++) {
    if (vm.exitCode !== null || tries > 200) throw new Error(`qemu-system-x86_64 did not start: ${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const socket = net.connect(socketPath);
  const lines = readline.createInterface({ input: socket })[Symbol.asyncIterator]();
  await lines.next(); // the greeting
  const call = async (command: string, args?: Record<string, unknown>) => {
    socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) }) + '\n');
    for (;;) {
      const { value, done } = await lines.next();
      if (done) throw new Error(`QMP closed during ${command}: ${stderr}`);
      const reply = JSON.parse(value as string) as { return?: unknown; error?: { desc: string } };
      if (reply.error) throw new Error(`QMP ${command}: ${reply.error.desc}`);
      if ('return' in reply) return reply.return;
    }
  };
  await call('qmp_capabilities');
  return {
    vm,
    call,
    async close() {
      socket.destroy();
      if (vm.exitCode === null) {
        const exited = new Promise((resolve) => vm.once('exit', resolve));
        vm.kill('SIGKILL');
        await exited;
      }
      fs.rmSync(socketPath, { force: true });
    },
  };
}

/** Running the CLI and signalling it once it has got somewhere. */
import { type ChildProcess, spawn } from 'node:child_process';
import { cliPath } from './qemu';

/**
 * Runs `qcow2img args`, calls `act(child)` once `started()` holds (polled every 5 ms), and
 * resolves to the exit status, the signal that ended it (if one did) and stderr.
 */
export function cliDuring(args: readonly string[], started: () => boolean, act: (child: ChildProcess) => void): Promise<{ status: number | null; signal: NodeJS.Signals | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cliPath, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
    const poll = setInterval(() => {
      if (started()) {
        clearInterval(poll);
        act(child);
      }
    }, 5);
    child.on('error', reject);
    child.on('close', (status, signal) => {
      clearInterval(poll);
      resolve({ status, signal, stderr });
    });
  });
}

/** Runs `qcow2img args`, sends `signal` once `started()` holds, and resolves to the exit status and stderr. */
export async function interruptedCli(args: readonly string[], started: () => boolean, signal: NodeJS.Signals = 'SIGTERM'): Promise<{ status: number | null; stderr: string }> {
  const { status, stderr } = await cliDuring(args, started, (child) => child.kill(signal));
  return { status, stderr };
}

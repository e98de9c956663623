/** Running the CLI and signalling it once it has got somewhere. */
import { spawn } from 'node:child_process';
import { cliPath } from './qemu';

/**
 * Runs `qcow2img args`, sends `signal` once `started()` holds (polled every 5 ms), and resolves
 * to the exit status and stderr.
 */
export function interruptedCli(args: readonly string[], started: () => boolean, signal: NodeJS.Signals = 'SIGTERM'): Promise<{ status: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cliPath, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
    const poll = setInterval(() => {
      if (started()) {
        clearInterval(poll);
        child.kill(signal);
      }
    }, 5);
    child.on('error', reject);
    child.on('close', (status) => {
      clearInterval(poll);
      resolve({ status, stderr });
    });
  });
}

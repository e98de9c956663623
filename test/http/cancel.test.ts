/**
 * A load from an http(s) image stops when its signal fires, even while a fetch is under way: the
 * requests in flight are cut (a stalled server would otherwise hold it until its timeout).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { load, type Qcow2Error } from '../../src/index';
import { qemuImg, qemuIo } from '../helpers/qemu';
import { FaultProxy, type Nginx, startNginx } from './servers';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-http-cancel-'));
let nginx: Nginx;
let proxy: FaultProxy;

beforeAll(async () => {
  fs.mkdirSync(path.join(work, 'www'), { recursive: true });
  const image = path.join(work, 'www', 'disk.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', image, '64M']);
  qemuIo(image, ['write -P 0x3c 0 16M', 'write -P 0x4d 40M 8M']);
  nginx = await startNginx(path.join(work, 'www'), path.join(work, 'nginx'));
  proxy = await new FaultProxy(nginx.http).start();
});
afterAll(async () => {
  await proxy?.stop();
  await nginx?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

/** Bytes a ranged GET asks for. */
function rangeLength(header: string | undefined): number {
  const range = /^bytes=(\d+)-(\d+)$/.exec(header ?? '');
  return range ? Number(range[2]) - Number(range[1]) + 1 : 0;
}

it('a signal fired while the data is being fetched from a stalled server stops the load: CANCELLED, no file left', async () => {
  const controller = new AbortController();
  // Metadata comes in 1 MiB blocks and is served; the data ranges stall after a few bytes.
  proxy.decide = (request) => (rangeLength(request.headers.range) > 1 << 20 ? 'stall' : undefined);
  proxy.before = (request) => {
    if (rangeLength(request.headers.range) > 1 << 20) setTimeout(() => controller.abort(), 200);
  };
  const target = path.join(work, 'out.raw');
  // Patience far beyond the test's own timeout: only the signal can end this load in time.
  const error = (await load(`${proxy.url}/disk.qcow2`, target, { signal: controller.signal, http: { timeoutMs: 3_600_000 } }).catch((e: unknown) => e)) as Qcow2Error;
  expect(proxy.requests.some((r) => r.fault === 'stall')).toBe(true);
  expect(error.code).toBe('CANCELLED');
  expect(error.message).toContain('cancelled; the target is incomplete');
  expect(fs.existsSync(target)).toBe(false);
  expect(fs.readdirSync(work).filter((f) => f.startsWith('out.raw') || f.startsWith('.out.raw'))).toEqual([]);
});

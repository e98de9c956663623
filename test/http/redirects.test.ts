/**
 * Redirects of an http(s) image, followed when it is opened as curl (QEMU's http driver) follows
 * them, and what `info` says of a remote image's disk size: both against qemu-img's curl driver.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { load, open, type Qcow2Error } from '../../src/index';
import { cliPath, expectSameFile, qemuConvert, qemuImg, qemuIo } from '../helpers/qemu';
import { FaultProxy, type Nginx, startNginx } from './servers';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-redirects-'));
const www = path.join(work, 'www');
let nginx: Nginx;
let image: string;

beforeAll(async () => {
  fs.mkdirSync(path.join(www, 'images'), { recursive: true });
  image = path.join(www, 'images', 'disk.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', image, '8M']);
  qemuIo(image, ['write -P 0x5a 0 1M', 'write -P 0x6b 5M 2M']);
  nginx = await startNginx(www, path.join(work, 'nginx'));
});
afterAll(async () => {
  await nginx?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

/** A server of the test's own whose every answer is a 302 to `location`; it records the headers it got. */
async function redirector(location: string): Promise<{ url: string; seen: http.IncomingHttpHeaders[]; stop(): Promise<void> }> {
  const seen: http.IncomingHttpHeaders[] = [];
  const server = http.createServer((req, res) => {
    seen.push(req.headers);
    res.writeHead(302, { location }).end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/disk.qcow2`;
  return { url, seen, stop: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

/** The CLI with the test CA trusted, as a user adds a private CA. */
function cli(args: string[]) {
  return spawnSync(process.execPath, [cliPath, ...args], { encoding: 'utf8', env: { ...process.env, NODE_EXTRA_CA_CERTS: nginx.ca } });
}

it('a redirect on the same origin is followed: the load is qemu-img convert\'s bytes, info is qemu-img\'s', async () => {
  const target = path.join(work, 'same-origin.raw');
  await load(`${nginx.http}/moved/images/disk.qcow2`, target);
  expectSameFile(target, qemuConvert(image));
  fs.rmSync(target);
  const loaded = cli(['load', `${nginx.https}/moved/images/disk.qcow2`, target, '--progress=none']);
  expect(loaded.status, loaded.stderr).toBe(0);
  expectSameFile(target, qemuConvert(image));
  fs.rmSync(target);
  const url = `${nginx.http}/moved/images/disk.qcow2`;
  const qemu = spawnSync('qemu-img', ['info', '--output=json', url], { encoding: 'utf8' });
  const ours = cli(['info', '--output=json', url]);
  expect(qemu.status, qemu.stderr).toBe(0);
  expect(ours.status, ours.stderr).toBe(0);
  expect(ours.stdout).toBe(qemu.stdout);
});

it('a redirect to another origin is followed without the headers given for the first one', async () => {
  const proxy = await new FaultProxy(nginx.http).start();
  const away = await redirector(`${proxy.url}/images/disk.qcow2`);
  try {
    const target = path.join(work, 'cross-origin.raw');
    await load(away.url, target, { http: { headers: ['Authorization: Bearer for-the-first-origin'] } });
    expectSameFile(target, qemuConvert(image));
    expect(away.seen[0]!.authorization).toBe('Bearer for-the-first-origin');
    expect(proxy.requests.length).toBeGreaterThan(0);
    expect(proxy.requests.every((r) => r.headers.authorization === undefined)).toBe(true);
  } finally {
    await away.stop();
    await proxy.stop();
  }
});

it('a redirect loop, and https redirected to http, are refused with one line naming the URL given', async () => {
  const loop = (await open(`${nginx.http}/loop`).catch((e: unknown) => e)) as Qcow2Error;
  expect(loop.code).toBe('HTTP_ERROR');
  expect(loop.message).toMatch(/more than 10 redirects/);
  expect(loop.path).toBe(`${nginx.http}/loop`);
  const down = cli(['info', `${nginx.https}/to-http/images/disk.qcow2`]);
  expect(down.status).toBe(1);
  expect(down.stderr.trim().split('\n')).toHaveLength(1);
  expect(down.stderr).toContain(`${nginx.https}/to-http/images/disk.qcow2: a redirect from https to http is not followed`);
});

it('info of a remote image: "disk size: unavailable" and no actual-size, as qemu-img says', () => {
  const url = `${nginx.http}/images/disk.qcow2`;
  const human = spawnSync(process.execPath, [cliPath, 'info', url], { encoding: 'utf8' });
  const qemuHuman = spawnSync('qemu-img', ['info', url], { encoding: 'utf8' });
  expect(human.stdout).toContain('disk size: unavailable');
  expect(human.stdout).toBe(qemuHuman.stdout);
  const json = spawnSync(process.execPath, [cliPath, 'info', '--output=json', url], { encoding: 'utf8' });
  expect(JSON.parse(json.stdout)['actual-size']).toBeUndefined();
});

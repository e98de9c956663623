/**
 * http(s) images against real servers on 127.0.0.1: nginx with Range on and off, HTTPS with a CA
 * made at test time, and a fault proxy in front (connections cut mid-range, 503s, stalls, a file
 * replaced mid-load). Every load is compared byte for byte with `qemu-img convert` of the local file.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error, check, load, open } from '../../src/index';
import { remoteOf } from '../../src/http/remote';
import { MiB, cliPath, expectSameFile, qemuConvert, qemuImg, qemuIo, randomBytes, runAsync, textBytes } from '../helpers/qemu';
import { type Fault, FaultProxy, type Nginx, startNginx } from './servers';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-http-'));
const www = path.join(work, 'www');
const images = path.join(www, 'images');
let nginx: Nginx;
const secret = 'X-Amz-Signature=SECRETsig0123';
const token = 'Bearer TOKENvalue4567';

function make(name: string, size: string, writes: readonly string[], extra: readonly string[] = []): string {
  const file = path.join(images, name);
  qemuImg(['create', '-q', '-f', 'qcow2', ...extra, file, size]);
  if (writes.length) qemuIo(file, writes);
  return file;
}

/** Writes spread over a 600 MiB disk: across the several batches a remote load takes (at most 192 MiB of guest bytes each). */
const spread = ['write -P 0x11 0 3M', 'write -P 0x22 100M 1M', 'write -P 0x33 255M 2M', 'write -P 0x44 300M 64k', 'write -P 0x55 511M 3M', 'write -P 0x66 599M 1M', 'write -z 20M 1M'];

let plain: string;
let zlib: string;
let zstd: string;

beforeAll(async () => {
  fs.mkdirSync(images, { recursive: true });
  plain = make('plain.qcow2', '600M', spread);
  // Random and text data, so compressed clusters vary in size.
  const compressedSource = path.join(work, 'source.raw');
  const fd = fs.openSync(compressedSource, 'w');
  fs.ftruncateSync(fd, 600 * MiB);
  fs.writeSync(fd, randomBytes('http-a', 4 * MiB), 0, 4 * MiB, 0);
  fs.writeSync(fd, textBytes('http-b', 5 * MiB), 0, 5 * MiB, 257 * MiB);
  fs.writeSync(fd, randomBytes('http-c', 2 * MiB), 0, 2 * MiB, 590 * MiB);
  fs.closeSync(fd);
  zlib = path.join(images, 'zlib.qcow2');
  qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', compressedSource, zlib]);
  zstd = path.join(images, 'zstd.qcow2');
  qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', compressedSource, zstd]);
  nginx = await startNginx(www, path.join(work, 'nginx'));
});

afterAll(async () => {
  await nginx?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

const url = (name: string, base = nginx.http) => `${base}/images/${name}?${secret}`;

async function loadAndCompare(source: string, local: string, options: Parameters<typeof load>[2] = {}): Promise<void> {
  const target = path.join(work, `out-${path.basename(local)}-${Math.random().toString(36).slice(2)}.raw`);
  await load(source, target, options);
  expectSameFile(target, qemuConvert(local));
  fs.rmSync(target);
}

describe('reading over HTTP', () => {
  it('load of uncompressed, zlib and zstd images equals qemu-img convert of the local file, across several batches', async () => {
    for (const local of [plain, zlib, zstd]) await loadAndCompare(url(path.basename(local)), local);
  });

  it('a disk past 1 GiB (a remote load plans 1 GiB spans and cuts them into batches) loads as qemu-img converts it, runs across both edges', async () => {
    // Data and compressed clusters across the 1 GiB span edge and batch edges, and a zero run
    // across the span edge. Batches end where they have fetched 12 MiB (then 48), or after 4x that
    // in guest bytes: the uncompressed image's first batch inside its 14 MiB at 0, the zlib image's
    // at 48 MiB; the second span's first batch at 1024 + 192 MiB in both.
    const raw = path.join(work, 'span.raw');
    const fd = fs.openSync(raw, 'w');
    fs.ftruncateSync(fd, 1300 * MiB);
    for (const [at, seed, mib] of [[0, 'span-0', 14], [47, 'span-a', 2], [1023, 'span-b', 2], [1215, 'span-c', 2]] as const) fs.writeSync(fd, textBytes(seed, mib * MiB), 0, mib * MiB, at * MiB);
    fs.closeSync(fd);
    const plainSpan = path.join(images, 'span-plain.qcow2');
    const zlibSpan = path.join(images, 'span-zlib.qcow2');
    qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, plainSpan]);
    qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, zlibSpan]);
    qemuIo(plainSpan, ['write -z 1022M 4M', 'write -P 0x77 1025M 1M']);
    for (const local of [plainSpan, zlibSpan]) {
      const target = path.join(work, `out-${path.basename(local)}.raw`);
      await load(url(path.basename(local)), target);
      // cmp streams: the disks are sparse, 1.3 GiB each.
      const compared = spawnSync('cmp', [target, qemuConvert(local)], { encoding: 'utf8' });
      expect(compared.status, compared.stdout + compared.stderr).toBe(0);
      fs.rmSync(target);
    }
  });

  it('info, map and check over HTTP say what they say of the local file, naming the URL without its query', async () => {
    for (const local of [plain, zlib]) {
      const remote = await open(url(path.basename(local)));
      const here = await open(local);
      try {
        expect(remote.path).toBe(`${nginx.http}/images/${path.basename(local)}`);
        expect(remote.info.allocatedBytes).toBeUndefined();
        expect({ ...remote.info, filename: '', allocatedBytes: 0 }).toEqual({ ...here.info, filename: '', allocatedBytes: 0 });
        const strip = (entries: { filename?: string }[]) => entries.map((e) => ({ ...e, filename: undefined }));
        expect(strip(await remote.extents())).toEqual(strip(await here.extents()));
        const buffer = Buffer.alloc(3 * MiB);
        const expected = Buffer.alloc(3 * MiB);
        await remote.read(buffer, 255 * MiB);
        await here.read(expected, 255 * MiB);
        expect(buffer.equals(expected)).toBe(true);
      } finally {
        await remote.close();
        await here.close();
      }
      const remoteCheck = await check(url(path.basename(local)));
      const localCheck = await check(local);
      expect(remoteCheck.filename).toBe(`${nginx.http}/images/${path.basename(local)}`);
      expect({ ...remoteCheck, filename: '' }).toEqual({ ...localCheck, filename: '' });
    }
  });

  it('a load leaves no stage lent out once done, and its bytes came through the native fast path', async () => {
    const image = await open(url('zlib.qcow2'));
    try {
      const target = path.join(work, 'held.raw');
      await load(image, target);
      expectSameFile(target, qemuConvert(zlib));
      const handle = remoteOf(image.layers[0]!.file)!;
      expect(handle).toBeDefined();
      expect(handle.heldBytes()).toBe(0);
      // Guest bytes fetched: the compressed file, not the disk (each byte about once).
      expect(handle.http.bytesReceived).toBeLessThan(2 * fs.statSync(zlib).size + 2 * MiB);
      // Over plain HTTP the clusters come through the native fast path, not node:http.
      expect(handle.http.directBytes).toBeGreaterThan(0.9 * fs.statSync(zlib).size);
    } finally {
      await image.close();
    }
  });

  it('a server that ignores Range is refused with one line that says so', async () => {
    const error = (await open(`${nginx.http}/norange/images/plain.qcow2?${secret}`).catch((e: unknown) => e)) as Qcow2Error;
    expect(error).toBeInstanceOf(Qcow2Error);
    expect(error.code).toBe('RANGE_NOT_SUPPORTED');
    expect(error.message).toBe(`${nginx.http}/norange/images/plain.qcow2: the server ignores Range requests (it answered a ranged GET with the whole file); qcow2img needs ranged reads`);
  });

  it('a 404 is not retried and names the URL without its query', async () => {
    const proxy = await new FaultProxy(nginx.http).start();
    try {
      const error = (await open(`${proxy.url}/images/missing.qcow2?${secret}`, { http: { retryDelayMs: 1 } }).catch((e: unknown) => e)) as Qcow2Error;
      expect(error.code).toBe('HTTP_ERROR');
      expect(error.message).toBe(`${proxy.url}/images/missing.qcow2: HTTP 404 Not Found`);
      expect(proxy.requests).toHaveLength(1);
    } finally {
      await proxy.stop();
    }
  });
});

describe('faults', () => {
  it('connections cut mid-range, 503s and a stall are retried and resumed: the load is still exact', async () => {
    for (const local of [plain, zlib]) {
      const proxy = await new FaultProxy(nginx.http).start();
      const faults = ['drop', '503', 'stall', 'drop', '503'] as const;
      const queue: Fault[] = [...faults];
      // After the first request (which pins the file), the next requests get the faults in turn.
      proxy.decide = (_req, index) => (index >= 1 ? queue.shift() : undefined);
      try {
        await loadAndCompare(`${proxy.url}/images/${path.basename(local)}?${secret}`, local, { http: { timeoutMs: 500, retryDelayMs: 1 } });
        expect(proxy.requests.map((r) => r.fault).filter(Boolean)).toEqual([...faults]);
        // Resumed at the byte: a retry after a cut asks for the rest only.
        const cut = proxy.requests.findIndex((r) => r.fault === 'drop');
        const [from, to] = /bytes=(\d+)-(\d+)/.exec(String(proxy.requests[cut]!.headers.range))!.slice(1).map(Number) as [number, number];
        const resumed = proxy.requests.slice(cut + 1).find((r) => String(r.headers.range).endsWith(`-${to}`))!;
        expect(Number(/bytes=(\d+)-/.exec(String(resumed.headers.range))![1])).toBeGreaterThan(from);
      } finally {
        await proxy.stop();
      }
    }
  });

  it('a server that keeps answering 503 gives up after the bounded tries, with one line naming the URL', async () => {
    const proxy = await new FaultProxy(nginx.http).start();
    proxy.decide = (_req, index) => (index >= 1 ? '503' : undefined);
    const target = path.join(work, 'gave-up.raw');
    try {
      const error = (await load(`${proxy.url}/images/plain.qcow2?${secret}`, target, { http: { tries: 3, retryDelayMs: 1 } }).catch((e: unknown) => e)) as Qcow2Error;
      expect(error.code).toBe('HTTP_ERROR');
      expect(error.message).toMatch(new RegExp(`^${proxy.url}/images/plain\\.qcow2: HTTP 503; gave up after 3 tries at byte \\d+$`));
      expect(fs.existsSync(target)).toBe(false);
      expect(fs.readdirSync(work).filter((f) => f.includes('gave-up'))).toEqual([]);
    } finally {
      await proxy.stop();
    }
  });

  it('a file replaced on the server during a load is SOURCE_CHANGED, and no target is left', async () => {
    const copy = path.join(images, 'swapped.qcow2');
    fs.copyFileSync(plain, copy);
    const proxy = await new FaultProxy(nginx.http).start();
    let swapped = false;
    proxy.before = (_req, index) => {
      // After the metadata, once the data ranges are being fetched: a different file, another mtime.
      if (index === 4 && !swapped) {
        swapped = true;
        const other = path.join(images, 'swapped.tmp');
        fs.copyFileSync(zlib, other);
        fs.utimesSync(other, new Date(), new Date(Date.now() + 10_000));
        fs.renameSync(other, copy);
      }
    };
    const target = path.join(work, 'swapped.raw');
    try {
      const error = (await load(`${proxy.url}/images/swapped.qcow2?${secret}`, target).catch((e: unknown) => e)) as Qcow2Error;
      expect(swapped).toBe(true);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect(error.code).toBe('SOURCE_CHANGED');
      expect(error.message.startsWith(`${proxy.url}/images/swapped.qcow2: the file on the server changed`)).toBe(true);
      expect(proxy.requests.slice(1).every((r) => r.headers['if-match'] !== undefined)).toBe(true);
      expect(fs.existsSync(target)).toBe(false);
    } finally {
      await proxy.stop();
    }
  });
});

describe('backing files of a remote image', () => {
  it('resolve relative to its URL under the same folder; outside it, or a local path, are refused unless allowed', async () => {
    const base = make('chain-base.qcow2', '8M', ['write -P 0x61 0 8M']);
    const overlay = make('chain-top.qcow2', '8M', ['write -P 0x62 1M 1M'], ['-b', 'chain-base.qcow2', '-F', 'qcow2']);
    await loadAndCompare(url('chain-top.qcow2'), overlay);
    const image = await open(url('chain-top.qcow2'));
    expect(image.backingChain[0]!.filename).toBe(`${nginx.http}/images/chain-base.qcow2`);
    await image.close();

    fs.mkdirSync(path.join(www, 'other'), { recursive: true });
    fs.copyFileSync(base, path.join(www, 'other', 'base.qcow2'));
    make('escape.qcow2', '8M', [], ['-b', '../other/base.qcow2', '-F', 'qcow2', '-u']);
    const escape = (await open(url('escape.qcow2')).catch((e: unknown) => e)) as Qcow2Error;
    expect(escape.code).toBe('PATH_NOT_ALLOWED');
    expect(escape.message).not.toContain('SECRET');
    const allowed = await open(url('escape.qcow2'), { allowPaths: [`${nginx.http}/other/`] });
    expect(allowed.backingChain[0]!.filename).toBe(`${nginx.http}/other/base.qcow2`);
    await allowed.close();

    make('local.qcow2', '8M', [], ['-b', base, '-F', 'qcow2', '-u']);
    const local = (await open(url('local.qcow2')).catch((e: unknown) => e)) as Qcow2Error;
    expect(local.code).toBe('PATH_NOT_ALLOWED');
    expect(local.message).toContain('a local path named by a remote image');
    const explicit = await open(url('local.qcow2'), { allowPaths: [images] });
    expect(explicit.backingChain[0]!.filename).toBe(base);
    await explicit.close();
  });
});

describe('headers', () => {
  it('go to the image\'s origin only: a backing file on another origin (allowed) is fetched without them', async () => {
    const proxy = await new FaultProxy(nginx.http).start();
    try {
      make('cross-base.qcow2', '8M', ['write -P 0x71 0 8M']);
      // Written before it names its backing URL (qemu-io would open the URL through this process's proxy, blocked meanwhile).
      const top = make('cross-top.qcow2', '8M', ['write -P 0x72 0 1M']);
      const localTop = path.join(work, 'cross-top-local.qcow2');
      // The oracle reads a copy whose backing name is the local base.
      fs.copyFileSync(top, localTop);
      qemuImg(['rebase', '-u', '-b', path.join(images, 'cross-base.qcow2'), '-F', 'qcow2', localTop]);
      qemuImg(['rebase', '-u', '-b', `${proxy.url}/images/cross-base.qcow2`, '-F', 'qcow2', top]);
      const refused = (await open(url('cross-top.qcow2')).catch((e: unknown) => e)) as Qcow2Error;
      expect(refused.code).toBe('PATH_NOT_ALLOWED');
      const target = path.join(work, 'cross.raw');
      await load(url('cross-top.qcow2'), target, { allowAnyPath: true, http: { headers: [`Authorization: ${token}`] } });
      expectSameFile(target, qemuConvert(localTop));
      expect(proxy.requests.length).toBeGreaterThan(0);
      expect(proxy.requests.every((r) => r.headers.authorization === undefined)).toBe(true);
    } finally {
      await proxy.stop();
    }
  });
});

describe('the CLI', () => {
  it('over HTTPS with the test CA in NODE_EXTRA_CA_CERTS: load is exact; without it, a one-line TLS error', async () => {
    const target = path.join(work, 'tls.raw');
    const env = { ...process.env, NODE_EXTRA_CA_CERTS: nginx.ca };
    const ok = await runWithEnv(['load', url('zlib.qcow2', nginx.https), target], env);
    expect(ok.status, ok.stderr).toBe(0);
    expectSameFile(target, qemuConvert(zlib));
    fs.rmSync(target);
    const bad = await runWithEnv(['load', url('zlib.qcow2', nginx.https), target], { ...process.env, NODE_EXTRA_CA_CERTS: '' });
    expect(bad.status).toBe(1);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toContain(`${nginx.https}/images/zlib.qcow2: TLS:`);
    expect(fs.existsSync(target)).toBe(false);
  });

  it('neither the query string nor header values appear in any output, while the header reaches the server', async () => {
    const proxy = await new FaultProxy(nginx.http).start();
    proxy.decide = (_req, index) => (index === 3 ? 'drop' : undefined);
    const outputs: string[] = [];
    try {
      const target = path.join(work, 'secret.raw');
      const source = `${proxy.url}/images/zlib.qcow2?${secret}`;
      for (const args of [
        ['info', source],
        ['info', '--output=json', source],
        ['map', source],
        ['map', '--output=json', source],
        ['check', source],
        ['check', '--output=json', source],
        ['load', '--progress=json', source, target],
        ['load', '--json', source, target, '--overwrite'],
        ['load', `${proxy.url}/images/nothing.qcow2?${secret}`, path.join(work, 'nothing.raw')],
        ['load', `${nginx.http}/norange/images/zlib.qcow2?${secret}`, path.join(work, 'nothing.raw')],
      ]) {
        const ran = await runAsync(process.execPath, [cliPath, ...args, '--header', `Authorization: ${token}`]);
        outputs.push(ran.stdout + ran.stderr);
      }
      expectSameFile(target, qemuConvert(zlib));
      const all = outputs.join('\n');
      expect(all).toContain(`${proxy.url}/images/zlib.qcow2`);
      expect(all).toContain('HTTP 404');
      expect(all).not.toContain('SECRET');
      expect(all).not.toContain('TOKEN');
      expect(all).not.toContain('?X-Amz');
      expect(proxy.requests.length).toBeGreaterThan(10);
      expect(proxy.requests.every((r) => r.headers.authorization === token)).toBe(true);
    } finally {
      await proxy.stop();
    }
  });
});

function runWithEnv(args: string[], env: NodeJS.ProcessEnv): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const { spawn } = require('node:child_process') as typeof import('node:child_process');
    const child = spawn(process.execPath, [cliPath, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c));
    child.stderr.on('data', (c: Buffer) => (stderr += c));
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

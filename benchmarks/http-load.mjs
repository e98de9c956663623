#!/usr/bin/env node
/**
 * `qcow2img load` of the realistic uncompressed and zlib images (realistic-image.mjs) from nginx on
 * 127.0.0.1 over HTTP and over HTTPS (a certificate made for the run, trusted through
 * NODE_EXTRA_CA_CERTS), against the same load from the local file and against qemu-img's curl driver
 * (`qemu-img convert -O raw -t none -m 1 URL`, Debian package qemu-block-extra), in one run.
 *
 *   node benchmarks/http-load.mjs [--images uncompressed,zlib] [--runs 5] [--quiet-timeout 20]
 *                                 [--cache-dir DIR] [--no-qemu]
 *
 * (Loads onto several targets: benchmarks/load-many.mjs.)
 *
 * Warm runs: the image is in the page cache (nginx serves it from there, and the local load reads it
 * from there), so the figures compare the HTTP path with the local one, not two disks. The tools
 * rotate which goes first; each figure is the median of --runs runs; the CPU seconds other processes
 * used during the runs are reported (the machine is shared).
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { cliPath, markdownTable, median } from './common.mjs';
import { timed, warmPageCache } from './harness.mjs';
import { buildRealisticImages, defaultCacheDir } from './realistic-image.mjs';

const { values } = parseArgs({
  options: {
    images: { type: 'string', default: 'uncompressed,zlib' },
    runs: { type: 'string', default: '5' },
    'quiet-timeout': { type: 'string', default: '20' },
    'cache-dir': { type: 'string' },
    'no-qemu': { type: 'boolean' },
  },
});
const runs = Number(values.runs);
const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
const quietTimeout = Number(values['quiet-timeout']);

function freePort() {
  return new Promise((resolve) => {
    const server = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A self-signed certificate for 127.0.0.1 (openssl, installed by the setup for the HTTPS tests). */
function makeCertificate(dir) {
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' });
  if (made.status !== 0) throw new Error('openssl could not make the benchmark certificate: run npm run setup');
  return { cert, key };
}

function waitForPort(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => (s.destroy(), resolve(true)));
    s.on('error', () => resolve(false));
  });
}

/** nginx serving `root` over HTTP and HTTPS (sendfile; TLS in nginx itself, on the same cores). */
async function startNginx(root, dir) {
  fs.mkdirSync(dir, { recursive: true });
  const [port, tlsPort] = [await freePort(), await freePort()];
  const { cert, key } = makeCertificate(dir);
  fs.writeFileSync(
    path.join(dir, 'nginx.conf'),
    `daemon off; master_process off; pid ${dir}/nginx.pid; error_log ${dir}/error.log warn;
events { worker_connections 512; }
http { access_log off; sendfile on; keepalive_requests 100000; keepalive_timeout 600s;
  client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir}; uwsgi_temp_path ${dir}; scgi_temp_path ${dir};
  server { listen 127.0.0.1:${port}; root ${root}; }
  server { listen 127.0.0.1:${tlsPort} ssl; ssl_certificate ${cert}; ssl_certificate_key ${key}; root ${root}; } }
`,
  );
  const child = spawn('nginx', ['-c', path.join(dir, 'nginx.conf'), '-p', dir, '-e', path.join(dir, 'error.log')], { stdio: 'ignore' });
  for (let i = 0; i < 100 && !((await waitForPort(port)) && (await waitForPort(tlsPort))); i++) await new Promise((r) => setTimeout(r, 50));
  return { url: `http://127.0.0.1:${port}`, tlsUrl: `https://127.0.0.1:${tlsPort}`, cert, stop: () => child.kill('SIGTERM') };
}

const variants = await buildRealisticImages({ cacheDir, only: values.images.split(','), log: console.error });
const out = path.join(cacheDir, 'http-out');
fs.mkdirSync(out, { recursive: true });
const nginx = await startNginx(path.join(cacheDir, 'variants'), path.join(cacheDir, 'http-nginx'));
const rows = [];
let others = 0;
try {
  for (const variant of variants) {
    const relative = path.relative(path.join(cacheDir, 'variants'), variant.image);
    const url = `${nginx.url}/${relative}`;
    const output = path.join(out, `${variant.name}.raw`);
    const tools = {
      local: [process.execPath, [cliPath, 'load', variant.image, output, '--overwrite', '--progress=none']],
      http: [process.execPath, [cliPath, 'load', url, output, '--overwrite', '--progress=none']],
      // The certificate is trusted as an operator's own CA would be: NODE_EXTRA_CA_CERTS.
      https: ['env', [`NODE_EXTRA_CA_CERTS=${nginx.cert}`, process.execPath, cliPath, 'load', `${nginx.tlsUrl}/${relative}`, output, '--overwrite', '--progress=none']],
      // qemu-img's curl driver on the zlib image (the comparison asked for). One request at a time
      // (-m 1): with more (-m 8, its default, or -m 16) QEMU 7.2's curl driver stalls for good on
      // this machine (ppoll on established connections, nothing moving); bounded all the same.
      ...(values['no-qemu'] || variant.name !== 'zlib' ? {} : { 'qemu-img curl': ['timeout', ['300', 'qemu-img', 'convert', '-O', 'raw', '-t', 'none', '-m', '1', url, output]] }),
    };
    const times = Object.fromEntries(Object.keys(tools).map((k) => [k, []]));
    const names = Object.keys(tools);
    for (let r = 0; r < runs; r++) {
      // Rotate which tool goes first.
      for (const name of [...names.slice(r % names.length), ...names.slice(0, r % names.length)]) {
        fs.rmSync(output, { force: true });
        const [command, args] = tools[name];
        const result = await timed(command, args, { quietTimeout, beforeRun: () => warmPageCache(variant.image) });
        times[name].push(result.seconds);
        others += result.othersCpuSeconds;
        console.error(`${variant.name} ${name} run ${r + 1}: ${result.seconds.toFixed(2)} s (others used ${result.othersCpuSeconds.toFixed(1)} CPU s)`);
      }
    }
    const m = Object.fromEntries(names.map((n) => [n, median(times[n])]));
    rows.push([
      variant.name,
      ...['local', 'http', 'https', 'qemu-img curl'].filter((n) => !values['no-qemu'] || n !== 'qemu-img curl').map((n) => (m[n] ? `${m[n].toFixed(2)} s` : '-')),
      `${((m.http / m.local - 1) * 100).toFixed(0)}%`,
      `${((m.https / m.local - 1) * 100).toFixed(0)}%`,
      m['qemu-img curl'] ? `${(m['qemu-img curl'] / m.http).toFixed(1)}x` : '-',
    ]);
    fs.rmSync(output, { force: true });
  }
} finally {
  nginx.stop();
}
const header = ['image', 'local load', 'HTTP load', 'HTTPS load', ...(values['no-qemu'] ? [] : ['qemu-img curl']), 'HTTP vs local', 'HTTPS vs local', 'qemu-img curl / HTTP'];
console.log(markdownTable(header, rows));
console.log(`\nMedians of ${runs} warm runs (image in the page cache, nginx on 127.0.0.1). Other processes used ${others.toFixed(1)} CPU seconds during the timed runs.`);

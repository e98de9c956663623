/**
 * Real servers for the http(s) source tests, on 127.0.0.1: nginx (HTTP, HTTPS with a CA made
 * at test time by openssl, a location with Range off by `max_ranges 0`) and a fault proxy of
 * the test's own in front of it that drops connections mid-range, answers 503, stalls, or
 * runs a hook before forwarding a request.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
    server.on('error', reject);
  });
}

async function waitForPort(port: number, child: ChildProcess, log: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) throw new Error(`nginx exited: ${fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : ''}`);
    const ok = await new Promise<boolean>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => {
        socket.destroy();
        resolve(true);
      });
      socket.on('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nginx did not listen on ${port}`);
}

/** A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI. */
export function makeCertificates(dir: string): { ca: string; cert: string; key: string } {
  const ca = path.join(dir, 'ca.pem');
  const caKey = path.join(dir, 'ca.key');
  const key = path.join(dir, 'server.key');
  const csr = path.join(dir, 'server.csr');
  const cert = path.join(dir, 'server.pem');
  const ext = path.join(dir, 'server.ext');
  const openssl = (args: string[]) => {
    const r = spawnSync('openssl', args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`openssl ${args[0]}: ${r.stderr}`);
  };
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', caKey, '-out', ca, '-days', '2', '-subj', '/CN=qcow2img test CA']);
  openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', csr, '-subj', '/CN=127.0.0.1']);
  fs.writeFileSync(ext, 'subjectAltName=IP:127.0.0.1\n');
  openssl(['x509', '-req', '-in', csr, '-CA', ca, '-CAkey', caKey, '-CAcreateserial', '-out', cert, '-days', '2', '-extfile', ext]);
  return { ca, cert, key };
}

export interface Nginx {
  /** http://127.0.0.1:PORT */
  http: string;
  /** https://127.0.0.1:PORT */
  https: string;
  ca: string;
  stop(): Promise<void>;
}

/**
 * nginx serving `root` at / (Range on) and at /norange/ (max_ranges 0: ranged GETs get 200),
 * over HTTP and HTTPS; /moved/X redirects (302) to /X, /loop to itself, /to-http/X to http://.../X. Its own config, pid and logs under `dir`; never the system service.
 */
export async function startNginx(root: string, dir: string): Promise<Nginx> {
  fs.mkdirSync(dir, { recursive: true });
  const { ca, cert, key } = makeCertificates(dir);
  const [plain, secure] = [await freePort(), await freePort()];
  const log = path.join(dir, 'error.log');
  const locations = `
    root ${root};
    location /norange/ { alias ${root}/; max_ranges 0; }
    location /moved/ { rewrite ^/moved/(.*)$ /$1 redirect; }
    location = /loop { return 302 /loop; }
    location /to-http/ { rewrite ^/to-http/(.*)$ http://127.0.0.1:${plain}/$1 redirect; }`;
  const config = `
daemon off;
master_process off;
pid ${dir}/nginx.pid;
error_log ${log} warn;
events { worker_connections 512; }
http {
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir}; uwsgi_temp_path ${dir}; scgi_temp_path ${dir};
  server { listen 127.0.0.1:${plain}; ${locations} }
  server { listen 127.0.0.1:${secure} ssl; ssl_certificate ${cert}; ssl_certificate_key ${key}; ${locations} }
}
`;
  fs.writeFileSync(path.join(dir, 'nginx.conf'), config);
  const child = spawn('nginx', ['-c', path.join(dir, 'nginx.conf'), '-p', dir, '-e', log], { stdio: 'ignore' });
  await waitForPort(plain, child, log);
  await waitForPort(secure, child, log);
  return {
    http: `http://127.0.0.1:${plain}`,
    https: `https://127.0.0.1:${secure}`,
    ca,
    stop: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null) return resolve();
        child.on('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

export type Fault = 'drop' | '503' | '404' | 'stall' | undefined;

export interface ProxyRequest {
  url: string;
  headers: http.IncomingHttpHeaders;
  status?: number;
  fault: Fault;
}

/**
 * A forwarding proxy to `upstream` (http://host:port). `decide(request, index)` picks a fault
 * for each request: drop (the connection is cut after half the body), 503, 404, stall (headers
 * and a few bytes, then nothing), or none (forwarded as is). `before` runs before forwarding.
 */
export class FaultProxy {
  readonly requests: ProxyRequest[] = [];
  decide: (request: http.IncomingMessage, index: number) => Fault = () => undefined;
  before: ((request: http.IncomingMessage, index: number) => void) | undefined;
  private server: http.Server | undefined;
  private readonly sockets = new Set<net.Socket>();
  url = '';

  constructor(private readonly upstream: string) {}

  async start(): Promise<this> {
    const target = new URL(this.upstream);
    const agent = new http.Agent({ keepAlive: true });
    this.server = http.createServer((req, res) => {
      const index = this.requests.length;
      const fault = this.decide(req, index);
      const record: ProxyRequest = { url: req.url ?? '', headers: req.headers, fault };
      this.requests.push(record);
      this.before?.(req, index);
      if (fault === '503' || fault === '404') {
        record.status = Number(fault);
        res.writeHead(Number(fault), { 'content-length': '0' });
        res.end();
        return;
      }
      const upstream = http.request({ host: target.hostname, port: target.port, path: req.url, method: req.method, headers: req.headers, agent }, (up) => {
        record.status = up.statusCode;
        res.writeHead(up.statusCode ?? 502, up.headers);
        const length = Number(up.headers['content-length'] ?? 0);
        let sent = 0;
        up.on('data', (chunk: Buffer) => {
          if (fault === 'stall') {
            if (sent === 0) res.write(chunk.subarray(0, Math.min(100, chunk.length)));
            sent += chunk.length;
            return;
          }
          if (fault === 'drop' && sent + chunk.length > length / 2) {
            res.write(chunk.subarray(0, Math.max(0, Math.floor(length / 2) - sent)), () => res.socket?.destroy());
            sent = length;
            up.destroy();
            return;
          }
          sent += chunk.length;
          res.write(chunk);
        });
        up.on('end', () => {
          if (fault !== 'stall' && fault !== 'drop') res.end();
        });
      });
      upstream.on('error', () => res.destroy());
      upstream.end();
    });
    this.server.on('connection', (socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as net.AddressInfo).port}`;
    return this;
  }

  async stop(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}

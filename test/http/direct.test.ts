/**
 * The plain-HTTP fast path (native/core/http_get.cc through native().httpGet, and
 * HttpFile.fetchDirect judging its heads) against a raw TCP server scripted by each case: nginx
 * answers every request well, and the cases here are the ones it never produces (a head past
 * 64 KiB, a 206 of the wrong length, a chunked 206, a kept-alive connection closed between jobs).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { HttpFile, type Piece } from '../../src/http/client';
import { requestBytes } from '../../src/http/direct';
import { Qcow2Error } from '../../src/index';
import { native, type NativeHttpGetJob, type NativeHttpGetResult } from '../../src/native';

/** The remote file: every byte differs from its neighbours, so a misplaced range shows. */
const size = 256 * 1024;
const content = Buffer.alloc(size);
for (let i = 0; i < size; i++) content[i] = (i * 131 + 7 + (i >> 8)) & 255;

/** What a piece's memory holds before a job: a byte the file never has at a piece's start. */
const untouched = 0xee;

interface Seen {
  /** Order among all requests the server got. */
  index: number;
  /** Order of the connection it came on. */
  connection: number;
  head: string;
  /** Lower-case names. */
  headers: Record<string, string>;
  /** [from, to) asked by its Range header. */
  range?: { from: number; to: number };
}

type Answer = (request: Seen, socket: net.Socket) => void;

/** The head and body of a well-behaved 206 for `request`, with `headers` replacing or adding lines. */
function partial(request: Seen, headers: Record<string, string | undefined> = {}, body?: Buffer): Buffer {
  const { from, to } = request.range!;
  const end = Math.min(to, size);
  const payload = body ?? content.subarray(from, end);
  const fields: Record<string, string | undefined> = {
    'Content-Range': `bytes ${from}-${end - 1}/${size}`,
    'Content-Length': String(payload.length),
    ETag: '"v1"',
    ...headers,
  };
  const lines = Object.entries(fields).flatMap(([name, value]) => (value === undefined ? [] : [`${name}: ${value}`]));
  return Buffer.concat([Buffer.from(`HTTP/1.1 206 Partial Content\r\n${lines.join('\r\n')}\r\n\r\n`, 'latin1'), payload]);
}

/** A raw TCP server on 127.0.0.1 that records each request and answers it as `answer` says. */
class ScriptedServer {
  readonly requests: Seen[] = [];
  readonly sockets: net.Socket[] = [];
  /** Per connection: resolves when the server sees it closed. */
  readonly closed: Promise<void>[] = [];
  answer: Answer = (request, socket) => socket.write(partial(request));
  private readonly server = net.createServer((socket) => this.accept(socket));

  get connections(): number {
    return this.sockets.length;
  }

  async start(): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return this;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  get url(): URL {
    return new URL(`http://127.0.0.1:${this.port}/disk.img`);
  }

  async stop(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(socket: net.Socket): void {
    const connection = this.sockets.length;
    this.sockets.push(socket);
    this.closed.push(new Promise((resolve) => socket.on('close', () => resolve())));
    // A client that gives up mid-answer makes the server's writes fail: that is the case, not an error of the test.
    socket.on('error', () => {});
    let pending = '';
    socket.on('data', (data: Buffer) => {
      pending += data.toString('latin1');
      for (let end; (end = pending.indexOf('\r\n\r\n')) >= 0; ) {
        const head = pending.slice(0, end);
        pending = pending.slice(end + 4);
        const headers: Record<string, string> = {};
        for (const line of head.split('\r\n').slice(1)) {
          const colon = line.indexOf(':');
          headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
        }
        const range = /^bytes=(\d+)-(\d+)$/.exec(headers.range ?? '');
        const request: Seen = { index: this.requests.length, connection, head, headers, ...(range ? { range: { from: Number(range[1]), to: Number(range[2]) + 1 } } : {}) };
        this.requests.push(request);
        if (!socket.destroyed) this.answer(request, socket);
      }
    });
  }
}

let server: ScriptedServer;
/** Sockets jobs handed back, closed after each case. */
let leftOpen: number[] = [];

beforeEach(async () => {
  server = await new ScriptedServer().start();
  leftOpen = [];
});
afterEach(async () => {
  for (const fd of leftOpen) fs.closeSync(fd);
  await server.stop();
});

/** A piece of the file as the fast path takes it, asking [from, to) of the scripted server. */
function piece(from: number, to: number): { request: Buffer; into: Buffer } {
  return { request: requestBytes(server.url, { range: `bytes=${from}-${to - 1}`, connection: 'keep-alive' }), into: Buffer.alloc(to - from, untouched) };
}

/** Runs a job against the scripted server; the sockets it hands back are closed after the case. */
async function httpGet(pieces: NativeHttpGetJob['pieces'], options: Partial<NativeHttpGetJob> = {}): Promise<NativeHttpGetResult> {
  const result = await native().httpGet({
    family: 4,
    address: '127.0.0.1',
    port: server.port,
    idle: [],
    connections: 1,
    timeoutMs: 10_000,
    counters: new BigUint64Array(4),
    pieces,
    ...options,
  });
  leftOpen.push(...result.idle);
  return result;
}

/** Resolves with 'closed' once the server sees the connection end, or 'open' if it has not after a while. */
function closedOrOpen(connection: number): Promise<'closed' | 'open'> {
  return Promise.race([server.closed[connection]!.then(() => 'closed' as const), new Promise<'open'>((resolve) => setTimeout(() => resolve('open'), 5000))]);
}

/** Opens the scripted server's file through HttpFile: node:http's first request pins it (ETag "v1"). */
async function openFile(): Promise<HttpFile> {
  const { file } = await HttpFile.open(server.url, { retryDelayMs: 10, timeoutMs: 10_000, connections: 1 }, 4096);
  expect(file.size).toBe(size);
  return file;
}

/** What `fetch` brings for a piece left by fetchDirect, into the piece's memory. */
function fetchRest(file: HttpFile, rest: Piece): Promise<void> {
  return file.fetch(rest.from, rest.to - rest.from, (chunk, position) => {
    chunk.copy(rest.into, position - rest.from);
  });
}

describe('native().httpGet', () => {
  it('reads two pieces on one kept-alive connection straight into their memory, and hands the connection back', async () => {
    const pieces = [piece(1000, 1000 + 70_000), piece(100_000, 100_000 + 5000)];
    const result = await httpGet(pieces);
    expect(result.pieces.map((p) => [p.failure, p.received])).toEqual([
      ['', 70_000],
      ['', 5000],
    ]);
    expect(result.pieces[0]!.head).toMatch(/^HTTP\/1\.1 206 Partial Content\r\nContent-Range: bytes 1000-70999\/262144\r\n/);
    expect(pieces[0]!.into.equals(content.subarray(1000, 71_000))).toBe(true);
    expect(pieces[1]!.into.equals(content.subarray(100_000, 105_000))).toBe(true);
    // The second request reused the first's connection.
    expect(server.connections).toBe(1);
    expect(server.requests.map((r) => [r.connection, r.range])).toEqual([
      [0, { from: 1000, to: 71_000 }],
      [0, { from: 100_000, to: 105_000 }],
    ]);
    expect(server.requests[0]!.head.split('\r\n')[0]).toBe('GET /disk.img HTTP/1.1');
    expect(server.requests[0]!.headers.host).toBe(`127.0.0.1:${server.port}`);
    expect(server.requests[0]!.headers.range).toBe('bytes=1000-70999');
    // The socket handed back is that connection: closing it ends the server's side.
    expect(result.idle).toHaveLength(1);
    fs.closeSync(result.idle[0]!);
    leftOpen = [];
    expect(await closedOrOpen(0)).toBe('closed');
  });

  it('a body cut after N bytes: received is N, and the piece says why it stopped', async () => {
    const cut = 12_345;
    server.answer = (request, socket) => {
      const whole = partial(request);
      socket.write(whole.subarray(0, whole.length - request.range!.to + request.range!.from + cut), () => socket.destroy());
    };
    const pieces = [piece(4096, 4096 + 50_000)];
    const result = await httpGet(pieces);
    expect(result.pieces[0]!.received).toBe(cut);
    expect(result.pieces[0]!.failure).not.toBe('');
    expect(result.pieces[0]!.head).toMatch(/^HTTP\/1\.1 206 /);
    expect(pieces[0]!.into.subarray(0, cut).equals(content.subarray(4096, 4096 + cut))).toBe(true);
    expect(result.idle).toEqual([]);
  });

  /** A 206 for `request` whose head (without its empty line) is `length` bytes long, padded by one header. */
  function headOf(length: number, request: Seen): Buffer {
    const bare = partial(request, { 'X-Filler': '' });
    const filler = 'a'.repeat(length - bare.indexOf('\r\n\r\n'));
    return partial(request, { 'X-Filler': filler });
  }

  it.each([
    ['just past the limit, its empty line in the same read as its end', 64 * 1024 + 1],
    ['far past the limit', 1024 * 1024],
  ])('a response head longer than 64 KiB (%s) is refused: nothing read, the connection dropped', async (_case, length) => {
    server.answer = (request, socket) => socket.write(headOf(length, request));
    const pieces = [piece(0, 4096)];
    const result = await httpGet(pieces);
    expect(result.pieces[0]!.failure).toMatch(/longer than 64 KiB/);
    expect(result.pieces[0]!.received).toBe(0);
    expect(result.pieces[0]!.head).toBe('');
    expect(pieces[0]!.into.equals(Buffer.alloc(4096, untouched))).toBe(true);
    expect(result.idle).toEqual([]);
  });

  it('a response head of exactly 64 KiB is taken', async () => {
    server.answer = (request, socket) => socket.write(headOf(64 * 1024, request));
    const pieces = [piece(0, 4096)];
    const result = await httpGet(pieces);
    expect(result.pieces[0]).toMatchObject({ failure: '', received: 4096 });
    expect(result.pieces[0]!.head).toHaveLength(64 * 1024);
    expect(pieces[0]!.into.equals(content.subarray(0, 4096))).toBe(true);
  });

  it('a 200 (Range ignored): received 0, the head handed back for JavaScript to judge', async () => {
    server.answer = (_request, socket) => socket.write(Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: ${size}\r\nETag: "v1"\r\n\r\n`), content]));
    const asked = piece(8192, 8192 + 4096);
    asked.into.fill(0xa5);
    const result = await httpGet([asked]);
    expect(result.pieces[0]!.received).toBe(0);
    expect(result.pieces[0]!.failure).not.toBe('');
    expect(result.pieces[0]!.head).toBe(`HTTP/1.1 200 OK\r\nContent-Length: ${size}\r\nETag: "v1"`);
    // The body that came with the head is not the range asked for: none of it lands in `into`.
    expect(asked.into.every((b) => b === 0xa5)).toBe(true);
    // The whole file's body was left unread: the connection cannot carry another request.
    expect(result.idle).toEqual([]);
  });

  it('a stall after the head: the piece stops with a "no data" failure', async () => {
    server.answer = (request, socket) => {
      const whole = partial(request);
      socket.write(whole.subarray(0, whole.length - (request.range!.to - request.range!.from)));
    };
    const result = await httpGet([piece(0, 4096)], { timeoutMs: 300 });
    expect(result.pieces[0]!.failure).toMatch(/^no data/);
    expect(result.pieces[0]!.received).toBe(0);
    expect(result.pieces[0]!.head).toMatch(/^HTTP\/1\.1 206 /);
    expect(result.idle).toEqual([]);
  });

  it('a kept-alive connection the server closed between jobs: the next job retries on a new connection', async () => {
    const first = await httpGet([piece(0, 4096)]);
    expect(first.pieces[0]!.failure).toBe('');
    expect(first.idle).toHaveLength(1);
    leftOpen = [];
    server.sockets[0]!.destroy();
    await server.closed[0];
    const pieces = [piece(20_000, 30_000)];
    const second = await httpGet(pieces, { idle: first.idle });
    expect(second.pieces[0]).toMatchObject({ failure: '', received: 10_000 });
    expect(pieces[0]!.into.equals(content.subarray(20_000, 30_000))).toBe(true);
    expect(server.connections).toBe(2);
    expect(server.requests.map((r) => [r.connection, r.range?.from])).toEqual([
      [0, 0],
      [1, 20_000],
    ]);
    // The new connection is the one handed back (the dead one was closed).
    expect(second.idle).toHaveLength(1);
  });

  it('the cancel flag set while a piece stalls stops it: "cancelled", and the job settles', async () => {
    // Nothing is answered; only the flag can end the job before its timeout (far beyond the test's).
    server.answer = () => {};
    const counters = new BigUint64Array(4);
    const timer = setTimeout(() => {
      counters[2] = 1n;
    }, 200);
    const result = await httpGet([piece(0, 4096)], { counters, timeoutMs: 3_600_000 });
    clearTimeout(timer);
    expect(server.requests).toHaveLength(1);
    expect(result.pieces[0]).toMatchObject({ failure: 'cancelled', received: 0, head: '' });
    expect(result.idle).toEqual([]);
  });

  it('a 206 whose Content-Length is not the piece length: the body is not read, and the connection is not reused', async () => {
    server.answer = (request, socket) => {
      // The first request gets half of its range (Content-Range and Content-Length say so); the second a proper answer.
      if (request.index === 0) {
        const { from, to } = request.range!;
        const half = from + (to - from) / 2;
        socket.write(partial(request, { 'Content-Range': `bytes ${from}-${half - 1}/${size}` }, content.subarray(from, half)));
      } else socket.write(partial(request));
    };
    const pieces = [piece(0, 8192), piece(8192, 16_384)];
    const result = await httpGet(pieces);
    expect(result.pieces[0]!.received).toBe(0);
    expect(result.pieces[0]!.failure).not.toBe('');
    expect(result.pieces[0]!.head).toMatch(/\r\nContent-Length: 4096(\r\n|$)/);
    // Its unread body would have been taken for the next response's head: a new connection carried that.
    expect(result.pieces[1]).toMatchObject({ failure: '', received: 8192 });
    expect(pieces[1]!.into.equals(content.subarray(8192, 16_384))).toBe(true);
    expect(server.requests.map((r) => r.connection)).toEqual([0, 1]);
  });

  it('a 206 with Transfer-Encoding: chunked (even with a matching Content-Length) is not read', async () => {
    // A chunked body as long as the range (a 4084-byte chunk: "ff4" CRLF, data, CRLF, "0" CRLF CRLF), so only the Transfer-Encoding line tells.
    const chunked = Buffer.concat([Buffer.from('ff4\r\n'), content.subarray(0, 4084), Buffer.from('\r\n0\r\n\r\n')]);
    server.answer = (request, socket) => socket.write(partial(request, { 'Content-Length': '4096', 'Transfer-Encoding': 'chunked' }, chunked));
    const result = await httpGet([piece(0, 4096)]);
    expect(result.pieces[0]!.received).toBe(0);
    expect(result.pieces[0]!.failure).not.toBe('');
    expect(result.pieces[0]!.head).toMatch(/\r\nTransfer-Encoding: chunked(\r\n|$)/);
    expect(result.idle).toEqual([]);
  });
});

describe('HttpFile.fetchDirect', () => {
  it('sends the pinned ETag; a piece cut short is left from the byte reached, and fetch() completes it', async () => {
    const file = await openFile();
    try {
      const cut = 3000;
      server.answer = (request, socket) => {
        const whole = partial(request);
        // The fast path's request (the first after opening) is cut; the rest are answered whole.
        if (request.index === 1) socket.write(whole.subarray(0, whole.length - (request.range!.to - request.range!.from) + cut), () => socket.destroy());
        else socket.write(whole);
      };
      const from = 50_000;
      const into = Buffer.alloc(20_000, untouched);
      const left = await file.fetchDirect([{ from, to: from + into.length, into }]);
      expect(left.map((p) => [p.from, p.to, p.into.length])).toEqual([[from + cut, from + into.length, into.length - cut]]);
      expect(left[0]!.into.buffer === into.buffer && left[0]!.into.byteOffset === into.byteOffset + cut).toBe(true);
      expect(file.directBytes).toBe(cut);
      const native = server.requests[1]!;
      expect(native.headers.host).toBe(`127.0.0.1:${server.port}`);
      expect(native.headers.range).toBe(`bytes=${from}-${from + into.length - 1}`);
      expect(native.headers['if-match']).toBe('"v1"');
      await fetchRest(file, left[0]!);
      expect(server.requests[2]!.headers.range).toBe(`bytes=${from + cut}-${from + into.length - 1}`);
      expect(server.requests[2]!.headers['if-match']).toBe('"v1"');
      expect(into.equals(content.subarray(from, from + into.length))).toBe(true);
    } finally {
      file.close();
    }
  });

  it('a 200 to the fast path leaves the piece whole, and fetch() then says RANGE_NOT_SUPPORTED', async () => {
    const file = await openFile();
    try {
      server.answer = (_request, socket) => socket.write(Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: ${size}\r\nETag: "v1"\r\n\r\n`), content]));
      const into = Buffer.alloc(4096, untouched);
      const left = await file.fetchDirect([{ from: 8192, to: 8192 + 4096, into }]);
      expect(left.map((p) => [p.from, p.to, p.into.length])).toEqual([[8192, 8192 + 4096, 4096]]);
      expect(file.directBytes).toBe(0);
      const error = await fetchRest(file, left[0]!).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect((error as Qcow2Error).code).toBe('RANGE_NOT_SUPPORTED');
    } finally {
      file.close();
    }
  });

  it('a 206 with another ETag than the pinned one: SOURCE_CHANGED', async () => {
    const file = await openFile();
    try {
      server.answer = (request, socket) => socket.write(partial(request, { ETag: '"v2"' }));
      const into = Buffer.alloc(4096, untouched);
      const error = await file.fetchDirect([{ from: 4096, to: 8192, into }]).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2Error);
      expect((error as Qcow2Error).code).toBe('SOURCE_CHANGED');
      expect(server.requests[1]!.headers['if-match']).toBe('"v1"');
    } finally {
      file.close();
    }
  });
});

/**
 * Ranged GETs of one remote file over a pool of kept-alive connections (node:http/https).
 *
 * - The first response pins the file: its ETag (or Last-Modified) and size. Every later
 *   request carries If-Match (If-Unmodified-Since without an ETag), and every response is
 *   checked against the pin, so a file replaced on the server is an error (SOURCE_CHANGED),
 *   never a mix of two files.
 * - A server that answers a ranged GET with the whole file (200) is refused (RANGE_NOT_SUPPORTED).
 * - A dropped connection, a stall, a 5xx, 408 or 429 is retried with backoff, resuming at the
 *   byte reached; a try that brought bytes resets the count. Other 4xx are not retried.
 * - What is shown anywhere is scheme://host/path: never the query string or header values.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import * as fs from 'node:fs';
import { Qcow2Error } from '../errors';
import { JobCounters } from '../jobs';
import { native } from '../native';
import { numericAddress, parseHead, requestBytes, type ResponseHead } from './direct';
import { shownUrl } from './url';

/** Bytes [from, to) of the file, to be fetched into `into` (as long as the range). */
export interface Piece {
  from: number;
  to: number;
  into: Buffer;
}

/** How http(s) images are fetched: headers for tokens, and the patience of each request. */
export interface HttpOptions {
  /** Extra request headers ("Name: value" strings or an object), sent to the image's origin only. */
  headers?: readonly string[] | Record<string, string>;
  /** Milliseconds without a byte before a request counts as stalled (default 30000). */
  timeoutMs?: number;
  /** Tries of one range without progress before giving up (default 6). */
  tries?: number;
  /** First backoff in milliseconds, doubled each try up to 5 s (default 200). */
  retryDelayMs?: number;
  /** Connections kept to the server (default 8). */
  connections?: number;
  /** @internal The origin `headers` belong to (the chain's first image); undefined: any. */
  headersOrigin?: string;
}

/** The headers of `--header 'Name: value'` strings, checked; values are never echoed. */
export function parseHeaders(headers: HttpOptions['headers'], shown: string): Record<string, string> {
  if (!headers) return {};
  const out: Record<string, string> = {};
  const entries = Array.isArray(headers)
    ? headers.map((line: string) => {
        const colon = line.indexOf(':');
        if (colon <= 0) throw new Qcow2Error('INVALID_ARGUMENT', `a header must be "Name: value" (got one without a name or colon)`, { path: shown });
        return [line.slice(0, colon).trim(), line.slice(colon + 1).trim()] as const;
      })
    : Object.entries(headers);
  for (const [name, value] of entries) {
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) throw new Qcow2Error('INVALID_ARGUMENT', `header name "${name}" is not a valid HTTP header name`, { path: shown });
    if (/[\r\n\0]/.test(value)) throw new Qcow2Error('INVALID_ARGUMENT', `the value of header ${name} holds a line break`, { path: shown });
    if (/^(range|if-match|if-range|if-unmodified-since|host|content-length|transfer-encoding|connection)$/i.test(name)) {
      throw new Qcow2Error('INVALID_ARGUMENT', `header ${name} is set by qcow2img itself`, { path: shown });
    }
    out[name] = value;
  }
  return out;
}

/** Why one try failed, and whether another may help. */
class TryError extends Error {
  constructor(
    message: string,
    readonly retry: boolean,
    readonly final?: Qcow2Error,
    /** Where a redirect of the opening request points. */
    readonly redirect?: URL,
  ) {
    super(message);
  }
}

/** Waits `ms`, or less when `signal` fires (the caller then sees it aborted). */
function abortableDelay(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** Redirects followed while a file is opened, as curl (QEMU's http driver) follows them. */
const maxRedirects = 10;
const redirectStatuses = new Set([301, 302, 303, 307, 308]);

export class HttpFile {
  readonly shown: string;
  /** Where requests go: the URL given, or where its redirects led when the file was opened. */
  private target: URL;
  private redirects = 0;
  /** Size of the file, from the first response's Content-Range. */
  size = 0;
  private etag: string | undefined;
  private lastModified: string | undefined;
  private agent: http.Agent;
  private headers: Record<string, string>;
  private readonly connections: number;
  private readonly timeoutMs: number;
  private readonly tries: number;
  private readonly retryDelayMs: number;
  private closed = false;
  /** Bytes received, all requests (for benchmarks and tests). */
  bytesReceived = 0;
  /** Of those, the bytes native threads received (the plain-HTTP fast path). */
  directBytes = 0;
  requests = 0;
  /** Kept-alive sockets of the plain-HTTP fast path, between its jobs. */
  private idle: number[] = [];
  private address: Promise<{ address: string; family: 4 | 6 } | undefined> | undefined;

  private constructor(
    readonly url: URL,
    options: HttpOptions,
  ) {
    this.shown = shownUrl(url);
    this.target = url;
    this.headers = parseHeaders(options.headers, this.shown);
    this.timeoutMs = options.timeoutMs ?? 30000;
    this.tries = options.tries ?? 6;
    this.retryDelayMs = options.retryDelayMs ?? 200;
    this.connections = options.connections ?? 8;
    this.agent = this.agentFor(url);
  }

  private agentFor(url: URL): http.Agent {
    const agentOptions = { keepAlive: true, maxSockets: this.connections, maxFreeSockets: this.connections, scheduling: 'lifo' as const };
    return url.protocol === 'https:' ? new https.Agent(agentOptions) : new http.Agent(agentOptions);
  }

  /**
   * Follows a redirect of the opening request: later requests go where it points. Headers given
   * for the image's origin are not sent to another origin, and https never leads to http.
   */
  private follow(to: URL): void {
    if (++this.redirects > maxRedirects) throw this.error('HTTP_ERROR', `more than ${maxRedirects} redirects`);
    if (to.protocol !== 'http:' && to.protocol !== 'https:') throw this.error('HTTP_ERROR', `a redirect to a ${to.protocol} URL is not followed`);
    if (this.target.protocol === 'https:' && to.protocol === 'http:') throw this.error('HTTP_ERROR', 'a redirect from https to http is not followed');
    if (to.origin !== this.target.origin) this.headers = {};
    this.address = undefined;
    if (to.protocol !== this.target.protocol) {
      this.agent.destroy();
      this.agent = this.agentFor(to);
    }
    this.target = to;
  }

  /** Opens the file: a first ranged GET of up to `firstBytes` bytes, which pins it. Resolves with those bytes too. */
  static async open(url: URL, options: HttpOptions = {}, firstBytes = 65536): Promise<{ file: HttpFile; head: Buffer }> {
    const file = new HttpFile(url, options);
    try {
      const parts: Buffer[] = [];
      await file.fetch(0, firstBytes, (chunk) => {
        parts.push(chunk);
      });
      return { file, head: Buffer.concat(parts) };
    } catch (error) {
      file.close();
      throw error;
    }
  }

  close(): void {
    this.closed = true;
    this.agent.destroy();
    for (const fd of this.idle.splice(0)) fs.closeSync(fd);
  }

  private error(code: 'HTTP_ERROR' | 'SOURCE_CHANGED' | 'RANGE_NOT_SUPPORTED' | 'CLOSED' | 'CANCELLED', message: string): Qcow2Error {
    return new Qcow2Error(code, message, { path: this.shown });
  }

  /**
   * GETs bytes [offset, offset + length) (clipped to the file once its size is known), handing
   * each chunk to `sink` in order with its file offset. Retries and resumes as the file says.
   * `signal` cuts the request in flight (and a wait between tries): CANCELLED.
   */
  async fetch(offset: number, length: number, sink: (chunk: Buffer, position: number) => void, signal?: AbortSignal): Promise<void> {
    let end = offset + length;
    let position = offset;
    let failures = 0;
    for (;;) {
      if (this.size > 0) end = Math.min(end, this.size);
      if (position >= end) return;
      if (this.closed) throw this.error('CLOSED', 'closed while reading');
      if (signal?.aborted) throw this.error('CANCELLED', 'cancelled');
      const before = position;
      try {
        await this.once(position, end, (chunk, at) => {
          sink(chunk, at);
          position = at + chunk.length;
        }, signal);
      } catch (error) {
        if (!(error instanceof TryError)) throw error;
        if (error.redirect) {
          this.follow(error.redirect);
          continue;
        }
        if (!error.retry) throw error.final ?? this.error('HTTP_ERROR', error.message);
        if (position > before) failures = 0;
        failures++;
        if (failures >= this.tries) throw this.error('HTTP_ERROR', `${error.message}; gave up after ${this.tries} tries at byte ${position}`);
        const delay = Math.min(5000, this.retryDelayMs * 2 ** (failures - 1));
        await abortableDelay(delay, signal);
      }
    }
  }

  /** The headers of a ranged GET: the user's, the range, and the pin (If-Match, or If-Unmodified-Since without a strong ETag). */
  private rangeHeaders(from: number, to: number): Record<string, string> {
    const headers: Record<string, string> = { ...this.headers, range: `bytes=${from}-${to - 1}`, 'accept-encoding': 'identity' };
    if (this.etag !== undefined && !this.etag.startsWith('W/')) headers['if-match'] = this.etag;
    else if (this.lastModified !== undefined) headers['if-unmodified-since'] = this.lastModified;
    return headers;
  }

  /**
   * The plain-HTTP fast path: one try of every piece on native threads, bodies read straight
   * into `into`, heads judged here as fetch() judges them. Resolves with what is left to fetch()
   * (a piece cut short, refused or never answered is retried there, with its backoff and its
   * errors); rejects only on what no retry mends (the file changed) or on cancel.
   */
  async fetchDirect(pieces: Piece[], signal?: AbortSignal): Promise<Piece[]> {
    if (this.target.protocol !== 'http:' || this.size === 0 || pieces.length === 0 || this.closed) return pieces;
    const server = await (this.address ??= numericAddress(this.target));
    if (!server) return pieces;
    const counters = new JobCounters();
    const release = counters.cancelOn(signal);
    const port = Number(this.target.port || 80);
    const requests = pieces.map((p) => ({ request: requestBytes(this.target, { ...this.rangeHeaders(p.from, p.to), connection: 'keep-alive' }), into: p.into }));
    this.requests += pieces.length;
    const result = await native()
      .httpGet({ ...server, port, idle: this.idle.splice(0), connections: this.connections, timeoutMs: this.timeoutMs, counters: counters.words, pieces: requests })
      .finally(release);
    if (this.closed) for (const fd of result.idle) fs.closeSync(fd);
    else this.idle.push(...result.idle);
    if (signal?.aborted) throw this.error('CANCELLED', 'cancelled');
    const left: Piece[] = [];
    pieces.forEach((piece, i) => {
      const { head, received } = result.pieces[i]!;
      const response = head ? parseHead(head) : undefined;
      let valid = 0;
      if (response?.statusCode === 206) {
        const pinError = this.checkPin(response, piece.from);
        if (pinError) throw pinError;
        valid = received;
        this.bytesReceived += received;
        this.directBytes += received;
      }
      if (piece.from + valid < piece.to) left.push({ from: piece.from + valid, to: piece.to, into: piece.into.subarray(valid) });
    });
    return left;
  }

  /**
   * Fetches every piece into its `into`: over plain HTTP first on native threads (fetchDirect),
   * then what that left with fetch() over the connections, with its retries. The first failure
   * cuts the other requests, and all of them have ended when this settles: none writes into a
   * piece's memory afterwards.
   */
  async fetchAll(all: Piece[], signal?: AbortSignal): Promise<void> {
    const pieces = await this.fetchDirect(all, signal);
    const cut = new AbortController();
    const onAbort = () => cut.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    if (signal?.aborted) cut.abort();
    let next = 0;
    let failure: { error: unknown } | undefined;
    const worker = async () => {
      while (next < pieces.length && !failure) {
        const { from, to, into } = pieces[next++]!;
        try {
          await this.fetch(from, to - from, (chunk, at) => chunk.copy(into, at - from), cut.signal);
        } catch (error) {
          failure ??= { error };
          cut.abort();
        }
      }
    };
    try {
      await Promise.all(Array.from({ length: Math.min(this.connections, pieces.length) }, worker));
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    if (failure) throw failure.error;
  }

  /** One request for [from, to): resolves when the body is complete, rejects with a TryError. */
  private once(from: number, end: number, sink: (chunk: Buffer, position: number) => void, signal?: AbortSignal): Promise<void> {
    let to = end;
    const headers = this.rangeHeaders(from, to);
    const request = this.target.protocol === 'https:' ? https.request : http.request;
    this.requests++;
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      const onAbort = () => fail(new TryError('', false, this.error('CANCELLED', 'cancelled')));
      const fail = (error: TryError) => {
        if (settled) return;
        settled = true;
        req.destroy();
        reject(error);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      // However the request ends, the listener goes with it.
      const done = () => signal?.removeEventListener('abort', onAbort);
      const req = request(this.target, { method: 'GET', headers, agent: this.agent }, (res) => {
        const status = res.statusCode ?? 0;
        if (status !== 206) {
          res.resume();
          fail(this.statusError(res));
          return;
        }
        const pinError = this.checkPin(res, from);
        if (pinError) {
          res.resume();
          fail(new TryError(pinError.message, false, pinError));
          return;
        }
        to = Math.min(to, this.size);
        let at = from;
        res.on('data', (chunk: Buffer) => {
          if (settled) return;
          // Never past what was asked: a server sending more is cut.
          const take = Math.min(chunk.length, to - at);
          if (take <= 0) return;
          const piece = take === chunk.length ? chunk : chunk.subarray(0, take);
          this.bytesReceived += take;
          try {
            sink(piece, at);
          } catch (error) {
            settled = true;
            req.destroy();
            reject(error);
            return;
          }
          at += take;
        });
        res.on('end', () => {
          if (settled) return;
          if (at < to) fail(new TryError(`the connection ended at byte ${at} of a range to ${to}`, true));
          else {
            settled = true;
            resolve();
          }
        });
        res.on('aborted', () => fail(new TryError(`the connection was cut at byte ${at}`, true)));
        res.on('error', (error: NodeJS.ErrnoException) => fail(new TryError(`the connection failed at byte ${at} (${error.code ?? 'error'})`, true)));
      });
      req.setTimeout(this.timeoutMs, () => fail(new TryError(`no data for ${this.timeoutMs / 1000} s`, true)));
      req.on('error', (error: NodeJS.ErrnoException) => {
        const tls = /CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO/i.test(error.code ?? '');
        if (tls) fail(new TryError('', false, this.error('HTTP_ERROR', `TLS: ${error.code ?? 'handshake failed'} (the server's certificate is not trusted: add its CA to the system's or NODE_EXTRA_CA_CERTS)`)));
        else if (error.code === 'ENOTFOUND' || error.code === 'EAI_AGAIN') fail(new TryError(`cannot resolve the host (${error.code})`, error.code === 'EAI_AGAIN'));
        else fail(new TryError(`request failed (${error.code ?? 'error'})`, true));
      });
      req.on('close', done);
      req.end();
    });
  }

  private statusError(res: ResponseHead | http.IncomingMessage): TryError {
    const status = res.statusCode ?? 0;
    if (status === 200) {
      const etag = res.headers.etag;
      if (this.etag !== undefined && etag !== undefined && etag !== this.etag) {
        return new TryError('', false, this.error('SOURCE_CHANGED', 'the file on the server changed (its ETag is not the one first seen)'));
      }
      return new TryError('', false, this.error('RANGE_NOT_SUPPORTED', 'the server ignores Range requests (it answered a ranged GET with the whole file); qcow2img needs ranged reads'));
    }
    if (status === 412) return new TryError('', false, this.error('SOURCE_CHANGED', 'the file on the server changed since it was opened (412 Precondition Failed)'));
    if (status === 416) return new TryError('', false, this.error('SOURCE_CHANGED', 'the file on the server is shorter than when it was opened (416)'));
    if (status >= 500 || status === 408 || status === 429) return new TryError(`HTTP ${status}`, true);
    const location = res.headers.location;
    if (redirectStatuses.has(status) && location !== undefined && this.size === 0) {
      // Only while opening: a file already pinned does not move.
      const to = URL.canParse(location, this.target.href) ? new URL(location, this.target) : undefined;
      if (to) return new TryError('', false, undefined, to);
    }
    if (status >= 300 && status < 400) return new TryError('', false, this.error('HTTP_ERROR', `HTTP ${status}${this.size === 0 ? ' without a usable Location' : ': the file moved while it was read'}`));
    return new TryError('', false, this.error('HTTP_ERROR', `HTTP ${status}${res.statusMessage ? ` ${res.statusMessage}` : ''}`));
  }

  /** The first 206 pins the file; later ones must match it. Returns the error, if any. */
  private checkPin(res: ResponseHead | http.IncomingMessage, from: number): Qcow2Error | undefined {
    const range = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers['content-range'] ?? '');
    if (!range || Number(range[1]) !== from) return this.error('HTTP_ERROR', 'the server answered a ranged GET with a Content-Range that does not match the request');
    const total = range[3] === '*' ? NaN : Number(range[3]);
    const etag = res.headers.etag;
    const lastModified = res.headers['last-modified'];
    if (this.size === 0) {
      if (!Number.isSafeInteger(total)) return this.error('HTTP_ERROR', 'the server does not say the size of the file (Content-Range */)');
      this.size = total;
      this.etag = etag;
      this.lastModified = lastModified;
      return undefined;
    }
    if (total !== this.size || (this.etag !== undefined && etag !== this.etag) || (this.etag === undefined && this.lastModified !== undefined && lastModified !== this.lastModified)) {
      return this.error('SOURCE_CHANGED', 'the file on the server changed since it was opened (size, ETag or Last-Modified differ)');
    }
    return undefined;
  }
}

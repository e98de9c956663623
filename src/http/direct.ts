/**
 * The plain-HTTP fast path's two small pieces of protocol: the bytes of a ranged GET, and the
 * head native code hands back, parsed into the shape client.ts judges node:http's responses in.
 * The bodies never pass through JavaScript: native threads read them into the stage.
 */
import * as dns from 'node:dns';

/** What client.ts looks at in a response: node:http's IncomingMessage has this shape. */
export interface ResponseHead {
  statusCode?: number;
  statusMessage?: string;
  /** Lower-case names. */
  headers: Record<string, string | undefined>;
}

/** A response head (status line and header lines, without the empty line). */
export function parseHead(head: string): ResponseHead {
  const [statusLine = '', ...lines] = head.split('\r\n');
  const status = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(statusLine);
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim();
    headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`;
  }
  return { ...(status ? { statusCode: Number(status[1]), statusMessage: status[2] ?? '' } : {}), headers };
}

/** The whole request of a GET of `url` with `headers` (values already checked: no line breaks). */
export function requestBytes(url: URL, headers: Record<string, string>): Buffer {
  const lines = [`GET ${url.pathname}${url.search} HTTP/1.1`, `Host: ${url.host}`, ...Object.entries(headers).map(([name, value]) => `${name}: ${value}`)];
  return Buffer.from(`${lines.join('\r\n')}\r\n\r\n`, 'latin1');
}

/** The numeric address native code connects to; undefined when the name does not resolve (the node:http path then says why). */
export async function numericAddress(url: URL): Promise<{ address: string; family: 4 | 6 } | undefined> {
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  try {
    const { address, family } = await dns.promises.lookup(host);
    return { address, family: family === 6 ? 6 : 4 };
  } catch {
    return undefined;
  }
}

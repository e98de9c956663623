/** Opening the files of a backing chain by name: local paths as before, http(s) URLs remotely. */
import { Qcow2Error } from '../errors';
import type { OpenOptions } from '../qcow2/image';
import { type FileRegion, type OpenFile, openFile } from '../qcow2/layers';
import { resolveExternalFile } from '../qcow2/paths';
import { openRemoteFile, remoteOf } from './remote';
import { isUrl, parseUrl, resolveRemoteName, shownUrl } from './url';

/** Opens `name` (a path or an http(s) URL) of a chain. */
export async function openChainFile(name: string, what: string, fileOptions: { region?: FileRegion | undefined; forceShare?: boolean | undefined }, options: OpenOptions): Promise<OpenFile> {
  if (!isUrl(name)) return openFile(name, what, fileOptions);
  const url = parseUrl(name);
  if (fileOptions.region) throw new Qcow2Error('INVALID_ARGUMENT', 'an image region (an archive member) cannot be read from a URL', { path: shownUrl(url) });
  const http = options.http ?? {};
  // Headers (tokens) go to the origin of the image they were given for, never to another.
  const sendHeaders = http.headersOrigin === undefined || http.headersOrigin === url.origin;
  return openRemoteFile(name, sendHeaders ? http : { ...http, headers: undefined });
}

/** Resolves a backing or data file name stored in `referrer`: against its URL when it is remote. */
export async function resolveChainName(referrer: OpenFile, name: string, what: string, options: OpenOptions): Promise<string> {
  const remote = remoteOf(referrer);
  if (!remote) return resolveExternalFile(referrer.path, name, what, options);
  return resolveRemoteName(remote.http.url, name, what, options);
}

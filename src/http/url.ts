/**
 * Image names that are http(s) URLs: how they are shown (never with a query string,
 * credentials or fragment: presigned URLs carry their secret there), and which backing
 * or data file names a remote image may make us open.
 */
import * as nodePath from 'node:path';
import { Qcow2Error } from '../errors';
import type { PathPolicy } from '../qcow2/paths';

/** True for an http:// or https:// name (any case). */
export function isUrl(name: string): boolean {
  return /^https?:\/\//i.test(name);
}

/** scheme://host[:port]/path of a URL: what errors, progress and logs name. */
export function shownUrl(url: URL | string): string {
  const parsed = typeof url === 'string' ? safeParse(url) : url;
  if (!parsed) return '(invalid URL)';
  return `${parsed.protocol}//${parsed.host}${parsed.pathname}`;
}

function safeParse(text: string): URL | undefined {
  try {
    return new URL(text);
  } catch {
    return undefined;
  }
}

/** Parses an http(s) URL, or throws INVALID_ARGUMENT without echoing the text (it may hold a secret). */
export function parseUrl(text: string): URL {
  const url = safeParse(text);
  if (!url || (url.protocol !== 'http:' && url.protocol !== 'https:')) {
    throw new Qcow2Error('INVALID_ARGUMENT', 'not a valid http(s) URL', { path: url ? shownUrl(url) : text.split(/[?#]/)[0] });
  }
  return url;
}

/** The folder part of a URL's path ("/images/" of "/images/a.qcow2"). */
function urlFolder(url: URL): string {
  return url.pathname.slice(0, url.pathname.lastIndexOf('/') + 1);
}

/** `candidate` lies under the prefix URL (same origin, path under the prefix's folder or equal). */
function underPrefix(prefix: URL, candidate: URL): boolean {
  if (prefix.origin !== candidate.origin) return false;
  const folder = prefix.pathname.endsWith('/') ? prefix.pathname : `${prefix.pathname}/`;
  return candidate.pathname === prefix.pathname || candidate.pathname.startsWith(folder);
}

/**
 * Resolves a backing or data file name stored in the remote image at `referrer` (a URL):
 * - a relative name resolves against the image's URL, and is followed when it stays under
 *   the image's own origin and folder (after "..", "%2e%2e" and the like are normalised),
 *   or under a URL given in allowPaths, or with allowAnyPath;
 * - an absolute URL is followed under the same rules;
 * - a local path (absolute, or file:) is refused unless its folder is in allowPaths, or
 *   allowAnyPath: a server must not make the host open its own files.
 * Returns the URL (or local path) to open.
 */
export function resolveRemoteName(referrer: URL, name: string, what: string, policy: PathPolicy): string {
  const shown = shownUrl(referrer);
  if (name.length === 0) throw new Qcow2Error('BAD_BACKING_NAME', `${what} name is empty`, { path: shown });
  const local = name.startsWith('/') || /^file:/i.test(name);
  if (local) {
    const path = nodePath.resolve(name.replace(/^file:(\/\/)?/i, ''));
    const allowed = policy.allowAnyPath === true || (policy.allowPaths ?? []).some((folder) => !isUrl(folder) && insideFolder(nodePath.resolve(folder), path));
    if (!allowed) {
      throw new Qcow2Error('PATH_NOT_ALLOWED', `${what} "${name}" is a local path named by a remote image; allow it with --allow-path DIR or --allow-any-path`, { path: shown });
    }
    return path;
  }
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !isUrl(name)) {
    throw new Qcow2Error('UNSUPPORTED_PROTOCOL', `${what} "${name}" uses a protocol qcow2img does not follow`, { path: shown });
  }
  let resolved: URL;
  try {
    resolved = new URL(name, referrer);
  } catch {
    throw new Qcow2Error('BAD_BACKING_NAME', `${what} "${name}" is not a valid URL`, { path: shown });
  }
  const ownFolder = new URL(urlFolder(referrer), referrer);
  const allowed =
    policy.allowAnyPath === true ||
    underPrefix(ownFolder, resolved) ||
    (policy.allowPaths ?? []).some((prefix) => isUrl(prefix) && underPrefix(new URL(prefix), resolved));
  if (!allowed) {
    throw new Qcow2Error(
      'PATH_NOT_ALLOWED',
      `${what} "${name}" resolves outside the image's origin and folder (${shownUrl(ownFolder)}); allow it with --allow-path URL or --allow-any-path`,
      { path: shown },
    );
  }
  return resolved.href;
}

function insideFolder(folder: string, candidate: string): boolean {
  const relative = nodePath.relative(folder, candidate);
  return relative === '' || (!relative.startsWith('..') && !nodePath.isAbsolute(relative));
}

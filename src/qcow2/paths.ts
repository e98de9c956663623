/**
 * Which external files (backing files, data files) an image may make us open.
 * A name is followed only when it resolves inside the referring image's own
 * folder, or inside a folder the caller allowed; everything else is refused
 * before the path is even looked at, so an image cannot probe the host.
 */
import * as fs from 'node:fs/promises';
import * as nodePath from 'node:path';
import { Qcow2Error } from '../errors';

/** Which external files (backing and data files) an image may make the library open. */
export interface PathPolicy {
  /** Folders (and their subfolders) from which external files may be opened. */
  allowPaths?: readonly string[];
  /** Follow any name, anywhere (the CLI's --allow-any-path). */
  allowAnyPath?: boolean;
}

const protocolPattern = /^(json|nbd|nbd\+unix|nbd\+tcp|https?|ftps?|iscsi|ssh|rbd|gluster|nfs|vxhs|blkdebug|blkverify|null-co|null-aio|host_device|host_cdrom|vvfat|quorum|throttle|replication|copy-on-read):/i;

function inside(folder: string, candidate: string): boolean {
  const relative = nodePath.relative(folder, candidate);
  return relative === '' || (!relative.startsWith('..') && !nodePath.isAbsolute(relative));
}

async function realFolder(folder: string): Promise<string> {
  try {
    return await fs.realpath(folder);
  } catch {
    return nodePath.resolve(folder);
  }
}

/**
 * Resolves `name` (as stored in `referrer`) to a real path it is safe to open.
 * `what` is "backing file" or "external data file".
 */
export async function resolveExternalFile(referrer: string, name: string, what: string, policy: PathPolicy): Promise<string> {
  let stored = name;
  if (stored.startsWith('file:')) stored = stored.slice('file:'.length);
  if (protocolPattern.test(stored)) {
    throw new Qcow2Error('UNSUPPORTED_PROTOCOL', `${what} "${name}" uses a protocol or json: name, which qcow2img does not follow`, { path: referrer });
  }
  if (stored.length === 0) {
    throw new Qcow2Error('BAD_BACKING_NAME', `${what} name is empty`, { path: referrer });
  }
  const ownFolder = await realFolder(nodePath.dirname(referrer));
  const lexical = nodePath.resolve(ownFolder, stored);
  const allowed = await Promise.all((policy.allowPaths ?? []).map(realFolder));
  const refusal = () =>
    new Qcow2Error(
      'PATH_NOT_ALLOWED',
      `${what} "${name}" resolves outside the image's folder (${ownFolder}); allow it with --allow-path DIR or --allow-any-path`,
      { path: referrer },
    );
  const explicitlyAllowed = (candidate: string) => policy.allowAnyPath === true || allowed.some((folder) => inside(folder, candidate));
  if (!inside(ownFolder, lexical) && !explicitlyAllowed(lexical)) throw refusal();

  let real: string;
  try {
    real = await fs.realpath(lexical);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new Qcow2Error('BACKING_FILE_NOT_FOUND', `${what} "${name}" (${lexical}) cannot be opened: ${code === 'ENOENT' ? 'no such file' : code}`, {
      path: referrer,
      cause: error,
    });
  }
  // A symlink inside the folder may point out of it.
  const viaAllowance = explicitlyAllowed(real);
  if (!inside(ownFolder, real) && !viaAllowance) throw refusal();
  // Inside its own folder only regular files count: a device node there is a trap.
  const stats = await fs.stat(real);
  if (!stats.isFile() && !viaAllowance) {
    throw new Qcow2Error('NOT_A_REGULAR_FILE', `${what} "${name}" is not a regular file; allow it with --allow-path DIR`, { path: referrer });
  }
  return real;
}

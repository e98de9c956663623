/**
 * Uncompressed capture writes its data clusters through an O_DIRECT descriptor. Some filesystems
 * accept an O_DIRECT open and then refuse the writes with EINVAL; capture must then finish with
 * buffered writes and an image QEMU trusts. No filesystem here does that, so a small LD_PRELOAD
 * library, built at test time, makes every vectored write to an O_DIRECT descriptor fail the same
 * way and records that it did.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noise } from '../helpers/damage';

const repoRoot = path.resolve(__dirname, '..', '..');
const cli = path.join(repoRoot, 'dist', 'cli', 'main.js');
const MiB = 1024 * 1024;

const shimSource = `
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

typedef ssize_t (*pwritev_fn)(int, const struct iovec*, int, off_t);

static ssize_t refuse_direct(const char* name, int fd, const struct iovec* iov, int count, off_t offset) {
  int flags = fcntl(fd, F_GETFL);
  if (flags >= 0 && (flags & O_DIRECT)) {
    const char* log = getenv("QCOW2IMG_TEST_REFUSAL_LOG");
    if (log) {
      FILE* file = fopen(log, "a");
      if (file) {
        fprintf(file, "refused %s at %lld\\n", name, (long long)offset);
        fclose(file);
      }
    }
    errno = EINVAL;
    return -1;
  }
  pwritev_fn real = (pwritev_fn)dlsym(RTLD_NEXT, name);
  return real(fd, iov, count, offset);
}

ssize_t pwritev(int fd, const struct iovec* iov, int count, off_t offset) { return refuse_direct("pwritev", fd, iov, count, offset); }
ssize_t pwritev64(int fd, const struct iovec* iov, int count, off_t offset) { return refuse_direct("pwritev64", fd, iov, count, offset); }
`;

let dir: string;
let shim: string | undefined;
let skipReason: string | undefined;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-direct-fallback-'));
  const source = path.join(dir, 'refuse-direct.c');
  fs.writeFileSync(source, shimSource);
  const built = spawnSync('cc', ['-shared', '-fPIC', '-O2', '-o', path.join(dir, 'refuse-direct.so'), source, '-ldl'], { encoding: 'utf8' });
  if (built.error || built.status !== 0) skipReason = `no C compiler to build the LD_PRELOAD shim: ${built.error?.message ?? built.stderr.trim()}`;
  else shim = path.join(dir, 'refuse-direct.so');
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('uncompressed capture onto a filesystem that refuses direct writes', () => {
  it('falls back to buffered writes: exit 0, qemu-img check clean, compare identical', (context) => {
    if (skipReason) return context.skip(skipReason);
    const raw = path.join(dir, 'disk.raw');
    const bytes = Buffer.alloc(8 * MiB);
    noise('direct-fallback/a', 3 * MiB).copy(bytes, 0);
    noise('direct-fallback/b', 2 * MiB + 333).copy(bytes, 5 * MiB);
    fs.writeFileSync(raw, bytes);
    const out = path.join(dir, 'disk.qcow2');
    const log = path.join(dir, 'refusals.log');
    const ran = spawnSync(process.execPath, [cli, 'capture', raw, out, '--progress=none'], {
      encoding: 'utf8',
      env: { ...process.env, LD_PRELOAD: shim, QCOW2IMG_TEST_REFUSAL_LOG: log },
    });
    expect(ran.status, ran.stderr).toBe(0);
    // The direct path was really taken, and refused.
    expect(fs.existsSync(log), 'the shim refused a direct write').toBe(true);
    expect(fs.readFileSync(log, 'utf8')).toMatch(/^refused pwritev(64)? at \d+/m);
    const checked = spawnSync('qemu-img', ['check', out], { encoding: 'utf8' });
    expect(checked.status, checked.stdout + checked.stderr).toBe(0);
    const compared = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, out], { encoding: 'utf8' });
    expect(compared.status, compared.stdout + compared.stderr).toBe(0);
    expect(compared.stdout).toMatch(/Images are identical/);
  });
});

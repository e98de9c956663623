/**
 * The prebuilt addons as shipped: one per CPU that package.json names, each asking the system for
 * glibc symbols no newer than the floor and for nothing else (no libstdc++, libgcc_s, ISA-L or
 * zlib: all of that is inside). Read from the ELF files with readelf, as the dynamic loader reads them.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';

const root = path.join(__dirname, '..', '..');
/** Node 20's own floor (its official Linux builds need glibc 2.28): Debian 10, Ubuntu 20.04, RHEL 8. */
const glibcFloor = '2.28';
const allowedLibraries = new Set(['libc.so.6', 'libm.so.6', 'libpthread.so.0', 'libdl.so.2', 'librt.so.1', 'ld-linux-x86-64.so.2', 'ld-linux-aarch64.so.1']);
const machines: Record<string, string> = { x64: 'Advanced Micro Devices X86-64', arm64: 'AArch64' };

function readelf(args: string[], file: string): string {
  return execFileSync('readelf', ['--wide', ...args, file], { encoding: 'utf8' });
}

/** The versions a shared object needs (.gnu.version_r), e.g. GLIBC_2.17, GLIBCXX_3.4.30. */
function neededVersions(file: string): string[] {
  const section = readelf(['--version-info'], file).split(/^Version needs section/m)[1] ?? '';
  return [...section.matchAll(/Name: (\S+)\s+Flags/g)].map((m) => m[1]!);
}

function neededLibraries(file: string): string[] {
  return [...readelf(['--dynamic'], file).matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]!);
}

const compare = (a: string, b: string) => {
  const [x, y] = [a.split('.').map(Number), b.split('.').map(Number)];
  for (let i = 0; i < Math.max(x.length, y.length); i++) if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) - (y[i] ?? 0);
  return 0;
};

const cpus = (JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { cpu: string[] }).cpu;

beforeAll(() => {
  // Builds them when missing or older than the sources; a no-op otherwise.
  execFileSync('bash', [path.join(root, 'scripts', 'prebuild.sh')], { cwd: root, stdio: ['ignore', 'ignore', 'pipe'] });
}, 1_200_000);

describe('prebuilds/', () => {
  it('holds one addon for each CPU package.json names, and no other', () => {
    const dirs = fs.readdirSync(path.join(root, 'prebuilds')).sort();
    expect(dirs).toEqual(cpus.map((cpu) => `linux-${cpu}`).sort());
    for (const dir of dirs) expect(fs.readdirSync(path.join(root, 'prebuilds', dir))).toEqual(['qcow2img.glibc.node']);
  });

  describe.each(cpus)('linux-%s', (cpu) => {
    const file = path.join(root, 'prebuilds', `linux-${cpu}`, 'qcow2img.glibc.node');

    it('is an ELF shared object for that CPU', () => {
      const header = readelf(['--file-header'], file);
      expect(header).toMatch(/Type:\s+DYN/);
      expect(header).toMatch(new RegExp(`Machine:\\s+${machines[cpu]}`));
    });

    it(`asks for no glibc symbol version above ${glibcFloor}, and for no C++ runtime or GCC version at all`, () => {
      const versions = neededVersions(file);
      const glibc = versions.filter((v) => v.startsWith('GLIBC_')).map((v) => v.slice('GLIBC_'.length));
      expect(glibc.length, 'glibc versions found').toBeGreaterThan(0);
      const above = glibc.filter((v) => compare(v, glibcFloor) > 0);
      expect(above, `GLIBC_ versions above ${glibcFloor}`).toEqual([]);
      expect(versions.filter((v) => !v.startsWith('GLIBC_')), 'GLIBCXX_, CXXABI_ or GCC_ versions').toEqual([]);
    });

    it('needs only glibc\'s own libraries (libstdc++, libgcc_s, ISA-L and zlib are inside)', () => {
      const libraries = neededLibraries(file);
      expect(libraries).toContain('libc.so.6');
      expect(libraries.filter((lib) => !allowedLibraries.has(lib))).toEqual([]);
    });
  });

  it('the reader sees what a build on this Debian 12 machine asks for (GLIBC_2.34 and up), so the floor check can fail', () => {
    const local = path.join(root, 'build', 'Release', 'qcow2img.node');
    expect(fs.existsSync(local), `${local} missing: npm ci builds it`).toBe(true);
    const glibc = neededVersions(local).filter((v) => v.startsWith('GLIBC_')).map((v) => v.slice('GLIBC_'.length));
    expect(glibc.some((v) => compare(v, '2.34') >= 0)).toBe(true);
    expect(neededLibraries(local)).toContain('libisal.so.2');
  });
});

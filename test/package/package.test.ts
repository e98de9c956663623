/**
 * The package as a consumer gets it: packed with its prebuilds, installed with install scripts off
 * into an empty project, then required, imported and run as a CLI on the oldest Node that
 * package.json's engines names and on the current LTS (official builds from the npm registry,
 * scripts/node-dist.sh), compiled against with TypeScript 5 and 7 (tsc --strict, no tsconfig), and
 * its arm64 prebuild run by an arm64 Node under qemu-user.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = path.join(__dirname, '..', '..');
const MiB = 1024 * 1024;
/** TypeScript 7 (the native compiler), pinned; TypeScript 5 is the version this repository builds with. */
const typescript7 = '7.0.2';
const qemuAarch64 = '/usr/bin/qemu-aarch64-static';
/** The arm64 glibc that scripts/prebuild.sh's Debian 11 root holds for its cross compiler. */
const arm64Sysroot = path.join(root, '.cache', 'roots', 'bullseye', 'usr', 'aarch64-linux-gnu');

const manifest = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { engines: { node: string }; cpu: string[] };
const oldest = /^>=(\d+\.\d+\.\d+)$/.exec(manifest.engines.node)?.[1];
const installedVersion = (name: string) => (JSON.parse(fs.readFileSync(path.join(root, 'node_modules', name, 'package.json'), 'utf8')) as { version: string }).version;

let dir: string;
let consumer: string;
let installed: string;
let image: string;
let zlibImage: string;
let sourceRaw: string;
let tarballFiles: string[];
const nodes: Record<'oldest' | 'lts' | 'arm64', { dir: string; version: string }> = {} as never;

function run(command: string, args: string[], cwd: string, env?: NodeJS.ProcessEnv): string {
  return execFileSync(command, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env, maxBuffer: 64 * MiB });
}

function nodeDist(arch: 'x64' | 'arm64', version: string): { dir: string; version: string } {
  const found = run('bash', [path.join(root, 'scripts', 'node-dist.sh'), arch, version], root).trim();
  return { dir: found, version: /-(\d+\.\d+\.\d+)$/.exec(found)![1]! };
}

function qemuImgRaw(qcow2: string): Buffer {
  const raw = `${qcow2}.reference.raw`;
  execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow2, raw]);
  return fs.readFileSync(raw);
}

beforeAll(() => {
  expect(oldest, `package.json engines.node must read >=X.Y.Z, not ${manifest.engines.node}`).toBeDefined();
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-package-'));
  // A no-op when prebuilds/ is current; builds it otherwise (about 5 minutes from nothing).
  run('bash', [path.join(root, 'scripts', 'prebuild.sh')], root);
  nodes.oldest = nodeDist('x64', 'oldest');
  nodes.lts = nodeDist('x64', 'lts');
  nodes.arm64 = nodeDist('arm64', 'lts');
  const packed = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', dir], root)) as { filename: string; files: { path: string }[] }[];
  tarballFiles = packed[0]!.files.map((f) => f.path);
  consumer = path.join(dir, 'consumer');
  fs.mkdirSync(consumer);
  fs.writeFileSync(path.join(consumer, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true }));
  run('npm', [
    'install', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error', path.join(dir, packed[0]!.filename),
    `typescript5@npm:typescript@${installedVersion('typescript')}`, `typescript7@npm:typescript@${typescript7}`, `@types/node@${installedVersion('@types/node')}`,
  ], consumer);
  installed = path.join(consumer, 'node_modules', 'qcow2img');
  image = path.join(dir, 'small.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', image, '8M']);
  execFileSync('qemu-io', ['-c', 'write -P 0x5a 1M 1M', image], { stdio: 'ignore' });
  // Real bytes (a program and text) at 8 MiB, a zlib-compressed image of them made by QEMU.
  sourceRaw = path.join(dir, 'source.raw');
  const text = fs.readFileSync(path.join(root, 'README.md'));
  const fill = Buffer.concat([fs.readFileSync(process.execPath).subarray(0, 3 * MiB), Buffer.concat(Array(Math.ceil(MiB / text.length)).fill(text)).subarray(0, MiB)]);
  fs.writeFileSync(sourceRaw, Buffer.concat([fill, Buffer.alloc(MiB), fill.subarray(0, 3 * MiB)]));
  expect(fs.statSync(sourceRaw).size).toBe(8 * MiB);
  zlibImage = path.join(dir, 'zlib.qcow2');
  execFileSync('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-c', sourceRaw, zlibImage]);
}, 1_500_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('the packed package', () => {
  it('holds a prebuild for each CPU it names, compiled JS and types, and nothing a user does not need', () => {
    for (const cpu of manifest.cpu) expect(tarballFiles).toContain(`prebuilds/linux-${cpu}/qcow2img.glibc.node`);
    expect(tarballFiles).toContain('dist/index.js');
    expect(tarballFiles).toContain('dist/index.d.ts');
    expect(tarballFiles).toContain('dist/cli/main.js');
    for (const file of tarballFiles) {
      expect(file).not.toMatch(/^(test|benchmarks|examples|src|docs|\.ci|\.cache)\//);
      expect(file).not.toMatch(/\.map$/);
    }
  });

  it('installs without scripts: no local build, the prebuilds in place', () => {
    expect(fs.existsSync(path.join(installed, 'build'))).toBe(false);
    for (const cpu of manifest.cpu) expect(fs.existsSync(path.join(installed, 'prebuilds', `linux-${cpu}`, 'qcow2img.glibc.node'))).toBe(true);
  });
});

describe.each(['oldest', 'lts'] as const)('on Node %s (engines: oldest; lts: the current LTS)', (which) => {
  const node = () => path.join(nodes[which].dir, 'bin', 'node');
  // npx and the CLI's `#!/usr/bin/env node` find this Node first.
  const env = () => ({ ...process.env, PATH: `${path.join(nodes[which].dir, 'bin')}:${process.env.PATH}` });

  it('is the Node meant', () => {
    if (which === 'oldest') expect(nodes.oldest.version).toBe(oldest);
    expect(run(node(), ['-p', 'process.version'], consumer).trim()).toBe(`v${nodes[which].version}`);
  });

  it('works from require(), with the x64 prebuild', () => {
    const script = `const q = require('qcow2img'); console.log(require('node-gyp-build').path(require('path').dirname(require.resolve('qcow2img/package.json'))));` +
      `q.open(${JSON.stringify(image)}).then(async (i) => { console.log(i.info.virtualSize, i.info.compressionType); await i.close(); })`;
    const [addon, info] = run(node(), ['-e', script], consumer).trim().split('\n');
    expect(addon).toBe(path.join(installed, 'prebuilds', 'linux-x64', 'qcow2img.glibc.node'));
    expect(info).toBe('8388608 zstd');
  });

  it('works from import, with named exports', () => {
    const script = `import { open, Qcow2Error } from 'qcow2img'; const i = await open(${JSON.stringify(image)}); console.log(i.info.clusterSize, typeof Qcow2Error); await i.close();`;
    expect(run(node(), ['--input-type=module', '-e', script], consumer).trim()).toBe('65536 function');
    const dynamic = run(node(), ['--input-type=module', '-e', `const m = await import('qcow2img'); console.log(typeof m.open, typeof m.default.load);`], consumer);
    expect(dynamic.trim()).toBe('function function');
  });

  it('runs its CLI with npx: info, and a load equal to qemu-img\'s output', () => {
    const info = JSON.parse(run('npx', ['--no-install', 'qcow2img', 'info', '--json', image], consumer, env())) as { virtualSize: number; format: string };
    expect(info.format).toBe('qcow2');
    expect(info.virtualSize).toBe(8 * MiB);
    const raw = path.join(dir, `small-${which}.raw`);
    run('npx', ['--no-install', 'qcow2img', 'load', image, raw, '--progress=none'], consumer, env());
    expect(fs.readFileSync(raw).equals(qemuImgRaw(image))).toBe(true);
  });

  it('loads into partition 1 of a GPT disk (its CRC32s checked with zlib.crc32)', () => {
    const disk = path.join(dir, `gpt-${which}.raw`);
    fs.writeFileSync(disk, Buffer.alloc(12 * MiB));
    execFileSync('sfdisk', ['-q', disk], { input: 'label: gpt\nstart=2048, size=16384\n' });
    run(node(), [path.join(installed, 'dist', 'cli', 'main.js'), 'load', zlibImage, disk, '--partition', '1', '--progress=none'], consumer);
    expect(fs.readFileSync(disk).subarray(MiB, 9 * MiB).equals(fs.readFileSync(sourceRaw))).toBe(true);
  });
});

describe('on Debian 11 (the root scripts/prebuild.sh builds in: glibc 2.31, GCC 10\'s libstdc++), the oldest Node', () => {
  it('the installed package loads a zlib image byte for byte as qemu-img converts it', () => {
    const bullseye = path.join(root, '.cache', 'roots', 'bullseye');
    expect(fs.existsSync(path.join(bullseye, 'usr', 'bin', 'ldd')), `${bullseye} missing: npm run prebuild makes it`).toBe(true);
    const inside = fs.mkdtempSync(path.join(bullseye, 'tmp', 'qcow2img-package-'));
    const there = `/tmp/${path.basename(inside)}`;
    const chroot = (args: string[]) => run('chroot', [bullseye, '/usr/bin/env', '-i', 'PATH=/usr/bin:/bin', ...args], root);
    try {
      expect(chroot(['ldd', '--version']).split('\n')[0]).toMatch(/ 2\.31$/);
      // The package and its dependencies as installed, without the consumer's TypeScript.
      fs.cpSync(path.join(consumer, 'node_modules'), path.join(inside, 'node_modules'), { recursive: true, filter: (from) => !/node_modules\/(typescript\d|@typescript|@types)(\/|$)/.test(from) });
      fs.mkdirSync(path.join(inside, 'bin'));
      fs.copyFileSync(path.join(nodes.oldest.dir, 'bin', 'node'), path.join(inside, 'bin', 'node'));
      fs.chmodSync(path.join(inside, 'bin', 'node'), 0o755);
      fs.copyFileSync(zlibImage, path.join(inside, 'zlib.qcow2'));
      chroot([`${there}/bin/node`, `${there}/node_modules/qcow2img/dist/cli/main.js`, 'load', `${there}/zlib.qcow2`, `${there}/out.raw`, '--progress=none']);
      expect(fs.readFileSync(path.join(inside, 'out.raw')).equals(qemuImgRaw(zlibImage))).toBe(true);
    } finally {
      fs.rmSync(inside, { recursive: true, force: true });
    }
  });
});

describe.each(['5', '7'] as const)('TypeScript %s, @types/node and no tsconfig', (major) => {
  const version = () => (major === '5' ? installedVersion('typescript') : typescript7);
  const tsc = () => path.join(consumer, 'node_modules', `typescript${major}`, 'bin', 'tsc');
  const compile = (file: string) => spawnSync(process.execPath, [tsc(), '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--noEmit', file], { cwd: consumer, encoding: 'utf8' });

  it('is that TypeScript', () => {
    expect(run(process.execPath, [tsc(), '--version'], consumer).trim()).toBe(`Version ${version()}`);
  });

  it('type-checks a consumer importing open with tsc --strict, and rejects a misuse', () => {
    fs.writeFileSync(
      path.join(consumer, `use${major}.ts`),
      `import { open, type ImageInfo, Qcow2Error } from 'qcow2img';\n` +
        `async function size(file: string): Promise<number> {\n  const image = await open(file);\n  const info: ImageInfo = image.info;\n  await image.close();\n  return info.virtualSize;\n}\n` +
        `size('x').catch((e: unknown) => { if (e instanceof Qcow2Error) console.log(e.code); });\n`,
    );
    const good = compile(`use${major}.ts`);
    expect(good.stdout + good.stderr).toBe('');
    expect(good.status).toBe(0);
    fs.writeFileSync(path.join(consumer, `bad${major}.ts`), `import { open } from 'qcow2img';\nconst n: string = open;\n`);
    const bad = compile(`bad${major}.ts`);
    expect(bad.status).not.toBe(0);
    expect(bad.stdout).toContain(`bad${major}.ts`);
  }, 300_000);
});

describe('the arm64 prebuild, run by an arm64 Node under qemu-user', () => {
  const arm64 = (args: string[]) => {
    expect(fs.existsSync(qemuAarch64), `${qemuAarch64} missing: apt-get install qemu-user-static`).toBe(true);
    expect(fs.existsSync(path.join(arm64Sysroot, 'lib', 'ld-linux-aarch64.so.1')), `${arm64Sysroot} missing: npm run prebuild makes it`).toBe(true);
    return run(qemuAarch64, ['-L', arm64Sysroot, path.join(nodes.arm64.dir, 'bin', 'node'), ...args], consumer);
  };
  const cli = () => path.join(installed, 'dist', 'cli', 'main.js');

  it('is arm64 and loads prebuilds/linux-arm64', () => {
    const out = arm64(['-e', `require('qcow2img'); console.log(process.arch, require('node-gyp-build').path(require('path').dirname(require.resolve('qcow2img/package.json'))))`]);
    expect(out.trim()).toBe(`arm64 ${path.join(installed, 'prebuilds', 'linux-arm64', 'qcow2img.glibc.node')}`);
  });

  it.each([['zlib', () => zlibImage], ['zstd', () => image]] as const)('loads a %s image byte for byte as qemu-img converts it', (_, file) => {
    const raw = path.join(dir, `arm64-${path.basename(file())}.raw`);
    arm64([cli(), 'load', file(), raw, '--progress=none']);
    expect(fs.readFileSync(raw).equals(qemuImgRaw(file()))).toBe(true);
  });

  it.each(['zlib', 'zstd'])('captures with --compress %s into an image qemu-img checks clean and finds identical', (codec) => {
    const out = path.join(dir, `arm64-capture-${codec}.qcow2`);
    arm64([cli(), 'capture', sourceRaw, out, '--compress', codec, '--progress=none']);
    const check = JSON.parse(run('qemu-img', ['check', '--output=json', out], dir)) as { 'compressed-clusters'?: number; corruptions?: number };
    expect(check['compressed-clusters']).toBeGreaterThan(0);
    expect(check.corruptions ?? 0).toBe(0);
    run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', sourceRaw, out], dir);
  });
});

describe('API reference', () => {
  it('typedoc builds it from the sources without a warning', () => {
    const result = spawnSync('npx', ['--no-install', 'typedoc', '--out', path.join(dir, 'api')], { cwd: root, encoding: 'utf8' });
    expect(result.stdout + result.stderr).not.toMatch(/warning|error/i);
    expect(result.status).toBe(0);
    expect(fs.existsSync(path.join(dir, 'api', 'index.html'))).toBe(true);
  });

  it('every option of the public API has TSDoc (typedoc names none undocumented)', () => {
    const result = spawnSync('npx', ['--no-install', 'typedoc', '--out', path.join(dir, 'api-documented'), '--validation.notDocumented'], { cwd: root, encoding: 'utf8' });
    // The option interfaces, their members and the progress events; CpuState's register fields are the schema's.
    const undocumented = (result.stdout + result.stderr)
      .split('\n')
      .filter((line) => /does not have any documentation/.test(line))
      .map((line) => line.replace(/\x1b\[[0-9;]*m/g, '').replace(/^\[warning\] /, '').split(',')[0]!)
      .filter((name) => /Options|Progress|Callback/.test(name) && !/\.cpu\.__type/.test(name));
    expect(undocumented).toEqual([]);
  });
});

describe('examples', () => {
  it.each(['info', 'load', 'capture', 'check'])('examples/%s.mjs runs', (name) => {
    const result = spawnSync(process.execPath, [path.join(root, 'examples', `${name}.mjs`)], { cwd: root, encoding: 'utf8' });
    expect(result.stderr).not.toMatch(/Error/);
    expect(result.status).toBe(0);
  });
});

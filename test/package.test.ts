/**
 * The package as a consumer gets it: packed with its prebuild, installed with
 * install scripts off into an empty project, then required, imported, compiled
 * against with tsc --strict, and run as a CLI.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = path.join(__dirname, '..');
let dir: string;
let consumer: string;
let image: string;
let tarballFiles: string[];

function run(command: string, args: string[], cwd: string): string {
  return execFileSync(command, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-package-'));
  run('npm', ['run', '--silent', 'prebuild'], root);
  const packed = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', dir], root)) as { filename: string; files: { path: string }[] }[];
  tarballFiles = packed[0]!.files.map((f) => f.path);
  consumer = path.join(dir, 'consumer');
  fs.mkdirSync(consumer);
  fs.writeFileSync(path.join(consumer, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true }));
  run('npm', ['install', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error', path.join(dir, packed[0]!.filename)], consumer);
  image = path.join(dir, 'small.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', image, '8M']);
  execFileSync('qemu-io', ['-c', 'write -P 0x5a 1M 1M', image], { stdio: 'ignore' });
}, 300_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
  // prebuildify leaves build/Release without the local addon; link it again (its objects are
  // there), so the tree works as before for benchmarks and tools that load the local build.
  if (!fs.existsSync(path.join(root, 'build', 'Release', 'qcow2img.node'))) run('npx', ['node-gyp', 'build'], root);
}, 120_000);

describe('the packed package', () => {
  it('holds the prebuild, compiled JS and types, and nothing a user does not need', () => {
    expect(tarballFiles).toContain('prebuilds/linux-x64/qcow2img.glibc.node');
    expect(tarballFiles).toContain('dist/index.js');
    expect(tarballFiles).toContain('dist/index.d.ts');
    expect(tarballFiles).toContain('dist/cli/main.js');
    for (const file of tarballFiles) {
      expect(file).not.toMatch(/^(test|benchmarks|examples|src|docs|\.ci)\//);
      expect(file).not.toMatch(/\.map$/);
    }
  });

  it('installs without scripts and loads the prebuild, not a local build', () => {
    const installed = path.join(consumer, 'node_modules', 'qcow2img');
    expect(fs.existsSync(path.join(installed, 'build'))).toBe(false);
    expect(fs.existsSync(path.join(installed, 'prebuilds', 'linux-x64', 'qcow2img.glibc.node'))).toBe(true);
  });

  it('works from require()', () => {
    const out = run(process.execPath, ['-e', `const q = require('qcow2img'); q.open(${JSON.stringify(image)}).then(async (i) => { console.log(i.info.virtualSize, i.info.compressionType); await i.close(); })`], consumer);
    expect(out.trim()).toBe('8388608 zstd');
  });

  it('works from import, with named exports', () => {
    const script = `import { open, Qcow2Error } from 'qcow2img'; const i = await open(${JSON.stringify(image)}); console.log(i.info.clusterSize, typeof Qcow2Error); await i.close();`;
    const out = run(process.execPath, ['--input-type=module', '-e', script], consumer);
    expect(out.trim()).toBe('65536 function');
    const dynamic = run(process.execPath, ['--input-type=module', '-e', `const m = await import('qcow2img'); console.log(typeof m.open, typeof m.default.load);`], consumer);
    expect(dynamic.trim()).toBe('function function');
  });

  it('type-checks a consumer with tsc --strict', () => {
    fs.writeFileSync(
      path.join(consumer, 'use.ts'),
      `import { open, type ImageInfo, Qcow2Error } from 'qcow2img';\n` +
        `async function size(file: string): Promise<number> {\n  const image = await open(file);\n  const info: ImageInfo = image.info;\n  await image.close();\n  return info.virtualSize;\n}\n` +
        `size('x').catch((e: unknown) => { if (e instanceof Qcow2Error) console.log(e.code); });\n`,
    );
    fs.writeFileSync(path.join(consumer, 'bad.ts'), `import { open } from 'qcow2img';\nconst n: string = open;\n`);
    const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');
    const common = ['--strict', '--noEmit', '--module', 'node16', '--moduleResolution', 'node16', '--target', 'es2022', '--typeRoots', path.join(root, 'node_modules', '@types'), '--types', 'node'];
    expect(spawnSync(process.execPath, [tsc, ...common, 'use.ts'], { cwd: consumer, encoding: 'utf8' }).status).toBe(0);
    // The types are real: a misuse fails to compile.
    const bad = spawnSync(process.execPath, [tsc, ...common, 'bad.ts'], { cwd: consumer, encoding: 'utf8' });
    expect(bad.status).not.toBe(0);
    expect(bad.stdout).toContain('bad.ts');
  });

  it('runs its CLI from the consumer with npx', () => {
    const out = run('npx', ['--no-install', 'qcow2img', 'info', '--json', image], consumer);
    const info = JSON.parse(out) as { virtualSize: number; format: string };
    expect(info.format).toBe('qcow2');
    expect(info.virtualSize).toBe(8 * 1024 * 1024);
    const raw = path.join(dir, 'small.raw');
    run('npx', ['--no-install', 'qcow2img', 'load', image, raw, '--progress=none'], consumer);
    const reference = path.join(dir, 'reference.raw');
    execFileSync('qemu-img', ['convert', '-O', 'raw', image, reference]);
    expect(fs.readFileSync(raw).equals(fs.readFileSync(reference))).toBe(true);
  });
});

describe('API reference', () => {
  it('typedoc builds it from the sources without a warning', () => {
    const result = spawnSync('npx', ['--no-install', 'typedoc', '--out', path.join(dir, 'api')], { cwd: root, encoding: 'utf8' });
    expect(result.stdout + result.stderr).not.toMatch(/warning|error/i);
    expect(result.status).toBe(0);
    expect(fs.existsSync(path.join(dir, 'api', 'index.html'))).toBe(true);
  });
});

describe('examples', () => {
  it.each(['info', 'load', 'capture', 'check'])('examples/%s.mjs runs', (name) => {
    const result = spawnSync(process.execPath, [path.join(root, 'examples', `${name}.mjs`)], { cwd: root, encoding: 'utf8' });
    expect(result.stderr).not.toMatch(/Error/);
    expect(result.status).toBe(0);
  });
});

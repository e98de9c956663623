/**
 * The CLI (node dist/cli/main.js) on the reader fixtures: load, info --json and map --json equal
 * qemu-img's answers; errors exit 1 with one line naming the file; so do usage errors
 * (docs/architecture.md, "CLI exit codes").
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ImageInfo, MapEntry } from '../../src/index';
import {
  type Fixture,
  type RefusalFiles,
  type RunResult,
  catalog,
  cliPath,
  expectInfoAgrees,
  expectMapAgrees,
  expectSameFile,
  field,
  prepare,
  qemuConvert,
  qemuInfo,
  qemuInfoChain,
  qemuImg,
  qemuIo,
  qemuRaw,
  refusalFixtures,
  repoRoot,
  run,
} from '../helpers/qemu';

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-cli-'));
afterAll(() => fs.rmSync(scratch, { recursive: true, force: true }));

let outputs = 0;
function outputPath(name: string): string {
  return path.join(scratch, `${name}-${++outputs}.raw`);
}

function cli(args: readonly string[], cwd?: string): RunResult {
  return run(process.execPath, [cliPath, ...args], cwd !== undefined ? { cwd } : {});
}

/** Runs the CLI and expects exit 0, showing stderr when it is not. */
function cliOk(args: readonly string[], cwd?: string): RunResult {
  const result = cli(args, cwd);
  expect(result.status, `qcow2img ${args.join(' ')}: ${result.stderr}`).toBe(0);
  return result;
}

/** Exit 1 and exactly one line on stderr, starting "qcow2img: " and naming `file`. */
function expectCliError(args: readonly string[], file: string): string {
  const result = cli(args);
  expect(result.status, `exit status of qcow2img ${args.join(' ')}`).toBe(1);
  const lines = result.stderr.split('\n').filter((line) => line !== '');
  expect(lines, 'exactly one line on stderr').toHaveLength(1);
  expect(lines[0]!.startsWith('qcow2img: '), lines[0]).toBe(true);
  expect(lines[0], 'the line names the file').toContain(file);
  expect(result.stdout).toBe('');
  return lines[0]!;
}

/**
 * Usage errors exit 1 (docs/architecture.md: `check` keeps 2 for corruptions, as qemu-img does)
 * with one line on stderr starting "qcow2img: " and pointing at --help, and nothing on stdout.
 */
function expectUsageError(args: readonly string[]): void {
  const result = cli(args);
  expect(result.status, `exit status of qcow2img ${args.join(' ')}`).toBe(1);
  const lines = result.stderr.split('\n').filter((line) => line !== '');
  expect(lines, `stderr of qcow2img ${args.join(' ')}`).toHaveLength(1);
  expect(lines[0]!.startsWith('qcow2img: '), lines[0]).toBe(true);
  expect(lines[0]).toContain('--help');
  expect(result.stdout).toBe('');
}

beforeAll(() => {
  // Always build: dist/ must be the sources under test.
  const tsc = run(path.join(repoRoot, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.build.json'], { cwd: repoRoot });
  if (tsc.status !== 0) throw new Error(`tsc -p tsconfig.build.json failed:\n${tsc.stdout}${tsc.stderr}`);
}, 300_000);

for (const spec of catalog) {
  describe(`qcow2img on ${spec.name}`, () => {
    let fixture: Fixture;
    beforeAll(() => {
      fixture = prepare(spec);
    });

    it('load IMAGE TARGET writes every byte qemu-img convert -O raw writes', () => {
      const target = outputPath(spec.name);
      const result = cliOk(['load', fixture.image, target, '--progress=none']);
      expect(fs.statSync(target).size).toBe(field(qemuInfo(fixture.image), 'virtual-size'));
      expectSameFile(target, qemuRaw(fixture));
      if (spec.warning) expect(result.stderr).toMatch(new RegExp(`^qcow2img: warning: .*${spec.warning.source}`, 'm'));
      fs.rmSync(target);
    });

    it('info --json agrees with qemu-img info --output=json', () => {
      const info = JSON.parse(cliOk(['info', fixture.image, '--json']).stdout) as ImageInfo;
      expect(Array.isArray(info)).toBe(false);
      expectInfoAgrees(info, qemuInfo(fixture.image), fixture.dir);
    });

    it('map --json agrees with qemu-img map --output=json', () => {
      const entries = JSON.parse(cliOk(['map', fixture.image, '--json']).stdout) as MapEntry[];
      expectMapAgrees(entries, fixture.image, fixture.dir);
    });

    for (const snapshot of spec.snapshots ?? []) {
      it(`load --snapshot ${snapshot} equals qemu-img`, () => {
        const target = outputPath(`${spec.name}-snapshot`);
        cliOk(['load', '--snapshot', snapshot, fixture.image, target, '--progress=none']);
        expectSameFile(target, qemuRaw(fixture, snapshot));
        fs.rmSync(target);
      });
    }
  });
}

describe('qcow2img commands and options', () => {
  let chain: Fixture;
  beforeAll(() => {
    chain = prepare(catalog.find((s) => s.name === 'chain-3')!);
  });

  it('info --backing-chain --json is an array that agrees with qemu-img info --backing-chain', () => {
    const infos = JSON.parse(cliOk(['info', chain.image, '--backing-chain', '--json']).stdout) as ImageInfo[];
    expect(Array.isArray(infos)).toBe(true);
    const expected = qemuInfoChain(chain.image);
    expect(infos).toHaveLength(expected.length);
    expect(infos).toHaveLength(3);
    infos.forEach((info, i) => expectInfoAgrees(info, expected[i]!, chain.dir));
  });

  it('info and map print human output', () => {
    const info = cliOk(['info', chain.image]).stdout;
    expect(info).toContain(`(${field(qemuInfo(chain.image), 'virtual-size')} bytes)`);
    expect(info).toContain('backing file: mid.qcow2');
    const chainText = cliOk(['info', chain.image, '--backing-chain']).stdout;
    expect(chainText).toContain('base.qcow2');
    const map = cliOk(['map', chain.image]).stdout.trim().split('\n');
    const entries = JSON.parse(cliOk(['map', chain.image, '--json']).stdout) as MapEntry[];
    expect(map).toHaveLength(entries.length + 1);
  });

  it('--progress=json writes JSON lines on stdout, ending with the result', () => {
    const target = outputPath('progress');
    const result = cliOk(['load', chain.image, target, '--progress=json']);
    const lines = result.stdout.trim().split('\n');
    const events = lines.map((line) => JSON.parse(line) as Record<string, unknown>);
    const size = field(qemuInfo(chain.image), 'virtual-size');
    const last = events[events.length - 1]!;
    expect(last['phase']).toBe('done');
    expect(last['virtualSize']).toBe(size);
    expect(fs.realpathSync(last['target'] as string)).toBe(fs.realpathSync(target));
    const writes = events.filter((e) => e['phase'] === 'write');
    expect(writes.length).toBeGreaterThan(0);
    for (const e of writes) {
      expect(e['bytesTotal']).toBe(size);
      expect(e['bytesDone'] as number).toBeLessThanOrEqual(size as number);
    }
    expect(writes[writes.length - 1]!['bytesDone']).toBe(size);
    expect(events.some((e) => e['phase'] === 'flush')).toBe(true);
    expectSameFile(target, qemuRaw(chain));
    fs.rmSync(target);
  });

  it('load --threads 1 --direct=never and --overwrite write the same bytes', () => {
    const target = outputPath('threads');
    cliOk(['load', chain.image, target, '--threads', '1', '--direct=never', '--progress=none']);
    expectSameFile(target, qemuRaw(chain));
    fs.writeFileSync(target, 'old contents');
    cliOk(['load', chain.image, target, '--overwrite', '--progress=none']);
    expectSameFile(target, qemuRaw(chain));
    fs.rmSync(target);
  });

  it('--help exits 0 with the usage; --version prints the package version', () => {
    const help = cliOk(['--help']);
    expect(help.stdout).toContain('usage: qcow2img');
    expect(cliOk(['load', '--help']).stdout).toContain('usage: qcow2img');
    const { version } = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { version: string };
    expect(cliOk(['--version']).stdout.trim()).toBe(version);
  });

  it('usage errors exit 1 with one line on stderr', () => {
    expectUsageError(['frobnicate']);
    expectUsageError(['info']);
    expectUsageError(['info', chain.image, 'extra']);
    expectUsageError(['map']);
    expectUsageError(['load', chain.image]);
    expectUsageError(['load', chain.image, outputPath('x'), '--direct=sometimes']);
    expectUsageError(['load', chain.image, outputPath('x'), '--progress=loud']);
    expectUsageError(['load', chain.image, outputPath('x'), '--threads', '0']);
    expectUsageError(['load', chain.image, outputPath('x'), '--threads', 'many']);
    expectUsageError(['info', chain.image, '--no-such-option']);
  });

  it('no arguments prints the usage and exits 1', () => {
    const result = cli([]);
    expect(result.status).toBe(1);
    expect(result.stdout).toContain('usage: qcow2img');
  });
});

describe('qcow2img errors: exit 1, one line naming the file', () => {
  let f: RefusalFiles;
  beforeAll(() => {
    f = refusalFixtures();
  });

  it('missing image', () => {
    const missing = path.join(scratch, 'no-such.qcow2');
    expectCliError(['info', missing], missing);
    expectCliError(['load', missing, outputPath('missing')], missing);
  });

  it('bad magic, a file cut inside its header', () => {
    // A file cut after its header reads as QEMU reads it, zeros past the end (test/qcow2/reader.test.ts).
    expectCliError(['info', f.badMagic], f.badMagic);
    expectCliError(['info', f.truncatedHeader], f.truncatedHeader);
  });

  it('encrypted images (info describes them: test/qcow2/encrypted-info.test.ts)', () => {
    expect(expectCliError(['map', f.luks], f.luks)).toMatch(/encrypt/i);
    expect(expectCliError(['load', f.aes, outputPath('aes')], f.aes)).toMatch(/encrypt/i);
  });

  it('unknown incompatible feature, named from the feature-name table', () => {
    expect(expectCliError(['info', f.unknownBit], f.unknownBit)).toMatch(/\bbit 10\b/);
    expect(expectCliError(['info', f.unknownBitNamed], f.unknownBitNamed)).toContain(f.unknownBitName);
  });

  it('backing chain loops and missing backing files', () => {
    // info names the backing file without opening it (as qemu-img info); --backing-chain follows it.
    expectCliError(['info', '--backing-chain', f.loopA], f.loopA);
    expectCliError(['map', f.loopSelf], f.loopSelf);
    expect(expectCliError(['load', f.missingBacking, outputPath('missing-backing')], f.missingBacking)).toContain('missing.qcow2');
  });

  it('backing and data files outside the folder: refused, then allowed by --allow-path or --allow-any-path', () => {
    expectCliError(['info', '--backing-chain', f.absoluteBacking], f.absoluteBacking);
    expectCliError(['load', f.dotDotBacking, outputPath('dotdot')], f.dotDotBacking);
    expectCliError(['map', f.symlinkBacking], f.symlinkBacking);
    expectCliError(['info', f.absoluteDataFile], f.absoluteDataFile);
    const expected = qemuConvert(f.absoluteBacking);
    for (const allow of [['--allow-path', f.outsideDir], ['--allow-any-path']]) {
      const target = outputPath('allowed');
      cliOk(['load', f.absoluteBacking, target, '--progress=none', ...allow]);
      expectSameFile(target, expected);
      fs.rmSync(target);
    }
    cliOk(['info', f.symlinkBacking, '--allow-path', f.outsideDir]);
    cliOk(['info', f.absoluteDataFile, '--allow-any-path']);
  });

  it('existing target without --overwrite, target that is the image, unknown snapshot', () => {
    const snapshots = prepare(catalog.find((s) => s.name === 'snapshots')!);
    const target = outputPath('exists');
    fs.writeFileSync(target, 'precious');
    expectCliError(['load', snapshots.image, target], target);
    expect(fs.readFileSync(target, 'utf8')).toBe('precious');
    const copy = path.join(scratch, 'self.qcow2');
    fs.copyFileSync(snapshots.image, copy);
    const before = fs.readFileSync(copy);
    expectCliError(['load', copy, copy, '--overwrite'], copy);
    expect(fs.readFileSync(copy).equals(before)).toBe(true);
    expect(expectCliError(['load', '--snapshot', 'no-such-snapshot', snapshots.image, outputPath('snap')], snapshots.image)).toContain('no-such-snapshot');
  });
});

describe('SIGINT during a load', () => {
  it('stops, says the target is incomplete, exits 130, reports no success and leaves no file', async () => {
    // 2 GiB of data, loaded with one thread and read back: seconds of work, interrupted at its first progress event.
    const image = path.join(scratch, 'interrupted.qcow2');
    const target = path.join(scratch, 'interrupted.raw');
    qemuImg(['create', '-q', '-f', 'qcow2', image, '2G']);
    qemuIo(image, [0, 1, 2, 3].map((i) => `write -P 0x5${i} ${i * 512}M 512M`));
    const { spawn } = await import('node:child_process');
    const child = spawn(process.execPath, [cliPath, 'load', image, target, '--threads', '1', '--verify', '--progress=json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const events: { phase: string; bytesDone?: number }[] = [];
    let stderr = '';
    let buffered = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.stdout.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      for (let at = buffered.indexOf('\n'); at >= 0; at = buffered.indexOf('\n')) {
        const event = JSON.parse(buffered.slice(0, at)) as { phase: string; bytesDone?: number };
        buffered = buffered.slice(at + 1);
        events.push(event);
        if (events.length === 1) child.kill('SIGINT');
      }
    });
    const status = await new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    expect(events.length, 'progress events before the interrupt').toBeGreaterThan(0);
    expect(status, stderr).toBe(130);
    expect(events.some((e) => e.phase === 'done'), 'no success reported').toBe(false);
    const lines = stderr.split('\n').filter((line) => line !== '');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toContain('incomplete');
    expect(fs.existsSync(target)).toBe(false);
    expect(fs.readdirSync(scratch).filter((f) => f.includes('interrupted.raw'))).toEqual([]);
    fs.rmSync(image);
  }, 120_000);
});

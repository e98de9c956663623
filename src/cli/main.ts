#!/usr/bin/env node
/** The qcow2img command line: a thin shell over the library API. */
import { parseArgs } from 'node:util';
import { Qcow2Error } from '../errors';
import type { OpenOptions } from '../qcow2/image';
import * as fs from 'node:fs/promises';
import type { Progress } from '../load/progress';
import type { DirectMode } from '../load/target';
import { formatInfoChain, formatMap, humanBytes, percent, progressLine } from './format';

const usage = `usage: qcow2img <command> [options]

commands:
  info IMAGE [--json] [--backing-chain]        describe an image (like qemu-img info)
  map IMAGE [--json]                           allocation map (like qemu-img map)
  load IMAGE TARGET [options]                  write the raw virtual disk to TARGET
      TARGET is a file (written under a temporary name, then renamed), a block
      device, or a disk / disk image with --partition N or --offset BYTES
      --partition N         write into partition N (GPT or MBR) of TARGET
      --offset BYTES        write starting at this byte of TARGET
      --verify              read the target back and compare (O_DIRECT)
      --target-is-zero      the target already reads zeros: skip zeroing
      --force               write to a mounted or in-use device (never the root disk)
      --snapshot ID|NAME    read the disk as it was at an internal snapshot
      --threads N           native worker threads
      --overwrite           replace an existing target file
      --direct=auto|always|never   O_DIRECT (default auto)
      --progress=bar|json|none     progress on stderr (bar on a TTY) or JSON lines on stdout

  check IMAGE [--json]                         consistency check (exit 0 clean, 2 corrupt, 3 leaks, 1 failed)
  capture SOURCE OUT.qcow2 [options]           raw file or block device to a qcow2 image
      --compress zlib|zstd  compressed clusters (zlib: raw deflate as QEMU writes it)
      --level N             zlib 0-3 (ISA-L), 4 (ISA-L + zlib, default) or 5-9 (zlib; 6 = qemu-img's size;
                            zlib's own levels without ISA-L), zstd -7 to 19 (default 1)
      --cluster-size BYTES  512 to 2M (default 64k; k, M, G suffixes accepted)
      --compat 0.10|1.1     qcow2 version 2 or 3 (default 1.1)
      --backing BASE        store only clusters that differ from BASE (its backing file)
      --backing-format qcow2|raw
      --threads N, --overwrite, --progress=bar|json|none

  bench TARGET [options]                       write bandwidth, IOPS and latency, as fio measures them
      TARGET is a block device, a folder, or a new file name (files are removed after)
      --size S, --block-size B (default 1M), --queue-depth Q (default 16)
      --pattern seq|rand, --time SECONDS, --direct=always|never
      --engine auto|io_uring|threads, --force, --json, --progress=bar|json|none
      --image IMAGE         also load IMAGE onto TARGET and report its throughput as a ratio

  snapshot create OUT [--disk SRC] [--memory RAM [--memory-map REGIONS.json]] [--cpu CPU.json]
                  [--device NAME=FILE]... [--parent BUNDLE] [--dirty-bitmap FILE]
                  [--compress zstd|deflate|none] [--level N] [--machine JSON]
                  [--archive-level N]
      OUT is a folder, or an archive: OUT.tar, OUT.tar.gz or OUT.tar.zst
  snapshot restore BUNDLE [--disk TARGET] [--memory FILE] [--cpu FILE.json] [--device-dir D]
                  (--partition, --offset, --verify, --force, --overwrite as for load)
  snapshot inspect BUNDLE [--json]
  snapshot verify BUNDLE                       exit 1 and name the damaged file (and chunk, range)
      BUNDLE is a folder or an archive; --temp-dir D: where an archive's members are extracted

options for every command that opens an image:
  --allow-path DIR          follow backing/data file names into DIR (repeatable)
  --allow-any-path          follow backing/data file names anywhere
`;

class UsageError extends Error {}

function openOptions(values: ParsedValues): OpenOptions {
  const options: OpenOptions = {
    onWarning: (message) => process.stderr.write(`qcow2img: warning: ${message}\n`),
  };
  if (values['allow-path']) options.allowPaths = values['allow-path'] as string[];
  if (values['allow-any-path']) options.allowAnyPath = true;
  return options;
}

const common = {
  'allow-path': { type: 'string', multiple: true },
  'allow-any-path': { type: 'boolean' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

type OptionSpec = Record<string, { type: 'string' | 'boolean'; multiple?: boolean; short?: string }>;
type ParsedValues = Record<string, string | boolean | string[] | undefined>;

function parse(args: string[], extra: OptionSpec = {}): { values: ParsedValues; positionals: string[] } {
  try {
    const { values, positionals } = parseArgs({ args, options: { ...common, ...extra }, allowPositionals: true, strict: true });
    return { values: values as ParsedValues, positionals };
  } catch (error) {
    // Node's messages can run to several lines ("--partition -1"): the first says what is wrong.
    const message = (error as Error).message;
    const first = message.split('\n')[0]!;
    const equalsForm = /use '(--[^'=]+)=/.exec(message)?.[1];
    throw new UsageError(equalsForm ? `${first} (a value starting with "-" goes as ${equalsForm}=VALUE)` : first);
  }
}

function needPositionals(positionals: string[], count: number, names: string): void {
  if (positionals.length !== count) throw new UsageError(`expected ${names}`);
}

// Each command loads only its part of the library: start-up is part of every command's time.
/* eslint-disable @typescript-eslint/no-require-imports */
const library = {
  open: () => (require('../qcow2/open') as typeof import('../qcow2/open')).open,
  load: () => (require('../load/index') as typeof import('../load/index')).load,
  capture: () => (require('../capture/index') as typeof import('../capture/index')).capture,
  check: () => require('../check/index') as typeof import('../check/index'),
  bench: () => (require('../bench/index') as typeof import('../bench/index')).bench,
};
/* eslint-enable @typescript-eslint/no-require-imports */

async function info(args: string[]): Promise<void> {
  const { values, positionals } = parse(args, { 'backing-chain': { type: 'boolean' } });
  needPositionals(positionals, 1, 'IMAGE');
  // As qemu-img info: an encrypted image is described, though its data cannot be read.
  const image = await library.open()(positionals[0]!, { ...openOptions(values), metadataOnly: true });
  try {
    const infos = values['backing-chain'] ? [image.info, ...image.backingChain] : [image.info];
    if (values.json) {
      process.stdout.write(JSON.stringify(values['backing-chain'] ? infos : infos[0], null, 2) + '\n');
    } else {
      process.stdout.write(formatInfoChain(infos) + '\n');
    }
  } finally {
    await image.close();
  }
}

async function map(args: string[]): Promise<void> {
  const { values, positionals } = parse(args);
  needPositionals(positionals, 1, 'IMAGE');
  const image = await library.open()(positionals[0]!, openOptions(values));
  try {
    const entries = await image.extents();
    // qemu-img map prints one empty entry for an empty disk (img_map dumps the entry it starts from).
    if (entries.length === 0) entries.push({ start: 0, length: 0, depth: 0, present: false, zero: false, data: false });
    process.stdout.write((values.json ? JSON.stringify(entries, null, 2) : formatMap(entries)) + '\n');
  } finally {
    await image.close();
  }
}

function progressReporter(mode: string): ((p: Progress) => void) | undefined {
  if (mode === 'json') return (p) => process.stdout.write(JSON.stringify(p) + '\n');
  if (mode === 'bar' || (mode === 'auto' && process.stderr.isTTY)) {
    return (p) => process.stderr.write(`\r${progressLine(p)}\x1b[K`);
  }
  return undefined;
}

function integerOption(value: string | boolean | string[] | undefined, name: string, minimum: number): number | undefined {
  if (value === undefined) return undefined;
  const parsed = Number(value);
  if (typeof value !== 'string' || !/^\d+$/.test(value) || !Number.isSafeInteger(parsed) || parsed < minimum) {
    throw new UsageError(`${name} must be an integer of at least ${minimum}`);
  }
  return parsed;
}

async function loadCommand(args: string[]): Promise<void> {
  const { values, positionals } = parse(args, {
    snapshot: { type: 'string' },
    threads: { type: 'string' },
    overwrite: { type: 'boolean' },
    direct: { type: 'string' },
    progress: { type: 'string' },
    partition: { type: 'string' },
    offset: { type: 'string' },
    verify: { type: 'boolean' },
    'target-is-zero': { type: 'boolean' },
    force: { type: 'boolean' },
  });
  needPositionals(positionals, 2, 'IMAGE TARGET');
  const direct = (values.direct as string | undefined) ?? 'auto';
  if (!['auto', 'always', 'never'].includes(direct)) throw new UsageError('--direct must be auto, always or never');
  const progressMode = (values.progress as string | undefined) ?? 'auto';
  if (!['auto', 'bar', 'json', 'none'].includes(progressMode)) throw new UsageError('--progress must be bar, json or none');
  const threads = threadsOption(values.threads);
  const partition = integerOption(values.partition, '--partition', 1);
  const offset = integerOption(values.offset, '--offset', 0);
  const onProgress = progressReporter(progressMode);
  const result = await untilInterrupted((signal) =>
    library.load()(positionals[0]!, positionals[1]!, {
      ...openOptions(values),
      ...(values.snapshot !== undefined ? { snapshot: values.snapshot as string } : {}),
      ...(threads !== undefined ? { threads } : {}),
      ...(onProgress ? { onProgress } : {}),
      ...(partition !== undefined ? { partition } : {}),
      ...(offset !== undefined ? { offset } : {}),
      verify: values.verify === true,
      targetIsZero: values['target-is-zero'] === true,
      force: values.force === true,
      overwrite: values.overwrite === true,
      direct: direct as DirectMode,
      signal,
      onNotice: (message) => process.stderr.write(`qcow2img: ${message}\n`),
    }),
  );
  if (onProgress && progressMode !== 'json') process.stderr.write('\n');
  if (progressMode === 'json') {
    process.stdout.write(JSON.stringify({ phase: 'done', ...result }) + '\n');
  } else {
    const rate = result.seconds > 0 ? result.virtualSize / result.seconds : 0;
    process.stderr.write(
      `qcow2img: loaded ${humanBytes(result.virtualSize)} into ${result.target}${result.offset ? ` at offset ${result.offset}` : ''} in ${result.seconds.toFixed(2)} s (${humanBytes(rate)}/s; ${humanBytes(result.dataBytes)} data, ${humanBytes(result.zeroBytes)} zero${result.direct ? ', O_DIRECT' : ''}${result.verified ? ', verified' : ''})\n`,
    );
  }
}

/**
 * Runs `work` with a signal SIGINT and SIGTERM fire meanwhile: the library stops at its next step
 * and removes what it had not finished, and main() exits 130.
 */
async function untilInterrupted<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const onSignal = () => controller.abort();
  const signals = ['SIGINT', 'SIGTERM'] as const;
  for (const name of signals) process.once(name, onSignal);
  try {
    return await work(controller.signal);
  } finally {
    for (const name of signals) process.off(name, onSignal);
  }
}

function sizeOption(value: string | boolean | string[] | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  const match = typeof value === 'string' ? /^(\d+)([kKmMgGtT]?)$/.exec(value) : null;
  if (!match) throw new UsageError(`${name} must be a size in bytes (k, M, G, T suffixes accepted)`);
  const unit = ({ '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 } as Record<string, number>)[match[2]!.toUpperCase()]!;
  return Number(match[1]) * unit;
}

function threadsOption(value: string | boolean | string[] | undefined): number | undefined {
  if (value === undefined) return undefined;
  const threads = Number(value);
  if (!Number.isInteger(threads) || threads < 1 || threads > 64) throw new UsageError('--threads must be an integer from 1 to 64');
  return threads;
}

async function captureCommand(args: string[]): Promise<void> {
  const { values, positionals } = parse(args, {
    compress: { type: 'string' },
    level: { type: 'string' },
    'cluster-size': { type: 'string' },
    compat: { type: 'string' },
    backing: { type: 'string' },
    'backing-format': { type: 'string' },
    threads: { type: 'string' },
    overwrite: { type: 'boolean' },
    progress: { type: 'string' },
  });
  needPositionals(positionals, 2, 'SOURCE OUT.qcow2');
  const compress = values.compress as string | undefined;
  if (compress !== undefined && compress !== 'zlib' && compress !== 'zstd') throw new UsageError('--compress must be zlib or zstd');
  const compat = values.compat as string | undefined;
  if (compat !== undefined && compat !== '0.10' && compat !== '1.1') throw new UsageError('--compat must be 0.10 or 1.1');
  const backingFormat = values['backing-format'] as string | undefined;
  if (backingFormat !== undefined && backingFormat !== 'qcow2' && backingFormat !== 'raw') throw new UsageError('--backing-format must be qcow2 or raw');
  let level: number | undefined;
  if (values.level !== undefined) {
    level = Number(values.level);
    if (!Number.isInteger(level)) throw new UsageError('--level must be an integer');
  }
  const progressMode = (values.progress as string | undefined) ?? 'auto';
  const onProgress = progressReporter(progressMode);
  const clusterSize = sizeOption(values['cluster-size'], '--cluster-size');
  const threads = threadsOption(values.threads);
  const result = await untilInterrupted((signal) =>
    library.capture()(positionals[0]!, positionals[1]!, {
      ...openOptions(values),
      ...(compress ? { compress: compress as 'zlib' | 'zstd' } : {}),
      ...(level !== undefined ? { level } : {}),
      ...(clusterSize !== undefined ? { clusterSize } : {}),
      ...(compat ? { compat: compat as '0.10' | '1.1' } : {}),
      ...(values.backing !== undefined ? { backing: values.backing as string } : {}),
      ...(backingFormat ? { backingFormat: backingFormat as 'qcow2' | 'raw' } : {}),
      ...(threads !== undefined ? { threads } : {}),
      ...(onProgress ? { onProgress } : {}),
      overwrite: values.overwrite === true,
      signal,
    }),
  );
  if (onProgress && progressMode !== 'json') process.stderr.write('\n');
  if (progressMode === 'json') {
    process.stdout.write(JSON.stringify({ phase: 'done', ...result }) + '\n');
  } else {
    process.stderr.write(
      `qcow2img: captured ${humanBytes(result.virtualSize)} into ${result.output} (${humanBytes(result.fileSize)}; ${result.dataClusters} data, ${result.compressedClusters} compressed, ${result.zeroClusters} zero clusters) in ${result.seconds.toFixed(2)} s\n`,
    );
  }
}

async function checkCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args);
  needPositionals(positionals, 1, 'IMAGE');
  const { check, checkExitCode } = library.check();
  const result = await check(positionals[0]!);
  const exitCode = checkExitCode(result);
  if (values.json) {
    process.stdout.write(JSON.stringify(result, null, 2) + '\n');
    return exitCode;
  }
  // As qemu-img: each problem on stderr ("ERROR ..." / "Leaked cluster ..."), the summary on stdout.
  const problems = result.issues.map((issue) => (issue.kind === 'leak' ? issue.message.replace(/^leaked/, 'Leaked') : `ERROR ${issue.message}`));
  if (result.issueCount > result.issues.length) problems.push(`... and ${result.issueCount - result.issues.length} more`);
  if (problems.length) process.stderr.write(problems.join('\n') + '\n');
  const lines: string[] = [];
  if (result.corruptions === 0 && result.leaks === 0 && result.checkErrors === 0) lines.push('No errors were found on the image.');
  if (result.corruptions > 0) lines.push('', `${result.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  if (result.leaks > 0) lines.push('', `${result.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  if (result.checkErrors > 0) lines.push('', `${result.checkErrors} internal errors have occurred during the check.`);
  if (result.totalClusters > 0 && result.allocatedClusters > 0) {
    const allocated = percent(result.allocatedClusters, result.totalClusters);
    lines.push(
      `${result.allocatedClusters}/${result.totalClusters} = ${allocated}% allocated, ${percent(result.fragmentedClusters, result.allocatedClusters)}% fragmented, ${percent(result.compressedClusters, result.allocatedClusters)}% compressed clusters`,
    );
  }
  lines.push(`Image end offset: ${result.imageEndOffset}`);
  process.stdout.write(lines.join('\n') + '\n');
  return exitCode;
}

async function benchCommand(args: string[]): Promise<void> {
  const { values, positionals } = parse(args, {
    size: { type: 'string' },
    'block-size': { type: 'string' },
    'queue-depth': { type: 'string' },
    pattern: { type: 'string' },
    time: { type: 'string' },
    direct: { type: 'string' },
    engine: { type: 'string' },
    force: { type: 'boolean' },
    image: { type: 'string' },
    progress: { type: 'string' },
  });
  needPositionals(positionals, 1, 'TARGET');
  const pattern = (values.pattern as string | undefined) ?? 'seq';
  if (pattern !== 'seq' && pattern !== 'rand') throw new UsageError('--pattern must be seq or rand');
  const direct = (values.direct as string | undefined) ?? 'always';
  if (direct !== 'always' && direct !== 'never') throw new UsageError('--direct must be always or never');
  const engine = (values.engine as string | undefined) ?? 'auto';
  if (!['auto', 'io_uring', 'threads'].includes(engine)) throw new UsageError('--engine must be auto, io_uring or threads');
  let time: number | undefined;
  if (values.time !== undefined) {
    time = Number(values.time);
    // Finite and at most a million seconds: larger values overflow the native clock.
    if (!(time > 0 && time <= 1e6)) throw new UsageError('--time must be a number of seconds above 0, up to 1000000');
  }
  const size = sizeOption(values.size, '--size');
  const blockSize = sizeOption(values['block-size'], '--block-size');
  const queueDepth = integerOption(values['queue-depth'], '--queue-depth', 1);
  const progressMode = (values.progress as string | undefined) ?? (values.json ? 'none' : 'auto');
  if (!['auto', 'bar', 'json', 'none'].includes(progressMode)) throw new UsageError('--progress must be bar, json or none');
  const onProgress = progressReporter(progressMode);
  const result = await untilInterrupted((signal) =>
    library.bench()(positionals[0]!, {
      ...openOptions(values),
      ...(size !== undefined ? { size } : {}),
      ...(blockSize !== undefined ? { blockSize } : {}),
      ...(queueDepth !== undefined ? { queueDepth } : {}),
      ...(time !== undefined ? { time } : {}),
      ...(values.image !== undefined ? { image: values.image as string } : {}),
      ...(onProgress ? { onProgress } : {}),
      pattern: pattern as 'seq' | 'rand',
      direct: direct as 'always' | 'never',
      engine: engine as 'auto' | 'io_uring' | 'threads',
      force: values.force === true,
      signal,
    }),
  );
  if (onProgress && progressMode !== 'json') process.stderr.write('\n');
  if (values.json) {
    process.stdout.write(JSON.stringify(result, null, 2) + '\n');
    return;
  }
  const lines = [
    `target: ${result.target} (${result.direct ? 'O_DIRECT' : 'buffered'}, ${result.engine})`,
    `${result.pattern === 'seq' ? 'sequential' : 'random'} writes of ${humanBytes(result.blockSize)}, queue depth ${result.queueDepth}: ${humanBytes(result.bytes)} in ${result.seconds.toFixed(2)} s`,
    `bandwidth: ${(result.bandwidthBytesPerSec / 1e6).toFixed(1)} MB/s (${humanBytes(result.bandwidthBytesPerSec)}/s), ${Math.round(result.iops)} IOPS`,
    `latency: p50 ${result.latencyUs.p50.toFixed(0)} us, p99 ${result.latencyUs.p99.toFixed(0)} us, p99.9 ${result.latencyUs.p999.toFixed(0)} us`,
  ];
  if (result.load) {
    lines.push(
      `image load: ${humanBytes(result.load.dataBytes)} of data in ${result.load.seconds.toFixed(2)} s = ${(result.load.bytesPerSec / 1e6).toFixed(1)} MB/s, ${(100 * result.load.ratio).toFixed(1)}% of the raw bandwidth`,
    );
  }
  process.stdout.write(lines.join('\n') + '\n');
}

async function readJsonFile(path: string, what: string): Promise<unknown> {
  const text = await fs.readFile(path, 'utf8').catch((error: NodeJS.ErrnoException) => {
    throw new Qcow2Error('IO_ERROR', `cannot read the ${what}: ${error.code === 'ENOENT' ? 'no such file' : error.message}`, { path });
  });
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Qcow2Error('INVALID_ARGUMENT', `${what} is not JSON: ${(error as Error).message}`, { path });
  }
}

async function snapshotCommand(args: string[]): Promise<number | void> {
  // Loaded here: the snapshot code and its schema library are start-up time the other commands need not pay.
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { createSnapshot, inspectSnapshot, restoreSnapshot, verifySnapshot } = require('../snapshot/index') as typeof import('../snapshot/index');
  const [verb, ...rest] = args;
  if (verb === 'create') {
    const { values, positionals } = parse(rest, {
      disk: { type: 'string' },
      memory: { type: 'string' },
      'memory-map': { type: 'string' },
      cpu: { type: 'string' },
      device: { type: 'string', multiple: true },
      parent: { type: 'string' },
      'dirty-bitmap': { type: 'string' },
      compress: { type: 'string' },
      level: { type: 'string' },
      machine: { type: 'string' },
      threads: { type: 'string' },
      'archive-level': { type: 'string' },
    });
    needPositionals(positionals, 1, 'OUT');
    const compress = values.compress as string | undefined;
    if (compress !== undefined && !['zstd', 'deflate', 'none'].includes(compress)) throw new UsageError('--compress must be zstd, deflate or none');
    if (values['memory-map'] !== undefined && values.memory === undefined) throw new UsageError('--memory-map needs --memory');
    const devices = await Promise.all(
      ((values.device as string[] | undefined) ?? []).map(async (spec) => {
        const at = spec.indexOf('=');
        if (at <= 0) throw new UsageError('--device takes NAME=FILE');
        const file = spec.slice(at + 1);
        const data = await fs.readFile(file).catch((error: Error) => {
          throw new Qcow2Error('IO_ERROR', `cannot read the device blob: ${error.message}`, { path: file });
        });
        return { name: spec.slice(0, at), data };
      }),
    );
    let machine: Record<string, unknown> | undefined;
    if (values.machine !== undefined) {
      try {
        machine = JSON.parse(values.machine as string) as Record<string, unknown>;
      } catch {
        throw new UsageError('--machine takes a JSON object');
      }
    }
    const level = values.level !== undefined ? Number(values.level) : undefined;
    if (level !== undefined && !Number.isInteger(level)) throw new UsageError('--level must be an integer');
    const archiveLevel = integerOption(values['archive-level'], '--archive-level', 0);
    const threads = threadsOption(values.threads);
    const metadata = await untilInterrupted(async (signal) =>
      createSnapshot(positionals[0]!, {
        signal,
        ...(values.disk !== undefined ? { disk: values.disk as string } : {}),
        ...(values.memory !== undefined ? { memory: values.memory as string } : {}),
        ...(values['memory-map'] !== undefined ? { memoryRegions: (await readJsonFile(values['memory-map'] as string, 'memory map')) as never } : {}),
        ...(values.cpu !== undefined ? { cpu: await readJsonFile(values.cpu as string, 'CPU state') } : {}),
        ...(devices.length ? { devices } : {}),
        ...(values.parent !== undefined ? { parent: values.parent as string } : {}),
        ...(values['dirty-bitmap'] !== undefined ? { dirtyBitmap: await fs.readFile(values['dirty-bitmap'] as string) } : {}),
        ...(compress ? { compress: compress as 'zstd' | 'deflate' | 'none' } : {}),
        ...(level !== undefined ? { level } : {}),
        ...(machine ? { machine } : {}),
        ...(threads ? { threads } : {}),
        ...(archiveLevel !== undefined ? { archiveLevel } : {}),
      }),
    );
    process.stdout.write(JSON.stringify(metadata, null, 2) + '\n');
    return;
  }
  if (verb === 'restore') {
    const { values, positionals } = parse(rest, {
      disk: { type: 'string' },
      memory: { type: 'string' },
      cpu: { type: 'string' },
      'device-dir': { type: 'string' },
      partition: { type: 'string' },
      offset: { type: 'string' },
      verify: { type: 'boolean' },
      force: { type: 'boolean' },
      overwrite: { type: 'boolean' },
      'target-is-zero': { type: 'boolean' },
      threads: { type: 'string' },
      'temp-dir': { type: 'string' },
    });
    needPositionals(positionals, 1, 'BUNDLE');
    const partition = integerOption(values.partition, '--partition', 1);
    const offset = integerOption(values.offset, '--offset', 0);
    const threads = threadsOption(values.threads);
    const result = await untilInterrupted((signal) =>
      restoreSnapshot(positionals[0]!, {
        signal,
        ...(values.disk !== undefined ? { disk: values.disk as string } : {}),
        ...(values.memory !== undefined ? { memory: values.memory as string } : {}),
        ...(values.cpu !== undefined ? { cpu: values.cpu as string } : {}),
        ...(values['device-dir'] !== undefined ? { deviceDir: values['device-dir'] as string } : {}),
        ...(partition !== undefined ? { partition } : {}),
        ...(offset !== undefined ? { offset } : {}),
        ...(threads ? { threads } : {}),
        ...(values['temp-dir'] !== undefined ? { tempDir: values['temp-dir'] as string } : {}),
        verify: values.verify === true,
        force: values.force === true,
        overwrite: values.overwrite === true,
        targetIsZero: values['target-is-zero'] === true,
      }),
    );
    process.stdout.write(JSON.stringify(result, null, 2) + '\n');
    return;
  }
  if (verb === 'inspect') {
    const { values, positionals } = parse(rest, { 'temp-dir': { type: 'string' } });
    needPositionals(positionals, 1, 'BUNDLE');
    const inspection = await inspectSnapshot(positionals[0]!, values['temp-dir'] !== undefined ? { tempDir: values['temp-dir'] as string } : {});
    if (values.json) {
      process.stdout.write(JSON.stringify(inspection, null, 2) + '\n');
      return;
    }
    const m = inspection.metadata;
    const lines = [`snapshot ${m.id} (${m.created}) by ${m.producer}`, `parent: ${m.parent ? `${m.parent.id} at ${m.parent.path}` : 'none'}`];
    for (const [name, entry] of Object.entries(m.files)) if (entry) lines.push(`${name}: ${humanBytes(entry.size)}`);
    if (inspection.state) {
      const p = inspection.state.pages;
      lines.push(`memory: ${inspection.state.regions.map((r) => `0x${r.guestBase.toString(16)}+${humanBytes(r.size)}`).join(', ')}; pages: ${p.data} data, ${p.duplicate} duplicate, ${p.zero} zero, ${p.parent} from parent; ${inspection.state.chunks} chunks`);
      lines.push(`vCPUs: ${inspection.state.vcpus}; devices: ${inspection.state.devices.join(', ') || 'none'}`);
    }
    process.stdout.write(lines.join('\n') + '\n');
    return;
  }
  if (verb === 'verify') {
    const { values, positionals } = parse(rest, { 'temp-dir': { type: 'string' } });
    needPositionals(positionals, 1, 'BUNDLE');
    const problems = await verifySnapshot(positionals[0]!, values['temp-dir'] !== undefined ? { tempDir: values['temp-dir'] as string } : {});
    for (const p of problems) {
      const ranges = p.guestRanges?.map((r) => `0x${r.start.toString(16)}-0x${r.end.toString(16)}`).join(', ');
      process.stderr.write(`qcow2img: ${p.file}: ${p.part ? `${p.part}: ` : ''}${p.message}${ranges ? ` (guest-physical ${ranges})` : ''}\n`);
    }
    if (problems.length === 0) process.stdout.write('snapshot verified: every file and checksum matches\n');
    return problems.length === 0 ? 0 : 1;
  }
  throw new UsageError('snapshot takes create, restore, inspect or verify');
}

const commands: Record<string, (args: string[]) => Promise<void | number>> = { info, map, load: loadCommand, capture: captureCommand, check: checkCommand, bench: benchCommand, snapshot: snapshotCommand };

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(usage);
    return command === undefined ? 1 : 0;
  }
  if (command === '--version') {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    process.stdout.write(`${(require('../../package.json') as { version: string }).version}\n`);
    return 0;
  }
  const run = commands[command];
  try {
    if (!run) throw new UsageError(`unknown command "${command}"`);
    if (rest.includes('--help') || rest.includes('-h')) {
      process.stdout.write(usage);
      return 0;
    }
    return (await run(rest)) ?? 0;
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`qcow2img: ${error.message} (see qcow2img --help)\n`);
      // Not 2: check uses 2 for "corruptions found", as qemu-img does.
      return 1;
    }
    if (error instanceof Qcow2Error) {
      process.stderr.write(`qcow2img: ${error.message}\n`);
      return error.code === 'CANCELLED' ? 130 : 1;
    }
    const message = error instanceof Error ? error.message : String(error);
    process.stderr.write(`qcow2img: ${message.split('\n')[0]}\n`);
    return 1;
  }
}

if (require.main === module) {
  // A reader that went away (`qcow2img map IMAGE | head`) is not an error of ours: stop quietly.
  process.stdout.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw error;
  });
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

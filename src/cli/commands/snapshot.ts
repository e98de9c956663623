/** `qcow2img snapshot create|restore|inspect|verify`: VM snapshot bundles. */
import * as fs from 'node:fs/promises';
import { ioError, Qcow2Error } from '../../errors';
import { parseCpuState } from '../../vmstate/cpu';
import { createSnapshot, inspectSnapshot, restoreSnapshot, verifySnapshot } from '../../snapshot/index';
import { humanBytes } from '../format';
import { memoryMapFromMtree, qemuMemoryMap, type QemuMachine } from '../../vmstate/machine-memory';
import type { MemoryRegion } from '../../vmstate/writer';
import { defined, parseSize, UsageError } from '../options';
import { printJson, say, untilInterrupted } from '../terminal';

async function readJsonFile(path: string, what: string): Promise<unknown> {
  const text = await fs.readFile(path, 'utf8').catch((error: unknown) => {
    throw ioError(error, path, `cannot read the ${what}`);
  });
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Qcow2Error('INVALID_ARGUMENT', `${what} is not JSON: ${(error as Error).message}`, { path });
  }
}

/** --cpu: the file's JSON, checked here so that a wrong field blames the file, not the snapshot. */
async function readCpuFile(path: string): Promise<unknown> {
  const json = await readJsonFile(path, 'CPU state');
  parseCpuState(json, path);
  return json;
}

/**
 * --memory-map: a QEMU machine and its RAM size (q35:3G, pc:4G), or a file holding the regions
 * as JSON, or what `info mtree -f` printed (as text or as QMP's answer).
 */
async function memoryRegions(spec: string): Promise<MemoryRegion[]> {
  const machine = /^(q35|pc):(.+)$/.exec(spec);
  if (machine) return qemuMemoryMap(machine[1] as QemuMachine, parseSize(machine[2]!, '--memory-map'), spec);
  const text = await fs.readFile(spec, 'utf8').catch((error: NodeJS.ErrnoException) => {
    throw new Qcow2Error('IO_ERROR', `cannot read the memory map: ${error.code === 'ENOENT' ? 'no such file' : error.message}`, { path: spec });
  });
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return memoryMapFromMtree(text, undefined, spec);
  }
  const answer = (json as { return?: unknown } | null)?.return;
  return typeof answer === 'string' ? memoryMapFromMtree(answer, undefined, spec) : (json as MemoryRegion[]);
}

export interface CreateFlags {
  disk?: string;
  memory?: string;
  memoryMap?: string;
  cpu?: string;
  device?: string[];
  parent?: string;
  dirtyBitmap?: string;
  compress?: 'zstd' | 'zlib' | 'none';
  level?: number;
  machine?: string;
  threads?: number;
  archiveLevel?: number;
  tempDir?: string;
  overwrite?: boolean;
  json?: boolean;
}

export async function create([out]: string[], flags: CreateFlags): Promise<void> {
  const command = 'snapshot create';
  if (flags.memoryMap !== undefined && flags.memory === undefined) throw new UsageError('--memory-map needs --memory', command);
  let machine: Record<string, unknown> | undefined;
  if (flags.machine !== undefined) {
    try {
      machine = JSON.parse(flags.machine) as Record<string, unknown>;
    } catch {
      throw new UsageError('--machine takes a JSON object', command);
    }
  }
  const devices = await Promise.all(
    (flags.device ?? []).map(async (spec) => {
      const at = spec.indexOf('=');
      if (at <= 0) throw new UsageError(`--device takes NAME=FILE (got "${spec}")`, command);
      const file = spec.slice(at + 1);
      const data = await fs.readFile(file).catch((error: unknown) => {
        throw ioError(error, file, 'cannot read the device blob');
      });
      return { name: spec.slice(0, at), data };
    }),
  );
  const metadata = await untilInterrupted(async (signal) =>
    createSnapshot(out!, {
      signal,
      ...defined({ disk: flags.disk, memory: flags.memory, parent: flags.parent, level: flags.level, threads: flags.threads, archiveLevel: flags.archiveLevel, tempDir: flags.tempDir }),
      ...(flags.memoryMap !== undefined ? { memoryRegions: await memoryRegions(flags.memoryMap) } : {}),
      ...(flags.cpu !== undefined ? { cpu: await readCpuFile(flags.cpu) } : {}),
      ...(devices.length ? { devices } : {}),
      ...(flags.dirtyBitmap !== undefined ? { dirtyBitmap: await fs.readFile(flags.dirtyBitmap).catch((error: unknown) => { throw ioError(error, flags.dirtyBitmap!, 'cannot read the dirty bitmap'); }) } : {}),
      // The library's name for zlib clusters is "deflate".
      ...(flags.compress ? { compress: flags.compress === 'zlib' ? ('deflate' as const) : flags.compress } : {}),
      ...(machine ? { machine } : {}),
      ...(flags.overwrite ? { overwrite: true } : {}),
    }),
  );
  if (flags.json) {
    printJson(metadata);
    return;
  }
  const files = Object.entries(metadata.files)
    .filter(([, entry]) => entry)
    .map(([name, entry]) => `${name} ${humanBytes(entry!.size)}`);
  say(`qcow2img: snapshot ${metadata.id} written to ${out}${metadata.parent ? ` (parent ${metadata.parent.id})` : ''}: ${files.join(', ')}`);
}

export interface RestoreFlags {
  disk?: string;
  memory?: string;
  cpu?: string;
  deviceDir?: string;
  partition?: number;
  offset?: number;
  verify?: boolean;
  force?: boolean;
  overwrite?: boolean;
  targetIsZero?: boolean;
  inPlace?: boolean;
  memoryIsZero?: boolean;
  threads?: number;
  tempDir?: string;
  json?: boolean;
}

export async function restore([bundle]: string[], flags: RestoreFlags): Promise<void> {
  if (flags.inPlace && flags.memory === undefined) throw new UsageError('--in-place needs --memory', 'snapshot restore');
  if (flags.memoryIsZero && !flags.inPlace) throw new UsageError('--memory-is-zero needs --in-place', 'snapshot restore');
  const result = await untilInterrupted((signal) =>
    restoreSnapshot(bundle!, {
      signal,
      ...defined({
        disk: flags.disk,
        memory: flags.memory,
        cpu: flags.cpu,
        deviceDir: flags.deviceDir,
        partition: flags.partition,
        offset: flags.offset,
        threads: flags.threads,
        tempDir: flags.tempDir,
      }),
      verify: flags.verify === true,
      force: flags.force === true,
      overwrite: flags.overwrite === true,
      targetIsZero: flags.targetIsZero === true,
      ...(flags.inPlace ? { memoryInPlace: true } : {}),
      ...(flags.memoryIsZero ? { memoryZeroed: true } : {}),
    }),
  );
  if (flags.json) {
    printJson(result);
    return;
  }
  const parts: string[] = [];
  if (result.disk) parts.push(`disk ${humanBytes(result.disk.virtualSize)} into ${result.disk.target}${result.disk.verified ? ' (verified)' : ''}`);
  if (result.memory) parts.push(`memory ${humanBytes(result.memory.bytes)} into ${result.memory.path ?? 'memory'}${flags.inPlace ? ` (in place${result.memory.method === 'mmap' ? ', through a mapping' : ''})` : ''}`);
  if (result.cpu) parts.push(`vCPU state into ${result.cpu}`);
  if (result.devices?.length) parts.push(`${result.devices.length} device blob${result.devices.length === 1 ? '' : 's'}`);
  say(`qcow2img: restored ${parts.join('; ') || 'nothing'} from ${bundle}`);
}

export async function inspect([bundle]: string[], flags: { tempDir?: string; json?: boolean }): Promise<void> {
  const inspection = await inspectSnapshot(bundle!, defined({ tempDir: flags.tempDir }));
  if (flags.json) {
    printJson(inspection);
    return;
  }
  const m = inspection.metadata;
  const lines = [`snapshot ${m.id} (${m.created}) by ${m.producer}`, `parent: ${m.parent ? `${m.parent.id} at ${m.parent.path}` : 'none'}`];
  for (const [name, entry] of Object.entries(m.files)) if (entry) lines.push(`${name}: ${humanBytes(entry.size)}`);
  if (inspection.state) {
    const p = inspection.state.pages;
    lines.push(
      `memory: ${inspection.state.regions.map((r) => `0x${r.guestBase.toString(16)}+${humanBytes(r.size)}`).join(', ')}; pages: ${p.data} data, ${p.duplicate} duplicate, ${p.zero} zero, ${p.parent} from parent; ${inspection.state.chunks} chunks`,
    );
    lines.push(`vCPUs: ${inspection.state.vcpus}; devices: ${inspection.state.devices.join(', ') || 'none'}`);
  }
  process.stdout.write(lines.join('\n') + '\n');
}

export async function verify([bundle]: string[], flags: { tempDir?: string }): Promise<number> {
  const problems = await verifySnapshot(bundle!, defined({ tempDir: flags.tempDir }));
  for (const p of problems) {
    const ranges = p.guestRanges?.map((r) => `0x${r.start.toString(16)}-0x${r.end.toString(16)}`).join(', ');
    process.stderr.write(`qcow2img: ${p.file}: ${p.part ? `${p.part}: ` : ''}${p.message}${ranges ? ` (guest-physical ${ranges})` : ''}\n`);
  }
  if (problems.length === 0) process.stdout.write('snapshot verified: every file and checksum matches\n');
  return problems.length === 0 ? 0 : 1;
}

/**
 * The CLI's option values: every parser that more than one command uses, each giving a
 * one-line usage error that names the option. Ranges and alignments the library checks
 * itself (cluster size, block size, levels, --time) are left to it.
 */
import type { OpenOptions } from '../qcow2/image';
import { say } from './terminal';
import { UsageError } from './usage';

export { UsageError };

const powers: Record<string, number> = { '': 0, b: 0, k: 1, m: 2, g: 3, t: 4, p: 5, e: 6 };

/**
 * A size in bytes as qemu-img reads one (qemu_strtosz: k, M, G, T, P, E = powers of 1024,
 * either case, fractions such as 1.5G, a bare number = bytes, B = bytes) and as fio does by
 * default (KB = KiB = 1024; fio's default reads KiB as 1000 for old scripts' sake: here KiB is
 * 1024, as the sizes this CLI prints say). A value that is not a whole number of bytes is refused.
 */
export function parseSize(text: string, option: string): number {
  const match = /^(\d+)(?:\.(\d+))?([a-zA-Z]*)$/.exec(text);
  const suffix = match?.[3]?.toLowerCase();
  const unit = suffix === undefined ? undefined : /^([kmgtpe])(?:i?b)?$/.exec(suffix)?.[1] ?? (suffix === '' || suffix === 'b' ? suffix : undefined);
  if (!match || unit === undefined) {
    throw new UsageError(`${option} takes a size: a number of bytes, or with a unit as in 512, 64k, 1.5G, 4KiB (got "${text}")`);
  }
  const power = powers[unit]!;
  const fraction = match[2] ?? '';
  if (fraction !== '' && unit === '') throw new UsageError(`${option}: a fraction needs a unit (k, M, G, ...): "${text}"`);
  // Exact: (whole + fraction) × 1024^power as integers, in BigInt.
  const scale = 1024n ** BigInt(power);
  const numerator = BigInt(match[1]! + fraction) * scale;
  const denominator = 10n ** BigInt(fraction.length);
  if (numerator % denominator !== 0n) throw new UsageError(`${option}: ${text} is not a whole number of bytes`);
  const bytes = numerator / denominator;
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new UsageError(`${option}: ${text} is too large`);
  return Number(bytes);
}

/** A whole number written in decimal digits (a leading minus where min < 0), from min to max. */
export function parseInteger(text: string, option: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const value = Number(text);
  if (!/^-?\d+$/.test(text) || !Number.isSafeInteger(value) || value < min || value > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `of at least ${min}` : `from ${min} to ${max}`;
    throw new UsageError(`${option} takes a whole number ${range} (got "${text}")`);
  }
  return value;
}

/** --threads: native worker threads, 1 to 64. */
export function parseThreads(text: string, option = '--threads'): number {
  return parseInteger(text, option, 1, 64);
}

/** A number of seconds (fractions allowed), above 0. */
export function parseSeconds(text: string, option: string): number {
  const value = Number(text);
  if (!/^\d+(\.\d+)?$/.test(text) || !(value > 0)) throw new UsageError(`${option} takes a number of seconds above 0 (got "${text}")`);
  return value;
}

/** One of a few words, or an alias of one. */
export function parseChoice<T extends string>(text: string, option: string, choices: readonly T[], aliases: Record<string, T> = {}): T {
  if ((choices as readonly string[]).includes(text)) return text as T;
  const aliased = aliases[text];
  if (aliased !== undefined) return aliased;
  const list = choices.length > 1 ? `${choices.slice(0, -1).join(', ')} or ${choices[choices.length - 1]}` : choices[0];
  throw new UsageError(`${option} must be ${list} (got "${text}")`);
}

/** The options every command that opens an image shares: --allow-path, --allow-any-path, -U. */
/**
 * The options given, without those left undefined: the library's option types take no explicit
 * undefined (exactOptionalPropertyTypes), and a flag not given must mean the library's default.
 */
export function defined<T extends object>(options: T): { [K in keyof T]?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined)) as { [K in keyof T]?: Exclude<T[K], undefined> };
}

export interface OpenFlags {
  allowPath?: string[];
  allowAnyPath?: boolean;
  forceShare?: boolean;
  /** --header 'Name: value' for http(s) images. */
  header?: string[];
}

export function openOptions(flags: OpenFlags): OpenOptions {
  return {
    ...(flags.header?.length ? { http: { headers: flags.header } } : {}),
    onWarning: (message) => say(`qcow2img: warning: ${message}`),
    ...(flags.allowPath?.length ? { allowPaths: flags.allowPath } : {}),
    ...(flags.allowAnyPath ? { allowAnyPath: true } : {}),
    ...(flags.forceShare ? { forceShare: true } : {}),
  };
}

/** qemu-img's words for info, map and check: --output=human|json and -f FORMAT. */
export interface QemuOutputFlags {
  output?: 'human' | 'json';
  format?: 'qcow2' | 'raw';
  json?: boolean;
}

/**
 * Which output: 'qemu-json' (exactly qemu-img's --output=json), 'json' (the library's own
 * shape, --json) or 'human'. -f raw is refused: the library opens qcow2 images only.
 */
export function outputKind(flags: QemuOutputFlags, command: string): 'human' | 'json' | 'qemu-json' {
  if (flags.format === 'raw') {
    throw new UsageError('-f raw is not supported: qcow2img reads qcow2 images (raw files only as backing files); use qemu-img for a raw file', command);
  }
  if (flags.json && flags.output !== undefined) throw new UsageError('--json and --output cannot be combined: --output=json is qemu-img\'s JSON, --json the library\'s', command);
  if (flags.json) return 'json';
  return flags.output === 'json' ? 'qemu-json' : 'human';
}

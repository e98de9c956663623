/**
 * The one description of each command: its arguments, every option with its unit and default,
 * and examples. The parser (main.ts), `--help`, the man page (scripts/make-man.mjs) and the
 * shell completions (completion.ts) are all made from it.
 */
import { parseChoice, parseInteger, parseSeconds, parseSize, parseThreads } from './options';

export interface OptionSpec {
  /** Long name without dashes ("allow-path"). */
  long: string;
  /** One-letter alias ("U"). */
  short?: string;
  /** Placeholder of the value ("SIZE"); none for a flag. */
  value?: string;
  /** What it does, with its unit. */
  help: string;
  /** The default, as shown in the help. */
  default?: string;
  /** Turns the text into the value; throws a UsageError naming the option. */
  parse?: (text: string, option: string) => unknown;
  /** Values the option takes, for completion. */
  choices?: readonly string[];
  /** Given more than once, the values are collected. */
  repeatable?: boolean;
}

export interface CommandSpec {
  /** "info", or "snapshot create" for a subcommand. */
  name: string;
  /** Positional arguments, in order. */
  args: readonly string[];
  summary: string;
  /** Paragraphs after the summary. */
  details?: readonly string[];
  options: readonly OptionSpec[];
  examples: readonly { command: string; does: string }[];
}

const choice = (choices: readonly string[], aliases: Record<string, string> = {}) => ({
  choices,
  parse: (text: string, option: string) => parseChoice(text, option, choices, aliases),
});
const size = { value: 'SIZE', parse: parseSize };

// Shared groups of options -----------------------------------------------------------------

const openOptions: OptionSpec[] = [
  { long: 'allow-path', value: 'DIR|URL', repeatable: true, help: 'follow backing and data file names into DIR, or under a URL prefix (repeatable); by default only into the image\'s own folder (or, for a URL image, under its own URL\'s folder)' },
  { long: 'allow-any-path', help: 'follow backing and data file names anywhere' },
  {
    long: 'force-share',
    short: 'U',
    help: 'read even while another process (a running VM) holds the files, as qemu-img -U; writes over a running VM are always refused',
  },
];

/** Request headers for an http(s) IMAGE. */
const header: OptionSpec = {
  long: 'header',
  short: 'H',
  value: "'NAME: VALUE'",
  repeatable: true,
  help: 'send this request header when IMAGE is an http(s) URL (repeatable; tokens): sent to the image\'s origin only, never printed',
};

const qemuOutput: OptionSpec[] = [
  { long: 'output', value: 'FMT', ...choice(['human', 'json']), default: 'human', help: 'human: as qemu-img prints it; json: exactly what qemu-img --output=json prints' },
  { long: 'format', short: 'f', value: 'FMT', ...choice(['qcow2', 'raw']), default: 'qcow2', help: 'the image format, as qemu-img -f; only qcow2 is read (raw is refused)' },
];

const json = (what: string): OptionSpec => ({ long: 'json', help: `print ${what} as JSON (the library's camelCase shape) on stdout` });

const progressOptions: OptionSpec[] = [
  {
    long: 'progress',
    value: 'MODE',
    ...choice(['auto', 'bar', 'json', 'none']),
    default: 'auto',
    help: 'bar: a progress bar on stderr, drawn only on a terminal (auto: the same); json: JSON lines on stdout, the last {"phase":"done",...} the result; none',
  },
  { long: 'show-progress', short: 'p', help: 'show the progress bar (as qemu-img -p; --progress=bar)' },
  { long: 'quiet', short: 'q', help: 'no progress and no summary line (as qemu-img -q); errors and warnings still print' },
];

const threads: OptionSpec = { long: 'threads', value: 'N', parse: (text, option) => parseThreads(text, option), default: '4 a CPU, at least 8', help: 'native worker threads, 1 to 64' };
/** The snapshot commands' threads: the disk's as load's and capture's, the RAM's one a CPU (its work is all CPU). */
const snapshotThreads: OptionSpec = { ...threads, default: 'disk: 4 a CPU, at least 8; RAM: one a CPU' };

const targetOptions: OptionSpec[] = [
  { long: 'partition', value: 'N', parse: (text, option) => parseInteger(text, option, 1), help: 'write into partition N (GPT or MBR) of the disk or disk image TARGET' },
  { ...size, long: 'offset', help: 'write starting at this byte of TARGET' },
  { long: 'verify', help: 'read the target back (O_DIRECT) and compare' },
  { long: 'target-is-zero', help: 'the target already reads as zeros: skip zeroing' },
  { long: 'force', help: 'write to a mounted or in-use device (never the root disk, never a running VM\'s)' },
  { long: 'overwrite', help: 'replace an existing target file' },
];

/**
 * load's --partition and --offset: one value for every TARGET, or one for each TARGET in order
 * (commands/load.ts holds the count to that).
 */
const perTarget = ' (repeatable: once for every TARGET, or once for each TARGET in order)';
const loadTargetOptions: OptionSpec[] = targetOptions.map((o) => (o.long === 'partition' || o.long === 'offset' ? { ...o, repeatable: true, help: o.help + perTarget } : o));

const codecs = ['zlib', 'zstd'] as const;

// The commands ---------------------------------------------------------------------------------

export const commands: readonly CommandSpec[] = [
  {
    name: 'info',
    args: ['IMAGE'],
    summary: 'describe an image, as qemu-img info does',
    details: ['The human output is qemu-img info\'s, line for line; --output=json is qemu-img info --output=json byte for byte.'],
    options: [{ long: 'backing-chain', help: 'describe every file of the backing chain, nearest first' }, ...qemuOutput, json('the description'), ...openOptions, header],
    examples: [
      { command: 'qcow2img info disk.qcow2', does: 'virtual size, disk size, cluster size, backing file, snapshots' },
      { command: 'qcow2img info --backing-chain --output=json overlay.qcow2', does: 'the whole chain as qemu-img info --backing-chain --output=json prints it' },
      { command: 'qcow2img info -U /var/lib/vms/running.qcow2', does: 'describe the disk of a running VM' },
    ],
  },
  {
    name: 'map',
    args: ['IMAGE'],
    summary: 'the allocation map of the guest disk, as qemu-img map prints it',
    details: ['Each run of the disk: where it comes from (depth in the backing chain), whether it holds data or reads as zeros, and its host offset.'],
    options: [...qemuOutput, json('the map'), ...openOptions, header],
    examples: [
      { command: 'qcow2img map disk.qcow2', does: 'the data runs with their host offsets and files' },
      { command: 'qcow2img map --output=json disk.qcow2', does: 'every run, as qemu-img map --output=json prints it' },
    ],
  },
  {
    name: 'load',
    args: ['IMAGE', 'TARGET...'],
    summary: 'write the raw virtual disk of IMAGE to TARGET at disk speed',
    details: [
      'IMAGE may be an http(s) URL (ranged reads; --header for tokens). With several TARGETs the image is read and decoded once and written to each; a target that fails stops only itself, the others finish, and the exit status is 1 if any failed. --partition and --offset given once apply to every TARGET; given once for each TARGET, the first goes with the first TARGET, and so on. The progress bar shows one line per TARGET.',
      'TARGET is a file (written under a temporary name, then renamed; a symbolic link is written through, as cp and dd do), a block device, a disk or disk image with --partition N or --offset SIZE, or - for stdout.',
      'A summary line goes to stderr at the end; --json prints the result on stdout instead.',
    ],
    options: [
      ...loadTargetOptions,
      { long: 'snapshot', value: 'ID|NAME', help: 'read the disk as it was at this internal snapshot' },
      threads,
      { long: 'direct', value: 'MODE', ...choice(['auto', 'always', 'never']), default: 'auto', help: 'O_DIRECT writes: always, never, or where the target allows' },
      ...progressOptions,
      json('the result'),
      ...openOptions,
      header,
    ],
    examples: [
      { command: 'qcow2img load disk.qcow2 /dev/vg/guest', does: 'write the disk onto a logical volume' },
      { command: "qcow2img load -H 'Authorization: Bearer TOKEN' https://images.example/arch.qcow2 /dev/sdb", does: 'straight from an image server, with ranged reads' },
      { command: 'qcow2img load disk.qcow2 /dev/sdb /dev/sdc /dev/sdd', does: 'one read and decode, three disks written' },
      { command: 'qcow2img load disk.qcow2 /dev/sdb /dev/sdc --partition 2 --partition 3', does: 'into partition 2 of /dev/sdb and partition 3 of /dev/sdc' },
      { command: 'qcow2img load -p --verify disk.qcow2 /dev/sdb --partition 2', does: 'into partition 2 of /dev/sdb, with a progress bar, then read back' },
      { command: 'qcow2img load disk.qcow2 disk.img --offset 1M --overwrite', does: 'into a disk image, 1 MiB in' },
      { command: 'qcow2img load disk.qcow2 - | ssh host dd of=/dev/sdb bs=4M', does: 'the raw disk on stdout, in order, zeros included' },
    ],
  },
  {
    name: 'capture',
    args: ['SOURCE', 'OUT.qcow2'],
    summary: 'capture a raw file or block device into a qcow2 image',
    details: [
      'Zero runs are left out; with --backing only the clusters that differ from BASE are stored.',
      'SOURCE - reads the raw disk from stdin (a pipe is read in order, 32 MiB at a time); OUT.qcow2 must be a file.',
    ],
    options: [
      { long: 'compress', value: 'CODEC', ...choice(codecs, { deflate: 'zlib' }), help: 'compressed clusters: zlib (raw deflate, as QEMU writes it; "deflate" is accepted) or zstd; default: none' },
      {
        long: 'level',
        value: 'N',
        parse: (text, option) => parseInteger(text, option, -(2 ** 31)),
        help: 'compression level: zlib 0-3 (ISA-L), 4 (ISA-L + zlib, default), 5-9 (zlib; 6 = qemu-img\'s size); zstd -7 to 19 (default 1)',
      },
      { ...size, long: 'cluster-size', default: '64k', help: 'cluster size, a power of two from 512 to 2M' },
      { long: 'compat', value: 'VER', ...choice(['0.10', '1.1']), default: '1.1', help: 'qcow2 version 2 (0.10) or 3 (1.1)' },
      { long: 'backing', value: 'BASE', help: 'store only the clusters that differ from BASE, which becomes the backing file' },
      { long: 'backing-format', value: 'FMT', ...choice(['qcow2', 'raw']), default: 'probed', help: 'the format of BASE' },
      { ...size, long: 'size', default: 'read to the end of the stream', help: 'with SOURCE - (stdin) or a pipe: the disk\'s size; the stream must hold exactly that many bytes' },
      threads,
      { long: 'overwrite', help: 'replace an existing OUT.qcow2' },
      ...progressOptions,
      json('the result'),
      ...openOptions,
    ],
    examples: [
      { command: 'qcow2img capture /dev/vg/guest guest.qcow2', does: 'a logical volume into a sparse qcow2 image' },
      { command: 'qcow2img capture --compress zstd --cluster-size 1M disk.img disk.qcow2', does: 'zstd-compressed, in 1 MiB clusters' },
      { command: 'qcow2img capture --backing base.qcow2 /dev/vg/guest delta.qcow2', does: 'only what changed since base.qcow2' },
      { command: 'ssh host cat /dev/sdb | qcow2img capture - disk.qcow2', does: 'a disk read over ssh from stdin' },
    ],
  },
  {
    name: 'check',
    args: ['IMAGE'],
    summary: 'check an image\'s consistency, as qemu-img check does',
    details: [
      'Exit status as qemu-img check: 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check failed.',
      'Problems go to stderr, the summary to stdout; --output=json prints qemu-img check --output=json\'s document.',
    ],
    options: [...qemuOutput, json('the result, with the first 1000 issues'), { long: 'quiet', short: 'q', help: 'no summary (as qemu-img -q); the exit status still tells' }, openOptions[2]!, header],
    examples: [
      { command: 'qcow2img check disk.qcow2', does: 'refcounts, leaks and corruptions, as qemu-img check prints them' },
      { command: 'qcow2img check --output=json disk.qcow2', does: 'the counts as qemu-img check --output=json' },
      { command: 'qcow2img check -q disk.qcow2 || echo damaged', does: 'only the exit status' },
    ],
  },
  {
    name: 'bench',
    args: ['TARGET'],
    summary: 'measure write bandwidth, IOPS and latency, as fio measures them',
    details: ['TARGET is a block device, a folder, or a new file name (files it makes are removed after).'],
    options: [
      { ...size, long: 'size', default: '1G, or the image\'s virtual size with --image; at most the device', help: 'bytes to write' },
      { ...size, long: 'block-size', default: '1M', help: 'bytes a write, a multiple of 512 up to 64M' },
      { long: 'queue-depth', value: 'N', parse: (text, option) => parseInteger(text, option, 1), default: '16', help: 'writes in flight, 1 to 1024' },
      { long: 'pattern', value: 'P', ...choice(['seq', 'rand']), default: 'seq', help: 'sequential or random offsets' },
      { long: 'time', value: 'SECONDS', parse: parseSeconds, help: 'stop after this many seconds (up to 1000000); default: when SIZE is written' },
      { long: 'direct', value: 'MODE', ...choice(['always', 'never']), default: 'always', help: 'O_DIRECT writes or buffered ones' },
      { long: 'engine', value: 'E', ...choice(['auto', 'io_uring', 'threads']), default: 'auto', help: 'io_uring where the kernel has it, else threads' },
      { long: 'image', value: 'IMAGE', help: 'also load IMAGE onto TARGET and report its throughput against the raw bandwidth' },
      { long: 'force', help: 'write to a device that is mounted or in use (never the root disk)' },
      { ...progressOptions[0]!, default: 'auto (none with --json)' },
      json('the result'),
      ...openOptions,
    ],
    examples: [
      { command: 'qcow2img bench /dev/nvme1n1', does: 'sequential 1 MiB writes at queue depth 16 over the whole device' },
      { command: 'qcow2img bench --pattern rand --block-size 4k --time 30 /mnt/scratch', does: '4 KiB random writes for 30 s in a file under /mnt/scratch' },
      { command: 'qcow2img bench --image disk.qcow2 --size 8G /dev/vg/test', does: 'how close load gets to the raw bandwidth' },
    ],
  },
  {
    name: 'snapshot create',
    args: ['OUT'],
    summary: 'save a VM snapshot: disk, memory, vCPU and device state, in a bundle',
    details: ['OUT is a folder, or an archive: OUT.tar, OUT.tar.gz or OUT.tar.zst. The snapshot\'s metadata is printed with --json.'],
    options: [
      { long: 'disk', value: 'SRC', help: 'raw disk (file, block device or partition) to capture as disk.qcow2' },
      { long: 'memory', value: 'RAM', help: 'raw guest RAM dump' },
      { long: 'memory-map', value: 'MAP', help: 'how the dump maps to guest-physical memory (needs --memory): q35:SIZE or pc:SIZE as QEMU lays out that machine\'s RAM, a JSON file of regions, or a file of `info mtree -f` output; its regions must cover the whole dump without overlapping; default: one region from 0' },
      { long: 'cpu', value: 'CPU.json', help: 'vCPU state, as JSON' },
      { long: 'device', value: 'NAME=FILE', repeatable: true, help: 'an opaque device-state blob (repeatable)' },
      { long: 'parent', value: 'BUNDLE', help: 'the previous snapshot: store only what changed since' },
      { long: 'dirty-bitmap', value: 'FILE', help: 'with --parent: one bit a RAM page, set = changed' },
      { long: 'compress', value: 'CODEC', ...choice(['zstd', 'zlib', 'none'], { deflate: 'zlib' }), default: 'zstd', help: 'for the disk and the state file ("deflate" is accepted for zlib)' },
      { long: 'level', value: 'N', parse: (text, option) => parseInteger(text, option, -(2 ** 31)), help: 'compression level of the codec' },
      { long: 'machine', value: 'JSON', help: 'a free-form machine description kept in snapshot.json' },
      snapshotThreads,
      { long: 'archive-level', value: 'N', parse: (text, option) => parseInteger(text, option, 0), default: '3 (.tar.zst), 6 (.tar.gz)', help: 'compression level of the archive' },
      { long: 'temp-dir', value: 'DIR', default: 'the system\'s', help: 'where a compressed parent archive\'s members are extracted' },
      { long: 'overwrite', help: 'replace an existing snapshot at OUT (a bundle folder or an archive file)' },
      json('the snapshot\'s metadata'),
    ],
    examples: [
      { command: 'qcow2img snapshot create snaps/s1 --disk /dev/vg/guest --memory ram.raw --cpu cpu.json', does: 'a full snapshot in the folder snaps/s1' },
      { command: 'qcow2img snapshot create snaps/s2 --parent snaps/s1 --disk /dev/vg/guest --memory ram.raw', does: 'an incremental one' },
      { command: 'qcow2img snapshot create s1.tar.zst --memory ram.raw --json', does: 'an archive; print its metadata' },
    ],
  },
  {
    name: 'snapshot restore',
    args: ['BUNDLE'],
    summary: 'restore what a snapshot bundle holds',
    details: ['BUNDLE is a folder or an archive. The disk goes through the same paths and checks as load.'],
    options: [
      { long: 'disk', value: 'TARGET', help: 'where the disk goes: a file, a block device, or a disk with --partition/--offset' },
      { long: 'memory', value: 'FILE', help: 'where the RAM dump goes (a new file; zero pages stay holes)' },
      { long: 'in-place', help: 'with --memory: restore into the existing FILE where it stands (tmpfs, hugetlbfs through a mapping, a block device; an empty file is sized), zeroing the snapshot\'s zero pages' },
      { long: 'memory-is-zero', help: 'with --in-place: FILE already reads as zeros, so the snapshot\'s zero pages are left untouched' },
      { long: 'cpu', value: 'FILE.json', help: 'where the vCPU state goes' },
      { long: 'device-dir', value: 'DIR', help: 'folder that receives one file a device blob' },
      ...targetOptions,
      snapshotThreads,
      { long: 'temp-dir', value: 'DIR', default: 'the system\'s', help: 'where an archive\'s members are extracted' },
      json('what was restored'),
    ],
    examples: [
      { command: 'qcow2img snapshot restore snaps/s2 --disk /dev/vg/guest --memory ram.raw --cpu cpu.json', does: 'disk, memory and vCPU state, through the parent chain' },
      { command: 'qcow2img snapshot restore s1.tar.zst --memory ram.raw --temp-dir /var/tmp', does: 'from an archive' },
      { command: 'qcow2img snapshot restore snaps/s2 --memory /dev/hugepages/vm1.ram --in-place', does: 'into the existing memory backend file of a VM' },
    ],
  },
  {
    name: 'snapshot inspect',
    args: ['BUNDLE'],
    summary: 'describe a snapshot bundle',
    options: [{ long: 'temp-dir', value: 'DIR', default: 'the system\'s', help: 'where an archive\'s members are extracted' }, json('the inspection')],
    examples: [{ command: 'qcow2img snapshot inspect snaps/s2', does: 'its id, parent, files, memory regions and pages' }],
  },
  {
    name: 'snapshot verify',
    args: ['BUNDLE'],
    summary: 'check every file and checksum of a snapshot bundle',
    details: ['Exit 1 naming each damaged file (and chunk, and guest range); 0 when every checksum matches.'],
    options: [{ long: 'temp-dir', value: 'DIR', default: 'the system\'s', help: 'where an archive\'s members are extracted' }],
    examples: [{ command: 'qcow2img snapshot verify s1.tar.zst', does: 'read the whole archive and check it' }],
  },
  {
    name: 'completion',
    args: ['SHELL'],
    summary: 'print a completion script for bash or zsh',
    options: [],
    examples: [
      { command: 'source <(qcow2img completion bash)', does: 'complete qcow2img\'s commands and options in this shell' },
      { command: 'qcow2img completion zsh > "${fpath[1]}/_qcow2img"', does: 'install it for zsh' },
    ],
  },
];

export const snapshotSummary = 'VM snapshots: create, restore, inspect and verify bundles';

export function findCommand(name: string): CommandSpec | undefined {
  return commands.find((c) => c.name === name);
}

/** "--offset SIZE" / "-U, --force-share". */
export function optionFlags(option: OptionSpec): string {
  return `${option.short ? `-${option.short}, ` : ''}--${option.long}${option.value ? ` ${option.value}` : ''}`;
}

function wrap(text: string, width: number, indent: string): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(' ')) {
    if (line && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  if (line) lines.push(line);
  return lines.map((l, i) => (i === 0 ? l : indent + l));
}

/** `qcow2img CMD --help`. */
export function commandHelp(spec: CommandSpec): string {
  const out = [`usage: qcow2img ${spec.name}${spec.options.length ? ' [options]' : ''} ${spec.args.join(' ')}`, '', `${spec.summary[0]!.toUpperCase()}${spec.summary.slice(1)}.`];
  for (const paragraph of spec.details ?? []) out.push('', ...wrap(paragraph, 78, ''));
  const options = [...spec.options, { long: 'help', short: 'h', help: 'this help' } as OptionSpec];
  out.push('', 'options:');
  const column = 28;
  for (const option of options) {
    const flags = `  ${optionFlags(option)}`;
    const help = option.help + (option.default ? ` (default: ${option.default})` : '');
    const lines = wrap(help, 78 - column, ' '.repeat(column));
    out.push(flags.length < column ? `${flags.padEnd(column)}${lines.join('\n')}` : `${flags}\n${' '.repeat(column)}${lines.join('\n')}`);
  }
  if (spec.options.some((o) => o.parse === parseSize)) {
    out.push('', 'SIZE: bytes, or a number with a unit as qemu-img and fio read them: k/K/KB/KiB = 1024, M, G, T, P, E; fractions such as 1.5G.');
  }
  out.push('', 'examples:');
  for (const example of spec.examples) out.push(`  ${example.command}`, `      ${example.does}`);
  return out.join('\n') + '\n';
}

/** `qcow2img --help`: the commands. */
export function mainHelp(): string {
  const rows = commands.map((c) => [`${c.name} ${c.args.join(' ')}`, c.summary] as const);
  const width = Math.max(...rows.map(([left]) => left.length)) + 2;
  return [
    'usage: qcow2img <command> [options]',
    '',
    'Host-side qcow2 tooling: load qcow2 images onto disks and files, capture disks to qcow2,',
    'inspect and check images as qemu-img does, bench disks as fio does, VM snapshots.',
    '',
    'commands:',
    ...rows.map(([left, right]) => `  ${left.padEnd(width)}${right}`),
    '',
    "Run 'qcow2img help COMMAND' or 'qcow2img COMMAND --help' for a command's options and examples.",
    'Exit status: 0 done, 1 failed (one line on stderr naming the file), 2 or 3 from check, 130 interrupted.',
    '',
  ].join('\n');
}

/** `qcow2img snapshot --help`: its verbs. */
export function snapshotHelp(): string {
  const verbs = commands.filter((c) => c.name.startsWith('snapshot '));
  const rows = verbs.map((c) => [`${c.name} ${c.args.join(' ')}`, c.summary] as const);
  const width = Math.max(...rows.map(([left]) => left.length)) + 2;
  return [
    'usage: qcow2img snapshot <create|restore|inspect|verify> [options] ...',
    '',
    `${snapshotSummary[0]!.toUpperCase()}${snapshotSummary.slice(1)}.`,
    'A bundle is a folder, or an archive: .tar, .tar.gz or .tar.zst.',
    '',
    'commands:',
    ...rows.map(([left, right]) => `  ${left.padEnd(width)}${right}`),
    '',
    "Run 'qcow2img help snapshot VERB' or 'qcow2img snapshot VERB --help' for its options.",
    '',
  ].join('\n');
}

#!/usr/bin/env node
/**
 * The qcow2img command line: a dispatcher. Each command is described once in spec.ts (which
 * commander parses by, and --help, the man page and the completions are made from) and runs
 * from its own file in commands/, loaded only when that command runs: start-up is part of
 * every command's time.
 */
import { Command, CommanderError, Option } from 'commander';
import { Qcow2Error } from '../errors';
import { type CommandSpec, commandHelp, commands, findCommand, mainHelp, snapshotHelp } from './spec';
import { clearProgress } from './terminal';
import { UsageError } from './usage';

type Runner = (args: string[], flags: never) => Promise<number | void>;

/* eslint-disable @typescript-eslint/no-require-imports */
const runners: Record<string, () => Runner> = {
  info: () => (require('./commands/info') as typeof import('./commands/info')).run,
  map: () => (require('./commands/map') as typeof import('./commands/map')).run,
  load: () => (require('./commands/load') as typeof import('./commands/load')).run,
  capture: () => (require('./commands/capture') as typeof import('./commands/capture')).run,
  check: () => (require('./commands/check') as typeof import('./commands/check')).run,
  bench: () => (require('./commands/bench') as typeof import('./commands/bench')).run,
  'snapshot create': () => (require('./commands/snapshot') as typeof import('./commands/snapshot')).create,
  'snapshot restore': () => (require('./commands/snapshot') as typeof import('./commands/snapshot')).restore,
  'snapshot inspect': () => (require('./commands/snapshot') as typeof import('./commands/snapshot')).inspect,
  'snapshot verify': () => (require('./commands/snapshot') as typeof import('./commands/snapshot')).verify,
  completion: () => (require('./completion') as typeof import('./completion')).run,
};
/* eslint-enable @typescript-eslint/no-require-imports */

/** The command commander was parsing when it found a usage error, for the --help hint. */
let erring: string | undefined;

function configure(command: Command, name: string | undefined, help: () => string): Command {
  command
    .exitOverride()
    .helpCommand(false)
    .configureOutput({
      writeOut: (text) => process.stdout.write(text),
      writeErr: () => {},
      outputError: () => {
        erring = name;
      },
    });
  command.helpInformation = help;
  return command;
}

function addCommand(parent: Command, spec: CommandSpec, setResult: (code: number | void) => void): void {
  const leaf = spec.name.split(' ').pop()!;
  const command = configure(parent.command(leaf), spec.name, () => commandHelp(spec));
  for (const arg of spec.args) command.argument(`<${arg}>`);
  for (const option of spec.options) {
    const flag = `--${option.long}`;
    const o = new Option(`${option.short ? `-${option.short}, ` : ''}${flag}${option.value ? ` <${option.value}>` : ''}`, option.help);
    if (option.parse || option.repeatable) {
      o.argParser((text: string, previous: unknown) => {
        let value: unknown = text;
        try {
          if (option.parse) value = option.parse(text, flag);
        } catch (error) {
          if (error instanceof UsageError) error.command ??= spec.name;
          throw error;
        }
        return option.repeatable ? [...((previous as unknown[] | undefined) ?? []), value] : value;
      });
    }
    command.addOption(o);
  }
  command.action(async (...args: unknown[]) => {
    const positionals = args.slice(0, spec.args.length) as string[];
    try {
      refuseDash(spec, positionals);
      setResult(await runners[spec.name]!()(positionals, command.opts() as never));
    } catch (error) {
      if (error instanceof UsageError) error.command ??= spec.name;
      throw error;
    }
  });
}

/** The arguments where `-` means stdin or stdout: the raw disk `load` writes, and the one `capture` reads. */
const streams: Record<string, string> = { 'load TARGET': 'stdout', 'capture SOURCE': 'stdin' };

/**
 * `-` is never a file name (`./-` is): where a command cannot stream, it is refused in words.
 * A qcow2 image is read and written out of order, so it can come from or go to a file only.
 */
function refuseDash(spec: CommandSpec, positionals: readonly string[]): void {
  spec.args.forEach((arg, i) => {
    if (positionals[i] !== '-' || streams[`${spec.name} ${arg}`]) return;
    let why: string;
    if (arg === 'IMAGE') why = 'a qcow2 image cannot be read from stdin: reading one needs random access; save it to a file first';
    else if (arg === 'OUT.qcow2') why = 'a qcow2 image cannot be written to stdout: it is written out of order; name a file';
    else if (arg === 'BUNDLE' || arg === 'OUT') why = 'a snapshot bundle cannot be read from stdin or written to stdout; name a folder or an archive file';
    else why = `${arg} cannot be - (stdin or stdout) here; name a file (./- for a file named -)`;
    throw new UsageError(`-: ${why}`, spec.name);
  });
}

/** The usage error commander found, as one line. */
function commanderMessage(error: CommanderError): string {
  return error.message
    .replace(/^error: /, '')
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line !== '')
    .join(' ');
}

export async function main(argv: string[]): Promise<number> {
  const [first, ...rest] = argv;
  if (first === undefined) {
    process.stdout.write(mainHelp());
    return 1;
  }
  if (first === '--help' || first === '-h') {
    process.stdout.write(mainHelp());
    return 0;
  }
  if (first === '--version' || first === '-V') {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    process.stdout.write(`${(require('../../package.json') as { version: string }).version}\n`);
    return 0;
  }
  if (first === 'help') {
    const name = rest.join(' ');
    if (name === '') process.stdout.write(mainHelp());
    else if (name === 'snapshot') process.stdout.write(snapshotHelp());
    else {
      const spec = findCommand(name);
      if (!spec) return usageError(new UsageError(`no command "${name}"`));
      process.stdout.write(commandHelp(spec));
    }
    return 0;
  }
  if (first === 'snapshot' && rest.length === 0) {
    process.stdout.write(snapshotHelp());
    return 1;
  }
  let result: number | void = undefined;
  const program = configure(new Command('qcow2img'), undefined, mainHelp);
  program.allowExcessArguments(false);
  const snapshot = configure(program.command('snapshot'), 'snapshot', snapshotHelp);
  for (const spec of commands) addCommand(spec.name.startsWith('snapshot ') ? snapshot : program, spec, (code) => (result = code));
  try {
    await program.parseAsync(argv, { from: 'user' });
    return result ?? 0;
  } catch (error) {
    clearProgress();
    if (error instanceof CommanderError) {
      if (error.exitCode === 0) return 0;
      return usageError(new UsageError(commanderMessage(error), erring));
    }
    if (error instanceof UsageError) return usageError(error);
    if (error instanceof Qcow2Error) {
      process.stderr.write(`qcow2img: ${error.message}\n`);
      return error.code === 'CANCELLED' ? 130 : 1;
    }
    const message = error instanceof Error ? error.message : String(error);
    process.stderr.write(`qcow2img: ${message.split('\n')[0]}\n`);
    return 1;
  }
}

function usageError(error: UsageError): number {
  process.stderr.write(`qcow2img: ${error.message} (see qcow2img ${error.command ? `${error.command} ` : ''}--help)\n`);
  // Not 2: check uses 2 for "corruptions found", as qemu-img does.
  return 1;
}

if (require.main === module) {
  // A reader that went away (`qcow2img map IMAGE | head`) is not an error of ours: stop quietly.
  process.stdout.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw error;
  });
  void main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

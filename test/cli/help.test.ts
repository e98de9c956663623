/**
 * One description of each command (src/cli/spec.ts) makes its --help, `help CMD` and `CMD -h`
 * (the same text), the man page (committed, current, rendered by man) and the completions.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { commands } from '../../src/cli/spec';
import { cliPath, repoRoot, run } from '../helpers/qemu';

function cli(args: readonly string[]) {
  return spawnSync(process.execPath, [cliPath, ...args], { encoding: 'utf8' });
}

beforeAll(() => {
  const tsc = run(path.join(repoRoot, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.build.json'], { cwd: repoRoot });
  if (tsc.status !== 0) throw new Error(`tsc failed:\n${tsc.stdout}${tsc.stderr}`);
}, 300_000);

describe('per-command help', () => {
  for (const spec of commands) {
    it(`${spec.name}: --help, -h and help ${spec.name} print the same text, with every option, default and example`, () => {
      const words = spec.name.split(' ');
      const viaFlag = cli([...words, '--help']);
      expect(viaFlag.status).toBe(0);
      expect(cli([...words, '-h']).stdout).toBe(viaFlag.stdout);
      expect(cli(['help', ...words]).stdout).toBe(viaFlag.stdout);
      const text = viaFlag.stdout;
      expect(text.startsWith(`usage: qcow2img ${spec.name} `)).toBe(true);
      for (const option of spec.options) {
        expect(text).toContain(`--${option.long}`);
        if (option.short) expect(text).toContain(`-${option.short}, --${option.long}`);
        if (option.default) expect(text.replace(/\s+/g, ' ')).toContain(`(default: ${option.default})`);
      }
      expect(spec.examples.length).toBeGreaterThanOrEqual(1);
      for (const example of spec.examples) expect(text).toContain(example.command);
    });
  }

  it('qcow2img --help lists every command; `snapshot` alone lists its verbs', () => {
    const text = cli(['--help']).stdout;
    for (const spec of commands) expect(text).toContain(`  ${spec.name} `);
    const snapshot = cli(['snapshot']);
    expect(snapshot.status).toBe(1);
    expect(snapshot.stdout).toContain('snapshot create OUT');
    expect(cli(['snapshot', '--help']).stdout).toBe(snapshot.stdout);
  });

  it('usage errors name the command\'s --help; an unknown command suggests the nearest', () => {
    const ran = cli(['lod', 'a', 'b']);
    expect(ran.status).toBe(1);
    expect(ran.stderr).toBe("qcow2img: unknown command 'lod' (Did you mean load?) (see qcow2img --help)\n");
    expect(cli(['capture', 'a', 'b', '--progress=loud']).stderr).toBe('qcow2img: --progress must be auto, bar, json or none (got "loud") (see qcow2img capture --help)\n');
    expect(cli(['capture', 'a', 'b', '--level=']).stderr).toMatch(/^qcow2img: --level takes a whole number .*\(see qcow2img capture --help\)\n$/);
    expect(cli(['snapshot', 'create', 'x', '--compress', 'lzma']).stderr).toContain('(see qcow2img snapshot create --help)');
  });
});

describe('man page', () => {
  it('qcow2img.1 is what scripts/make-man.mjs makes now', () => {
    const made = spawnSync(process.execPath, [path.join(repoRoot, 'scripts', 'make-man.mjs'), '--stdout'], { encoding: 'utf8' });
    expect(made.status, made.stderr).toBe(0);
    expect(fs.readFileSync(path.join(repoRoot, 'qcow2img.1'), 'utf8'), 'run: npx tsc -p tsconfig.build.json && node scripts/make-man.mjs').toBe(made.stdout);
    const pkg = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { man: string; files: string[] };
    expect(pkg.man).toBe('./qcow2img.1');
    expect(pkg.files).toContain('qcow2img.1');
  });

  it('renders with man -l (or nroff) without warnings, every command and option in it', () => {
    const page = path.join(repoRoot, 'qcow2img.1');
    const hasMan = spawnSync('man', ['--version']).status === 0;
    const rendered = hasMan
      ? spawnSync('man', ['-l', page], { encoding: 'utf8', env: { ...process.env, MANWIDTH: '100', MAN_KEEP_FORMATTING: '', MANPAGER: 'cat', PAGER: 'cat' } })
      : spawnSync('nroff', ['-man', '-ww', page], { encoding: 'utf8' });
    expect(rendered.status, rendered.stderr).toBe(0);
    expect(rendered.stderr).toBe('');
    const text = rendered.stdout.replace(/.\x08/g, '').replace(/\u2010/g, '-');
    for (const spec of commands) {
      expect(text).toContain(`qcow2img ${spec.name}`);
      for (const option of spec.options) expect(text).toContain(`--${option.long}`);
    }
  });
});

describe('completion', () => {
  function complete(line: string): string[] {
    const script = cli(['completion', 'bash']).stdout;
    const words = line.split(' ');
    const ran = spawnSync(
      'bash',
      ['-c', `${script}\nCOMP_WORDS=(${words.map((w) => `'${w}'`).join(' ')}); COMP_CWORD=${words.length - 1}; COMP_LINE='${line}'; COMP_POINT=${line.length}; _qcow2img; printf '%s\\n' "\${COMPREPLY[@]}"`],
      { encoding: 'utf8' },
    );
    expect(ran.status, ran.stderr).toBe(0);
    return ran.stdout.split('\n').filter((w) => w !== '');
  }

  it('bash: commands, snapshot verbs, options and option values', () => {
    expect(complete('qcow2img lo')).toEqual(['load']);
    expect(complete('qcow2img snapshot cr')).toEqual(['create']);
    expect(complete('qcow2img load --ver')).toEqual(['--verify']);
    expect(complete('qcow2img info --output')).toEqual(['--output']);
    expect(complete('qcow2img info --output ')).toEqual(['human', 'json']);
    expect(complete('qcow2img snapshot create x --compress z').sort()).toEqual(['zlib', 'zstd']);
    expect(complete('qcow2img help sn')).toEqual(['snapshot']);
  });

  it('zsh: a #compdef script naming every command (zsh itself is not installed here)', () => {
    const script = cli(['completion', 'zsh']).stdout;
    expect(script.startsWith('#compdef qcow2img\n')).toBe(true);
    for (const spec of commands) expect(script).toContain(`'${spec.name}')`);
    const hasZsh = spawnSync('zsh', ['--version']).status === 0;
    if (hasZsh) expect(spawnSync('zsh', ['-n', '-c', script]).status).toBe(0);
  });
});

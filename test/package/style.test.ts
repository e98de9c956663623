/**
 * Functions short enough to read at once: scripts/long-functions.mjs finds none over 80 lines in
 * src/ (TypeScript) or native/core/*.cc and native/binding.cc (C++) but its allowed flat lists
 * of checks; and it does find them where there are.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const script = path.join(__dirname, '..', '..', 'scripts', 'long-functions.mjs');
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-style-'));
afterAll(() => fs.rmSync(scratch, { recursive: true, force: true }));

function longFunctions(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(process.execPath, [script, ...args], { encoding: 'utf8' });
}

function write(relative: string, text: string): void {
  fs.mkdirSync(path.dirname(path.join(scratch, relative)), { recursive: true });
  fs.writeFileSync(path.join(scratch, relative), text);
}

/** `count` statement lines. */
const body = (count: number, statement: string) => Array.from({ length: count }, () => `  ${statement}\n`).join('');

describe('long functions', () => {
  it('there are none in the repository, and the script says nothing', () => {
    const run = longFunctions();
    expect(run.stderr).toBe('');
    expect(run.stdout).toBe('');
    expect(run.status).toBe(0);
  });

  it('are found in TypeScript and C++, past 80 lines only, but for the allowed ones', () => {
    // 80 lines in all (signature and closing brace included): allowed; 81: not.
    write('src/a.ts', `export function fits(): void {\n${body(78, 'void 0;')}}\n\nexport const tooLong = (): void => {\n${body(79, 'void 0;')}};\n`);
    write('src/qcow2/header.ts', `export function parseHeader(): void {\n${body(200, 'void 0;')}}\n`);
    write(
      'native/core/engine.cc',
      [
        '#include "engine.h"',
        'namespace qcow2img {',
        'namespace {',
        'struct Table { int values[2] = {1, 2}; };',
        '}  // namespace',
        `int Engine::run(int a) const {\n  // a } in a comment, "{" in a string, '{' as a character\n${body(79, 'a += 1;')}  return a;\n}`,
        `int shortOne() {\n  auto lambda = [](int x) {\n${body(40, 'x++;')}    return x;\n  };\n  return lambda(1);\n}`,
        `class Worker {\n public:\n  Worker(int n) : n_(n), m_{n} {\n${body(90, 'n_++;')}  }\n  int n_, m_;\n};`,
        '}  // namespace qcow2img',
        '',
      ].join('\n'),
    );
    write('native/binding.cc', `void Init() {\n${body(100, 'call();')}}\n`);
    const run = longFunctions(scratch);
    expect(run.status).toBe(1);
    expect(run.stdout.trim().split('\n').sort()).toEqual(['102 native/binding.cc:1 Init', '81 src/a.ts:82 tooLong', '83 native/core/engine.cc:6 run', '92 native/core/engine.cc:137 Worker'].sort());
  });
});

#!/usr/bin/env node
// Functions over 80 lines: the TypeScript of src/ and the C++ of native/core/*.cc and
// native/binding.cc. Prints each (lines, file:line, name) and exits 1 when there is one that is
// not allowed below; prints nothing and exits 0 when there is none.
// Usage: node scripts/long-functions.mjs [ROOT] (default: the repository this script is in).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const maxLines = 80;

/** Flat lists of checks, one after the other, read best whole: file (from ROOT) to function names. */
const allowed = new Map([['src/qcow2/header.ts', new Set(['parseHeader'])]]);

const root = path.resolve(process.argv[2] ?? path.join(path.dirname(fileURLToPath(import.meta.url)), '..'));

function walk(dir) {
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(path.join(dir, e.name)) : [path.join(dir, e.name)]));
}

/** A function's name, or the name of what it is assigned to (`const f = () => ...`). */
function functionName(node) {
  if (node.name) return node.name.getText();
  const parent = node.parent;
  if ((ts.isVariableDeclaration(parent) || ts.isPropertyAssignment(parent) || ts.isPropertyDeclaration(parent)) && parent.initializer === node) return parent.name.getText();
  return '(anonymous)';
}

/** { name, line, lines } of every TypeScript function with a body (nested ones too). */
function typescriptFunctions(file, text) {
  const source = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true);
  const found = [];
  const visit = (node) => {
    if (ts.isFunctionLike(node) && node.body) {
      const first = source.getLineAndCharacterOfPosition(node.getStart()).line;
      const last = source.getLineAndCharacterOfPosition(node.end).line;
      found.push({ name: functionName(node), line: first + 1, lines: last - first + 1 });
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return found;
}

/** C++ with comments, string and character literals and preprocessor lines blanked (newlines kept). */
function cppCode(text) {
  return text
    .replace(/\/\*[\s\S]*?\*\/|\/\/[^\n]*|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|^[ \t]*#[^\n]*/gm, (m) => m.replace(/[^\n]/g, ' '));
}

/**
 * { name, line, lines } of every C++ function body at namespace or class scope: a `{` whose
 * header (the code since the last `;`, `{` or `}`) ends with `)` and its qualifiers, or with a
 * constructor's initializer list. Lambdas and blocks inside a function count as its lines.
 */
function cppFunctions(text) {
  const code = cppCode(text);
  /** The index of the `}` that closes the `{` at `open`. */
  const closing = (open) => {
    let depth = 0;
    for (let j = open; j < code.length; j++) {
      if (code[j] === '{') depth++;
      else if (code[j] === '}' && --depth === 0) return j;
    }
    return code.length;
  };
  const found = [];
  // What each open brace is: a function body, a block inside one, or a scope (namespace, class, initializer).
  const scopes = [];
  let headerStart = 0;
  let line = 1;
  const lineAt = [];
  for (let i = 0; i < code.length; i++) {
    lineAt[i] = line;
    if (code[i] === '\n') line++;
  }
  for (let i = 0; i < code.length; i++) {
    const c = code[i];
    if (c === '{') {
      const inFunction = scopes.some((s) => s.kind === 'function');
      const header = code.slice(headerStart, i).trim();
      // A member's brace initializer in a constructor's initializer list (`: n_(n), m_{n}`): part of the header.
      if (!inFunction && /\)\s*:(?!:)/.test(header) && /[\w>]$/.test(header)) {
        i = closing(i);
        continue;
      }
      const isFunction = !inFunction && /\)\s*(?:const|override|final|noexcept|mutable|->\s*[\w:<>,\s*&]+|\s)*$|\)\s*:\s*[\w:]+\s*[({][\s\S]*[)}]$/.test(header) && !/^(?:namespace|struct|class|enum|union)\b/.test(header);
      if (isFunction) {
        // From its first token, past an access label (`public:`) before it.
        const at = headerStart + code.slice(headerStart, i).match(/^(?:\s*(?:public|private|protected)\s*:(?!:))*\s*/)[0].length;
        const name = header.match(/(operator\s*[^\s(]+|[~\w]+)\s*(?:<[^()]*>)?\s*\(/)?.[1] ?? '(anonymous)';
        scopes.push({ kind: 'function', name, line: lineAt[at] });
      } else scopes.push({ kind: inFunction ? 'block' : 'scope' });
      headerStart = i + 1;
    } else if (c === '}') {
      const scope = scopes.pop();
      if (scope?.kind === 'function') found.push({ name: scope.name, line: scope.line, lines: lineAt[i] - scope.line + 1 });
      headerStart = i + 1;
    } else if (c === ';') headerStart = i + 1;
  }
  return found;
}

const files = [
  ...walk(path.join(root, 'src')).filter((f) => f.endsWith('.ts')),
  ...walk(path.join(root, 'native', 'core')).filter((f) => f.endsWith('.cc') && path.dirname(f) === path.join(root, 'native', 'core')),
  path.join(root, 'native', 'binding.cc'),
].filter((f) => fs.existsSync(f));

let failed = false;
for (const file of files) {
  const relative = path.relative(root, file).split(path.sep).join('/');
  const text = fs.readFileSync(file, 'utf8');
  const functions = file.endsWith('.ts') ? typescriptFunctions(file, text) : cppFunctions(text);
  for (const f of functions) {
    if (f.lines <= maxLines || allowed.get(relative)?.has(f.name)) continue;
    console.log(`${f.lines} ${relative}:${f.line} ${f.name}`);
    failed = true;
  }
}
process.exitCode = failed ? 1 : 0;

#!/usr/bin/env node
/**
 * make-damaged-images DIR: writes the damaged qcow2 set (every defect of
 * test/helpers/damage.ts on each of its base images) into DIR, with the QEMU-made
 * base images in DIR/bases/ and DIR/manifest.json = [{file, defect, description, base}].
 *
 * Needs qemu-img and qemu-io on PATH, and the typescript dev dependency: the defects
 * live in one copy, in test/helpers/damage.ts, which this script transpiles and runs.
 *
 *   node scripts/make-damaged-images.mjs /tmp/damaged [--defect NAME]... [--base NAME]... [--list]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const here = path.dirname(fileURLToPath(import.meta.url));
const helper = path.join(here, '..', 'test', 'helpers', 'damage.ts');

async function loadDamage() {
  const { default: ts } = await import('typescript');
  const output = ts.transpileModule(fs.readFileSync(helper, 'utf8'), {
    fileName: helper,
    compilerOptions: { module: ts.ModuleKind.ES2022, target: ts.ScriptTarget.ES2022 },
  });
  const temporary = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-damage-'));
  const module = path.join(temporary, 'damage.mjs');
  fs.writeFileSync(module, output.outputText);
  try {
    return await import(pathToFileURL(module).href);
  } finally {
    fs.rmSync(temporary, { recursive: true, force: true });
  }
}

const usage = 'usage: node scripts/make-damaged-images.mjs DIR [--defect NAME]... [--base NAME]... [--list]\n';

async function main() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        defect: { type: 'string', multiple: true },
        base: { type: 'string', multiple: true },
        list: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (error) {
    process.stderr.write(`make-damaged-images: ${error.message}\n${usage}`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(usage);
    return 0;
  }
  const damage = await loadDamage();
  if (values.list) {
    process.stdout.on('error', () => {}); // a closed pipe (| head) is not an error
    process.stdout.write(damage.defects.map((d) => `${d.name.padEnd(34)} ${d.bases.join(',').padEnd(40)} ${d.description}\n`).join(''));
    return 0;
  }
  if (positionals.length !== 1) {
    process.stderr.write(usage);
    return 2;
  }
  const known = new Set(damage.defects.map((d) => d.name));
  for (const name of values.defect ?? []) {
    if (!known.has(name)) {
      process.stderr.write(`make-damaged-images: unknown defect ${name} (see --list)\n`);
      return 2;
    }
  }
  const dir = path.resolve(positionals[0]);
  fs.mkdirSync(dir, { recursive: true });
  const defects = values.defect ? new Set(values.defect) : undefined;
  const bases = values.base ? new Set(values.base) : undefined;
  const manifest = damage.makeDamagedImages(dir, {
    only: (defect, base) => (!defects || defects.has(defect.name)) && (!bases || bases.has(base)),
  });
  const count = new Set(manifest.map((m) => m.defect)).size;
  process.stderr.write(`make-damaged-images: ${manifest.length} damaged images (${count} defects) in ${dir}; manifest.json lists them\n`);
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    process.stderr.write(`make-damaged-images: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode = 1;
  },
);

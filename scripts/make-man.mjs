#!/usr/bin/env node
// Writes qcow2img.1 (roff) from the command descriptions in dist/cli/spec.js, the ones
// `qcow2img CMD --help` prints; `--stdout` prints it instead. Run it after changing the commands
// (`npm run compile && node scripts/make-man.mjs`): test/cli/help.test.ts fails while qcow2img.1 is stale.
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const { commands, snapshotSummary } = require(path.join(root, 'dist', 'cli', 'spec.js'));
const { version } = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));

/** Text for roff: backslashes and dashes escaped, no line starting with a control character. */
function esc(text) {
  return text.replace(/\\/g, '\\e').replace(/-/g, '\\-').replace(/^([.'])/gm, '\\&$1');
}

const out = [];
out.push(`.TH QCOW2IMG 1 "" "qcow2img ${version}" "User Commands"`);
out.push('.SH NAME', 'qcow2img \\- load qcow2 images onto disks, capture disks to qcow2, inspect, check and bench');
out.push('.SH SYNOPSIS', '.B qcow2img', '.I command', '[\\fIoptions\\fR] \\fIarguments\\fR');
out.push('.br', '.B qcow2img', '.I command', '\\fB\\-\\-help\\fR', '.br', '.B qcow2img help', '.I command');
out.push(
  '.SH DESCRIPTION',
  esc('Host-side qcow2 tooling for hypervisor hosts. info, map and check print what qemu-img prints (--output=json byte for byte); load writes the raw virtual disk of a qcow2 image to a file, block device or partition at disk speed; capture makes a qcow2 image of a raw file or device; bench measures a disk as fio does; snapshot saves and restores VM snapshots.'),
);
out.push('.SH COMMANDS');
let group;
for (const command of commands) {
  if (command.name.startsWith('snapshot ') && group !== 'snapshot') {
    group = 'snapshot';
    out.push('.PP', esc(`snapshot: ${snapshotSummary}. A bundle is a folder, or an archive: .tar, .tar.gz or .tar.zst.`));
  }
  out.push(`.SS "${esc(`qcow2img ${command.name}${command.options.length ? ' [options]' : ''} ${command.args.join(' ')}`)}"`);
  out.push(esc(`${command.summary[0].toUpperCase()}${command.summary.slice(1)}.`));
  for (const paragraph of command.details ?? []) out.push('.PP', esc(paragraph));
  for (const option of command.options) {
    const flags = `${option.short ? `\\fB\\-${option.short}\\fR, ` : ''}\\fB${esc(`--${option.long}`)}\\fR${option.value ? ` \\fI${esc(option.value)}\\fR` : ''}`;
    out.push('.TP', flags, esc(option.help + (option.default ? ` (default: ${option.default})` : '')));
  }
  out.push('.PP', 'Examples:', '.RS', '.nf');
  for (const example of command.examples) out.push(esc(example.command), `    ${esc(example.does)}`);
  out.push('.fi', '.RE');
}
out.push(
  '.SH SIZES',
  esc('Options that take a SIZE read it as qemu-img and fio do: a number of bytes, or a number with a unit: k, K, KB or KiB = 1024 bytes; M, G, T, P, E likewise (powers of 1024, any case); fractions such as 1.5G. A size that is not a whole number of bytes is refused.'),
  '.SH "EXIT STATUS"',
  '.TP', '0', 'done',
  '.TP', '1', esc('failed: one line on stderr names the file and the problem; usage errors add a pointer to the command\'s --help'),
  '.TP', '2, 3', esc('check only: corruptions (2), leaked clusters only (3), as qemu-img check'),
  '.TP', '130', 'interrupted (SIGINT or SIGTERM); what was not finished is removed',
  '.SH "SEE ALSO"',
  '.BR qemu\\-img (1),',
  '.BR fio (1)',
);
const text = out.join('\n') + '\n';
if (process.argv.includes('--stdout')) process.stdout.write(text);
else fs.writeFileSync(path.join(root, 'qcow2img.1'), text);

/** `qcow2img map IMAGE`: qemu-img map's allocation map, human or JSON. */
import { open } from '../../qcow2/open';
import { formatMap } from '../format';
import { type OpenFlags, type QemuOutputFlags, openOptions, outputKind } from '../options';
import { qemuMapJson } from '../qemu-json';
import { printJson } from '../terminal';

export async function run([path]: string[], flags: OpenFlags & QemuOutputFlags): Promise<void> {
  const kind = outputKind(flags, 'map');
  const image = await open(path!, openOptions(flags));
  try {
    const entries = await image.extents();
    // qemu-img map prints one empty entry for an empty disk (img_map dumps the entry it starts from).
    if (entries.length === 0) entries.push({ start: 0, length: 0, depth: 0, present: false, zero: false, data: false });
    if (kind === 'json') printJson(entries);
    else if (kind === 'qemu-json') process.stdout.write(qemuMapJson(entries));
    else process.stdout.write(formatMap(entries) + '\n');
  } finally {
    await image.close();
  }
}

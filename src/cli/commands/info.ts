/** `qcow2img info IMAGE`: qemu-img info's description, human or JSON. */
import { open } from '../../qcow2/open';
import { chainNames, formatInfoChain } from '../format';
import { type OpenFlags, type QemuOutputFlags, openOptions, outputKind } from '../options';
import { qemuInfoJson } from '../qemu-json';
import { printJson } from '../terminal';

export interface InfoFlags extends OpenFlags, QemuOutputFlags {
  backingChain?: boolean;
}

export async function run([path]: string[], flags: InfoFlags): Promise<void> {
  const kind = outputKind(flags, 'info');
  // As qemu-img info: an encrypted image is described, though its data cannot be read.
  const image = await open(path!, { ...openOptions(flags), metadataOnly: true });
  try {
    const infos = flags.backingChain ? [image.info, ...image.backingChain] : [image.info];
    if (kind === 'json') printJson(flags.backingChain ? infos : infos[0]);
    else if (kind === 'qemu-json') process.stdout.write(qemuInfoJson(infos, chainNames(infos), flags.backingChain === true));
    else process.stdout.write(formatInfoChain(infos) + '\n');
  } finally {
    await image.close();
  }
}

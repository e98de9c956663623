/** `qcow2img info IMAGE`: qemu-img info's description, human or JSON. */
import { open, openToDescribe } from '../../qcow2/open';
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
  // Without --backing-chain the backing file is only named, as qemu-img info names it (it opens
  // the image with BDRV_O_NO_BACKING): nothing of it is read, so the allow-list is not asked.
  const image = flags.backingChain ? await open(path!, { ...openOptions(flags), metadataOnly: true }) : await openToDescribe(path!, openOptions(flags));
  try {
    const infos = flags.backingChain ? [image.info, ...image.backingChain] : [image.info];
    if (kind === 'json') printJson(flags.backingChain ? infos : infos[0]);
    else if (kind === 'qemu-json') process.stdout.write(qemuInfoJson(infos, chainNames(infos), flags.backingChain === true));
    else process.stdout.write(formatInfoChain(infos) + '\n');
  } finally {
    await image.close();
  }
}

// Describe an image and print its allocation map: node examples/info.mjs IMAGE
import { open } from 'qcow2img';

const image = await open(process.argv[2] ?? new URL('demo.qcow2', import.meta.url).pathname);
try {
  const { virtualSize, clusterSize, compressionType, backingFile } = image.info;
  console.log({ virtualSize, clusterSize, compressionType, backingFile });
  for (const extent of await image.extents()) {
    if (extent.data) console.log(`data  ${extent.start}+${extent.length}`);
  }
} finally {
  await image.close();
}

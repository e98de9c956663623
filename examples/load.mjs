// Load an image's raw disk into a file or onto a device, verified:
// node examples/load.mjs IMAGE TARGET
import { load } from 'qcow2img';

const [image = new URL('demo.qcow2', import.meta.url).pathname, target = '/tmp/qcow2img-example.raw'] = process.argv.slice(2);
const result = await load(image, target, {
  overwrite: true,
  verify: true,
  onProgress: (p) => process.stderr.write(`\r${p.phase} ${((100 * p.bytesDone) / p.bytesTotal).toFixed(0)}%`),
});
console.error(`\nwrote ${result.dataBytes} bytes of data to ${result.target} in ${result.seconds.toFixed(2)} s`);

// Capture a raw disk (file or block device) into a zstd-compressed qcow2 image:
// node examples/capture.mjs SOURCE OUT.qcow2
import { capture, check, checkExitCode } from 'qcow2img';

const [source = '/tmp/qcow2img-example.raw', output = '/tmp/qcow2img-example.qcow2'] = process.argv.slice(2);
const result = await capture(source, output, { compress: 'zstd', overwrite: true });
console.log(`${result.output}: ${result.fileSize} bytes, ${result.compressedClusters} compressed clusters`);
const verdict = await check(output);
console.log(`check: exit status ${checkExitCode(verdict)}, ${verdict.corruptions} corruptions, ${verdict.leaks} leaks`);

// Check an image's consistency as qemu-img check does; exits with its status:
// node examples/check.mjs IMAGE
import { check, checkExitCode } from 'qcow2img';

const result = await check(process.argv[2] ?? new URL('demo.qcow2', import.meta.url).pathname);
for (const issue of result.issues) console.log(`${issue.kind}: ${issue.message}`);
console.log(`${result.corruptions} corruptions, ${result.leaks} leaks, image end offset ${result.imageEndOffset}`);
process.exitCode = checkExitCode(result);

// Measure write bandwidth of a disk or folder, and how fast an image loads there:
// node examples/bench.mjs TARGET [IMAGE]
import { bench } from 'qcow2img';

const [target = '/tmp', image] = process.argv.slice(2);
const result = await bench(target, { size: 256 * 1024 * 1024, queueDepth: 16, ...(image ? { image } : {}) });
console.log(`${(result.bandwidthBytesPerSec / 1e6).toFixed(0)} MB/s, ${Math.round(result.iops)} IOPS, p99 ${result.latencyUs.p99.toFixed(0)} us (${result.engine})`);
if (result.load) console.log(`image load: ${(100 * result.load.ratio).toFixed(0)}% of that`);

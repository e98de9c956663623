/** Progress events now live with the other parts of a native job (src/jobs.ts); this name stays for src/cli's imports. */
export type { Progress, ProgressCallback } from '../jobs';

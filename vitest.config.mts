import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // Native addons belong in forked processes (vitest-dev/vitest#5047).
    pool: 'forks',
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // Tests that share loop devices and big fixtures run one file at a time.
    fileParallelism: false,
  },
});

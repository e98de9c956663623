/**
 * A synthetic guest RAM dump with the make-up measured on a booted Linux guest
 * (../shared/README.md): about 88% zero pages, and a quarter of the non-zero
 * pages equal to another page. Deterministic for a given seed.
 */
import * as fs from 'node:fs';

export function makeRamDump(path: string, sizeBytes: number, seed = 1): Buffer {
  let state = seed >>> 0 || 1;
  const next = () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 2 ** 32;
  };
  const ram = Buffer.alloc(sizeBytes);
  const pages = sizeBytes / 4096;
  const shared: Buffer[] = [];
  for (let p = 0; p < pages; p++) {
    const r = next();
    if (r < 0.88) continue;
    const page = ram.subarray(p * 4096, (p + 1) * 4096);
    if (r < 0.91 && shared.length > 0) {
      shared[Math.floor(next() * shared.length)]!.copy(page);
      continue;
    }
    // Text-like, compressible content, unique to the page.
    const line = Buffer.from(`page ${p} seed ${seed} value ${Math.floor(next() * 1e9)}\n`);
    for (let at = 0; at < 4096; at += line.length) line.copy(page, at);
    if (shared.length < 64 && next() < 0.1) shared.push(Buffer.from(page));
  }
  fs.writeFileSync(path, ram);
  return ram;
}

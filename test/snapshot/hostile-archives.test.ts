/**
 * Hostile snapshot archives: the tar layer (pax records), the gzip stream (bounded memory) and
 * cancellation while a skipped member streams by, each case a bug a review found, and the
 * behaviour GNU tar shows for the same input. (Split from test/hostile-input.test.ts.)
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error, restoreSnapshot } from '../../src/index';
import { ChunkReader, tarEntries } from '../../src/snapshot/tar';
import { repoRoot } from '../helpers/qemu';
import { failure } from '../helpers/fixtures';

const MiB = 1024 * 1024;
let dir: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-review-'));
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// tar, made by hand.

function tarHeader(name: string, size: number, type = '0'): Buffer {
  const block = Buffer.alloc(512);
  block.write(name, 0, 100, 'utf8');
  block.write('0000644\0', 100, 'ascii');
  block.write('0000000\0', 108, 'ascii');
  block.write('0000000\0', 116, 'ascii');
  block.write(`${Math.min(size, 8 ** 11 - 1).toString(8).padStart(11, '0')}\0`, 124, 'ascii');
  block.write('00000000000\0', 136, 'ascii');
  block.write(type, 156, 'ascii');
  block.write('ustar\u000000', 257, 'ascii');
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (const byte of block) sum += byte;
  block.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'ascii');
  return block;
}

function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  let length = Buffer.byteLength(body) + 1;
  while (String(length).length + Buffer.byteLength(body) !== length) length = String(length).length + Buffer.byteLength(body);
  return `${length}${body}`;
}

function paxEntry(records: string): Buffer {
  const data = Buffer.from(records);
  return Buffer.concat([tarHeader('PaxHeaders/x', data.length, 'x'), data, Buffer.alloc((512 - (data.length % 512)) % 512)]);
}

async function entriesOf(tar: Buffer): Promise<{ name: string; size: number }[]> {
  async function* chunks(): AsyncGenerator<Buffer> {
    yield tar;
  }
  const reader = new ChunkReader(chunks());
  const seen: { name: string; size: number }[] = [];
  for await (const entry of tarEntries(reader, 'hostile.tar')) {
    seen.push({ name: entry.name, size: entry.size });
    await reader.exactly(entry.size + ((512 - (entry.size % 512)) % 512));
  }
  return seen;
}

describe('snapshot archives', () => {
  it('a pax size that is not a plain decimal byte count (0x200, 1e3, empty) is BAD_ARCHIVE', async () => {
    // Number() takes "0x200", "1e3", " 512 " and "" (as 0); GNU tar refuses all of them
    // ("Malformed extended header: invalid size="), and POSIX makes an empty value mean
    // "use the ustar field", never 0.
    // The member's 512 bytes of data look like a header: read with a size of 0, they become
    // an entry of their own.
    const data = tarHeader('b/state.qvms', 0);
    for (const value of ['0x200', '1e3', '']) {
      const tar = Buffer.concat([paxEntry(paxRecord('size', value)), tarHeader('b/snapshot.json', 512), data, Buffer.alloc(1024)]);
      const result = await entriesOf(tar).then(
        (entries) => entries,
        (e: unknown) => e,
      );
      if (value === '' && !(result instanceof Qcow2Error)) {
        // POSIX: an empty value deletes the record, and the ustar size (512) holds.
        expect(result, 'size= (empty)').toEqual([{ name: 'b/snapshot.json', size: 512 }]);
        continue;
      }
      expect(result, `size=${value}`).toBeInstanceOf(Qcow2Error);
      expect((result as Qcow2Error).code).toBe('BAD_ARCHIVE');
    }
  });

  it('gunzip holds a bounded amount of memory however well a member compresses', () => {
    // fflate inflates each pushed input chunk (4 MiB here) into one output buffer: a chunk of
    // deflated zeros becomes up to ~4 GiB at once, and four chunks may be queued. 512 MiB of
    // zeros (2.3 MiB of gzip -1) peaked at about 1.1 GiB RSS when fflate got 4 MiB pushes; the same as .tar.zst at ~0.1 GiB.
    const member = 512 * MiB;
    const folder = fs.mkdtempSync(path.join(dir, 'bomb-'));
    const header = path.join(folder, 'header');
    const end = path.join(folder, 'end');
    fs.writeFileSync(header, tarHeader('b/disk.qcow2', member));
    fs.writeFileSync(end, Buffer.alloc(1024));
    const archive = path.join(folder, 'bomb.tar.gz');
    execFileSync('sh', ['-c', `{ cat "$1"; head -c ${member} /dev/zero; cat "$2"; } | gzip -1 > "$3"`, 'sh', header, end, archive]);
    expect(fs.statSync(archive).size).toBeLessThan(4 * MiB);
    const script = `require(${JSON.stringify(path.join(repoRoot, 'dist', 'index.js'))}).inspectSnapshot(process.argv[1], { tempDir: process.argv[2] })
      .catch((e) => e).then((r) => console.log(JSON.stringify({ code: r && r.code, maxRssMiB: process.resourceUsage().maxRSS / 1024 })))`;
    const ran = spawnSync(process.execPath, ['-e', script, archive, folder], { encoding: 'utf8', timeout: 120_000 });
    expect(ran.status, ran.stderr).toBe(0);
    const result = JSON.parse(ran.stdout.trim()) as { code: string; maxRssMiB: number };
    // The archive holds no snapshot.json: refused, after the whole stream was read.
    expect(result.code).toBe('BAD_ARCHIVE');
    expect(result.maxRssMiB, 'peak RSS in MiB').toBeLessThan(400);
  });

  it('an abort while a skipped member streams by stops the restore promptly', async () => {
    // extractMembers checks the signal only when it writes a wanted member: skipping an 8 GiB
    // disk.qcow2 to reach state.qvms (restore --memory of an archive made by qcow2img, where the
    // disk comes first) goes on to the end of the member after SIGINT/SIGTERM.
    const folder = fs.mkdtempSync(path.join(dir, 'abort-'));
    const unit = 256 * MiB;
    const units = 32;
    const zstd = (data: Buffer) => execFileSync('zstd', ['-q', '-c'], { input: data, maxBuffer: 64 * MiB });
    const zeros = execFileSync('sh', ['-c', `head -c ${unit} /dev/zero | zstd -q -19 -c`], { maxBuffer: 64 * MiB });
    const size = unit * units;
    const first = zstd(Buffer.concat([paxEntry(paxRecord('size', String(size))), tarHeader('b/disk.qcow2', size)]));
    const last = zstd(Buffer.alloc(1024));
    const archive = path.join(folder, 'big.tar.zst');
    fs.writeFileSync(archive, Buffer.concat([first, ...Array.from({ length: units }, () => zeros), last]));
    const temp = path.join(folder, 'temp');
    fs.mkdirSync(temp);
    const controller = new AbortController();
    const started = Date.now();
    let abortedAt = 0;
    const timer = setTimeout(() => {
      abortedAt = Date.now();
      controller.abort();
    }, 300);
    const error = await failure(restoreSnapshot(archive, { memory: path.join(folder, 'ram.raw'), tempDir: temp, signal: controller.signal }));
    clearTimeout(timer);
    const stoppedAfter = Date.now() - (abortedAt || started);
    expect(abortedAt, 'the restore ended before the abort').toBeGreaterThan(0);
    expect(error.code).toBe('CANCELLED');
    expect(stoppedAfter, 'ms from abort to rejection').toBeLessThan(2000);
    expect(fs.readdirSync(temp)).toEqual([]);
    expect(fs.existsSync(path.join(folder, 'ram.raw'))).toBe(false);
  });
});

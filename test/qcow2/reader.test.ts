/**
 * Reader conformance: every fixture read by qcow2img must equal what qemu-img makes of it,
 * byte for byte (load, read, createReadStream), field for field (info) and entry for entry (map).
 * Fixtures: test/helpers/qemu.ts.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Image, type OpenOptions, Qcow2Error, load, open } from '../../src/index';
import {
  type Fixture,
  type RefusalFiles,
  catalog,
  expectInfoAgrees,
  expectMapAgrees,
  expectSameFile,
  field,
  firstDifference,
  interestingReads,
  prepare,
  qemuCheck,
  qemuConvert,
  qemuInfo,
  qemuInfoChain,
  qemuMap,
  qemuRaw,
  refusalFixtures,
  run,
  sha256File,
} from '../helpers/qemu';

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-reader-'));
afterAll(() => fs.rmSync(scratch, { recursive: true, force: true }));

let outputs = 0;
function outputPath(name: string): string {
  return path.join(scratch, `${name}-${++outputs}.raw`);
}

async function withImage<T>(file: string, options: OpenOptions, body: (image: Image) => Promise<T>): Promise<T> {
  const image = await open(file, options);
  try {
    return await body(image);
  } finally {
    await image.close();
  }
}

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

for (const spec of catalog) {
  describe(`${spec.name}: ${spec.title}`, () => {
    let fixture: Fixture;
    beforeAll(() => {
      fixture = prepare(spec);
    });

    it('is what it claims to be, by qemu-img', () => {
      const info = qemuInfo(fixture.image);
      for (const [dotted, value] of Object.entries(spec.qemuInfo ?? {})) {
        expect(field(info, dotted), `qemu-img info ${dotted}`).toEqual(value);
      }
      expect(field(info, 'virtual-size')).toBe(fs.statSync(qemuRaw(fixture)).size);
      if (spec.compressed) expect(qemuCheck(fixture.image)['compressed-clusters'], 'compressed clusters').toBeGreaterThan(0);
      const map = qemuMap(fixture.image, fixture.dir);
      const clusterSize = field(info, 'cluster-size') as number;
      for (const [what, has] of Object.entries(spec.qemuMapHas ?? {})) {
        expect(map.some((e) => has(e, clusterSize)), `qemu-img map has ${what}`).toBe(true);
      }
    });

    it('load() writes every byte qemu-img convert -O raw writes, and nothing more', async () => {
      const expected = qemuRaw(fixture);
      const target = outputPath(spec.name);
      const result = await load(fixture.image, target);
      const virtualSize = field(qemuInfo(fixture.image), 'virtual-size');
      expect(fs.statSync(target).size).toBe(virtualSize);
      expect(result.virtualSize).toBe(virtualSize);
      expectSameFile(target, expected);
      fs.rmSync(target);
    });

    it('info agrees with qemu-img info, for the image and every backing file', async () => {
      const warnings: string[] = [];
      await withImage(fixture.image, { onWarning: (w) => warnings.push(w) }, async (image) => {
        expectInfoAgrees(image.info, qemuInfo(fixture.image), fixture.dir);
        const chain = qemuInfoChain(fixture.image);
        expect(image.backingChain.length, 'backing chain length').toBe(chain.length - 1);
        image.backingChain.forEach((info, i) => expectInfoAgrees(info, chain[i + 1]!, fixture.dir));
        expect(image.virtualSize).toBe(image.info.virtualSize);
      });
      if (spec.warning) {
        expect(warnings.some((w) => spec.warning!.test(w) && w.includes(fixture.image)), `a warning naming the image: ${warnings.join(' | ')}`).toBe(true);
      } else {
        expect(warnings).toEqual([]);
      }
    });

    it('extents() agree with qemu-img map entry by entry', async () => {
      await withImage(fixture.image, {}, async (image) => {
        expectMapAgrees(await image.extents(), fixture.image, fixture.dir);
      });
    });

    it('read() at unaligned offsets, across clusters and L2 tables and past the end, equals qemu-img', async () => {
      const expected = fs.readFileSync(qemuRaw(fixture));
      await withImage(fixture.image, {}, async (image) => {
        const size = image.virtualSize;
        expect(size).toBe(expected.length);
        const clusterSize = image.info.clusterSize!;
        const l2Span = (clusterSize / (image.info.extendedL2 ? 16 : 8)) * clusterSize;
        // Also across the boundaries between qemu-img map entries, where the kind of data changes.
        const boundaries = qemuMap(fixture.image, fixture.dir).slice(1).map((e) => e.start);
        const step = Math.max(1, Math.floor(boundaries.length / 40));
        const acrossBoundaries = boundaries.filter((_, i) => i % step === 0).map((b) => ({ offset: Math.max(0, b - 700), length: Math.min(1401, size - Math.max(0, b - 700)) }));
        for (const { offset, length } of [...interestingReads(size, clusterSize, l2Span, spec.name.length), ...acrossBoundaries]) {
          const buffer = Buffer.alloc(length, 0x5a);
          expect(await image.read(buffer, offset), `bytes read at ${offset}`).toBe(length);
          expect(firstDifference(buffer, expected.subarray(offset, offset + length)), `first wrong byte of read(${offset}, ${length})`).toBe(-1);
        }
        // Past the end: a short read, and the rest of the buffer untouched.
        const tail = Buffer.alloc(100, 0x5a);
        expect(await image.read(tail, size - 5)).toBe(5);
        expect(firstDifference(tail.subarray(0, 5), expected.subarray(size - 5))).toBe(-1);
        expect(tail.subarray(5).every((b) => b === 0x5a), 'bytes past the end untouched').toBe(true);
        expect(await image.read(Buffer.alloc(10), size)).toBe(0);
        expect(await image.read(Buffer.alloc(10), size + 12345)).toBe(0);
        // A Uint8Array view into a larger buffer.
        const backing = new Uint8Array(5000).fill(0x5a);
        const view = backing.subarray(1000, 4000);
        expect(await image.read(view, 777)).toBe(3000);
        expect(firstDifference(view, expected.subarray(777, 3777))).toBe(-1);
        expect(backing.subarray(0, 1000).every((b) => b === 0x5a) && backing.subarray(4000).every((b) => b === 0x5a), 'bytes around the view untouched').toBe(true);
      });
    });

    it('createReadStream() concatenated equals qemu-img, whole and for an unaligned range', async () => {
      const expected = fs.readFileSync(qemuRaw(fixture));
      await withImage(fixture.image, {}, async (image) => {
        const whole = await readAll(image.createReadStream());
        expect(whole.length).toBe(expected.length);
        expect(firstDifference(whole, expected)).toBe(-1);
        const start = 4097;
        const end = expected.length - 1001;
        // end is inclusive, as in fs.createReadStream: the same range of the raw file read by fs is the expectation.
        const part = await readAll(image.createReadStream({ start, end, highWaterMark: 100_003 }));
        expect(part.length).toBe(end - start + 1);
        expect(firstDifference(part, expected.subarray(start, end + 1))).toBe(-1);
        const raw = await readAll(fs.createReadStream(qemuRaw(fixture), { start, end }));
        expect(Buffer.compare(part, raw)).toBe(0);
        const sector = await readAll(image.createReadStream({ start: 0, end: 511 }));
        expect(Buffer.compare(sector, expected.subarray(0, 512))).toBe(0);
        const last = await readAll(image.createReadStream({ start: expected.length - 1 }));
        expect(Buffer.compare(last, expected.subarray(expected.length - 1))).toBe(0);
      });
    });

    for (const snapshot of spec.snapshots ?? []) {
      it(`load({ snapshot: "${snapshot}" }) equals qemu-img (${spec.snapshotOracle === 'apply' ? 'snapshot -a, then convert' : 'convert -l'})`, async () => {
        const expected = qemuRaw(fixture, snapshot);
        const target = outputPath(`${spec.name}-snapshot`);
        const result = await load(fixture.image, target, { snapshot });
        expect(fs.statSync(target).size).toBe(fs.statSync(expected).size);
        expect(result.virtualSize).toBe(fs.statSync(expected).size);
        expectSameFile(target, expected);
        fs.rmSync(target);
        // The same snapshot through read(), at unaligned offsets.
        const bytes = fs.readFileSync(expected);
        await withImage(fixture.image, { snapshot }, async (image) => {
          expect(image.virtualSize).toBe(bytes.length);
          for (const { offset, length } of interestingReads(bytes.length, 64 * 1024, 512 * 1024 * 1024, snapshot.length)) {
            const buffer = Buffer.alloc(length);
            expect(await image.read(buffer, offset)).toBe(length);
            expect(firstDifference(buffer, bytes.subarray(offset, offset + length)), `read(${offset}, ${length}) of snapshot ${snapshot}`).toBe(-1);
          }
        });
      });
    }
  });
}

describe('snapshots of another disk size', () => {
  it('qemu-img convert -l keeps the current size; on the snapshot\'s own bytes it agrees with load({ snapshot })', async () => {
    const fixture = prepare(catalog.find((s) => s.name === 'snapshot-resized')!);
    const converted = path.join(scratch, 'convert-l.raw');
    run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', '-l', 'snapshot.name=small', fixture.image, converted]);
    const qemu = fs.readFileSync(converted);
    fs.rmSync(converted);
    const target = outputPath('resized');
    await load(fixture.image, target, { snapshot: 'small' });
    const ours = fs.readFileSync(target);
    fs.rmSync(target);
    expect(qemu.length, 'convert -l writes the current virtual size').toBe(field(qemuInfo(fixture.image), 'virtual-size'));
    expect(ours.length, 'the size the snapshot recorded (qemu-img snapshot -a)').toBe(fs.statSync(qemuRaw(fixture, 'small')).size);
    expect(ours.length).toBeLessThan(qemu.length);
    expect(firstDifference(ours, qemu.subarray(0, ours.length))).toBe(-1);
    expect(qemu.subarray(ours.length).every((b) => b === 0), 'convert -l reads zeros past the snapshot\'s size').toBe(true);
  });
});

describe('load options', () => {
  let fixture: Fixture;
  beforeAll(() => {
    fixture = prepare(catalog.find((s) => s.name === 'chain-3')!);
  });

  for (const options of [{ direct: 'never', threads: 1 }, { direct: 'never', threads: 7 }, { direct: 'auto', threads: 3 }] as const) {
    it(`writes the same bytes with direct=${options.direct}, threads=${options.threads}`, async () => {
      const target = outputPath('options');
      await load(fixture.image, target, options);
      expectSameFile(target, qemuRaw(fixture));
      fs.rmSync(target);
    });
  }

  it('leaves the clusters a preallocation=metadata image never wrote as holes of the target file', async () => {
    const prealloc = prepare(catalog.find((s) => s.name === 'prealloc-metadata')!);
    const target = outputPath('prealloc');
    const result = await load(prealloc.image, target);
    expectSameFile(target, qemuRaw(prealloc));
    // 300k + 4k were written (and the 64k zero write reads as zeros): only those are data.
    expect(result.dataBytes).toBeLessThan(1024 * 1024);
    expect(fs.statSync(target).blocks * 512).toBeLessThan(1024 * 1024);
    fs.rmSync(target);
  });

  it('loads from an already open Image, and reports progress up to the virtual size', async () => {
    const target = outputPath('open-image');
    const done: number[] = [];
    await withImage(fixture.image, {}, async (image) => {
      await load(image, target, { onProgress: (p) => done.push(p.bytesDone) });
      expect(done.length).toBeGreaterThan(0);
      expect(done[done.length - 1]).toBe(image.virtualSize);
    });
    expectSameFile(target, qemuRaw(fixture));
    fs.rmSync(target);
  });

  it('replaces an existing target with overwrite: true', async () => {
    const target = outputPath('overwrite');
    fs.writeFileSync(target, Buffer.alloc(100 * 1024 * 1024 + 7, 0x77));
    await load(fixture.image, target, { overwrite: true });
    expectSameFile(target, qemuRaw(fixture));
    fs.rmSync(target);
  });
});

// ---------------------------------------------------------------------------------------------

async function expectRefusal(promise: Promise<unknown>, code: string, file: string): Promise<Qcow2Error> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error, `refused with ${code}`).toBeInstanceOf(Qcow2Error);
  const e = error as Qcow2Error;
  expect(e.code, e.message).toBe(code);
  expect(e.message, 'the message names the file').toContain(file);
  expect(e.message.includes('\n'), 'one line').toBe(false);
  return e;
}

async function openAndRead(file: string, options: OpenOptions = {}): Promise<void> {
  await withImage(file, options, async (image) => {
    await image.read(Buffer.alloc(image.virtualSize), 0);
  });
}

describe('refusals', () => {
  let f: RefusalFiles;
  beforeAll(() => {
    f = refusalFixtures();
  });

  it('refuses a LUKS-encrypted image (ENCRYPTED)', async () => {
    expect(qemuInfo(f.luks)['encrypted']).toBe(true);
    await expectRefusal(open(f.luks), 'ENCRYPTED', f.luks);
    await expectRefusal(load(f.luks, outputPath('luks')), 'ENCRYPTED', f.luks);
  });

  it('refuses an AES-encrypted image (ENCRYPTED)', async () => {
    expect(field(qemuInfo(f.aes), 'format-specific.data.encrypt.format')).toBe('aes');
    await expectRefusal(open(f.aes), 'ENCRYPTED', f.aes);
  });

  it('refuses an unknown incompatible feature bit (UNKNOWN_INCOMPATIBLE_FEATURE), like qemu-img', async () => {
    expect(run('qemu-img', ['info', f.unknownBit]).status).not.toBe(0);
    const e = await expectRefusal(open(f.unknownBit), 'UNKNOWN_INCOMPATIBLE_FEATURE', f.unknownBit);
    expect(e.message).toMatch(/\bbit 10\b/);
  });

  it('names an unknown incompatible feature from the feature-name table, as qemu-img does', async () => {
    const qemu = run('qemu-img', ['info', f.unknownBitNamed]);
    expect(qemu.status).not.toBe(0);
    expect(qemu.stderr).toContain(f.unknownBitName);
    const e = await expectRefusal(open(f.unknownBitNamed), 'UNKNOWN_INCOMPATIBLE_FEATURE', f.unknownBitNamed);
    expect(e.message).toContain(f.unknownBitName);
  });

  it('refuses a backing chain loop between two images (BACKING_CHAIN_LOOP)', async () => {
    expect(run('qemu-img', ['info', '--backing-chain', f.loopA]).stderr).toMatch(/infinite loop/);
    // a -> b -> a: the loop closes on a, and the other way round.
    await expectRefusal(open(f.loopA), 'BACKING_CHAIN_LOOP', f.loopA);
    await expectRefusal(open(f.loopB), 'BACKING_CHAIN_LOOP', f.loopB);
  });

  it('refuses an image that is its own backing file (BACKING_CHAIN_LOOP)', async () => {
    await expectRefusal(open(f.loopSelf), 'BACKING_CHAIN_LOOP', f.loopSelf);
  });

  it('refuses a chain deeper than maxChainDepth (BACKING_CHAIN_TOO_DEEP), and accepts it at the limit', async () => {
    const chain = prepare(catalog.find((s) => s.name === 'chain-3')!);
    await expectRefusal(open(chain.image, { maxChainDepth: 1 }), 'BACKING_CHAIN_TOO_DEEP', chain.image);
    await expectRefusal(open(chain.image, { maxChainDepth: 0 }), 'BACKING_CHAIN_TOO_DEEP', chain.image);
    await withImage(chain.image, { maxChainDepth: 2 }, async (image) => {
      expect(image.backingChain.length).toBe(2);
    });
  });

  it('refuses a backing file named by an absolute path outside the folder (PATH_NOT_ALLOWED) unless allowed', async () => {
    await expectRefusal(open(f.absoluteBacking), 'PATH_NOT_ALLOWED', f.absoluteBacking);
    await expectRefusal(open(f.absoluteBacking, { allowPaths: [path.join(f.dir, 'inside')] }), 'PATH_NOT_ALLOWED', f.absoluteBacking);
    const expected = fs.readFileSync(qemuConvert(f.absoluteBacking));
    for (const options of [{ allowPaths: [f.outsideDir] }, { allowAnyPath: true }]) {
      await withImage(f.absoluteBacking, options, async (image) => {
        const bytes = Buffer.alloc(image.virtualSize);
        await image.read(bytes, 0);
        expect(firstDifference(bytes, expected)).toBe(-1);
        expect(fs.realpathSync(image.backingChain[0]!.filename)).toBe(fs.realpathSync(f.outsideBase));
      });
    }
  });

  it('refuses a backing name escaping the folder with .. (PATH_NOT_ALLOWED)', async () => {
    await expectRefusal(open(f.dotDotBacking), 'PATH_NOT_ALLOWED', f.dotDotBacking);
    await openAndRead(f.dotDotBacking, { allowPaths: [f.outsideDir] });
  });

  it('refuses a backing symlink that points out of the folder (PATH_NOT_ALLOWED)', async () => {
    expect(fs.lstatSync(path.join(path.dirname(f.symlinkBacking), 'link.qcow2')).isSymbolicLink()).toBe(true);
    await expectRefusal(open(f.symlinkBacking), 'PATH_NOT_ALLOWED', f.symlinkBacking);
    await openAndRead(f.symlinkBacking, { allowPaths: [f.outsideDir] });
  });

  it('refuses an external data file outside the folder (PATH_NOT_ALLOWED) unless allowed', async () => {
    await expectRefusal(open(f.absoluteDataFile), 'PATH_NOT_ALLOWED', f.absoluteDataFile);
    await openAndRead(f.absoluteDataFile, { allowAnyPath: true });
  });

  it('refuses a missing backing file (BACKING_FILE_NOT_FOUND)', async () => {
    const e = await expectRefusal(open(f.missingBacking), 'BACKING_FILE_NOT_FOUND', f.missingBacking);
    expect(e.message).toContain('missing.qcow2');
  });

  it('refuses a missing image (IO_ERROR, ENOENT)', async () => {
    const missing = path.join(f.dir, 'no-such-image.qcow2');
    const e = await expectRefusal(open(missing), 'IO_ERROR', missing);
    expect(e.syscallCode).toBe('ENOENT');
  });

  it('refuses a file without the qcow2 magic (BAD_MAGIC)', async () => {
    await expectRefusal(open(f.badMagic), 'BAD_MAGIC', f.badMagic);
  });

  it('refuses a file cut inside the header: past the end it reads as zeros, a header length of 0 (BAD_HEADER_LENGTH), as qemu-img refuses it', async () => {
    await expectRefusal(open(f.truncatedHeader), 'BAD_HEADER_LENGTH', f.truncatedHeader);
    expect(run('qemu-img', ['info', f.truncatedHeader]).stderr).toMatch(/header too short/);
  });

  it('loads a file cut before its tables as qemu-img convert does: the tables read as zeros (bdrv_aligned_preadv)', async () => {
    const target = outputPath('truncated-tables');
    await load(f.truncatedTables, target);
    expectSameFile(target, qemuConvert(f.truncatedTables));
  });

  it('loads a file cut inside its data clusters as qemu-img convert does: zeros past the end (bdrv_aligned_preadv)', async () => {
    const target = outputPath('truncated');
    await load(f.truncatedData, target);
    expectSameFile(target, qemuConvert(f.truncatedData));
  });

  it('refuses an unknown snapshot (SNAPSHOT_NOT_FOUND)', async () => {
    const snapshots = prepare(catalog.find((s) => s.name === 'snapshots')!);
    await expectRefusal(open(snapshots.image, { snapshot: 'no-such-snapshot' }), 'SNAPSHOT_NOT_FOUND', snapshots.image);
    await expectRefusal(open(snapshots.image, { snapshot: '3' }), 'SNAPSHOT_NOT_FOUND', snapshots.image);
    const target = outputPath('no-snapshot');
    await expectRefusal(load(snapshots.image, target, { snapshot: 'no-such-snapshot' }), 'SNAPSHOT_NOT_FOUND', snapshots.image);
    expect(fs.existsSync(target)).toBe(false);
  });

  it('refuses to load onto an existing file without overwrite (TARGET_EXISTS), leaving it alone', async () => {
    const chain = prepare(catalog.find((s) => s.name === 'chain-3')!);
    const target = outputPath('exists');
    fs.writeFileSync(target, 'precious');
    await expectRefusal(load(chain.image, target), 'TARGET_EXISTS', target);
    expect(fs.readFileSync(target, 'utf8')).toBe('precious');
    expect(fs.readdirSync(scratch).filter((n) => n.includes('.tmp'))).toEqual([]);
  });

  it('refuses to load onto the image itself or a file of its chain (TARGET_IS_SOURCE), even with overwrite', async () => {
    const chain = prepare(catalog.find((s) => s.name === 'chain-3')!);
    // Work on a copy: a failure here must not damage the shared fixture.
    const copy = path.join(scratch, 'target-is-source');
    fs.rmSync(copy, { recursive: true, force: true });
    fs.cpSync(chain.dir, copy, { recursive: true, filter: (src) => !src.endsWith('.raw') });
    const top = path.join(copy, 'top.qcow2');
    const base = path.join(copy, 'base.qcow2');
    const before = [sha256File(top), sha256File(base)];
    await expectRefusal(load(top, top, { overwrite: true }), 'TARGET_IS_SOURCE', top);
    await expectRefusal(load(top, base, { overwrite: true }), 'TARGET_IS_SOURCE', base);
    expect([sha256File(top), sha256File(base)]).toEqual(before);
    const data = prepare(catalog.find((s) => s.name === 'data-file')!);
    const dataCopy = path.join(scratch, 'target-is-data-file');
    fs.rmSync(dataCopy, { recursive: true, force: true });
    fs.cpSync(data.dir, dataCopy, { recursive: true, filter: (src) => !src.endsWith('.raw') });
    const dataFile = path.join(dataCopy, 'image.data');
    const dataBefore = sha256File(dataFile);
    await expectRefusal(load(path.join(dataCopy, 'image.qcow2'), dataFile, { overwrite: true }), 'TARGET_IS_SOURCE', dataFile);
    expect(sha256File(dataFile)).toBe(dataBefore);
  });

  it('refuses to read a closed image (CLOSED)', async () => {
    const chain = prepare(catalog.find((s) => s.name === 'chain-3')!);
    const image = await open(chain.image);
    await image.close();
    await expectRefusal(image.read(Buffer.alloc(10), 0), 'CLOSED', chain.image);
  });
});

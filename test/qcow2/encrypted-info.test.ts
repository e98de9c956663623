/**
 * Encrypted images: `info` describes them as qemu-img info does (text for text, and the LUKS
 * header's fields in the JSON), while every read, map and load of one, or of an image over an
 * encrypted backing file, is refused with ENCRYPTED naming the encrypted file.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type EncryptionInfo, load, open, Qcow2Error } from '../../src/index';
import { cliPath, qemuImgCreateEncrypted } from '../helpers/qemu';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-encrypted-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

const secret = ['--object', 'secret,id=sec0,data=abc'];
// A short key derivation: the default spends two seconds on PBKDF2 per image.
const luks = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10';
const images: Record<string, string> = {
  'luks.qcow2': luks,
  'luks-essiv.qcow2': `${luks},encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512`,
  'luks-serpent-xts.qcow2': `${luks},encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain`,
  'luks-cast5.qcow2': `${luks},encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64`,
  'luks-aes-ctr.qcow2': `${luks},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ctr,encrypt.ivgen-alg=plain`,
  'luks-v2.qcow2': `compat=0.10,${luks}`,
  'luks-data-file.qcow2': `${luks},data_file=luks-data-file.data`,
  'aes.qcow2': 'encrypt.format=aes,encrypt.key-secret=sec0',
  'aes-v2.qcow2': 'compat=0.10,encrypt.format=aes,encrypt.key-secret=sec0',
};

function ours(args: readonly string[]) {
  return spawnSync(process.execPath, [cliPath, ...args], { cwd: work, encoding: 'utf8' });
}

function qemuImg(args: readonly string[]) {
  return spawnSync('qemu-img', args, { cwd: work, encoding: 'utf8' });
}

/** qemu-img's JSON encrypt object with our camelCase keys. */
function camelCase(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(camelCase);
  if (value === null || typeof value !== 'object') return value;
  return Object.fromEntries(Object.entries(value).map(([key, inner]) => [key.replace(/-(\w)/g, (_, c: string) => c.toUpperCase()), camelCase(inner)]));
}

async function refusal(work: Promise<unknown>): Promise<Qcow2Error> {
  const error = await work.then(() => undefined, (e: unknown) => e);
  expect(error).toBeInstanceOf(Qcow2Error);
  return error as Qcow2Error;
}

beforeAll(() => {
  for (const [name, options] of Object.entries(images)) {
    // In the folder, where the data file's relative name is made and resolved.
    qemuImgCreateEncrypted(['-q', '-f', 'qcow2', ...secret, '-o', options, name, '1M'], work);
  }
  // Made without opening the base, which would need its key.
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'luks.qcow2', '-F', 'qcow2', path.join(work, 'over-luks.qcow2'), '1M']);
});

describe('info of an encrypted image', () => {
  for (const name of Object.keys(images)) {
    it(`${name}: the text qemu-img info prints, and its encrypt object in the JSON`, () => {
      const text = ours(['info', name]);
      expect(text.stderr).toBe('');
      expect(text.status).toBe(0);
      expect(text.stdout).toBe(qemuImg(['info', name]).stdout);

      const json = JSON.parse(ours(['info', '--json', name]).stdout) as { encrypted: boolean; encryption: EncryptionInfo };
      const qemu = JSON.parse(qemuImg(['info', '--output=json', name]).stdout) as { 'format-specific': { data: { encrypt: unknown } } };
      expect(json.encrypted).toBe(true);
      expect(json.encryption).toEqual(camelCase(qemu['format-specific'].data.encrypt));
    });
  }

  it('an overlay over a LUKS base: the whole chain, as qemu-img info --backing-chain prints it', () => {
    const text = ours(['info', '--backing-chain', 'over-luks.qcow2']);
    expect(text.status).toBe(0);
    expect(text.stdout).toBe(qemuImg(['info', '--backing-chain', 'over-luks.qcow2']).stdout);
  });
});

describe('reading an encrypted image is refused', () => {
  for (const name of ['luks.qcow2', 'aes.qcow2']) {
    it(`${name}: open refuses it unless asked only to describe it, and then every read refuses`, async () => {
      const file = path.join(work, name);
      expect((await refusal(open(file))).code).toBe('ENCRYPTED');
      expect((await refusal(load(file, path.join(work, `${name}.raw`)))).code).toBe('ENCRYPTED');
      expect(fs.existsSync(path.join(work, `${name}.raw`))).toBe(false);

      const image = await open(file, { metadataOnly: true });
      try {
        expect(image.info.encrypted).toBe(true);
        for (const attempt of [image.read(Buffer.alloc(4096), 0), image.extents()]) {
          const error = await refusal(attempt);
          expect(error.code).toBe('ENCRYPTED');
          expect(error.path).toBe(file);
        }
        const stream = image.createReadStream();
        const streamError = await new Promise<unknown>((resolve) => {
          stream.on('error', resolve);
          stream.on('data', () => resolve(undefined));
        });
        expect((streamError as Qcow2Error).code).toBe('ENCRYPTED');
      } finally {
        await image.close();
      }
    });
  }

  it('an overlay over an encrypted base: the base is named', async () => {
    const image = await open(path.join(work, 'over-luks.qcow2'), { metadataOnly: true });
    try {
      const error = await refusal(image.read(Buffer.alloc(512), 0));
      expect(error.code).toBe('ENCRYPTED');
      expect(error.path).toBe(path.join(work, 'luks.qcow2'));
    } finally {
      await image.close();
    }
    const map = ours(['map', 'over-luks.qcow2']);
    expect(map.status).toBe(1);
    expect(map.stderr).toMatch(/luks\.qcow2: image is encrypted \(LUKS\)/);
  });
});

describe('an image opened only to be described', () => {
  it('load refuses it before the target is touched: an existing file region stays as it was', async () => {
    const target = path.join(work, 'region-target.bin');
    const original = Buffer.alloc(4096, 0x5c);
    fs.writeFileSync(target, original);
    const image = await open(path.join(work, 'luks.qcow2'), { metadataOnly: true });
    try {
      expect((await refusal(load(image, target, { offset: 0 }))).code).toBe('ENCRYPTED');
    } finally {
      await image.close();
    }
    // A file region is extended to offset + virtual size when it is opened.
    expect(fs.readFileSync(target).equals(original)).toBe(true);
  });
});

describe('a damaged LUKS header', () => {
  /** A copy of luks.qcow2 with `change` applied to its bytes; the LUKS header's offset passed along. */
  function damaged(name: string, change: (bytes: Buffer, luksAt: number, extensionAt: number) => void): string {
    const bytes = fs.readFileSync(path.join(work, 'luks.qcow2'));
    // Header extensions start after the v3 header (its length at byte 100).
    let at = bytes.readUInt32BE(100);
    while (bytes.readUInt32BE(at) !== 0x0537be77) at += 8 + Math.ceil(bytes.readUInt32BE(at + 4) / 8) * 8;
    change(bytes, Number(bytes.readBigUInt64BE(at + 8)), at + 8);
    const file = path.join(work, name);
    fs.writeFileSync(file, bytes);
    return file;
  }

  const cases: [string, (bytes: Buffer, luksAt: number, extensionAt: number) => void, RegExp][] = [
    ['bad magic', (bytes, luksAt) => bytes.write('XXXX', luksAt), /bad magic/],
    ['version 2', (bytes, luksAt) => bytes.writeUInt16BE(2, luksAt + 6), /version 2/],
    ['an unknown cipher', (bytes, luksAt) => bytes.write('rot13\0', luksAt + 8, 'latin1'), /unsupported cipher "rot13"/],
    ['a cipher mode without its IV generator', (bytes, luksAt) => bytes.write('xts\0\0\0\0\0\0\0\0\0', luksAt + 40, 'latin1'), /unsupported cipher mode "xts"/],
    ['a key slot in neither state', (bytes, luksAt) => bytes.writeUInt32BE(0x12345678, luksAt + 208 + 3 * 48), /key slot 3/],
    ['an extension shorter than the header', (bytes, _luksAt, extensionAt) => bytes.writeBigUInt64BE(100n, extensionAt + 8), /does not hold a LUKS header/],
    ['a header past the end of the file', (bytes, _luksAt, extensionAt) => bytes.writeBigUInt64BE(BigInt(bytes.length - 100), extensionAt), /does not hold a LUKS header/],
    // The layout checks of QEMU's qcrypto_block_luks_check_header.
    ['master key iterations 0', (bytes, luksAt) => bytes.writeUInt32BE(0, luksAt + 164), /iterations are 0/],
    ['an inactive key slot with 3999 stripes', (bytes, luksAt) => bytes.writeUInt32BE(3999, luksAt + 208 + 3 * 48 + 44), /key slot 3 has 3999 stripes/],
    ['a payload offset inside the header', (bytes, luksAt) => bytes.writeUInt32BE(1, luksAt + 104), /overlaps the header/],
    ['two key slots at the same offset', (bytes, luksAt) => bytes.writeUInt32BE(bytes.readUInt32BE(luksAt + 208 + 40), luksAt + 208 + 48 + 40), /key slots 0 and 1 overlap/],
    // qcow2_read_extensions: the encryption header's offset must be a multiple of the cluster size.
    ['an offset off a cluster boundary', (bytes, luksAt, extensionAt) => {
      const moved = luksAt + 4 * 4096 + 512;
      bytes.copy(bytes, moved, luksAt, luksAt + 592);
      bytes.writeBigUInt64BE(BigInt(moved), extensionAt);
    }, /not a multiple of the cluster size/],
  ];
  for (const [what, change, message] of cases) {
    it(`${what}: BAD_ENCRYPTION_HEADER naming the file, and qemu-img info fails too`, async () => {
      const file = damaged(`damaged-${what.replace(/\W+/g, '-')}.qcow2`, change);
      expect(qemuImg(['info', file]).status).not.toBe(0);
      const error = await refusal(open(file, { metadataOnly: true }));
      expect(error.code).toBe('BAD_ENCRYPTION_HEADER');
      expect(error.path).toBe(file);
      expect(error.message).toMatch(message);
      const cli = ours(['info', file]);
      expect(cli.status).toBe(1);
      expect(cli.stderr.trim().split('\n')).toHaveLength(1);
      expect(cli.stderr).toContain(file);
    });
  }
});

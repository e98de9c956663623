/** The pure rules of http(s) sources: URL display, backing names of remote images, range sets, headers. */
import { describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../src/index';
import { parseHeaders } from '../../src/http/client';
import { mergeRanges } from '../../src/http/remote';
import { resolveRemoteName, shownUrl } from '../../src/http/url';

const image = new URL('https://img.example:8443/fleet/images/arch.qcow2?X-Amz-Signature=abc&X-Amz-Credential=def');

function refusal(fn: () => unknown): Qcow2Error {
  try {
    fn();
  } catch (error) {
    return error as Qcow2Error;
  }
  throw new Error('no refusal');
}

describe('shown URLs', () => {
  it('keep scheme, host, port and path; drop query, fragment and credentials', () => {
    expect(shownUrl(image)).toBe('https://img.example:8443/fleet/images/arch.qcow2');
    expect(shownUrl('http://user:pw@h/a.qcow2#frag')).toBe('http://h/a.qcow2');
  });
});

describe('backing names of a remote image', () => {
  it('a relative name resolves against the image URL and stays allowed under its folder', () => {
    expect(resolveRemoteName(image, 'base.qcow2', 'backing file', {})).toBe('https://img.example:8443/fleet/images/base.qcow2');
    expect(resolveRemoteName(image, 'bases/v1.qcow2', 'backing file', {})).toBe('https://img.example:8443/fleet/images/bases/v1.qcow2');
    expect(resolveRemoteName(image, 'https://img.example:8443/fleet/images/b.qcow2', 'backing file', {})).toBe('https://img.example:8443/fleet/images/b.qcow2');
  });

  it('outside the folder, another origin, or encoded dot segments are refused unless allowed', () => {
    for (const name of ['../base.qcow2', '%2e%2e/base.qcow2', 'https://other.example/fleet/images/base.qcow2', 'http://img.example:8443/fleet/images/base.qcow2', '//img.example:8443/x.qcow2']) {
      const error = refusal(() => resolveRemoteName(image, name, 'backing file', {}));
      expect(error.code, name).toBe('PATH_NOT_ALLOWED');
      expect(error.message).not.toContain('Signature');
    }
    expect(resolveRemoteName(image, '../base.qcow2', 'backing file', { allowPaths: ['https://img.example:8443/fleet/'] })).toBe('https://img.example:8443/fleet/base.qcow2');
    expect(resolveRemoteName(image, 'https://other.example/b.qcow2', 'backing file', { allowAnyPath: true })).toBe('https://other.example/b.qcow2');
    // A prefix allowance is a folder: /fleet/ does not allow /fleetwood/.
    expect(refusal(() => resolveRemoteName(image, '../../fleetwood/b.qcow2', 'backing file', { allowPaths: ['https://img.example:8443/fleet'] })).code).toBe('PATH_NOT_ALLOWED');
  });

  it('a local path (absolute or file:) is refused unless its folder is allowed explicitly', () => {
    for (const name of ['/etc/shadow', 'file:/dev/sda', 'file:///var/lib/images/base.qcow2']) {
      const error = refusal(() => resolveRemoteName(image, name, 'backing file', {}));
      expect(error.code, name).toBe('PATH_NOT_ALLOWED');
      expect(error.message).toContain('a local path named by a remote image');
    }
    expect(resolveRemoteName(image, '/var/lib/images/base.qcow2', 'backing file', { allowPaths: ['/var/lib/images'] })).toBe('/var/lib/images/base.qcow2');
    expect(refusal(() => resolveRemoteName(image, '/var/lib/images/base.qcow2', 'backing file', { allowPaths: ['https://img.example:8443/'] })).code).toBe('PATH_NOT_ALLOWED');
  });

  it('other protocols are refused', () => {
    expect(refusal(() => resolveRemoteName(image, 'nbd://h/x', 'backing file', {})).code).toBe('UNSUPPORTED_PROTOCOL');
    expect(refusal(() => resolveRemoteName(image, 'json:{}', 'backing file', {})).code).toBe('UNSUPPORTED_PROTOCOL');
  });
});

describe('range sets', () => {
  it('merge, with a gap', () => {
    expect(mergeRanges([[10, 20], [0, 5], [22, 30], [100, 110]], 2)).toEqual([[0, 5], [10, 30], [100, 110]]);
    expect(mergeRanges([[10, 20], [0, 5]], 0)).toEqual([[0, 5], [10, 20]]);
  });
});

describe('--header', () => {
  it('takes Name: value, and refuses bad names, line breaks and headers qcow2img sets, without echoing values', () => {
    expect(parseHeaders(['Authorization: Bearer x', 'X-A:b'], 'u')).toEqual({ Authorization: 'Bearer x', 'X-A': 'b' });
    for (const line of ['no colon', ': empty', 'Bad Name: v', 'Range: bytes=0-1', 'If-Match: x']) {
      const error = refusal(() => parseHeaders([line], 'https://h/a'));
      expect(error.code, line).toBe('INVALID_ARGUMENT');
    }
    const error = refusal(() => parseHeaders({ 'X-Token': 'sec\r\nret' }, 'https://h/a'));
    expect(error.message).not.toContain('sec');
  });
});

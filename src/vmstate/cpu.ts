/**
 * vCPU state: JSON in and out ({arch, vcpus: [...]}, integers as "0x" hex
 * strings, unknown keys kept), stored in the CPU section in the value grammar of
 * docs/formats/vmstate.md. xsave and lapic blobs (base64 in JSON) are stored as
 * raw bytes, so they come back byte for byte.
 */
// valibot, not zod: it loads in about 12 ms instead of 55-80, and every snapshot command pays it.
import * as v from 'valibot';
import { Qcow2Error } from '../errors';

const hex = v.pipe(v.string(), v.regex(/^0x[0-9a-fA-F]+$/, 'an integer as a "0x" hex string'));
const segment = v.union([v.looseObject({ selector: hex, base: hex, limit: hex }), v.looseObject({ base: hex, limit: hex })]);
const table = v.looseObject({ base: hex, limit: hex });
const base64 = v.pipe(v.string(), v.regex(/^[A-Za-z0-9+/]*={0,2}$/, 'base64'));
const registers = (names: string[]) => v.looseObject(Object.fromEntries(names.map((r) => [r, hex])) as Record<string, typeof hex>);

/** The x86_64 shape of the CPU JSON; every object keeps keys it does not know. */
export const cpuStateSchema = v.looseObject({
  arch: v.literal('x86_64'),
  vcpus: v.array(
    v.looseObject({
      id: v.pipe(v.number(), v.integer(), v.minValue(0)),
      regs: registers(['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags']),
      sregs: v.looseObject({
        cs: segment, ds: segment, es: segment, fs: segment, gs: segment, ss: segment, tr: segment,
        ldt: v.looseObject({ selector: hex, base: hex, limit: hex, attrs: hex }),
        gdt: table, idt: table,
        cr0: hex, cr2: hex, cr3: hex, cr4: hex, cr8: v.optional(hex), efer: hex, apicBase: v.optional(hex),
      }),
      dregs: registers(['dr0', 'dr1', 'dr2', 'dr3', 'dr6', 'dr7']),
      fpu: v.looseObject({ fcw: hex, fsw: hex, ftw: v.optional(hex), mxcsr: hex, xmm: v.record(v.string(), hex) }),
      msrs: v.optional(v.record(hex, hex)),
      xsave: v.optional(base64),
      lapic: v.optional(base64),
    }),
  ),
});

export type CpuState = v.InferOutput<typeof cpuStateSchema>;

/** The first problem valibot found, as "field.path: message". */
export function describeIssue(issues: readonly v.BaseIssue<unknown>[]): string {
  const issue = issues[0]!;
  return `${v.getDotPath(issue) ?? '(root)'}: ${issue.message}`;
}

/**
 * Validates CPU JSON, naming the offending field, and checks that it encodes within what a
 * reader takes (before a snapshot spends minutes on its disk). A copy of the JSON itself is what
 * is stored: valibot's output puts the keys it knows first, and the state file keeps keys in the
 * order given; a copy, so that a caller changing its object meanwhile changes nothing.
 */
export function parseCpuState(json: unknown, path: string): CpuState {
  const result = v.safeParse(cpuStateSchema, json);
  if (!result.success) throw new Qcow2Error('INVALID_ARGUMENT', `CPU state: ${describeIssue(result.issues)}`, { path });
  const state = structuredClone(json) as CpuState;
  encodeCpuState(state, path);
  return state;
}

const Tag = { null: 0, false: 1, true: 2, hex: 3, string: 4, bytes: 5, array: 6, object: 7, number: 8 } as const;
const blobKeys = new Set(['xsave', 'lapic']);

/** The CPU section's bytes, appended to one buffer that doubles as it fills. */
class Writer {
  private buffer = Buffer.alloc(4096);
  private at = 0;
  u8(v: number) { this.room(1); this.buffer[this.at++] = v; }
  u16(v: number) { this.room(2); this.at = this.buffer.writeUInt16LE(v, this.at); }
  u32(v: number) { this.room(4); this.at = this.buffer.writeUInt32LE(v, this.at); }
  f64(v: number) { this.room(8); this.at = this.buffer.writeDoubleLE(v, this.at); }
  bytes(b: Uint8Array) { this.room(b.length); this.buffer.set(b, this.at); this.at += b.length; }
  done() { return Buffer.from(this.buffer.subarray(0, this.at)); }
  private room(n: number) {
    if (this.at + n <= this.buffer.length) return;
    const bigger = Buffer.alloc(Math.max(2 * this.buffer.length, this.at + n));
    this.buffer.copy(bigger, 0, 0, this.at);
    this.buffer = bigger;
  }
}

/**
 * Where a value sits: only a vCPU's own xsave and lapic are blobs (a key of that name deeper
 * down, in keys the schema does not know, is left as it is).
 */
type Place = 'root' | 'vcpus' | 'vcpu' | 'blob' | 'other';

function placeOf(parent: Place, key: string): Place {
  if (parent === 'root' && key === 'vcpus') return 'vcpus';
  if (parent === 'vcpu' && blobKeys.has(key)) return 'blob';
  return 'other';
}

/** Deepest nesting a reader takes (the root is level 0): deeper, the file could not be restored. */
const maxDepth = 64;

function encodeValue(w: Writer, value: unknown, place: Place, depth: number, path: string): void {
  if (depth > maxDepth) throw new Qcow2Error('INVALID_ARGUMENT', `CPU state nests deeper than ${maxDepth} levels`, { path });
  if (value === null) return w.u8(Tag.null);
  if (value === false) return w.u8(Tag.false);
  if (value === true) return w.u8(Tag.true);
  if (typeof value === 'number') {
    w.u8(Tag.number);
    return w.f64(value);
  }
  if (typeof value === 'string') {
    const raw = place === 'blob' ? Buffer.from(value, 'base64') : undefined;
    // As bytes only when they give the same text back (canonical, padded base64).
    if (raw && raw.toString('base64') === value) {
      w.u8(Tag.bytes);
      w.u32(raw.length);
      return w.bytes(raw);
    }
    if (/^0x[0-9a-fA-F]+$/.test(value) && value.length - 2 <= 0xffff && value === value.toLowerCase().replace(/^0x/, '0x')) {
      // Digits kept as written (leading zeros too), two a byte, little-endian.
      const digits = value.slice(2);
      const padded = digits.length % 2 ? `0${digits}` : digits;
      w.u8(Tag.hex);
      w.u16(digits.length);
      return w.bytes(Buffer.from(padded, 'hex').reverse());
    }
    const utf8 = Buffer.from(value, 'utf8');
    w.u8(Tag.string);
    w.u32(utf8.length);
    return w.bytes(utf8);
  }
  if (Array.isArray(value)) {
    w.u8(Tag.array);
    w.u32(value.length);
    for (const item of value) encodeValue(w, item, place === 'vcpus' ? 'vcpu' : 'other', depth + 1, path);
    return;
  }
  if (typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>);
    w.u8(Tag.object);
    w.u32(entries.length);
    for (const [k, v] of entries) {
      const name = Buffer.from(k, 'utf8');
      if (name.length > 0xffff) throw new Qcow2Error('INVALID_ARGUMENT', `CPU state has a key of ${name.length} bytes (at most 65535)`, { path });
      w.u16(name.length);
      w.bytes(name);
      encodeValue(w, v, placeOf(place, k), depth + 1, path);
    }
    return;
  }
  throw new TypeError(`cannot store a ${typeof value} in the CPU state`);
}

/** CPU JSON to the CPU section payload; what a reader would refuse is INVALID_ARGUMENT naming `path`. */
export function encodeCpuState(state: CpuState, path: string): Buffer {
  const w = new Writer();
  encodeValue(w, state, 'root', 0, path);
  return w.done();
}

/** The CPU section payload back to JSON, every value as it was given. */
export function decodeCpuState(payload: Buffer, path: string): CpuState {
  let at = 0;
  const need = (n: number) => {
    if (at + n > payload.length) throw new Qcow2Error('TRUNCATED', 'CPU section ends inside a value', { path });
  };
  const read = (depth: number): unknown => {
    if (depth > maxDepth) throw new Qcow2Error('BAD_HEADER_FIELD', 'CPU section nests too deep', { path });
    need(1);
    const tag = payload[at++]!;
    switch (tag) {
      case Tag.null: return null;
      case Tag.false: return false;
      case Tag.true: return true;
      case Tag.number: need(8); at += 8; return payload.readDoubleLE(at - 8);
      case Tag.hex: {
        need(2);
        const digits = payload.readUInt16LE(at);
        at += 2;
        const length = Math.ceil(digits / 2);
        need(length);
        const hexText = Buffer.from(payload.subarray(at, at + length)).reverse().toString('hex');
        at += length;
        return `0x${hexText.slice(hexText.length - digits)}`;
      }
      case Tag.string:
      case Tag.bytes: {
        need(4);
        const length = payload.readUInt32LE(at);
        at += 4;
        need(length);
        const bytes = payload.subarray(at, at + length);
        at += length;
        return tag === Tag.string ? bytes.toString('utf8') : bytes.toString('base64');
      }
      case Tag.array: {
        need(4);
        const count = payload.readUInt32LE(at);
        at += 4;
        if (count > payload.length - at) throw new Qcow2Error('BAD_HEADER_FIELD', 'CPU section array longer than the section', { path });
        return Array.from({ length: count }, () => read(depth + 1));
      }
      case Tag.object: {
        need(4);
        const count = payload.readUInt32LE(at);
        at += 4;
        if (count > payload.length - at) throw new Qcow2Error('BAD_HEADER_FIELD', 'CPU section object larger than the section', { path });
        const object: Record<string, unknown> = {};
        for (let i = 0; i < count; i++) {
          need(2);
          const length = payload.readUInt16LE(at);
          at += 2;
          need(length);
          const key = payload.toString('utf8', at, at + length);
          at += length;
          // Defined, not assigned: a key "__proto__" is data here, not the object's prototype.
          Object.defineProperty(object, key, { value: read(depth + 1), enumerable: true, writable: true, configurable: true });
        }
        return object;
      }
      default:
        throw new Qcow2Error('BAD_HEADER_FIELD', `CPU section has an unknown value tag ${tag}`, { path });
    }
  };
  const value = read(0);
  return value as CpuState;
}

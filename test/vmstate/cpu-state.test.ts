/**
 * The CPU section gives back the JSON it was given, text for text: opaque blobs are stored as
 * bytes only where the schema puts them (a vCPU's xsave and lapic) and only when their base64
 * is canonical; keys the schema does not know keep their values, "__proto__" included.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Qcow2Error, StateFile, writeState } from '../../src/index';
import { decodeCpuState, encodeCpuState, parseCpuState } from '../../src/vmstate/cpu';
import { sampleCpuState } from '../helpers/cpu';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2img-cpu-state-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function roundTrip(name: string, json: string): Promise<string> {
  const file = path.join(dir, `${name}.qvms`);
  await writeState(file, { cpu: parseCpuState(JSON.parse(json), file) });
  const state = await StateFile.open(file);
  try {
    return JSON.stringify(await state.cpu());
  } finally {
    await state.close();
  }
}

describe('CPU state text for text', () => {
  it('non-canonical base64 in xsave and lapic comes back as written', async () => {
    const cpu = structuredClone(sampleCpuState) as Record<string, unknown> & { vcpus: Record<string, unknown>[] };
    cpu.vcpus[0]!.xsave = 'QQ';
    cpu.vcpus[0]!.lapic = 'QR==';
    const json = JSON.stringify(cpu);
    expect(await roundTrip('base64', json)).toBe(json);
  });

  it('xsave and lapic keys outside a vCPU are not decoded as base64', async () => {
    const cpu = structuredClone(sampleCpuState) as Record<string, unknown> & { vcpus: Record<string, unknown>[] };
    cpu.vcpus[1]!.hypervisorSpecific = { lapic: '0x1234', xsave: 'not base64 at all' };
    cpu.lapic = 'QUJD';
    const json = JSON.stringify(cpu);
    expect(await roundTrip('nested', json)).toBe(json);
  });

  it('an unknown key named __proto__ is kept as data', async () => {
    const cpu = JSON.stringify(sampleCpuState).replace('"hypervisorSpecific":{', '"hypervisorSpecific":{"__proto__":{"polluted":"0x1"},');
    const back = await roundTrip('proto', cpu);
    expect(back).toBe(cpu);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });
});

describe('CPU state limits (docs/formats/vmstate.md)', () => {
  it('CPU JSON nested deeper than the 64 levels the reader takes is refused when written, not stored unreadable', () => {
    // docs/formats/vmstate.md: "Nesting is limited to 64 levels". decodeCpuState refuses depth
    // > 64: a writer that took more would make a state.qvms whose restore fails.
    let deep: unknown = '0x1';
    for (let i = 0; i < 80; i++) deep = { inner: deep };
    const json = structuredClone(sampleCpuState) as { vcpus: Record<string, unknown>[] };
    json.vcpus[0]!.vendorBlob = deep;
    let stored: Buffer;
    try {
      stored = encodeCpuState(parseCpuState(json, 'cpu.json'), 'cpu.json');
    } catch (error) {
      expect((error as Qcow2Error).code).toBe('INVALID_ARGUMENT');
      return;
    }
    expect(() => decodeCpuState(stored, 'state.qvms')).not.toThrow();
  });
});

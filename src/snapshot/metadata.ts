/**
 * snapshot.json: the small metadata file of a snapshot bundle, validated on load
 * with errors that name the field. Layout: docs/formats/bundle.md.
 */
import * as v from 'valibot';
import { Qcow2Error } from '../errors';
import { describeIssue } from '../vmstate/cpu';

export const BUNDLE_FORMAT_VERSION = 1;
export const METADATA_FILE = 'snapshot.json';
export const DISK_FILE = 'disk.qcow2';
export const STATE_FILE = 'state.qvms';

const uuid = v.pipe(v.string(), v.regex(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, 'a lowercase UUID'));
const hex64 = v.pipe(v.string(), v.regex(/^[0-9a-f]{16}$/, '16 hex digits'));
const count = v.pipe(v.number(), v.integer(), v.minValue(0));
const fileEntry = { size: count, xxh3: hex64 };

export const metadataSchema = v.strictObject({
  formatVersion: v.literal(BUNDLE_FORMAT_VERSION),
  id: uuid,
  created: v.pipe(v.string(), v.isoTimestamp('an ISO 8601 time')),
  parent: v.nullable(v.strictObject({ id: uuid, path: v.pipe(v.string(), v.minLength(1)) })),
  producer: v.string(),
  vcpuCount: count,
  memoryRegions: v.array(v.strictObject({ guestBase: count, size: v.pipe(v.number(), v.integer(), v.minValue(1)), dumpOffset: count })),
  machine: v.record(v.string(), v.unknown()),
  devices: v.array(v.pipe(v.string(), v.regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, 'a plain file name'))),
  files: v.strictObject({
    [DISK_FILE]: v.optional(v.strictObject({ ...fileEntry, virtualSize: count })),
    [STATE_FILE]: v.optional(v.strictObject({ ...fileEntry, snapshotId: uuid, digest: v.pipe(v.string(), v.regex(/^[0-9a-f]{32}$/, '32 hex digits')) })),
  }),
});

export type SnapshotMetadata = v.InferOutput<typeof metadataSchema>;

export function parseMetadata(json: string, path: string): SnapshotMetadata {
  let value: unknown;
  try {
    value = JSON.parse(json);
  } catch (error) {
    throw new Qcow2Error('BAD_HEADER_FIELD', `${METADATA_FILE} is not JSON: ${(error as Error).message}`, { path });
  }
  const result = v.safeParse(metadataSchema, value);
  if (!result.success) throw new Qcow2Error('BAD_HEADER_FIELD', `${METADATA_FILE}: field ${describeIssue(result.issues)}`, { path });
  return result.output;
}

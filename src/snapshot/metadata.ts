/**
 * snapshot.json: the small metadata file of a snapshot bundle, validated on load
 * with errors that name the field. Layout: docs/formats/bundle.md.
 */
import { z } from 'zod';
import { Qcow2Error } from '../errors';

export const BUNDLE_FORMAT_VERSION = 1;
export const METADATA_FILE = 'snapshot.json';
export const DISK_FILE = 'disk.qcow2';
export const STATE_FILE = 'state.qvms';

const uuid = z.string().regex(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, 'a lowercase UUID');
const hex64 = z.string().regex(/^[0-9a-f]{16}$/, '16 hex digits');
const fileEntry = z.strictObject({ size: z.number().int().nonnegative(), xxh3: hex64 });

export const metadataSchema = z.strictObject({
  formatVersion: z.literal(BUNDLE_FORMAT_VERSION),
  id: uuid,
  created: z.iso.datetime(),
  parent: z.strictObject({ id: uuid, path: z.string().min(1) }).nullable(),
  producer: z.string(),
  vcpuCount: z.number().int().nonnegative(),
  memoryRegions: z.array(z.strictObject({ guestBase: z.number().int().nonnegative(), size: z.number().int().positive(), dumpOffset: z.number().int().nonnegative() })),
  machine: z.record(z.string(), z.unknown()),
  devices: z.array(z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, 'a plain file name')),
  files: z.strictObject({
    [DISK_FILE]: fileEntry.extend({ virtualSize: z.number().int().nonnegative() }).optional(),
    [STATE_FILE]: fileEntry.extend({ snapshotId: uuid, digest: z.string().regex(/^[0-9a-f]{32}$/) }).optional(),
  }),
});

export type SnapshotMetadata = z.infer<typeof metadataSchema>;

export function parseMetadata(json: string, path: string): SnapshotMetadata {
  let value: unknown;
  try {
    value = JSON.parse(json);
  } catch (error) {
    throw new Qcow2Error('BAD_HEADER_FIELD', `${METADATA_FILE} is not JSON: ${(error as Error).message}`, { path });
  }
  const result = metadataSchema.safeParse(value);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    throw new Qcow2Error('BAD_HEADER_FIELD', `${METADATA_FILE}: field ${issue.path.join('.') || '(root)'}: ${issue.message}`, { path });
  }
  return result.data;
}

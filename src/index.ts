// Kept in dist/index.d.ts (preserve): the declarations use Buffer and other Node types, and
// TypeScript 6+ no longer includes @types/node in a consumer's program by itself.
/// <reference types="node" preserve="true" />
/**
 * qcow2img: host-side qcow2 tooling. Read images (info, map, read), load them
 * onto files and disks at disk speed.
 */
export { Qcow2Error, type Qcow2ErrorCode, type Qcow2ErrorDetails } from './errors';
export { limits } from './limits';
export { open } from './qcow2/open';
export { Image, type ImageInfo, type MapEntry, type OpenOptions, type ReadStreamOptions, type SnapshotInfo } from './qcow2/image';
export type { PathPolicy } from './qcow2/paths';
export type { CompressionType } from './qcow2/header';
export type { EncryptionInfo, LuksInfo, LuksSlot } from './qcow2/luks';
export { loadMany, type LoadManyResult, type LoadTarget, type TargetOutcome } from './load/many';
export type { HttpOptions } from './http/client';
export { load, type LoadOptions, type LoadResult, type Progress, type ProgressCallback, type DirectMode, type TargetOptions } from './load/index';
export { loadToStream, type LoadToStreamOptions, type LoadToStreamResult } from './load/stream';
export { capture, type CaptureOptions, type CaptureResult } from './capture/index';
export { check, checkExitCode, type CheckIssue, type CheckResult } from './check/index';
export { bench, type BenchOptions, type BenchResult } from './bench/index';
export {
  createSnapshot, restoreSnapshot, inspectSnapshot, verifySnapshot, readBundle,
  type CreateSnapshotOptions, type RestoreSnapshotOptions, type RestoreSnapshotResult, type SnapshotInspection,
  type BundleProblem, type SnapshotMetadata, type CpuState, type MemoryRegion, type SnapshotChainLink,
} from './snapshot/index';
export { metadataSchema } from './snapshot/metadata';
export { cpuStateSchema } from './vmstate/cpu';
export type { Header as StateHeader, Index as StateIndex, Region as StateRegion, SectionEntry, ChunkMapEntry } from './vmstate/format';
export { writeState, type WriteStateOptions, type WriteStateResult } from './vmstate/writer';
export { StateFile, restoreMemory, restoreMemoryInto, type MemoryTarget, type OpenStateOptions, type RestoreMemoryOptions, type RestoreMemoryResult, type StateProblem } from './vmstate/reader';

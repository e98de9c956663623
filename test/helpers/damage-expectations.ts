/**
 * The error code each defect of test/helpers/damage.ts must give ("ok" where it reads fine):
 * `open` is what `open()` and `info` give, `load` what `load()` gives, on the defect's first base image.
 * `check` is held to qemu-img's own verdict by test/check/damaged.test.ts. A change here is a change of behaviour:
 * review it as one.
 *
 * Where these can be wrong, and who says so (`oracle`):
 * - 'qemu-img': whether `open` and `load` read or refuse is qemu-img's answer on the same image:
 *   `qemu-img info` for open, `qemu-img convert -O raw` for load. test/check/damaged.test.ts asserts
 *   each such entry against both ("ok" where qemu-img succeeds, a code where it fails). Which code
 *   is our own naming: qemu-img has no answer for that, only review does.
 * - 'none: <why>': qemu-img's verdict is no answer for this entry (our own policy, or qemu-img reads
 *   it differently on purpose); the entry can be wrong and only review catches it. None today: every
 *   defect reads or is refused as qemu-img reads or refuses it.
 */
export type DamageOracle = 'qemu-img' | `none: ${string}`;

export interface DamageExpectation {
  /** "ok", or the Qcow2Error code of open() and info. */
  open: string;
  /** "ok", or the Qcow2Error code of load(). */
  load: string;
  oracle: DamageOracle;
}

export const expectedCodes: Record<string, DamageExpectation> = {
  'bitmap-data-shared': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'bitmap-directory-past-eof': { open: 'BAD_EXTENSION', load: 'BAD_EXTENSION', oracle: 'qemu-img' },
  'bitmap-table-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'compressed-bitmap': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'compressed-copied': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'compressed-into-header': { open: 'ok', load: 'BAD_COMPRESSED_CLUSTER', oracle: 'qemu-img' },
  'compressed-max-sectors': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'compressed-past-eof': { open: 'ok', load: 'BAD_COMPRESSED_CLUSTER', oracle: 'qemu-img' },
  'compressed-refcount-zeroed': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'compressed-shared': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-corrupt-bit': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-dirty-bit': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-l1-at-header': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-l1-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-l1-size-too-large': { open: 'L1_TOO_LARGE', load: 'L1_TOO_LARGE', oracle: 'qemu-img' },
  'header-l1-size-zero': { open: 'L1_TOO_SMALL', load: 'L1_TOO_SMALL', oracle: 'qemu-img' },
  'header-l1-unaligned': { open: 'UNALIGNED_OFFSET', load: 'UNALIGNED_OFFSET', oracle: 'qemu-img' },
  'header-refcount-order-7': { open: 'BAD_REFCOUNT_ORDER', load: 'BAD_REFCOUNT_ORDER', oracle: 'qemu-img' },
  'header-reftable-at-header': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-reftable-clusters-huge': { open: 'REFCOUNT_TABLE_TOO_LARGE', load: 'REFCOUNT_TABLE_TOO_LARGE', oracle: 'qemu-img' },
  'header-reftable-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-reftable-unaligned': { open: 'UNALIGNED_OFFSET', load: 'UNALIGNED_OFFSET', oracle: 'qemu-img' },
  'header-size-shrunk': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-snapshot-count-huge': { open: 'TOO_MANY_SNAPSHOTS', load: 'TOO_MANY_SNAPSHOTS', oracle: 'qemu-img' },
  'header-snapshot-count-plus-one': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'header-snapshots-unaligned': { open: 'UNALIGNED_OFFSET', load: 'UNALIGNED_OFFSET', oracle: 'qemu-img' },
  'l1-copied-cleared': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-copied-set-shared': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-duplicate-l2': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-entry-copied-only': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-entry-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-entry-unaligned': { open: 'ok', load: 'UNALIGNED_OFFSET', oracle: 'qemu-img' },
  'l1-entry-zeroed': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-points-at-data': { open: 'ok', load: 'BAD_L2_ENTRY', oracle: 'qemu-img' },
  'l1-points-at-l1': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-points-at-refblock': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-points-at-reftable': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-reserved-high': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l1-reserved-low': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-compressed-flag-on-data': { open: 'ok', load: 'BAD_COMPRESSED_CLUSTER', oracle: 'qemu-img' },
  'l2-copied-cleared': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-copied-set-shared': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-data-at-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-data-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-data-unaligned': { open: 'ok', load: 'BAD_L2_ENTRY', oracle: 'qemu-img' },
  'l2-entry-zeroed': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-into-header': { open: 'ok', load: 'BAD_L2_ENTRY', oracle: 'qemu-img' },
  'l2-points-at-l1': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-points-at-own-table': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-points-at-refblock': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-points-at-reftable': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-reserved-high': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-reserved-low': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-reserved-on-zero-plain': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-shared-data': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'l2-zero-alloc-unaligned': { open: 'ok', load: 'BAD_L2_ENTRY', oracle: 'qemu-img' },
  'l2-zero-flag-v2': { open: 'ok', load: 'BAD_L2_ENTRY', oracle: 'qemu-img' },
  'l2-zero-offset-copied': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'refcount-free-cluster': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'refcount-header-zeroed': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'refcount-l2-zeroed': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'refcount-max': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'refcount-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'refcount-raised': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'refcount-zeroed': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'reftable-duplicate-refblock': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'reftable-entry-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'reftable-entry-unaligned': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'reftable-entry-zeroed': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'reftable-points-at-data': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'reftable-reserved-bits': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'snapshot-extra-data-short': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'snapshot-l1-entry-zeroed': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'snapshot-l1-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'snapshot-l1-too-large': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'snapshot-l1-unaligned': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'snapshot-name-past-eof': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'trailing-garbage': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'truncated-half': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'truncated-last-cluster': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'truncated-partial-cluster': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'xl2-alloc-and-zero': { open: 'ok', load: 'BAD_L2_ENTRY', oracle: 'qemu-img' },
  'xl2-bit0': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
  'xl2-unallocated-alloc-bit': { open: 'ok', load: 'BAD_L2_ENTRY', oracle: 'qemu-img' },
  'xl2-zero-bits-unallocated': { open: 'ok', load: 'ok', oracle: 'qemu-img' },
};

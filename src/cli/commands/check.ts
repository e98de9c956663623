/** `qcow2img check IMAGE`: qemu-img check's verdict, counts and exit status. */
import { check, checkExitCode, type CheckResult } from '../../check/index';
import { percent } from '../format';
import { type QemuOutputFlags, outputKind } from '../options';
import { qemuCheckJson } from '../qemu-json';
import { printJson } from '../terminal';

export interface CheckFlags extends QemuOutputFlags {
  forceShare?: boolean;
  quiet?: boolean;
  header?: string[];
}

export async function run([path]: string[], flags: CheckFlags): Promise<number> {
  const kind = outputKind(flags, 'check');
  const result = await check(path!, { ...(flags.forceShare ? { forceShare: true } : {}), ...(flags.header?.length ? { http: { headers: flags.header } } : {}) });
  const exitCode = checkExitCode(result);
  if (kind === 'json') {
    if (!flags.quiet) printJson(result);
    return exitCode;
  }
  // As qemu-img: each problem on stderr ("ERROR ..." / "Leaked cluster ..."), whatever the output format.
  const problems = result.issues.map((issue) => (issue.kind === 'leak' ? issue.message.replace(/^leaked/, 'Leaked') : `ERROR ${issue.message}`));
  if (result.issueCount > result.issues.length) problems.push(`... and ${result.issueCount - result.issues.length} more`);
  if (problems.length) process.stderr.write(problems.join('\n') + '\n');
  if (flags.quiet) return exitCode;
  process.stdout.write(kind === 'qemu-json' ? qemuCheckJson(result, result.filename) : summary(result));
  return exitCode;
}

/** qemu-img check's human summary (qemu-img.c dump_human_image_check). */
function summary(result: CheckResult): string {
  const lines: string[] = [];
  if (result.corruptions === 0 && result.leaks === 0 && result.checkErrors === 0) lines.push('No errors were found on the image.');
  if (result.corruptions > 0) lines.push('', `${result.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  if (result.leaks > 0) lines.push('', `${result.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  if (result.checkErrors > 0) lines.push('', `${result.checkErrors} internal errors have occurred during the check.`);
  if (result.totalClusters > 0 && result.allocatedClusters > 0) {
    const allocated = percent(result.allocatedClusters, result.totalClusters);
    lines.push(
      `${result.allocatedClusters}/${result.totalClusters} = ${allocated}% allocated, ${percent(result.fragmentedClusters, result.allocatedClusters)}% fragmented, ${percent(result.compressedClusters, result.allocatedClusters)}% compressed clusters`,
    );
  }
  lines.push(`Image end offset: ${result.imageEndOffset}`);
  return lines.join('\n') + '\n';
}

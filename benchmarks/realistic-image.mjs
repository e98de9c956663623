#!/usr/bin/env node
/**
 * Builds, once, a realistic OS disk and the qcow2 variants of it that the load benchmarks use.
 *
 * Synthetic patterns compress and deduplicate unlike real disks, so the disk is a 2 GiB GPT disk
 * whose second partition is an ext4 filesystem holding about 1.7 GB of this machine's own files.
 * Every variant is then made by QEMU itself (qemu-img convert, qemu-io), so the images are the
 * ones users meet, and qemu-img stays the reference for their content.
 *
 * Everything is cached under .cache/bench (gitignored): the raw disk at os.raw, each variant in
 * variants/NAME/ with a .complete.json marker written last, so an interrupted build is redone.
 *
 *   node benchmarks/realistic-image.mjs [--only a,b] [--rebuild] [--list] [--cache-dir DIR]
 *
 *   import { buildRealisticImages } from './realistic-image.mjs';
 *   const variants = await buildRealisticImages({ only: ['zlib'] });
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ensureFreeSpace, humanBytes, isAlive, killRunningChildren, markdownTable, repoRoot, run, track } from './common.mjs';
import { Cleanup } from './harness.mjs';

export const defaultCacheDir = path.join(repoRoot, '.cache', 'bench');

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const diskSize = 2 * GiB;
const bootPartitionSize = 100 * MiB;
/** File data to copy (apparent sizes), like the baselines in ../shared/README.md. */
const copyBudgetBytes = 1.7e9;
/** The same files counted in whole 4 KiB blocks, as ext4 stores them: the ~1.9 GiB partition must hold them. */
const copyBlockLimitBytes = 1.85e9;
/** Where the copied files come from, in order, until the budget is spent. */
const copySources = ['/usr/share', '/usr/bin', '/usr/lib', '/usr/sbin', '/usr/libexec', '/usr/include'];
/** Not a multiple of 4 KiB or of any cluster size, so the backing file ends inside a cluster. */
const shortBackingSize = 1_000_000_000;

/**
 * What a guest does to its disk between snapshots, as qemu-io commands: data writes, zero writes
 * with and without unmap, discards, some of them unaligned to clusters and sectors, some over the
 * disk's last MiB, and from level 1 on, writes that shadow what the level below wrote. Each level
 * (0 = the base image) moves the offsets so the layers overlap only partly.
 */
export function guestWrites(level) {
  const hex = (byte) => `0x${byte.toString(16)}`;
  const commands = [
    `write -P ${hex(0xa1 + level)} ${1 * MiB + level * 7 * MiB} ${3 * MiB}`,
    `write -P ${hex(0xb1 + level)} ${300 * MiB + level * MiB + 1234} 70001`,
    `write -z ${500 * MiB + level * 2 * MiB} ${8 * MiB}`,
    `write -z -u ${700 * MiB + level * 2 * MiB} ${4 * MiB}`,
    `discard ${900 * MiB + level * 3 * MiB} ${16 * MiB}`,
    `write -z ${1200 * MiB + level * MiB + 12388} 200000`,
    `discard ${1300 * MiB + level * MiB + 33333} ${1 * MiB}`,
    `write -P ${hex(0xe1 + level)} ${diskSize - 1 * MiB + level * 64 * KiB} 100000`,
  ];
  if (level > 0) {
    const below = level - 1;
    commands.push(
      `write -z ${1 * MiB + below * 7 * MiB + 1 * MiB} ${512 * KiB}`,
      `write -P ${hex(0xc1 + level)} ${500 * MiB + below * 2 * MiB + 1 * MiB} ${64 * KiB}`,
      `discard ${1 * MiB + below * 7 * MiB + 2 * MiB} ${1 * MiB}`,
    );
  }
  return commands;
}

/** Writes at subcluster granularity (4 KiB subclusters of a 128 KiB extended-L2 cluster). */
const subclusterWrites = [
  `write -P 0x5a ${200 * MiB + 4 * KiB} ${4 * KiB}`,
  `write -z ${200 * MiB + 128 * KiB + 8 * KiB} ${8 * KiB}`,
  `discard ${200 * MiB + 256 * KiB} ${32 * KiB}`,
  `write -P 0x5b ${200 * MiB + 384 * KiB + 100} 5000`,
];

async function qemuIo(image, format, commands, cwd) {
  const args = ['-f', format];
  for (const command of commands) args.push('-c', command);
  await run('qemu-io', [...args, image], { cwd });
}

async function convertDisk(ctx, output, createOptions = [], extraArgs = []) {
  const options = createOptions.length ? ['-o', createOptions.join(',')] : [];
  // -W and -m 16 only speed the build up; the content is the same.
  await run('qemu-img', ['convert', '-W', '-m', '16', '-f', 'raw', '-O', 'qcow2', ...extraArgs, ...options, ctx.disk, output], { cwd: ctx.dir });
}

/** A straight conversion, followed by a level of guest writes unless it is a benchmark image. */
function converted(name, description, createOptions, { extraArgs = [], guestActivity = true } = {}) {
  return {
    name,
    description: guestActivity ? `${description}, then guest writes` : description,
    image: 'disk.qcow2',
    recipe: JSON.stringify([createOptions, extraArgs, guestActivity]),
    async build(ctx) {
      await convertDisk(ctx, 'disk.qcow2', createOptions, extraArgs);
      if (guestActivity) await qemuIo('disk.qcow2', 'qcow2', guestWrites(0), ctx.dir);
    },
  };
}

/**
 * Every variant. `image` is relative to the variant's folder; `allowPaths` (relative to that
 * folder) are the folders outside it the image refers to; `views` are the states to load besides
 * the current one (internal snapshots), with the matching qemu-img convert -l argument.
 */
export const variantDefinitions = [
  // The three benchmark images stay pristine conversions, like the baselines in ../shared/README.md.
  converted('uncompressed', 'qcow2 v3, 64 KiB clusters', [], { guestActivity: false }),
  converted('zlib', 'qcow2 v3, zlib-compressed (-c)', [], { extraArgs: ['-c'], guestActivity: false }),
  converted('zstd', 'qcow2 v3, zstd-compressed (-c)', ['compression_type=zstd'], { extraArgs: ['-c'], guestActivity: false }),
  converted('v2', 'qcow2 v2 (compat=0.10)', ['compat=0.10']),
  converted('extended-l2-128k', 'extended_l2, 128 KiB clusters', ['extended_l2=on', 'cluster_size=128k']),
  converted('cluster-4k', '4 KiB clusters', ['cluster_size=4k']),
  converted('cluster-2m', '2 MiB clusters', ['cluster_size=2M']),
  converted('cluster-2m-zstd', '2 MiB clusters, zstd-compressed', ['cluster_size=2M', 'compression_type=zstd'], { extraArgs: ['-c'] }),
  converted('refcount-1', 'refcount_bits=1', ['refcount_bits=1']),
  converted('refcount-64', 'refcount_bits=64', ['refcount_bits=64']),
  converted('lazy-refcounts', 'lazy_refcounts=on', ['lazy_refcounts=on']),
  converted('prealloc-metadata', 'preallocation=metadata', ['preallocation=metadata']),
  // QEMU 7.2 opens a relative data_file name relative to its working directory, not the image's
  // folder: every qemu command on this variant runs with the variant folder as cwd.
  converted('external-data-file', 'external data file (data_file=disk.data)', ['data_file=disk.data']),
  {
    name: 'backing-chain',
    description: '3-deep chain base <- mid <- top, writes/zeros/discards at each level; base in a sibling folder',
    // A hypervisor keeps shared bases apart from per-VM overlays, hence --allow-path.
    image: 'vm/top.qcow2',
    allowPaths: ['base'],
    async build(ctx) {
      fs.mkdirSync(path.join(ctx.dir, 'base'));
      fs.mkdirSync(path.join(ctx.dir, 'vm'));
      await convertDisk(ctx, 'base/base.qcow2');
      await qemuIo('base/base.qcow2', 'qcow2', guestWrites(0), ctx.dir);
      // Relative backing names are resolved against the overlay's folder, so the chain can move.
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', '../base/base.qcow2', '-F', 'qcow2', 'vm/mid.qcow2'], { cwd: ctx.dir });
      await qemuIo('vm/mid.qcow2', 'qcow2', guestWrites(1), ctx.dir);
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'vm/top.qcow2'], { cwd: ctx.dir });
      await qemuIo('vm/top.qcow2', 'qcow2', guestWrites(2), ctx.dir);
    },
  },
  {
    name: 'raw-backing-short',
    description: `overlay over a raw backing file of ${shortBackingSize} bytes (ends mid-cluster, not 4 KiB aligned), writes`,
    image: 'overlay.qcow2',
    async build(ctx) {
      await run('cp', ['--sparse=always', ctx.disk, 'short-base.raw'], { cwd: ctx.dir });
      fs.truncateSync(path.join(ctx.dir, 'short-base.raw'), shortBackingSize);
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'short-base.raw', '-F', 'raw', 'overlay.qcow2', String(diskSize)], { cwd: ctx.dir });
      // The cluster holding the backing file's end stays unallocated: the reader must take the
      // backing bytes up to the end and zeros after it. Its neighbours get written.
      const endCluster = Math.floor(shortBackingSize / (64 * KiB)) * 64 * KiB;
      await qemuIo('overlay.qcow2', 'qcow2', [
        ...guestWrites(1),
        `write -P 0x77 ${endCluster - 64 * KiB} ${4 * KiB}`,
        `write -P 0x78 ${endCluster + 128 * KiB} ${4 * KiB}`,
      ], ctx.dir);
    },
  },
  {
    name: 'snapshots',
    description: 'internal snapshots before-update (id 1) and after-update (id 2), writes after each',
    image: 'disk.qcow2',
    views: [
      { label: '@before-update', snapshot: 'before-update', qemuSnapshot: 'snapshot.name=before-update' },
      { label: '@id 2', snapshot: '2', qemuSnapshot: 'snapshot.id=2' },
    ],
    async build(ctx) {
      await convertDisk(ctx, 'disk.qcow2');
      await run('qemu-img', ['snapshot', '-c', 'before-update', 'disk.qcow2'], { cwd: ctx.dir });
      await qemuIo('disk.qcow2', 'qcow2', guestWrites(1), ctx.dir);
      await run('qemu-img', ['snapshot', '-c', 'after-update', 'disk.qcow2'], { cwd: ctx.dir });
      await qemuIo('disk.qcow2', 'qcow2', guestWrites(2), ctx.dir);
    },
  },
  {
    name: 'dirty-bit',
    description: 'lazy_refcounts copy with writes, then the dirty bit (incompatible feature bit 0) set by hand',
    image: 'disk.qcow2',
    async build(ctx) {
      await convertDisk(ctx, 'disk.qcow2', ['lazy_refcounts=on']);
      await qemuIo('disk.qcow2', 'qcow2', guestWrites(0), ctx.dir);
      setDirtyBit(path.join(ctx.dir, 'disk.qcow2'));
    },
  },
  {
    name: 'extended-l2-overlay',
    description: 'extended_l2 128 KiB overlay over the raw disk, subcluster-sized writes/zeros/discards; base outside its folder',
    image: 'overlay.qcow2',
    allowPaths: ['../..'],
    async build(ctx) {
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', '-b', '../../os.raw', '-F', 'raw', 'overlay.qcow2'], { cwd: ctx.dir });
      await qemuIo('overlay.qcow2', 'qcow2', [...subclusterWrites, ...guestWrites(1)], ctx.dir);
    },
  },
];

export const variantNames = variantDefinitions.map((definition) => definition.name);

/** Sets incompatible feature bit 0 (dirty): the 8-byte big-endian field at offset 72 of a v3 header. */
function setDirtyBit(imagePath) {
  const fd = fs.openSync(imagePath, 'r+');
  try {
    const field = Buffer.alloc(8);
    fs.readSync(fd, field, 0, 8, 72);
    field.writeBigUInt64BE(field.readBigUInt64BE(0) | 1n, 0);
    fs.writeSync(fd, field, 0, 8, 72);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Lists files to copy, in a stable order, until the budget is spent. A file that would overshoot
 * is skipped and smaller ones after it still fill the gap. Also counted in whole 4 KiB blocks, so
 * the filesystem cannot run out of space half-way through the copy.
 */
function pickFiles(budgetBytes, blockLimitBytes) {
  const picked = [];
  const seenInodes = new Set();
  let blockBytes = 0;
  let dataBytes = 0;
  const walk = (dir) => {
    let entries;
    try {
      entries = fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1));
    } catch {
      return;
    }
    for (const entry of entries) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) {
        walk(full);
      } else if (entry.isFile() || entry.isSymbolicLink()) {
        const stats = fs.lstatSync(full);
        const key = `${stats.dev}:${stats.ino}`;
        if (seenInodes.has(key)) continue;
        const size = entry.isFile() ? stats.size : 0;
        const blocks = Math.ceil(size / 4096) * 4096;
        if (dataBytes + size > budgetBytes || blockBytes + blocks > blockLimitBytes) continue;
        seenInodes.add(key);
        blockBytes += blocks;
        dataBytes += size;
        picked.push(full.slice(1));
      }
    }
  };
  for (const source of copySources) walk(source);
  return { files: picked, dataBytes, blockBytes };
}

function checkedSpawnSync(command, args) {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')}: ${result.stderr.trim()}`);
}

/** Unmounts, waiting a little for killed children to let go; lazily as a last resort. */
function unmount(mountPoint) {
  for (let attempt = 0; attempt < 20; attempt += 1) {
    if (spawnSync('umount', [mountPoint]).status === 0) return;
    spawnSync('sleep', ['0.25']);
  }
  checkedSpawnSync('umount', ['-l', mountPoint]);
}

/**
 * Copies the listed files (relative to /) into `destination` with tar, which keeps symlinks, hard
 * links and modes and creates the parent folders. Two tracked children rather than a shell pipe,
 * so a signal handler can stop both.
 */
function copyFiles(listPath, destination) {
  return new Promise((resolve, reject) => {
    const create = track(spawn('tar', ['-C', '/', '--null', '--no-recursion', '-T', listPath, '-cf', '-'], { stdio: ['ignore', 'pipe', 'pipe'] }));
    const extract = track(spawn('tar', ['-C', destination, '-xf', '-'], { stdio: ['pipe', 'ignore', 'pipe'] }));
    create.stdout.pipe(extract.stdin);
    const errors = [];
    let pending = 2;
    for (const [name, child] of [['tar -c', create], ['tar -x', extract]]) {
      let stderr = '';
      child.stderr.on('data', (chunk) => (stderr += chunk));
      child.on('error', reject);
      child.on('close', (code, signal) => {
        if (code !== 0) errors.push(`${name}: ${signal ?? `exit ${code}`} ${stderr.trim()}`);
        if (--pending === 0) (errors.length ? reject(new Error(`copying files failed: ${errors.join('; ')}`)) : resolve());
      });
    }
  });
}

async function buildDisk(cacheDir, log) {
  const diskPath = path.join(cacheDir, 'os.raw');
  const partialPath = `${diskPath}.partial`;
  const mountPoint = path.join(cacheDir, 'mnt');
  ensureFreeSpace(cacheDir, diskSize + 1 * GiB, 'the raw disk');
  const started = performance.now();
  fs.writeFileSync(partialPath, '');
  fs.truncateSync(partialPath, diskSize);
  await run('sfdisk', ['--quiet', partialPath], {
    input: `label: gpt\nsize=${bootPartitionSize / MiB}MiB, type=U, name="EFI system"\ntype=L, name="root"\n`,
  });
  const table = JSON.parse((await run('sfdisk', ['--json', partialPath])).stdout).partitiontable;
  const sectorSize = table.sectorsize ?? 512;
  const root = table.partitions[1];
  const rootOffset = root.start * sectorSize;
  const rootSize = root.size * sectorSize;

  const { files, dataBytes, blockBytes } = pickFiles(copyBudgetBytes, copyBlockLimitBytes);
  const listPath = path.join(cacheDir, 'files.list');
  fs.writeFileSync(listPath, files.join('\0'));

  const resources = new Cleanup();
  try {
    const loopDevice = (await run('losetup', ['--find', '--show', '--offset', String(rootOffset), '--sizelimit', String(rootSize), partialPath])).stdout.trim();
    resources.add(`losetup ${loopDevice}`, () => checkedSpawnSync('losetup', ['-d', loopDevice]));
    await run('mkfs.ext4', ['-q', '-L', 'root', loopDevice]);
    fs.mkdirSync(mountPoint, { recursive: true });
    await run('mount', [loopDevice, mountPoint]);
    resources.add(`mount ${mountPoint}`, () => unmount(mountPoint));
    await copyFiles(listPath, mountPoint);
    const used = fs.statfsSync(mountPoint);
    log(`  root filesystem: ${humanBytes((used.blocks - used.bfree) * used.bsize)} used of ${humanBytes(used.blocks * used.bsize)}`);
  } finally {
    resources.release();
    fs.rmSync(mountPoint, { recursive: true, force: true });
    fs.rmSync(listPath, { force: true });
  }
  checkedSpawnSync('sync', []);
  fs.renameSync(partialPath, diskPath);
  const elapsed = (performance.now() - started) / 1000;
  log(`built os.raw: ${humanBytes(diskSize)} GPT disk, root partition at offset ${rootOffset} (${humanBytes(rootSize)} ext4), ` +
    `${files.length} files, ${(dataBytes / 1e9).toFixed(2)} GB of data (${(blockBytes / 1e9).toFixed(2)} GB in 4 KiB blocks), in ${elapsed.toFixed(1)} s`);
}

function diskIdentity(diskPath) {
  const stats = fs.statSync(diskPath);
  return `${stats.ino}:${stats.mtimeMs}`;
}

/** Changes when the way a variant is made changes, so an edited recipe is rebuilt. */
export function recipeDigest(definition) {
  const parts = [definition.recipe ?? '', definition.image, definition.build.toString(), guestWrites.toString(), JSON.stringify(subclusterWrites)];
  return createHash('sha256').update(parts.join('\0')).digest('hex').slice(0, 16);
}

function allocatedBytes(dir) {
  let total = 0;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += fs.statSync(path.join(entry.parentPath ?? entry.path, entry.name)).blocks * 512;
  }
  return total;
}

function describe(definition, cacheDir) {
  const dir = path.join(cacheDir, 'variants', definition.name);
  return {
    name: definition.name,
    description: definition.description,
    dir,
    image: path.join(dir, definition.image),
    allowPaths: (definition.allowPaths ?? []).map((relative) => path.resolve(dir, relative)),
    views: [{ label: '', snapshot: undefined, qemuSnapshot: undefined }, ...(definition.views ?? [])],
    virtualSize: diskSize,
  };
}

function readMarker(markerPath) {
  try {
    return JSON.parse(fs.readFileSync(markerPath, 'utf8'));
  } catch {
    return undefined;
  }
}

/**
 * Several benchmarks may start at once and share the cache: one builds while the others wait, so no
 * two processes write the same files. The lock is a directory (mkdir is atomic) holding the owner's
 * pid; a lock whose owner died is taken over.
 */
async function withBuildLock(cacheDir, log, work) {
  const lockDir = path.join(cacheDir, '.build-lock');
  const pidFile = path.join(lockDir, 'pid');
  for (let announced = false; ; announced = true) {
    try {
      fs.mkdirSync(lockDir);
      break;
    } catch (error) {
      if (error.code !== 'EEXIST') throw error;
    }
    let owner;
    try {
      owner = Number(fs.readFileSync(pidFile, 'utf8')) || undefined;
    } catch {
      owner = undefined;
    }
    // No pid a minute after the lock was made: its owner died between mkdir and writing it.
    const orphaned = owner === undefined && Date.now() - (fs.statSync(lockDir, { throwIfNoEntry: false })?.mtimeMs ?? 0) > 60_000;
    if ((owner !== undefined && !isAlive(owner)) || orphaned) {
      fs.rmSync(lockDir, { recursive: true, force: true });
      continue;
    }
    if (!announced) log(`waiting for another process building in ${cacheDir} (pid ${owner ?? 'unknown'})...`);
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
  fs.writeFileSync(pidFile, String(process.pid));
  try {
    return await work();
  } finally {
    fs.rmSync(lockDir, { recursive: true, force: true });
  }
}

/**
 * Builds what is missing (the disk, then the variants asked for) and returns their descriptions:
 * { name, description, dir, image, allowPaths, views, virtualSize }.
 */
export async function buildRealisticImages({ cacheDir = defaultCacheDir, only, rebuild = false, log = console.log } = {}) {
  const wanted = only ?? variantNames;
  const unknown = wanted.filter((name) => !variantNames.includes(name));
  if (unknown.length) throw new Error(`unknown variant ${unknown.join(', ')}; known: ${variantNames.join(', ')}`);
  const definitions = variantDefinitions.filter((d) => wanted.includes(d.name));
  const diskPath = path.join(cacheDir, 'os.raw');
  // A variant made from an older os.raw or by an older recipe is stale.
  const isStale = (definition) => {
    const marker = readMarker(path.join(cacheDir, 'variants', definition.name, '.complete.json'));
    return rebuild || marker?.disk !== diskIdentity(diskPath) || marker?.recipe !== recipeDigest(definition);
  };
  const upToDate = () => fs.existsSync(diskPath) && !definitions.some(isStale);

  if (!upToDate()) {
    fs.mkdirSync(path.join(cacheDir, 'variants'), { recursive: true });
    await withBuildLock(cacheDir, log, async () => {
      if (!fs.existsSync(diskPath)) await buildDisk(cacheDir, log);
      for (const definition of definitions) {
        // Checked again under the lock: another process may have just built it.
        if (!isStale(definition)) continue;
        const dir = path.join(cacheDir, 'variants', definition.name);
        fs.rmSync(dir, { recursive: true, force: true });
        fs.mkdirSync(dir, { recursive: true });
        ensureFreeSpace(cacheDir, diskSize + 1 * GiB, `variant ${definition.name}`);
        const started = performance.now();
        await definition.build({ dir, disk: diskPath });
        const elapsed = (performance.now() - started) / 1000;
        const marker = { disk: diskIdentity(diskPath), recipe: recipeDigest(definition), builtAt: new Date().toISOString(), seconds: elapsed };
        fs.writeFileSync(path.join(dir, '.complete.json'), JSON.stringify(marker) + '\n');
        log(`built ${definition.name} in ${elapsed.toFixed(1)} s: ${definition.description} (${humanBytes(allocatedBytes(dir))} on disk)`);
      }
    });
  }
  return definitions.map((definition) => describe(definition, cacheDir));
}

async function main() {
  const { values } = parseArgs({
    options: {
      only: { type: 'string' },
      rebuild: { type: 'boolean' },
      list: { type: 'boolean' },
      'cache-dir': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log('usage: node benchmarks/realistic-image.mjs [--only NAME,...] [--rebuild] [--list] [--cache-dir DIR]');
    console.log(`variants: ${variantNames.join(', ')}`);
    return;
  }
  if (values.list) {
    console.log(markdownTable(['variant', 'what'], variantDefinitions.map((d) => [d.name, d.description])));
    return;
  }
  const cacheDir = path.resolve(values['cache-dir'] ?? defaultCacheDir);
  const started = performance.now();
  const variants = await buildRealisticImages({ cacheDir, only: values.only?.split(','), rebuild: values.rebuild });
  console.log(`\n${variants.length} variants ready in ${cacheDir} (${((performance.now() - started) / 1000).toFixed(1)} s this run):\n`);
  console.log(markdownTable(
    ['variant', 'image', 'on disk', 'built in'],
    variants.map((v) => {
      const marker = JSON.parse(fs.readFileSync(path.join(v.dir, '.complete.json'), 'utf8'));
      return [v.name, path.relative(cacheDir, v.image), humanBytes(allocatedBytes(v.dir)), `${marker.seconds.toFixed(1)} s`];
    }),
  ));
}

if (process.argv[1] && path.resolve(process.argv[1]) === path.resolve(new URL(import.meta.url).pathname)) {
  main().catch((error) => {
    console.error(`realistic-image: ${error.message}`);
    process.exitCode = 1;
  });
}

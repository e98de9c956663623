#!/usr/bin/env node
// Stops the native build early, in one line, when a library's headers are missing;
// a prebuilt addon for this platform needs none of them.
'use strict';
const fs = require('fs');
const path = require('path');

const prebuilt = path.join(__dirname, '..', 'prebuilds', `${process.platform}-${process.arch}`);
if (fs.existsSync(prebuilt) && fs.readdirSync(prebuilt).some((f) => f.endsWith('.node'))) process.exit(0);

const needed = [
  { header: 'libdeflate.h', pkg: 'libdeflate-dev' },
  { header: 'zstd.h', pkg: 'libzstd-dev' },
  { header: 'xxhash.h', pkg: 'libxxhash-dev' },
  { header: 'isa-l/igzip_lib.h', pkg: 'libisal-dev' },
  { header: 'liburing.h', pkg: 'liburing-dev' },
  { header: 'zlib.h', pkg: 'zlib1g-dev' },
];
const includeDirs = ['/usr/include', '/usr/local/include', ...(process.env.CPATH || '').split(':').filter(Boolean)];
const missing = needed.filter(({ header }) => !includeDirs.some((dir) => fs.existsSync(path.join(dir, header))));
if (missing.length > 0) {
  console.error(`qcow2img: cannot build the native addon: ${missing.map((m) => m.header).join(', ')} not found; install ${missing.map((m) => m.pkg).join(' ')} (Debian/Ubuntu: apt-get install ${missing.map((m) => m.pkg).join(' ')})`);
  process.exit(1);
}

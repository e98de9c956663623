// The one numbering of compression codecs in memory, shared by every engine (cluster
// decompression, cluster compression, the VM state page engine) and held equal to
// src/native.ts `Codec` by test/package/addon-arguments.test.ts (the addon exports these values).
// It is not a file format: a file that stores a codec number (qcow2's compression_type, a
// VM state CHUNK's codec byte) keeps its own table and maps to this one explicitly.
#pragma once

namespace qcow2img {

enum class Codec : int {
  None = 0,     // stored as is (capture: clusters stay uncompressed; copy: a source with no
                // compressed clusters, so one found is invalid data)
  Deflate = 1,  // raw deflate (RFC 1951)
  Zstd = 2,     // zstd frames
};

}  // namespace qcow2img

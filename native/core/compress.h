// Cluster compression for qcow2 writers: raw deflate with a 4 KiB window (as
// QEMU's own deflateInit2(-12) produces: every reader can inflate it), or zstd.
// Deflate comes from ISA-L (levels 0-3, about 10x faster than zlib) and zlib
// (levels 5-9, and the second pass of level 4); the prebuilt addon has both inside.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "codec.h"

struct ZSTD_CCtx_s;
struct z_stream_s;

namespace qcow2img {

class ClusterCompressor {
 public:
  // level: deflate 0..3 (ISA-L's levels), 4 (ISA-L's 3, then zlib's 5 on the clusters it left
  // at 59-82% of their size) or 5..9 (zlib's); zstd 1..19 (negative: fast modes).
  ClusterCompressor(Codec codec, int level);
  ~ClusterCompressor();
  ClusterCompressor(const ClusterCompressor&) = delete;
  ClusterCompressor& operator=(const ClusterCompressor&) = delete;

  bool ok() const { return ok_; }
  // Compressed length, or 0 when the result would not fit in `limit` bytes
  // (the caller then stores the cluster uncompressed).
  size_t compress(const uint8_t* input, size_t inputSize, uint8_t* output, size_t limit);

 private:
  size_t compressIsal(const uint8_t* input, size_t inputSize, uint8_t* output, size_t limit, int level);
  size_t compressZlib(const uint8_t* input, size_t inputSize, uint8_t* output, size_t limit);

  Codec codec_;
  int level_;
  bool ok_ = true;
  bool useIsal_ = false;
  std::vector<uint8_t> deflateLevelBuffer_;
  std::vector<uint8_t> refined_;  // zlib's attempt at a cluster ISA-L compressed first
  ::z_stream_s* zlibStream_ = nullptr;  // levels 4-9: zlib's encoder
  ::ZSTD_CCtx_s* zstd_ = nullptr;
};

// True when all `length` bytes are zero.
bool isAllZero(const uint8_t* data, size_t length);

}  // namespace qcow2img

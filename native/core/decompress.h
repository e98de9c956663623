// Cluster decompression for qcow2 compression types 0 (raw deflate: Codec::Deflate) and 1
// (zstd: Codec::Zstd); Codec::None has no compressed clusters, so any is BadData.
// Plain C++17 over byte spans: no Node-API, no format policy beyond "fill exactly N bytes".
#pragma once
#include <cstddef>
#include <cstdint>

#include "codec.h"

struct libdeflate_decompressor;
struct ZSTD_DCtx_s;

namespace qcow2img {

enum class DecompressStatus : int {
  Ok = 0,
  BadData = 1,      // the stream is not valid for its codec
  ShortOutput = 2,  // the stream ended before `outputSize` bytes came out
  LongOutput = 3,   // the stream holds more than `outputSize` bytes
  NoMemory = 4,
};

const char* decompressStatusName(DecompressStatus status);

// One decompressor per thread; reuses the codec contexts across calls.
class ClusterDecompressor {
 public:
  ClusterDecompressor();
  ~ClusterDecompressor();
  ClusterDecompressor(const ClusterDecompressor&) = delete;
  ClusterDecompressor& operator=(const ClusterDecompressor&) = delete;

  // Decompresses `input` (whose length is an upper bound: the stream may end
  // sooner, followed by unrelated bytes) into exactly `outputSize` bytes.
  DecompressStatus decompress(Codec codec, const uint8_t* input, size_t inputSize,
                              uint8_t* output, size_t outputSize);

 private:
  DecompressStatus inflateRaw(const uint8_t* input, size_t inputSize, uint8_t* output,
                              size_t outputSize);
  DecompressStatus decompressZstd(const uint8_t* input, size_t inputSize, uint8_t* output,
                                  size_t outputSize);
  ::libdeflate_decompressor* deflate_ = nullptr;
  ::ZSTD_DCtx_s* zstd_ = nullptr;
};

}  // namespace qcow2img

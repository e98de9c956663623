#include "decompress.h"

#include <libdeflate.h>
#include <zstd.h>
#include <zstd_errors.h>

namespace qcow2img {

const char* decompressStatusName(DecompressStatus status) {
  switch (status) {
    case DecompressStatus::Ok: return "ok";
    case DecompressStatus::BadData: return "invalid compressed data";
    case DecompressStatus::ShortOutput: return "compressed data decodes to less than a cluster";
    case DecompressStatus::LongOutput: return "compressed data decodes to more than a cluster";
    case DecompressStatus::NoMemory: return "out of memory";
  }
  return "unknown";
}

ClusterDecompressor::ClusterDecompressor()
    : deflate_(libdeflate_alloc_decompressor()), zstd_(ZSTD_createDCtx()) {}

ClusterDecompressor::~ClusterDecompressor() {
  if (deflate_ != nullptr) libdeflate_free_decompressor(deflate_);
  if (zstd_ != nullptr) ZSTD_freeDCtx(zstd_);
}

DecompressStatus ClusterDecompressor::decompress(Codec codec, const uint8_t* input,
                                                 size_t inputSize, uint8_t* output,
                                                 size_t outputSize) {
  switch (codec) {
    case Codec::Deflate: return inflateRaw(input, inputSize, output, outputSize);
    case Codec::Zstd: return decompressZstd(input, inputSize, output, outputSize);
    case Codec::None: break;
  }
  return DecompressStatus::BadData;
}

DecompressStatus ClusterDecompressor::inflateRaw(const uint8_t* input, size_t inputSize,
                                                 uint8_t* output, size_t outputSize) {
  if (deflate_ == nullptr) return DecompressStatus::NoMemory;
  // libdeflate stops at the final block, so bytes after the stream (the next
  // compressed cluster, sector padding) are ignored as QEMU's inflate ignores them.
  size_t produced = 0;
  libdeflate_result result =
      libdeflate_deflate_decompress(deflate_, input, inputSize, output, outputSize, &produced);
  switch (result) {
    case LIBDEFLATE_SUCCESS:
      return produced == outputSize ? DecompressStatus::Ok : DecompressStatus::ShortOutput;
    case LIBDEFLATE_SHORT_OUTPUT: return DecompressStatus::ShortOutput;
    case LIBDEFLATE_INSUFFICIENT_SPACE: return DecompressStatus::LongOutput;
    default: return DecompressStatus::BadData;
  }
}

DecompressStatus ClusterDecompressor::decompressZstd(const uint8_t* input, size_t inputSize,
                                                     uint8_t* output, size_t outputSize) {
  if (zstd_ == nullptr) return DecompressStatus::NoMemory;
  // A cluster may hold several frames (QEMU's writer may split); decode frame by
  // frame in one-shot mode, which avoids the streaming decoder's internal copy.
  size_t produced = 0;
  size_t consumed = 0;
  while (produced < outputSize) {
    if (consumed >= inputSize) return DecompressStatus::ShortOutput;
    size_t frameSize = ZSTD_findFrameCompressedSize(input + consumed, inputSize - consumed);
    if (ZSTD_isError(frameSize) || frameSize == 0) return DecompressStatus::BadData;
    size_t frameOutput = ZSTD_decompressDCtx(zstd_, output + produced, outputSize - produced,
                                             input + consumed, frameSize);
    if (ZSTD_isError(frameOutput)) {
      return ZSTD_getErrorCode(frameOutput) == ZSTD_error_dstSize_tooSmall
                 ? DecompressStatus::LongOutput
                 : DecompressStatus::BadData;
    }
    // frameSize > 0, so every pass consumes input: hostile streams cannot loop.
    produced += frameOutput;
    consumed += frameSize;
  }
  return DecompressStatus::Ok;
}

}  // namespace qcow2img

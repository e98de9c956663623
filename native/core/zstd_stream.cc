#include "zstd_stream.h"

#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>

namespace qcow2img {

ZstdStream::ZstdStream(bool compress, int level, int workers) : compress_(compress) {
  if (compress) {
    encoder_ = ZSTD_createCCtx();
    if (!encoder_) {
      initError_ = "out of memory";
      return;
    }
    size_t status = ZSTD_CCtx_setParameter(encoder_, ZSTD_c_compressionLevel, level);
    // Checksummed frames: `zstd -t` and our reader catch a damaged archive by itself.
    if (!ZSTD_isError(status)) status = ZSTD_CCtx_setParameter(encoder_, ZSTD_c_checksumFlag, 1);
    if (!ZSTD_isError(status) && workers > 0) {
      // A libzstd without threads refuses nbWorkers; it then compresses in this thread.
      ZSTD_CCtx_setParameter(encoder_, ZSTD_c_nbWorkers, workers);
    }
    if (ZSTD_isError(status)) initError_ = ZSTD_getErrorName(status);
  } else {
    decoder_ = ZSTD_createDCtx();
    if (!decoder_) {
      initError_ = "out of memory";
      return;
    }
    // 2^27 = 128 MiB: what `zstd` itself accepts without --long; bounds memory on hostile input.
    size_t status = ZSTD_DCtx_setParameter(decoder_, ZSTD_d_windowLogMax, 27);
    if (ZSTD_isError(status)) initError_ = ZSTD_getErrorName(status);
  }
}

ZstdStream::~ZstdStream() {
  ZSTD_freeCCtx(encoder_);
  ZSTD_freeDCtx(decoder_);
}

StreamStep ZstdStream::step(const uint8_t* input, size_t inputSize, uint8_t* output, size_t outputSize, bool end) {
  StreamStep result;
  ZSTD_inBuffer in{input, inputSize, 0};
  ZSTD_outBuffer out{output, outputSize, 0};
  if (compress_) {
    size_t remaining = ZSTD_compressStream2(encoder_, &out, &in, end ? ZSTD_e_end : ZSTD_e_continue);
    if (ZSTD_isError(remaining)) {
      result.error = ZSTD_getErrorName(remaining);
      return result;
    }
    result.finished = end && remaining == 0 && in.pos == in.size;
  } else {
    // Loop so that one call crosses frame boundaries and flushes what the decoder holds.
    // `finished` tells whether the last call that moved anything ended a frame: a
    // call without progress (no input left) says nothing about the stream.
    size_t lastHint = 1;
    for (;;) {
      size_t inBefore = in.pos, outBefore = out.pos;
      size_t hint = ZSTD_decompressStream(decoder_, &out, &in);
      if (ZSTD_isError(hint)) {
        result.error = ZSTD_getErrorName(hint);
        return result;
      }
      if (in.pos == inBefore && out.pos == outBefore) break;
      lastHint = hint;
      if (out.pos == out.size) break;
    }
    result.finished = lastHint == 0;
  }
  result.consumed = in.pos;
  result.produced = out.pos;
  return result;
}

}  // namespace qcow2img

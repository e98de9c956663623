#include "compress.h"

#include <isa-l/igzip_lib.h>
#include <zstd.h>

#include <cstring>

namespace qcow2img {

namespace {
size_t deflateLevelBufferSize(int level) {
  switch (level) {
    case 1: return ISAL_DEF_LVL1_DEFAULT;
    case 2: return ISAL_DEF_LVL2_DEFAULT;
    case 3: return ISAL_DEF_LVL3_DEFAULT;
    default: return 0;
  }
}
}  // namespace

ClusterCompressor::ClusterCompressor(CompressCodec codec, int level) : codec_(codec), level_(level) {
  if (codec_ == CompressCodec::Deflate) {
    if (level_ < 0 || level_ > 3) level_ = 3;
    deflateLevelBuffer_.resize(deflateLevelBufferSize(level_));
  } else if (codec_ == CompressCodec::Zstd) {
    zstd_ = ZSTD_createCCtx();
    ok_ = zstd_ != nullptr &&
          !ZSTD_isError(ZSTD_CCtx_setParameter(zstd_, ZSTD_c_compressionLevel, level_)) &&
          // Readers decode one cluster at a time; a checksum would only cost bytes.
          !ZSTD_isError(ZSTD_CCtx_setParameter(zstd_, ZSTD_c_checksumFlag, 0));
  }
}

ClusterCompressor::~ClusterCompressor() {
  if (zstd_ != nullptr) ZSTD_freeCCtx(zstd_);
}

size_t ClusterCompressor::compress(const uint8_t* input, size_t inputSize, uint8_t* output,
                                   size_t limit) {
  if (codec_ == CompressCodec::Deflate) {
    isal_zstream stream;
    isal_deflate_stateless_init(&stream);
    stream.next_in = const_cast<uint8_t*>(input);
    stream.avail_in = static_cast<uint32_t>(inputSize);
    stream.next_out = output;
    stream.avail_out = static_cast<uint32_t>(limit);
    stream.end_of_stream = 1;
    stream.flush = NO_FLUSH;
    stream.level = static_cast<uint32_t>(level_);
    stream.level_buf = deflateLevelBuffer_.empty() ? nullptr : deflateLevelBuffer_.data();
    stream.level_buf_size = static_cast<uint32_t>(deflateLevelBuffer_.size());
    stream.gzip_flag = IGZIP_DEFLATE;
    // A 4 KiB window, like QEMU's writer: readers that inflate in pieces need it.
    stream.hist_bits = 12;
    if (isal_deflate_stateless(&stream) != COMP_OK) return 0;
    return stream.total_out < limit ? stream.total_out : 0;
  }
  if (codec_ == CompressCodec::Zstd) {
    size_t n = ZSTD_compress2(zstd_, output, limit, input, inputSize);
    if (ZSTD_isError(n) || n >= limit) return 0;
    return n;
  }
  return 0;
}

bool isAllZero(const uint8_t* data, size_t length) {
  if (length == 0) return true;
  if (length < 16) {
    for (size_t i = 0; i < length; i++) if (data[i]) return false;
    return true;
  }
  // Non-zero data usually shows in the first words; then one overlapping
  // memcmp, which libc vectorises, checks the rest.
  uint64_t head[2];
  memcpy(head, data, 16);
  if (head[0] | head[1]) return false;
  return memcmp(data, data + 16, length - 16) == 0;
}

}  // namespace qcow2img

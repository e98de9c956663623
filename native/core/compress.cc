#include "compress.h"

#include <isa-l/igzip_lib.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>

namespace qcow2img {

namespace {

// The deflate level that refines ISA-L's output with zlib's where that pays (see compress()).
constexpr int kRefinedLevel = 4;
// The zlib level of that second pass, and the band of ISA-L's results (percent of the cluster)
// it is tried on. Measured per cluster on a disk of system files (docs/formats/qcow2.md,
// "Compression levels"): zlib gains about 1 MB per CPU second on any cluster ISA-L compressed, so
// the band is as narrow as reaches 1.05x the size of zlib's 6 everywhere; level 5 costs less
// than 6 there for the same bytes.
constexpr int kRefineZlibLevel = 5;
constexpr size_t kRefineFromPercent = 59;
constexpr size_t kRefineBelowPercent = 82;

size_t deflateLevelBufferSize(int level) {
  switch (level) {
    case 1: return ISAL_DEF_LVL1_DEFAULT;
    case 2: return ISAL_DEF_LVL2_DEFAULT;
    case 3: return ISAL_DEF_LVL3_DEFAULT;
    default: return 0;
  }
}

}  // namespace

ClusterCompressor::ClusterCompressor(Codec codec, int level) : codec_(codec), level_(level) {
  if (codec_ == Codec::Deflate) {
    if (level_ < 0 || level_ > 9) level_ = kRefinedLevel;
    // Levels 0-3 are ISA-L's (fast, a few percent larger than zlib's 6); 5-9 are zlib's own,
    // for output as small as QEMU's at zlib's speed; 4 is ISA-L's 3 with zlib's 6 where it pays.
    useIsal_ = level_ <= kRefinedLevel;
    if (useIsal_) deflateLevelBuffer_.resize(deflateLevelBufferSize(std::min(level_, 3)));
    if (level_ >= kRefinedLevel) {
      auto* stream = new z_stream();
      // windowBits -12: raw deflate, 4 KiB window, as QEMU writes.
      if (deflateInit2(stream, useIsal_ ? kRefineZlibLevel : level_, Z_DEFLATED, -12, 8, Z_DEFAULT_STRATEGY) == Z_OK) {
        zlibStream_ = stream;
      } else {
        delete stream;
        ok_ = false;
      }
    }
  } else if (codec_ == Codec::Zstd) {
    zstd_ = ZSTD_createCCtx();
    ok_ = zstd_ != nullptr &&
          !ZSTD_isError(ZSTD_CCtx_setParameter(zstd_, ZSTD_c_compressionLevel, level_)) &&
          // Readers decode one cluster at a time; a checksum would only cost bytes.
          !ZSTD_isError(ZSTD_CCtx_setParameter(zstd_, ZSTD_c_checksumFlag, 0));
  }
}

ClusterCompressor::~ClusterCompressor() {
  if (zstd_ != nullptr) ZSTD_freeCCtx(zstd_);
  if (zlibStream_ != nullptr) {
    deflateEnd(zlibStream_);
    delete zlibStream_;
  }
}

size_t ClusterCompressor::compress(const uint8_t* input, size_t inputSize, uint8_t* output,
                                   size_t limit) {
  if (codec_ == Codec::Deflate && !useIsal_) return compressZlib(input, inputSize, output, limit);
  if (codec_ == Codec::Deflate) {
    size_t length = compressIsal(input, inputSize, output, limit, std::min(level_, 3));
    if (level_ == kRefinedLevel && length >= inputSize * kRefineFromPercent / 100 &&
        length < inputSize * kRefineBelowPercent / 100) {
      if (refined_.size() < length) refined_.resize(length);
      size_t better = compressZlib(input, inputSize, refined_.data(), length - 1);
      if (better > 0) {
        memcpy(output, refined_.data(), better);
        length = better;
      }
    }
    return length;
  }
  if (codec_ == Codec::Zstd) {
    size_t n = ZSTD_compress2(zstd_, output, limit, input, inputSize);
    if (ZSTD_isError(n) || n > limit) return 0;
    return n;
  }
  return 0;
}

size_t ClusterCompressor::compressZlib(const uint8_t* input, size_t inputSize, uint8_t* output, size_t limit) {
  z_stream* stream = zlibStream_;
  deflateReset(stream);
  stream->next_in = const_cast<uint8_t*>(input);
  stream->avail_in = static_cast<uInt>(inputSize);
  stream->next_out = output;
  stream->avail_out = static_cast<uInt>(limit);
  if (deflate(stream, Z_FINISH) != Z_STREAM_END) return 0;  // did not fit
  return stream->total_out <= limit ? stream->total_out : 0;
}

size_t ClusterCompressor::compressIsal(const uint8_t* input, size_t inputSize, uint8_t* output, size_t limit,
                                       int level) {
  isal_zstream stream;
  isal_deflate_stateless_init(&stream);
  stream.next_in = const_cast<uint8_t*>(input);
  stream.avail_in = static_cast<uint32_t>(inputSize);
  stream.next_out = output;
  stream.avail_out = static_cast<uint32_t>(limit);
  stream.end_of_stream = 1;
  stream.flush = NO_FLUSH;
  stream.level = static_cast<uint32_t>(level);
  stream.level_buf = deflateLevelBuffer_.empty() ? nullptr : deflateLevelBuffer_.data();
  stream.level_buf_size = static_cast<uint32_t>(deflateLevelBuffer_.size());
  stream.gzip_flag = IGZIP_DEFLATE;
  // A 4 KiB window, like QEMU's writer: readers that inflate in pieces need it.
  stream.hist_bits = 12;
  if (isal_deflate_stateless(&stream) != COMP_OK) return 0;
  return stream.total_out <= limit ? stream.total_out : 0;
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

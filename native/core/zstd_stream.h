// Streaming zstd for archives (.tar.zst): an encoder over libzstd's own worker
// threads and a decoder that accepts any zstd stream, frames concatenated or not.
// Plain step functions over caller buffers; the caller drives the loop.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

struct ZSTD_CCtx_s;
struct ZSTD_DCtx_s;

namespace qcow2img {

struct StreamStep {
  size_t consumed = 0;   // input bytes taken
  size_t produced = 0;   // output bytes written
  bool finished = false; // encoder: the frame is closed; decoder: a frame ended exactly here
  std::string error;     // set when the step failed (the stream is then unusable)
};

class ZstdStream {
 public:
  // compress: level 1..19 and `workers` libzstd threads (0: in the calling thread).
  // decompress: level and workers ignored; windowLogMax bounds the decoder's memory.
  ZstdStream(bool compress, int level, int workers);
  ~ZstdStream();
  ZstdStream(const ZstdStream&) = delete;
  ZstdStream& operator=(const ZstdStream&) = delete;

  const std::string& initError() const { return initError_; }
  // Takes input and fills output; with `end`, the encoder flushes and closes its
  // frame (call again while finished is false and output fills).
  StreamStep step(const uint8_t* input, size_t inputSize, uint8_t* output, size_t outputSize, bool end);

 private:
  bool compress_;
  std::string initError_;
  ::ZSTD_CCtx_s* encoder_ = nullptr;
  ::ZSTD_DCtx_s* decoder_ = nullptr;
};

}  // namespace qcow2img

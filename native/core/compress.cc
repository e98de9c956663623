#include "compress.h"

#include <dlfcn.h>
#include <isa-l/igzip_lib.h>
#include <zstd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace qcow2img {

namespace {

// The few entry points used, resolved once per process.
struct DeflateLibraries {
  void (*isalInit)(isal_zstream*) = nullptr;
  int (*isalStateless)(isal_zstream*) = nullptr;
  // zlib, declared by hand so that no zlib headers are needed to build.
  int (*zlibInit2)(void*, int, int, int, int, int, const char*, int) = nullptr;
  int (*zlibDeflate)(void*, int) = nullptr;
  int (*zlibReset)(void*) = nullptr;
  int (*zlibEnd)(void*) = nullptr;
  const char* zlibVersion = nullptr;
};

const DeflateLibraries& deflateLibraries() {
  static DeflateLibraries libraries;
  static std::once_flag once;
  std::call_once(once, [] {
    // QCOW2IMG_DEFLATE=zlib forces the fallback (tests; a system whose ISA-L misbehaves).
    const char* forced = getenv("QCOW2IMG_DEFLATE");
    bool allowIsal = forced == nullptr || strcmp(forced, "zlib") != 0;
    if (void* isal = allowIsal ? dlopen("libisal.so.2", RTLD_NOW | RTLD_LOCAL) : nullptr) {
      libraries.isalInit = reinterpret_cast<void (*)(isal_zstream*)>(dlsym(isal, "isal_deflate_stateless_init"));
      libraries.isalStateless = reinterpret_cast<int (*)(isal_zstream*)>(dlsym(isal, "isal_deflate_stateless"));
    }
    // DEEPBIND: Node exports a zlib of its own, whose symbols would otherwise win.
    if (void* zlib = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND)) {
      libraries.zlibInit2 = reinterpret_cast<int (*)(void*, int, int, int, int, int, const char*, int)>(dlsym(zlib, "deflateInit2_"));
      libraries.zlibDeflate = reinterpret_cast<int (*)(void*, int)>(dlsym(zlib, "deflate"));
      libraries.zlibReset = reinterpret_cast<int (*)(void*)>(dlsym(zlib, "deflateReset"));
      libraries.zlibEnd = reinterpret_cast<int (*)(void*)>(dlsym(zlib, "deflateEnd"));
      auto version = reinterpret_cast<const char* (*)()>(dlsym(zlib, "zlibVersion"));
      libraries.zlibVersion = version ? version() : nullptr;
    }
  });
  return libraries;
}

bool haveIsal() { return deflateLibraries().isalInit && deflateLibraries().isalStateless; }

// zlib's z_stream, as laid out on every LP64 Linux (zlib.h).
struct ZStream {
  const uint8_t* next_in;
  unsigned avail_in;
  unsigned long total_in;
  uint8_t* next_out;
  unsigned avail_out;
  unsigned long total_out;
  const char* msg;
  void* state;
  void* zalloc;
  void* zfree;
  void* opaque;
  int data_type;
  unsigned long adler;
  unsigned long reserved;
};
// The deflate level that refines ISA-L's output with zlib's where that pays (see compress()).
constexpr int kRefinedLevel = 4;
constexpr int kZFinish = 4, kZStreamEnd = 1, kZDeflated = 8, kZDefaultStrategy = 0;

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
    useIsal_ = haveIsal() && level_ <= kRefinedLevel;
    if (useIsal_) deflateLevelBuffer_.resize(deflateLevelBufferSize(std::min(level_, 3)));
    if (!useIsal_ || level_ == kRefinedLevel) {
      const DeflateLibraries& z = deflateLibraries();
      bool zlibLoaded = z.zlibInit2 && z.zlibDeflate && z.zlibReset && z.zlibEnd && z.zlibVersion;
      if (zlibLoaded) {
        auto* stream = new ZStream();
        // Without ISA-L every level is zlib's own (0, no compression at all, becomes 1);
        // windowBits -12: raw deflate, 4 KiB window.
        int zlibLevel = useIsal_ ? 6 : std::max(level_, 1);
        zlibLoaded = z.zlibInit2(stream, zlibLevel, kZDeflated, -12, 8, kZDefaultStrategy, z.zlibVersion,
                                 static_cast<int>(sizeof(ZStream))) == 0;
        if (zlibLoaded) {
          zlibStream_ = stream;
        } else {
          delete stream;
        }
      }
      // Refining is optional: with ISA-L and no zlib, level 4 is ISA-L's 3 alone.
      if (!useIsal_) ok_ = zlibLoaded;
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
    deflateLibraries().zlibEnd(zlibStream_);
    delete static_cast<ZStream*>(zlibStream_);
  }
}

size_t ClusterCompressor::compress(const uint8_t* input, size_t inputSize, uint8_t* output,
                                   size_t limit) {
  if (codec_ == Codec::Deflate && !useIsal_) return compressZlib(input, inputSize, output, limit);
  if (codec_ == Codec::Deflate) {
    size_t length = compressIsal(input, inputSize, output, limit, std::min(level_, 3));
    // Measured on a disk of system files: zlib's 6 gains about as many bytes per CPU second
    // on every cluster ISA-L shrank, a little more where it shrank them least; these clusters
    // hold a fifth of the gain for a sixth of zlib's time. Outside them, ISA-L's output stands.
    if (level_ == kRefinedLevel && zlibStream_ != nullptr && length >= inputSize * 55 / 100 && length < inputSize * 85 / 100) {
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
  const DeflateLibraries& z = deflateLibraries();
  auto* stream = static_cast<ZStream*>(zlibStream_);
  z.zlibReset(stream);
  stream->next_in = input;
  stream->avail_in = static_cast<unsigned>(inputSize);
  stream->next_out = output;
  stream->avail_out = static_cast<unsigned>(limit);
  if (z.zlibDeflate(stream, kZFinish) != kZStreamEnd) return 0;  // did not fit
  return stream->total_out <= limit ? stream->total_out : 0;
}

size_t ClusterCompressor::compressIsal(const uint8_t* input, size_t inputSize, uint8_t* output, size_t limit,
                                       int level) {
  isal_zstream stream;
  deflateLibraries().isalInit(&stream);
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
  if (deflateLibraries().isalStateless(&stream) != COMP_OK) return 0;
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

// The zlib capture's frontier: per 64 KiB cluster of a raw disk, the size and CPU time of ISA-L's
// level 3 and of zlib's levels 4, 5 and 6 (raw deflate, QEMU's 4 KiB window), binned by the
// percent of the cluster ISA-L's output takes; then, for bands of those bins re-encoded by each
// zlib level, the total size (against zlib's 6 on every cluster, i.e. qemu-img's output) and CPU.
//
//   g++ -O2 -o /tmp/deflate-frontier benchmarks/native/deflate-frontier.cc -lisal -lz
//   /tmp/deflate-frontier .cache/bench/os.raw
//
// CPU is this thread's (CLOCK_THREAD_CPUTIME_ID), which other work on the machine disturbs less
// than wall time. Zero clusters are left out, as capture leaves them out.
#include <fcntl.h>
#include <isa-l/igzip_lib.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <ctime>
#include <vector>

namespace {

constexpr size_t kCluster = 65536;
constexpr int kLevels[] = {4, 5, 6};

double threadCpu() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

struct Cost {
  double seconds = 0;
  double bytes = 0;
};

struct Bin {
  long clusters = 0;
  Cost isal;
  Cost zlib[3];
};

size_t isalLevel3(const uint8_t* in, uint8_t* out, std::vector<uint8_t>& levelBuffer) {
  isal_zstream s;
  isal_deflate_stateless_init(&s);
  s.next_in = const_cast<uint8_t*>(in);
  s.avail_in = kCluster;
  s.next_out = out;
  s.avail_out = kCluster;
  s.end_of_stream = 1;
  s.flush = NO_FLUSH;
  s.level = 3;
  s.level_buf = levelBuffer.data();
  s.level_buf_size = static_cast<uint32_t>(levelBuffer.size());
  s.gzip_flag = IGZIP_DEFLATE;
  s.hist_bits = 12;
  return isal_deflate_stateless(&s) == COMP_OK ? s.total_out : kCluster;
}

size_t zlibLevel(z_stream* stream, const uint8_t* in, uint8_t* out) {
  deflateReset(stream);
  stream->next_in = const_cast<uint8_t*>(in);
  stream->avail_in = kCluster;
  stream->next_out = out;
  stream->avail_out = kCluster;
  return deflate(stream, Z_FINISH) == Z_STREAM_END ? stream->total_out : kCluster;
}

bool allZero(const uint8_t* data) {
  for (size_t i = 0; i < kCluster; i++) if (data[i]) return false;
  return true;
}

template <typename F>
size_t timed(Cost& cost, F f) {
  double started = threadCpu();
  size_t n = f();
  cost.seconds += threadCpu() - started;
  cost.bytes += n;
  return n;
}

// For each bound on the size (against zlib's 6 everywhere), the cheapest band and level.
void report(const Bin (&bins)[101]) {
  double isalSeconds = 0, isalBytes = 0, qemuBytes = 0;
  for (const Bin& b : bins) isalSeconds += b.isal.seconds, isalBytes += b.isal.bytes, qemuBytes += b.zlib[2].bytes;
  printf("ISA-L 3 alone: %.4fx zlib 6's size, %.2f CPU s\n", isalBytes / qemuBytes, isalSeconds);
  printf("size bound  cheapest: zlib level, band (ISA-L %%), size, CPU s\n");
  for (double bound = 1.055; bound > 1.0345; bound -= 0.005) {
    double bestSeconds = 1e300, bestSize = 0;
    int bestLevel = 0, bestFrom = 0, bestBelow = 0;
    for (int level = 0; level < 3; level++) {
      for (int from = 0; from < 100; from++) {
        for (int below = from + 1; below <= 101; below++) {
          double seconds = isalSeconds, bytes = 0;
          for (int p = 0; p <= 100; p++) {
            bool refined = p >= from && p < below && bins[p].zlib[level].bytes < bins[p].isal.bytes;
            seconds += p >= from && p < below ? bins[p].zlib[level].seconds : 0;
            bytes += refined ? bins[p].zlib[level].bytes : bins[p].isal.bytes;
          }
          if (bytes / qemuBytes <= bound && seconds < bestSeconds) {
            bestSeconds = seconds, bestSize = bytes / qemuBytes, bestLevel = kLevels[level], bestFrom = from, bestBelow = below;
          }
        }
      }
    }
    printf("%.3f       %d, %d-%d%%, %.4f, %.2f\n", bound, bestLevel, bestFrom, bestBelow, bestSize, bestSeconds);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return fprintf(stderr, "usage: deflate-frontier RAW_DISK\n"), 2;
  int fd = open(argv[1], O_RDONLY);
  if (fd < 0) return perror(argv[1]), 1;
  std::vector<uint8_t> in(kCluster), out(2 * kCluster), levelBuffer(ISAL_DEF_LVL3_DEFAULT);
  z_stream streams[3] = {};
  for (int i = 0; i < 3; i++) deflateInit2(&streams[i], kLevels[i], Z_DEFLATED, -12, 8, Z_DEFAULT_STRATEGY);
  static Bin bins[101];
  for (off_t at = 0; pread(fd, in.data(), kCluster, at) == static_cast<ssize_t>(kCluster); at += kCluster) {
    if (allZero(in.data())) continue;
    Cost isal;
    size_t isalBytes = timed(isal, [&] { return isalLevel3(in.data(), out.data(), levelBuffer); });
    Bin& bin = bins[isalBytes * 100 / kCluster];
    bin.clusters++;
    bin.isal.seconds += isal.seconds;
    bin.isal.bytes += isal.bytes;
    for (int i = 0; i < 3; i++) timed(bin.zlib[i], [&] { return zlibLevel(&streams[i], in.data(), out.data()); });
  }
  report(bins);
  return 0;
}

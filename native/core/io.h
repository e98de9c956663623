// Small I/O helpers shared by the engines: page-aligned buffers (O_DIRECT needs
// them) and reads and writes that retry on EINTR and short transfers.
#pragma once
#include <errno.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace qcow2img {

// Runs `work` on `count` threads and joins them all. An exception in a thread (std::bad_alloc)
// or a thread that cannot be started calls `failed` instead of ending the process (a throw
// leaving a thread, or a joinable thread destroyed, would terminate it).
template <typename Work, typename Failed>
void runOnThreads(uint32_t count, Work work, Failed failed) {
  std::vector<std::thread> threads;
  for (uint32_t i = 0; i < count; i++) {
    try {
      threads.emplace_back([i, &work, &failed] {
        try {
          work(i);
        } catch (...) {
          failed();
        }
      });
    } catch (...) {
      failed();
      break;
    }
  }
  for (auto& t : threads) t.join();
}

// A 4 KiB-aligned heap buffer; data is nullptr when the allocation failed.
struct AlignedBuffer {
  uint8_t* data = nullptr;
  size_t size = 0;
  explicit AlignedBuffer(size_t bytes) : size(bytes) {
    if (posix_memalign(reinterpret_cast<void**>(&data), 4096, bytes ? bytes : 4096) != 0) data = nullptr;
  }
  ~AlignedBuffer() { free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

// Reads `length` bytes unless the file ends first: bytes read, or -1 with errno.
inline int64_t preadFully(int fd, uint8_t* buffer, uint64_t length, uint64_t offset) {
  uint64_t done = 0;
  while (done < length) {
    ssize_t n = pread(fd, buffer + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) break;
    done += static_cast<uint64_t>(n);
  }
  return static_cast<int64_t>(done);
}

// Writes all `length` bytes; false with errno set otherwise.
inline bool pwriteFully(int fd, const uint8_t* buffer, uint64_t length, uint64_t offset) {
  uint64_t done = 0;
  while (done < length) {
    ssize_t n = pwrite(fd, buffer + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (n == 0) {
      errno = EIO;
      return false;
    }
    done += static_cast<uint64_t>(n);
  }
  return true;
}

}  // namespace qcow2img

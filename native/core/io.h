// Small I/O helpers shared by the engines: page-aligned buffers (O_DIRECT needs
// them) and reads and writes that retry on EINTR and short transfers.
#pragma once
#include <errno.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

namespace qcow2img {

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

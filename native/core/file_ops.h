// Small file-descriptor helpers Node's fs does not offer.
#pragma once
#include <cstdint>

namespace qcow2img {

// Next data / hole at or after `offset` (lseek SEEK_DATA / SEEK_HOLE).
// Returns -1 with errno ENXIO past the last data; -1 and errno on other errors.
int64_t seekData(int fd, int64_t offset);
int64_t seekHole(int fd, int64_t offset);

struct BlockDeviceInfo {
  uint64_t sizeBytes = 0;
  uint32_t logicalBlockSize = 0;
  uint32_t physicalBlockSize = 0;
};
// 0 on success, else errno.
int blockDeviceInfo(int fd, BlockDeviceInfo* info);

// O_DIRECT alignment the filesystem asks for (statx STATX_DIOALIGN, Linux 6.1+):
// 0 when unknown, else the larger of the memory and offset alignments.
uint32_t directIoAlignment(int fd);

// Allocates [offset, offset + length) of a file (fallocate mode 0): 0 or errno.
int allocate(int fd, uint64_t offset, uint64_t length);

// Asks the kernel to start reading [offset, offset + length) into the page cache
// (posix_fadvise WILLNEED): 0 or errno.
int willNeed(int fd, uint64_t offset, uint64_t length);

// Starts writing the dirty pages of [offset, offset + length) to the disk without waiting
// (sync_file_range WRITE), so that a later fdatasync has little left to do: 0 or errno.
int startWriteback(int fd, uint64_t offset, uint64_t length);

// Drops cached pages of [offset, offset + length) so a read-back sees the device
// (posix_fadvise DONTNEED; BLKFLSBUF as well on block devices). 0 or errno.
int dropCache(int fd, uint64_t offset, uint64_t length);

// Open-file-description byte locks (F_OFD_SETLK/F_OFD_GETLK), the kind QEMU takes on its
// images. All are shared (read) locks of one byte at `offset`: QEMU announces a use or a
// refusal to share by holding one, so a conflict only shows against an exclusive probe.
// lockByte: 0, or errno (EAGAIN/EACCES when another description holds the byte exclusively).
int lockByte(int fd, uint64_t offset);
// byteLocked: 1 when another open file description holds a lock on the byte, 0 when none,
// -errno on failure.
int byteLocked(int fd, uint64_t offset);

}  // namespace qcow2img

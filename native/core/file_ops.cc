#include "file_ops.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcow2img {

int64_t seekData(int fd, int64_t offset) { return lseek(fd, offset, SEEK_DATA); }
int64_t seekHole(int fd, int64_t offset) { return lseek(fd, offset, SEEK_HOLE); }

int blockDeviceInfo(int fd, BlockDeviceInfo* info) {
  uint64_t size = 0;
  int logical = 0;
  unsigned int physical = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) != 0) return errno;
  if (ioctl(fd, BLKSSZGET, &logical) != 0) return errno;
  if (ioctl(fd, BLKPBSZGET, &physical) != 0) physical = static_cast<unsigned int>(logical);
  info->sizeBytes = size;
  info->logicalBlockSize = static_cast<uint32_t>(logical);
  info->physicalBlockSize = physical;
  return 0;
}

uint32_t directIoAlignment(int fd) {
#ifdef STATX_DIOALIGN
  struct statx sx {};
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN) &&
      sx.stx_dio_offset_align != 0) {
    uint32_t memory = sx.stx_dio_mem_align;
    uint32_t offset = sx.stx_dio_offset_align;
    return memory > offset ? memory : offset;
  }
#else
  (void)fd;
#endif
  return 0;
}

int allocate(int fd, uint64_t offset, uint64_t length) {
  return fallocate(fd, 0, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0 ? 0 : errno;
}

int willNeed(int fd, uint64_t offset, uint64_t length) {
  return posix_fadvise(fd, static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_WILLNEED);
}

int startWriteback(int fd, uint64_t offset, uint64_t length) {
  return sync_file_range(fd, static_cast<off_t>(offset), static_cast<off_t>(length), SYNC_FILE_RANGE_WRITE) == 0 ? 0
                                                                                                               : errno;
}

int dropCache(int fd, uint64_t offset, uint64_t length) {
  struct stat st {};
  if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) ioctl(fd, BLKFLSBUF, 0);
  return posix_fadvise(fd, static_cast<off_t>(offset), static_cast<off_t>(length),
                       POSIX_FADV_DONTNEED);
}

static struct flock byteRange(short type, uint64_t offset) {
  struct flock lock {};
  lock.l_type = type;
  lock.l_whence = SEEK_SET;
  lock.l_start = static_cast<off_t>(offset);
  lock.l_len = 1;
  return lock;  // l_pid stays 0, as OFD locks require
}

int lockByte(int fd, uint64_t offset) {
  struct flock lock = byteRange(F_RDLCK, offset);
  return fcntl(fd, F_OFD_SETLK, &lock) == 0 ? 0 : errno;
}

int byteLocked(int fd, uint64_t offset) {
  // Asking for an exclusive lock reports any lock another description holds, shared or not.
  struct flock lock = byteRange(F_WRLCK, offset);
  if (fcntl(fd, F_OFD_GETLK, &lock) != 0) return -errno;
  return lock.l_type == F_UNLCK ? 0 : 1;
}

}  // namespace qcow2img

// Reading or writing a file through a mapping while another process may cut the file short:
// a page past its new end faults with SIGBUS, which would kill the whole process (node and the
// user's other work with it). Accesses made inside guardMapped() end early instead, and it
// returns false; the caller reports the mapped file.
//
// Only plain memory work may run inside (memcpy, memcmp, hashing, compressing): leaving by the
// jump skips destructors, so nothing there may allocate, lock or own a resource.
#pragma once
#include <atomic>
#include <csetjmp>

namespace qcow2img {

namespace mapped_guard_detail {
// The innermost guard of this thread, or nullptr.
extern thread_local sigjmp_buf* active;
// Guards open in the process: the handler reads no thread-local while there are none.
extern std::atomic<int> openGuards;
// Installs the SIGBUS handler once per process (later calls return at once). It passes every
// SIGBUS that is not a guarded fault on to the handler it replaced. One installed after it (a
// process.on('SIGBUS') made later) replaces it in turn: guarded faults are then that handler's.
void installHandler();
// After a jump: SIGBUS, blocked while its handler ran, is let through on this thread again.
void unblockAfterJump();
}  // namespace mapped_guard_detail

template <typename Fn>
bool guardMapped(Fn&& fn) {
  namespace detail = mapped_guard_detail;
  detail::installHandler();
  sigjmp_buf jump;
  sigjmp_buf* const outer = detail::active;
  detail::openGuards.fetch_add(1);
  // The mask is not saved (0): saving it costs a system call per guard, more than comparing a
  // page; the one signal the jump leaves blocked is unblocked on the jump path instead.
  if (sigsetjmp(jump, 0) != 0) {
    detail::active = outer;
    detail::openGuards.fetch_sub(1);
    detail::unblockAfterJump();
    return false;
  }
  detail::active = &jump;
  // The accesses stay between setting and clearing `active`, as the handler sees them.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  try {
    fn();
  } catch (...) {
    detail::active = outer;
    detail::openGuards.fetch_sub(1);
    throw;
  }
  std::atomic_signal_fence(std::memory_order_seq_cst);
  detail::active = outer;
  detail::openGuards.fetch_sub(1);
  return true;
}

}  // namespace qcow2img

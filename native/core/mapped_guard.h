// Reading or writing a file through a mapping while another process may cut the file short:
// a page past its new end faults with SIGBUS, which would kill the whole process (node and the
// user's other work with it). Accesses made inside guardMapped() end early instead, and it
// returns false; the caller reports the file as cut short.
//
// Only plain memory work may run inside (memcpy, memcmp, hashing, compressing): leaving by the
// jump skips destructors, so nothing there may allocate, lock or own a resource.
#pragma once
#include <csetjmp>

namespace qcow2img {

namespace mapped_guard_detail {
// The innermost guard of this thread, or nullptr. initial-exec: read by the signal handler,
// which must not be the first to touch this thread's TLS (that may allocate).
extern thread_local sigjmp_buf* active __attribute__((tls_model("initial-exec")));
// Installs the SIGBUS handler once per process; later calls return at once.
void installHandler();
}  // namespace mapped_guard_detail

template <typename Fn>
bool guardMapped(Fn&& fn) {
  mapped_guard_detail::installHandler();
  sigjmp_buf jump;
  sigjmp_buf* const outer = mapped_guard_detail::active;
  // 1: the signal mask is saved and restored by the jump (SIGBUS is blocked inside its handler).
  if (sigsetjmp(jump, 1) != 0) {
    mapped_guard_detail::active = outer;
    return false;
  }
  mapped_guard_detail::active = &jump;
  fn();
  mapped_guard_detail::active = outer;
  return true;
}

}  // namespace qcow2img

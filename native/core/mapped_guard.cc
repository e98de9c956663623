#include "mapped_guard.h"

#include <mutex>
#include <signal.h>

namespace qcow2img {
namespace mapped_guard_detail {

thread_local sigjmp_buf* active __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {

struct sigaction previous;

void onBus(int signal, siginfo_t* info, void* context) {
  if (active != nullptr) siglongjmp(*active, 1);
  // Not a guarded access: whoever handled SIGBUS before us does, or the default kills the
  // process as it would have. Returning re-runs the faulting instruction under that action.
  sigaction(SIGBUS, &previous, nullptr);
  if (info->si_code <= 0) raise(signal);  // sent by a process, not a fault: nothing re-runs
  (void)context;
}

}  // namespace

void installHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = onBus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &previous);
  });
}

}  // namespace mapped_guard_detail
}  // namespace qcow2img

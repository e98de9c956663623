#include "mapped_guard.h"

#include <cerrno>
#include <mutex>
#include <signal.h>

namespace qcow2img {
namespace mapped_guard_detail {

thread_local sigjmp_buf* active = nullptr;
std::atomic<int> openGuards{0};

namespace {

struct sigaction previous;

// A fault of this thread's own access (not a signal another process sent, not the kernel's
// advance notice of a memory error, which re-runs nothing).
bool isFault(const siginfo_t* info) { return info->si_code > 0 && info->si_code != BUS_MCEERR_AO; }

// SIGBUS as if we had never handled it: whoever handled it before us, or the default action.
void passOn(int signal, siginfo_t* info, void* context) {
  if (previous.sa_flags & SA_SIGINFO) {
    previous.sa_sigaction(signal, info, context);
  } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
    previous.sa_handler(signal);
  } else if (isFault(info) || previous.sa_handler == SIG_DFL) {
    // Fatal: a fault re-runs once we return and, with the default action back, kills the
    // process as it would have (an ignored fault is fatal too); a signal sent is raised again.
    struct sigaction byDefault {};
    byDefault.sa_handler = SIG_DFL;
    sigemptyset(&byDefault.sa_mask);
    sigaction(signal, &byDefault, nullptr);
    if (!isFault(info)) raise(signal);
  }
  // Otherwise a signal sent while SIGBUS was ignored: ignored.
}

void onBus(int signal, siginfo_t* info, void* context) {
  const int savedErrno = errno;
  if (isFault(info) && openGuards.load() > 0 && active != nullptr) siglongjmp(*active, 1);
  passOn(signal, info, context);
  errno = savedErrno;
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

void unblockAfterJump() {
  sigset_t bus;
  sigemptyset(&bus);
  sigaddset(&bus, SIGBUS);
  pthread_sigmask(SIG_UNBLOCK, &bus, nullptr);
}

}  // namespace mapped_guard_detail
}  // namespace qcow2img

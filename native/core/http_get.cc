#include "http_get.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

namespace qcow2img {
namespace {

constexpr size_t kMaxHead = 64 * 1024;  // a longer response head is refused
constexpr int kPollSliceMs = 100;       // how often a wait looks at the cancel flag

// Waits until `fd` is ready for `events`, up to the job's timeout; false (with why) otherwise.
bool waitFor(int fd, short events, const HttpGetJob& job, std::string& why) {
  for (int waited = 0;; waited += kPollSliceMs) {
    if (job.cancel != nullptr && *job.cancel != 0) {
      why = "cancelled";
      return false;
    }
    if (waited >= job.timeoutMs) {
      why = job.timeoutMs % 1000 == 0 ? "no data for " + std::to_string(job.timeoutMs / 1000) + " s"
                                      : "no data for " + std::to_string(job.timeoutMs) + " ms";
      return false;
    }
    pollfd p{fd, events, 0};
    int n = poll(&p, 1, std::min(kPollSliceMs, job.timeoutMs - waited));
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) {
      why = strerror(errno);
      return false;
    }
  }
}

int connectTo(const HttpGetJob& job, std::string& why) {
  sockaddr_storage address{};
  socklen_t length = 0;
  int family = job.family == 6 ? AF_INET6 : AF_INET;
  if (family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&address);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(static_cast<uint16_t>(job.port));
    if (inet_pton(AF_INET6, job.address.c_str(), &a->sin6_addr) != 1) length = 0; else length = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&address);
    a->sin_family = AF_INET;
    a->sin_port = htons(static_cast<uint16_t>(job.port));
    if (inet_pton(AF_INET, job.address.c_str(), &a->sin_addr) != 1) length = 0; else length = sizeof *a;
  }
  if (length == 0) {
    why = "not a numeric address";
    return -1;
  }
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    why = strerror(errno);
    return -1;
  }
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), length) != 0 && errno != EINPROGRESS) {
    why = strerror(errno);
  } else if (waitFor(fd, POLLOUT, job, why)) {
    int error = 0;
    socklen_t size = sizeof error;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size);
    if (error == 0) return fd;
    why = strerror(error);
  }
  close(fd);
  return -1;
}

bool sendAll(int fd, const uint8_t* data, size_t length, const HttpGetJob& job, std::string& why) {
  for (size_t done = 0; done < length;) {
    ssize_t n = send(fd, data + done, length - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!waitFor(fd, POLLOUT, job, why)) return false;
    } else {
      why = n < 0 ? strerror(errno) : "the connection closed";
      return false;
    }
  }
  return true;
}

// Bytes received (> 0), 0 at the end of the stream, -1 on an error or timeout (with why).
ssize_t receive(int fd, uint8_t* into, size_t length, const HttpGetJob& job, std::string& why) {
  for (;;) {
    ssize_t n = recv(fd, into, length, 0);
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      why = strerror(errno);
      return -1;
    }
    if (!waitFor(fd, POLLIN, job, why)) return -1;
  }
}

struct HeadFacts {
  int status = 0;
  int64_t contentLength = -1;
  bool keepAlive = true;
  bool framedByLength = true;  // no Transfer-Encoding
};

std::string trimmed(const std::string& s) {
  size_t a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t");
  return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

HeadFacts readFacts(const std::string& head) {
  HeadFacts facts;
  size_t lineEnd = head.find("\r\n");
  std::string statusLine = head.substr(0, lineEnd);
  if (statusLine.rfind("HTTP/1.", 0) != 0 || statusLine.size() < 12) return facts;
  facts.status = std::atoi(statusLine.c_str() + 9);
  facts.keepAlive = statusLine.compare(0, 8, "HTTP/1.1") == 0;
  for (size_t at = lineEnd; at != std::string::npos && at + 2 < head.size();) {
    size_t next = head.find("\r\n", at + 2);
    std::string line = head.substr(at + 2, next == std::string::npos ? std::string::npos : next - at - 2);
    at = next;
    size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon), value = trimmed(line.substr(colon + 1));
    if (strcasecmp(name.c_str(), "content-length") == 0) {
      char* end = nullptr;
      long long n = std::strtoll(value.c_str(), &end, 10);
      facts.contentLength = (end != value.c_str() && *end == '\0' && n >= 0) ? n : -2;
    } else if (strcasecmp(name.c_str(), "transfer-encoding") == 0) {
      facts.framedByLength = false;
    } else if (strcasecmp(name.c_str(), "connection") == 0) {
      facts.keepAlive = strcasecmp(value.c_str(), "close") != 0;
    }
  }
  return facts;
}

// Reads the response head into the piece; body bytes that came with it go to `early`. False
// (with the piece's failure set, and `closed` when the server closed first) without a whole head.
bool readHead(int fd, HttpPiece& piece, const HttpGetJob& job, std::string& early, bool& closed) {
  std::string raw;
  uint8_t buffer[16384];
  for (;;) {
    ssize_t n = receive(fd, buffer, sizeof buffer, job, piece.failure);
    if (n <= 0) {
      closed = n == 0 && raw.empty();
      if (n == 0) piece.failure = "the connection closed before a response";
      return false;
    }
    raw.append(reinterpret_cast<char*>(buffer), static_cast<size_t>(n));
    size_t end = raw.find("\r\n\r\n");
    // Judged on where the head ends, not only while it is incomplete: a long head whose empty
    // line came in the same read as its last 16 KiB is as long. Incomplete, it ends at the
    // earliest 3 bytes before what came (part of its empty line may be there).
    if (end == std::string::npos ? raw.size() > kMaxHead + 3 : end > kMaxHead) {
      piece.failure = "the response head is longer than 64 KiB";
      return false;
    }
    if (end == std::string::npos) continue;
    piece.head = raw.substr(0, end);
    early = raw.substr(end + 4);
    return true;
  }
}

enum class Outcome {
  Reusable,              // complete, and the connection can carry the next request
  Ended,                 // complete or not, the connection is done
  ClosedBeforeResponse,  // the server closed it before a byte of response (a stale kept-alive one)
};

// One piece on one connection. The body is read into place only once the head is judged usable.
Outcome getPiece(int fd, HttpPiece& piece, const HttpGetJob& job) {
  if (!sendAll(fd, piece.request, piece.requestLength, job, piece.failure)) return Outcome::ClosedBeforeResponse;
  std::string early;
  bool closed = false;
  if (!readHead(fd, piece, job, early, closed)) return closed ? Outcome::ClosedBeforeResponse : Outcome::Ended;
  HeadFacts facts = readFacts(piece.head);
  if (facts.status != 206 || !facts.framedByLength || facts.contentLength != static_cast<int64_t>(piece.length)) {
    // JavaScript judges the head; the body, if any, stays unread.
    piece.failure = "not a 206 response of the length asked for";
    return Outcome::Ended;
  }
  piece.received = std::min<uint64_t>(early.size(), piece.length);
  std::memcpy(piece.into, early.data(), piece.received);
  while (piece.received < piece.length) {
    ssize_t n = receive(fd, piece.into + piece.received, piece.length - piece.received, job, piece.failure);
    if (n <= 0) {
      if (n == 0) piece.failure = "the connection ended";
      return Outcome::Ended;
    }
    piece.received += static_cast<uint64_t>(n);
  }
  return facts.keepAlive ? Outcome::Reusable : Outcome::Ended;
}

// One connection's thread: pieces in turn, reconnecting after a connection that cannot go on.
void connectionLoop(HttpGetJob& job, std::atomic<size_t>& next, std::mutex& idleLock, int fd) {
  for (size_t i; (i = next++) < job.pieces.size();) {
    HttpPiece& piece = job.pieces[i];
    bool reused = fd >= 0;
    if (fd < 0 && (fd = connectTo(job, piece.failure)) < 0) continue;
    Outcome outcome = getPiece(fd, piece, job);
    // A kept-alive connection the server closed meanwhile: once more on a new one.
    if (outcome == Outcome::ClosedBeforeResponse && reused) {
      close(fd);
      piece.failure.clear();
      fd = connectTo(job, piece.failure);
      if (fd >= 0) outcome = getPiece(fd, piece, job);
    }
    bool usable = outcome == Outcome::Reusable;
    if (!usable && fd >= 0) {
      close(fd);
      fd = -1;
    }
  }
  if (fd >= 0) {
    std::lock_guard<std::mutex> hold(idleLock);
    job.idle.push_back(fd);
  }
}

}  // namespace

void runHttpGets(HttpGetJob& job) {
  std::vector<int> given;
  given.swap(job.idle);
  size_t threads = std::min<size_t>(std::max(1u, job.connections), job.pieces.size());
  std::atomic<size_t> next{0};
  std::mutex idleLock;
  std::vector<std::thread> workers;
  for (size_t t = 0; t < threads; t++) {
    int fd = t < given.size() ? given[t] : -1;
    workers.emplace_back(connectionLoop, std::ref(job), std::ref(next), std::ref(idleLock), fd);
  }
  for (auto& w : workers) w.join();
  for (size_t t = threads; t < given.size(); t++) job.idle.push_back(given[t]);
}

}  // namespace qcow2img

// Ranged GETs over plain HTTP whose bodies go straight into memory (a remote image's stage).
// JavaScript owns the protocol's policy: it writes each request, resolves the host, judges each
// response head (status, Content-Range, the pinned ETag) and retries what stopped short. This
// only moves bytes: it sends the request, returns the head, and reads the body into place when
// the head is a 206 whose Content-Length is the length asked for.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qcow2img {

struct HttpPiece {
  const uint8_t* request = nullptr;  // the whole request, head and empty line
  size_t requestLength = 0;
  uint8_t* into = nullptr;           // where the body goes
  uint64_t length = 0;               // body bytes expected
  // Results.
  std::string head;                  // the response head without its empty line; empty if none came
  uint64_t received = 0;             // body bytes now in `into`, from its start
  std::string failure;               // why the piece stopped short; empty when complete
};

struct HttpGetJob {
  int family = 4;                    // 4 or 6
  std::string address;               // numeric, of that family
  int port = 80;
  std::vector<int> idle;             // in: kept-alive connections to use first; out: still usable
  std::vector<HttpPiece> pieces;
  unsigned connections = 8;          // at most this many at once, one thread each
  int timeoutMs = 30000;             // without a byte, a piece stops
  const volatile uint64_t* cancel = nullptr;  // non-zero: stop at the next wait
};

// Runs every piece; never fails as a whole (each piece says how far it got).
void runHttpGets(HttpGetJob& job);

}  // namespace qcow2img

// HTTP answers as an origin (or whatever a redirect leads to) sends them to the origin source:
// status lines, headers, Content-Range, redirects, bodies, as libcurl and drun's handling of it
// see them. The harness serves the input on loopback as the answers to successive connections
// (split at "\n--next--\n"), as a forward proxy, so any host a redirect names lands here too and
// nothing leaves the machine. Contracts: the credential header is never sent to another origin
// than the one it is scoped to; a piece or document that is accepted is bytes that one answer
// carried as its body (as it came, or de-chunked), of the length asked for (or at most the
// document bound).
#include "fuzz.hpp"
#include "peer/tls.hpp"

#include <drun/source.hpp>

#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr std::string_view secret = "Bearer fuzz-origin-secret";
constexpr std::string_view delimiter = "\n--next--\n";

struct loopback_proxy {
  drun::peer::listener l;
  std::mutex m;
  std::vector<std::string> answers;   // the current input's, one per connection (the last repeats)
  std::vector<std::string> requests;  // what came, in order
  std::thread thread;

  void serve() {
    for (;;) {
      pollfd p{l.fd.get(), POLLIN, 0};
      if (::poll(&p, 1, -1) <= 0) continue;
      drun::detail::unique_fd c(::accept4(l.fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!c) continue;
      std::string req;
      char buf[4096];
      auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (req.find("\r\n\r\n") == std::string::npos && req.size() < (64u << 10) &&
             std::chrono::steady_clock::now() < until) {
        pollfd q{c.get(), POLLIN, 0};
        if (::poll(&q, 1, 100) <= 0) continue;
        ssize_t n = ::recv(c.get(), buf, sizeof buf, 0);
        if (n <= 0) break;
        req.append(buf, static_cast<std::size_t>(n));
      }
      std::string answer;
      {
        std::lock_guard lock(m);
        requests.push_back(req);
        if (!answers.empty()) answer = answers[std::min(requests.size(), answers.size()) - 1];
      }
      (void)::send(c.get(), answer.data(), answer.size(), MSG_NOSIGNAL);
      ::shutdown(c.get(), SHUT_WR);
    }
  }
};

loopback_proxy* proxy = nullptr;

// The request line's target, absolute-form through a proxy ("GET http://host:port/path HTTP/1.1")
// or CONNECT host:port: which origin the request was for.
std::string origin_of_request(const std::string& req) {
  auto sp1 = req.find(' ');
  auto sp2 = sp1 == std::string::npos ? sp1 : req.find(' ', sp1 + 1);
  if (sp2 == std::string::npos) return {};
  auto target = req.substr(sp1 + 1, sp2 - sp1 - 1);
  if (req.rfind("CONNECT ", 0) == 0) return "https://" + target;
  return drun::url_origin(target);
}

// A chunked body as far as it parses (sizes in hex, extensions after ';', CRLF or bare LF).
std::string dechunk(std::string_view b) {
  std::string out;
  while (!b.empty()) {
    auto eol = b.find('\n');
    if (eol == std::string_view::npos) break;
    std::size_t size = 0, i = 0;
    for (; i < eol && std::isxdigit(static_cast<unsigned char>(b[i])); ++i) {
      size = size * 16 + static_cast<std::size_t>(std::isdigit(static_cast<unsigned char>(b[i])) ? b[i] - '0'
                                                                                                : (b[i] | 0x20) - 'a' + 10);
      if (size > (1u << 20)) return out;
    }
    if (i == 0) break;
    b.remove_prefix(eol + 1);
    if (size == 0) break;
    out.append(b.substr(0, size));  // a short last chunk: what came of it
    b.remove_prefix(std::min(size, b.size()));
    if (b.substr(0, 2) == "\r\n") b.remove_prefix(2);
    else if (b.substr(0, 1) == "\n") b.remove_prefix(1);
  }
  return out;
}

// Whether what was accepted is bytes one of the answers carried as a body, as it came or
// de-chunked. A body starts after any line that begins with CR or LF (libcurl ends a header
// block at such a line, "\r-\n" included; a 1xx answer puts another block after the first).
bool carried(const std::vector<std::string>& answers, std::span<const std::byte> got) {
  std::string_view g(reinterpret_cast<const char*>(got.data()), got.size());
  if (g.empty()) return true;  // an empty body (an answer cut short after its headers)
  for (std::string_view a : answers)
    for (auto nl = a.find('\n'); nl != std::string_view::npos && nl + 1 < a.size(); nl = a.find('\n', nl + 1)) {
      if (a[nl + 1] != '\r' && a[nl + 1] != '\n') continue;
      auto end = a.find('\n', nl + 1);
      if (end == std::string_view::npos) continue;
      auto body = a.substr(end + 1);
      if (body.find(g) != std::string_view::npos || dechunk(body).find(g) != std::string::npos) return true;
    }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  auto l = drun::peer::tcp_listen("127.0.0.1", "0", 16);
  if (!l) std::abort();
  // Blocking accepts and reads from here on (tcp_listen makes the socket non-blocking).
  proxy = new loopback_proxy{std::move(*l), {}, {}, {}, {}};
  proxy->thread = std::thread([] { proxy->serve(); });
  proxy->thread.detach();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  auto input = fuzz::text(data + 1, size - 1);
  std::vector<std::string> answers;
  for (std::size_t at = 0; answers.size() < 8;) {
    auto next = input.find(delimiter, at);
    answers.emplace_back(input.substr(at, next == std::string_view::npos ? next : next - at));
    if (next == std::string_view::npos) break;
    at = next + delimiter.size();
  }
  {
    std::lock_guard lock(proxy->m);
    proxy->requests.clear();
    proxy->answers = answers;
  }
  drun::source_options o;
  o.proxy = "http://127.0.0.1:" + std::to_string(proxy->l.port);
  o.headers = {"Authorization: " + std::string(secret)};
  o.credentials_origin = "http://origin.test";
  o.connect_timeout = std::chrono::seconds(2);
  o.stall_timeout = std::chrono::seconds(2);
  const int mode = data[0] % 3;
  if (mode == 2) {
    constexpr std::size_t max_size = 4096;
    auto doc = drun::fetch_document("http://origin.test/model.sig", max_size, o);
    if (doc) FUZZ_REQUIRE(doc->size() <= max_size && carried(answers, drun::as_bytes(*doc)));
  } else {
    auto src = drun::make_source("http://origin.test/model", o);
    FUZZ_REQUIRE(src.has_value());
    drun::piece_request p;
    p.file = "weights.bin";
    p.range = mode == 0 ? drun::byte_range{0, 32} : drun::byte_range{32, 64};
    std::vector<std::byte> out(p.range.size());
    auto got = (*src)->fetch(p, out, nullptr);
    if (got) FUZZ_REQUIRE(carried(answers, out));
    else FUZZ_REQUIRE(got.error().code() == drun::errc::io_error || got.error().code() == drun::errc::not_found);
  }
  std::lock_guard lock(proxy->m);
  for (const auto& req : proxy->requests)
    if (origin_of_request(req) != "http://origin.test:80") FUZZ_REQUIRE(req.find(secret) == std::string::npos);
  return 0;
}

// The small parsers of untrusted text: the /metrics endpoint's request (anyone who can reach the
// port), and W3C traceparent values (from a HELLO or the environment). The first input byte
// picks the parser. Contracts: a scrape is answered only for a GET or HEAD of /metrics with a
// complete header; a traceparent that parses prints back to the same (version 00) value.
#include "fuzz.hpp"
#include "metrics/registry.hpp"

#include <drun/trace.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  auto text = fuzz::text(data + 1, size - 1);
  if (data[0] % 2 == 0) {
    using drun::metrics::scrape_request;
    auto verdict = drun::metrics::judge_scrape_request(text);
    if (verdict == scrape_request::get || verdict == scrape_request::head) {
      FUZZ_REQUIRE(text.find("\r\n\r\n") != std::string_view::npos);
      auto line = text.substr(0, text.find("\r\n"));
      FUZZ_REQUIRE(line.rfind(verdict == scrape_request::get ? "GET /metrics" : "HEAD /metrics", 0) == 0);
    }
    return 0;
  }
  auto t = drun::trace_context::parse(text);
  if (!t) {
    FUZZ_REQUIRE(t.error().code() == drun::errc::invalid_argument);
    return 0;
  }
  auto printed = t->traceparent();
  FUZZ_REQUIRE(printed.size() == 55);
  auto again = drun::trace_context::parse(printed);
  FUZZ_REQUIRE(again && again->traceparent() == printed);
  // Version 00 is exactly its 55 characters; later versions are read by their first four fields.
  if (text.rfind("00-", 0) == 0) FUZZ_REQUIRE(printed == text);
  return 0;
}

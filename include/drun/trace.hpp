// W3C Trace Context (https://www.w3.org/TR/trace-context/): the trace a fetch belongs to. A
// fetch takes its trace from fetch_options::traceparent (the drun CLI: --traceparent or the
// TRACEPARENT environment variable), else from the calling thread's trace_scope, else starts a
// new one; it tells the peers it asks (in the protocol's HELLO), so the seed's log lines for
// serving it carry the same trace id.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace drun {

struct DRUN_API trace_context {
  std::array<std::uint8_t, 16> trace_id{};
  std::array<std::uint8_t, 8> span_id{};
  std::uint8_t flags = 0x01;  // sampled

  // A traceparent header value, version 00: "00-<32 hex>-<16 hex>-<2 hex>", lower-case hex, the
  // ids not all zero. A later version's value is read by its first four fields, as the
  // specification asks. Errors: invalid_argument, naming what is wrong.
  static result<trace_context> parse(std::string_view traceparent);
  // A new trace: random ids.
  static trace_context fresh();
  // The same trace, a new span (the parent's span id is not kept: logs name their own span).
  trace_context child() const;

  std::string traceparent() const;   // version 00
  std::string trace_id_hex() const;
  std::string span_id_hex() const;
};

// Makes a trace the calling thread's for the scope's lifetime: the library's messages from this
// thread carry it, the peers it connects to are told it, and a fetch started here (with an empty
// fetch_options::traceparent) is a child span of it. Nests; not to be moved across threads.
class DRUN_API trace_scope {
 public:
  explicit trace_scope(const trace_context& t) noexcept;
  ~trace_scope();
  trace_scope(const trace_scope&) = delete;
  trace_scope& operator=(const trace_scope&) = delete;

 private:
  trace_context context_;
  const trace_context* previous_;
};

}  // namespace drun

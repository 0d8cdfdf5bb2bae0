// Sending a message to the library's log (include/drun/log.hpp), and the trace the calling thread
// works for, which every message it sends carries.
#pragma once

#include <drun/log.hpp>
#include <drun/trace.hpp>

#include <initializer_list>
#include <string>
#include <string_view>

namespace drun::detail {

void log(log_level level, std::string_view message, std::initializer_list<log_attribute> attributes = {});

// Sets the calling thread's trace for its lifetime (a fetch's workers, a served connection's
// thread); nests. The context must outlive the scope.
class trace_scope {
 public:
  explicit trace_scope(const trace_context* t) noexcept;
  ~trace_scope();
  trace_scope(const trace_scope&) = delete;
  trace_scope& operator=(const trace_scope&) = delete;

 private:
  const trace_context* previous_;
};

// Now as RFC 3339 UTC with `decimals` (3 or 6) digits of the second: 2026-12-07T01:02:03.456Z.
std::string utc_timestamp(int decimals);

// Null when the thread works for no trace.
const trace_context* current_trace() noexcept;

}  // namespace drun::detail

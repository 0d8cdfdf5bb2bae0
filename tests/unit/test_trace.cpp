// W3C trace context (trace.hpp) and the log's JSON shape (log.hpp).
#include <drun/log.hpp>
#include <drun/trace.hpp>

#include "detail/log.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

using namespace drun;

TEST_CASE("trace: traceparent parses, round-trips and refuses what W3C refuses") {
  auto t = trace_context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  REQUIRE(t);
  CHECK(t->trace_id_hex() == "4bf92f3577b34da6a3ce929d0e0e4736");
  CHECK(t->span_id_hex() == "00f067aa0ba902b7");
  CHECK(t->flags == 1);
  CHECK(t->traceparent() == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  auto c = t->child();
  CHECK(c.trace_id == t->trace_id);
  CHECK(c.span_id != t->span_id);
  // A later version is read by its first four fields.
  CHECK(trace_context::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds"));
  for (const char* bad : {"", "00", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                          "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                          "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                          "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                          "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                          "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                          "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                          "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
                          "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"}) {
    auto r = trace_context::parse(bad);
    CHECK_MESSAGE(!r, bad);
    if (!r) CHECK(r.error().code() == errc::invalid_argument);
  }
  auto a = trace_context::fresh(), b = trace_context::fresh();
  CHECK(a.trace_id != b.trace_id);
  CHECK(trace_context::parse(a.traceparent()));
}

TEST_CASE("trace: a scope sets the thread's trace, nests, and ends") {
  CHECK(detail::current_trace() == nullptr);
  auto outer = trace_context::fresh();
  {
    trace_scope s(outer);
    REQUIRE(detail::current_trace());
    CHECK(detail::current_trace()->trace_id == outer.trace_id);
    auto inner = outer.child();
    {
      trace_scope s2(inner);
      CHECK(detail::current_trace()->span_id == inner.span_id);
    }
    CHECK(detail::current_trace()->span_id == outer.span_id);
  }
  CHECK(detail::current_trace() == nullptr);
}

TEST_CASE("log: levels filter before the sink, and the sink gets the body") {
  std::vector<std::pair<log_level, std::string>> got;
  set_log_sink([&](log_level l, std::string_view m) { got.emplace_back(l, std::string(m)); });
  auto before = logging_settings();
  configure_logging({log_level::info, log_format::text, "drun"});
  CHECK(log_enabled(log_level::info));
  CHECK(!log_enabled(log_level::debug));
  emit_log(log_level::debug, "not this");
  emit_log(log_level::info, "this", {{"n", 3}, {"s", "x"}});
  emit_log(log_level::error, "and this");
  configure_logging(before);
  set_log_sink({});
  REQUIRE(got.size() == 2);
  CHECK(got[0] == std::pair<log_level, std::string>{log_level::info, "this"});
  CHECK(got[1].first == log_level::error);
}

TEST_CASE("log: timestamps are UTC whatever the time zone") {
  const char* old = std::getenv("TZ");
  std::string saved = old ? old : "";
  ::setenv("TZ", "IST-5:30", 1);  // POSIX form (no tzdata needed): +05:30, hour and minute differ
  ::tzset();
  auto stamp = detail::utc_timestamp(3);
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  if (old) ::setenv("TZ", saved.c_str(), 1);
  else ::unsetenv("TZ");
  ::tzset();
  char want[32];
  std::strftime(want, sizeof want, "%Y-%m-%dT%H:%M", &utc);
  CHECK(stamp.substr(0, 16) == std::string(want));  // (a minute boundary between the two is rare)
  CHECK(stamp.size() == 24);
  CHECK(stamp.back() == 'Z');
}

// The library's log (log.hpp) and trace context (trace.hpp).
#include <drun/log.hpp>
#include <drun/trace.hpp>

#include "detail/encoding.hpp"
#include "detail/log.hpp"
#include "detail/sodium_init.hpp"

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <sodium.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <ctime>
#include <cstdio>
#include <mutex>
#include <string>

namespace drun {
namespace {

struct state {
  std::mutex mutex;  // the sink, the service name, and one line at a time on stderr
  log_sink sink;
  std::string service_name = "drun";
  std::atomic<int> level{static_cast<int>(log_level::warning)};
  std::atomic<int> format{static_cast<int>(log_format::text)};
};
state& global() {
  static state* s = new state;  // never destroyed: an audit log closed at exit still logs
  return *s;
}

thread_local const trace_context* current = nullptr;

int severity_number(log_level l) {
  switch (l) {
    case log_level::debug: return 5;
    case log_level::info: return 9;
    case log_level::warning: return 13;
    case log_level::error: return 17;
  }
  return 9;
}
const char* severity_text(log_level l) {
  switch (l) {
    case log_level::debug: return "DEBUG";
    case log_level::info: return "INFO";
    case log_level::warning: return "WARN";
    case log_level::error: return "ERROR";
  }
  return "INFO";
}

const std::string& host_name() {
  static const std::string name = [] {
    char buf[256] = {};
    if (::gethostname(buf, sizeof buf - 1) != 0) return std::string("unknown");
    return std::string(buf);
  }();
  return name;
}

std::string json_line(log_level level, std::string_view body, std::initializer_list<log_attribute> attributes,
                      const std::string& service) {
  using nlohmann::ordered_json;
  ordered_json j;
  j["timestamp"] = detail::utc_timestamp(6);
  j["severity_text"] = severity_text(level);
  j["severity_number"] = severity_number(level);
  j["body"] = std::string(body);
  ordered_json attrs = ordered_json::object();
  for (const auto& a : attributes) {
    auto v = a.number ? ordered_json::parse(a.value, nullptr, false) : ordered_json(a.value);
    attrs[std::string(a.key)] = v.is_discarded() ? ordered_json(a.value) : std::move(v);
  }
  j["attributes"] = std::move(attrs);
  if (current) {
    j["trace_id"] = current->trace_id_hex();
    j["span_id"] = current->span_id_hex();
    j["trace_flags"] = fmt::format("{:02x}", current->flags);
  }
  j["resource"] = {{"service.name", service},
                   {"service.version", fmt::format("{}.{}.{}", DRUN_VERSION_MAJOR, DRUN_VERSION_MINOR, DRUN_VERSION_PATCH)},
                   {"host.name", host_name()},
                   {"process.pid", static_cast<long>(::getpid())}};
  // Invalid UTF-8 (a file name, say) is replaced rather than thrown on.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

std::string text_line(log_level level, std::string_view body, std::initializer_list<log_attribute> attributes) {
  std::string line = "drun: ";
  if (level != log_level::info) line += fmt::format("{}: ", to_string(level));
  line += body;
  const char* sep = " (";
  for (const auto& a : attributes) {
    line += fmt::format("{}{}={}", sep, a.key, a.value);
    sep = ", ";
  }
  if (attributes.size()) line += ")";
  return line + "\n";
}

}  // namespace

// NaN and infinities are not JSON numbers: they are written as strings.
log_attribute::log_attribute(std::string_view k, double v)
    : key(k), value(fmt::format("{}", v)), number(std::isfinite(v)) {}

const char* to_string(log_level level) noexcept {
  switch (level) {
    case log_level::debug: return "debug";
    case log_level::info: return "info";
    case log_level::warning: return "warning";
    case log_level::error: return "error";
  }
  return "info";
}

void configure_logging(const log_settings& settings) {
  auto& g = global();
  std::lock_guard lock(g.mutex);
  g.level.store(static_cast<int>(settings.level), std::memory_order_relaxed);
  g.format.store(static_cast<int>(settings.format), std::memory_order_relaxed);
  g.service_name = settings.service_name.empty() ? "drun" : settings.service_name;
}

log_settings logging_settings() {
  auto& g = global();
  std::lock_guard lock(g.mutex);
  return {static_cast<log_level>(g.level.load()), static_cast<log_format>(g.format.load()), g.service_name};
}

void set_log_sink(log_sink sink) {
  auto& g = global();
  std::lock_guard lock(g.mutex);
  g.sink = std::move(sink);
}

bool log_enabled(log_level level) noexcept {
  return static_cast<int>(level) >= global().level.load(std::memory_order_relaxed);
}

void emit_log(log_level level, std::string_view body, std::initializer_list<log_attribute> attributes) {
  detail::log(level, body, attributes);
}

namespace detail {

void log(log_level level, std::string_view message, std::initializer_list<log_attribute> attributes) {
  if (!log_enabled(level)) return;
  auto& g = global();
  std::lock_guard lock(g.mutex);
  if (g.sink) {
    g.sink(level, message);
    return;
  }
  std::string line = static_cast<log_format>(g.format.load()) == log_format::json
                         ? json_line(level, message, attributes, g.service_name)
                         : text_line(level, message, attributes);
  std::fputs(line.c_str(), stderr);
}

std::string utc_timestamp(int decimals) {
  auto now = std::chrono::system_clock::now();
  auto secs = std::chrono::floor<std::chrono::seconds>(now);
  auto micros = std::chrono::duration_cast<std::chrono::microseconds>(now - secs).count();
  // fmt's time_point formatting is local time: UTC is asked for explicitly.
  std::tm utc = fmt::gmtime(std::chrono::system_clock::to_time_t(secs));
  if (decimals == 3) return fmt::format("{:%Y-%m-%dT%H:%M:%S}.{:03}Z", utc, micros / 1000);
  return fmt::format("{:%Y-%m-%dT%H:%M:%S}.{:06}Z", utc, micros);
}

trace_scope::trace_scope(const trace_context* t) noexcept : previous_(current) { current = t; }
trace_scope::~trace_scope() { current = previous_; }
const trace_context* current_trace() noexcept { return current; }

}  // namespace detail

trace_scope::trace_scope(const trace_context& t) noexcept : context_(t), previous_(current) { current = &context_; }
trace_scope::~trace_scope() { current = previous_; }

// ---- trace context ---------------------------------------------------------------------------

namespace {

template <std::size_t N>
bool parse_hex(std::string_view text, std::array<std::uint8_t, N>& out) {
  if (text.size() != 2 * N) return false;
  for (char c : text)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;  // lower case only
  auto bytes = detail::hex_decode(text);
  if (!bytes) return false;
  for (std::size_t i = 0; i < N; ++i) out[i] = static_cast<std::uint8_t>((*bytes)[i]);
  return true;
}
template <std::size_t N>
bool all_zero(const std::array<std::uint8_t, N>& a) {
  for (auto b : a)
    if (b) return false;
  return true;
}
template <std::size_t N>
std::string hex_of(const std::array<std::uint8_t, N>& a) {
  return detail::hex_encode(std::as_bytes(std::span(a)));
}

}  // namespace

result<trace_context> trace_context::parse(std::string_view tp) {
  auto bad = [&](std::string_view why) {
    return error(errc::invalid_argument, fmt::format("traceparent is malformed: {} (expected 00-<32 hex>-<16 hex>-<2 hex>)", why));
  };
  if (tp.size() < 55) return bad("too short");
  if (tp.size() > 256) return bad("too long");
  std::array<std::uint8_t, 1> version{}, flags{};
  if (!parse_hex(tp.substr(0, 2), version) || tp[2] != '-') return bad("the version is not two lower-case hex digits");
  if (version[0] == 0xff) return bad("version ff is invalid");
  // Version 00 is exactly 55 characters; a later version may append "-..." fields.
  if (version[0] == 0 && tp.size() != 55) return bad("a version 00 value is 55 characters");
  if (version[0] != 0 && tp.size() > 55 && tp[55] != '-') return bad("unexpected characters after the flags");
  trace_context t;
  if (!parse_hex(tp.substr(3, 32), t.trace_id) || tp[35] != '-') return bad("the trace id is not 32 lower-case hex digits");
  if (!parse_hex(tp.substr(36, 16), t.span_id) || tp[52] != '-') return bad("the parent id is not 16 lower-case hex digits");
  if (!parse_hex(tp.substr(53, 2), flags)) return bad("the flags are not two lower-case hex digits");
  if (all_zero(t.trace_id)) return bad("the trace id is all zeros");
  if (all_zero(t.span_id)) return bad("the parent id is all zeros");
  t.flags = flags[0];
  return t;
}

trace_context trace_context::fresh() {
  detail::ensure_sodium();
  trace_context t;
  do randombytes_buf(t.trace_id.data(), t.trace_id.size());
  while (all_zero(t.trace_id));
  do randombytes_buf(t.span_id.data(), t.span_id.size());
  while (all_zero(t.span_id));
  return t;
}

trace_context trace_context::child() const {
  detail::ensure_sodium();
  trace_context t = *this;
  do randombytes_buf(t.span_id.data(), t.span_id.size());
  while (all_zero(t.span_id));
  return t;
}

std::string trace_context::traceparent() const {
  return fmt::format("00-{}-{}-{:02x}", trace_id_hex(), span_id_hex(), flags);
}
std::string trace_context::trace_id_hex() const { return hex_of(trace_id); }
std::string trace_context::span_id_hex() const { return hex_of(span_id); }

}  // namespace drun

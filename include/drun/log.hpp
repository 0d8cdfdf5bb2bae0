// Where the library's messages go. By default, warnings and errors go to stderr as
// "drun: warning: ..."; a host program can lower the level, ask for JSON lines shaped after the
// OpenTelemetry log data model (what a collector's filelog or stdin receiver ingests as is), or
// route every message into its own log. Never secrets: no message or attribute holds a token, a
// key, a credential or a header value.
#pragma once

#include <drun/config.hpp>

#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>

namespace drun {

// In increasing severity; the OpenTelemetry severity numbers are 5, 9, 13 and 17.
enum class log_level { debug, info, warning, error };

enum class log_format {
  text,  // "drun: warning: <message>"
  json,  // one JSON object per line: timestamp, severity_text, severity_number, body, attributes,
         // trace_id, span_id, trace_flags, resource {service.name, service.version, host.name,
         // process.pid}
};

struct log_settings {
  log_level level = log_level::warning;  // messages below it are not formatted at all
  log_format format = log_format::text;
  std::string service_name = "drun";     // resource attribute service.name
};

// Applies to every message from then on. Thread safe.
DRUN_API void configure_logging(const log_settings& settings);
DRUN_API log_settings logging_settings();

// Called from whichever thread has something to say, one message at a time, with the message's
// body (attributes and trace context are in the JSON form only).
using log_sink = std::function<void(log_level, std::string_view message)>;

// Replaces the sink (it receives what passes the level); an empty one restores stderr. Thread safe.
DRUN_API void set_log_sink(log_sink sink);

// A message through drun's logging, as the library's own are (a command-line tool built on drun
// logs its diagnostics here, so that they share the format and the trace context).
struct DRUN_API log_attribute {
  log_attribute(std::string_view k, std::string_view v) : key(k), value(v) {}
  log_attribute(std::string_view k, const char* v) : key(k), value(v) {}
  log_attribute(std::string_view k, const std::string& v) : key(k), value(v) {}
  template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  log_attribute(std::string_view k, T v) : key(k), value(std::to_string(v)), number(true) {}
  log_attribute(std::string_view k, double v);
  std::string_view key;
  std::string value;
  bool number = false;  // written as a JSON number
};
DRUN_API void emit_log(log_level level, std::string_view body, std::initializer_list<log_attribute> attributes = {});

// Whether a message of that level would be written (cheap: one relaxed load).
DRUN_API bool log_enabled(log_level level) noexcept;

DRUN_API const char* to_string(log_level level) noexcept;

}  // namespace drun

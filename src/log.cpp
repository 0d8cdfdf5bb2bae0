// The library's message sink (log.hpp).
#include <drun/log.hpp>

#include "detail/log.hpp"

#include <cstdio>
#include <mutex>
#include <string>

namespace drun {
namespace {

std::mutex& sink_mutex() {
  static std::mutex m;
  return m;
}
log_sink& current() {
  static log_sink s;
  return s;
}

}  // namespace

void set_log_sink(log_sink sink) {
  std::lock_guard lock(sink_mutex());
  current() = std::move(sink);
}

namespace detail {

void log(log_level level, std::string_view message) {
  std::lock_guard lock(sink_mutex());
  if (current()) {
    current()(level, message);
    return;
  }
  std::string line = "drun: " + std::string(level == log_level::warning ? "warning: " : "") + std::string(message) + "\n";
  std::fputs(line.c_str(), stderr);
}

}  // namespace detail
}  // namespace drun

// Sending a message to the library's sink (include/drun/log.hpp).
#pragma once

#include <drun/log.hpp>

#include <string_view>

namespace drun::detail {

void log(log_level level, std::string_view message);

}  // namespace drun::detail

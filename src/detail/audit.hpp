// Recording a security decision in the library's audit log (include/drun/audit.hpp), if one is set.
#pragma once

#include <drun/log.hpp>

#include <initializer_list>
#include <string_view>

namespace drun::detail {

// Whether a log is set (cheap), so that callers build fields only when they will be written.
bool auditing() noexcept;
void audit(std::string_view event, std::initializer_list<log_attribute> fields);

}  // namespace drun::detail

// Where the library's few messages go: warnings a user must see (an insecure option, a transport
// falling back) that are not errors of any call. By default they go to stderr as "drun: ...";
// a host program can route them into its own log. Never secrets: no message holds a token, a key
// or a credential.
#pragma once

#include <drun/config.hpp>

#include <functional>
#include <string_view>

namespace drun {

enum class log_level { info, warning };

// Called from whichever thread has something to say, one message at a time.
using log_sink = std::function<void(log_level, std::string_view message)>;

// Replaces the sink; an empty one restores stderr. Thread safe.
DRUN_API void set_log_sink(log_sink sink);

}  // namespace drun

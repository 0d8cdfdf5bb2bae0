// The error category and message rendering.
#include <drun/error.hpp>

#include <fmt/format.h>

#include <cstring>

namespace drun {
namespace {

class category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "drun"; }
  std::string message(int c) const override {
    switch (static_cast<errc>(c)) {
      case errc::invalid_argument: return "invalid argument";
      case errc::io_error: return "I/O error";
      case errc::not_found: return "not found";
      case errc::key_error: return "unusable key or certificate";
      case errc::unsafe_entry: return "unsafe entry in the model";
      case errc::malformed_bundle: return "malformed bundle";
      case errc::unsupported: return "unsupported bundle feature";
      case errc::signature_invalid: return "signature invalid";
      case errc::untrusted_certificate: return "untrusted certificate";
      case errc::model_mismatch: return "model does not match its manifest";
      case errc::digest_mismatch: return "digest mismatch";
      case errc::cancelled: return "cancelled";
      case errc::permission_denied: return "permission denied";
      case errc::busy: return "busy";
    }
    return "unknown drun error";
  }
};

}  // namespace

const std::error_category& error_category() noexcept {
  static const category instance;
  return instance;
}

std::string error::message() const {
  std::string out;
  if (!operation_.empty()) out += operation_ + ": ";
  if (!path_.empty()) {
    out += path_;
    if (range_) out += fmt::format(" bytes [{}, {})", range_->first, range_->second);
    out += ": ";
  }
  out += detail_.empty() ? error_category().message(static_cast<int>(code_)) : detail_;
  if (errno_ != 0) {
    char buf[128];
    out += ": ";
    out += ::strerror_r(errno_, buf, sizeof buf);  // GNU variant returns the message
  }
  return out;
}

}  // namespace drun

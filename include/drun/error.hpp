// drun's one error model: an errc wired into std::error_code, an error that says what failed
// and where, and a [[nodiscard]] result<T> returned by every fallible function.
#pragma once

#include <drun/config.hpp>

#include <cassert>
#include <cstdint>
#include <optional>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace drun {

// What went wrong, coarse enough to act on. The CLI maps these to exit statuses.
enum class errc : int {
  invalid_argument = 1,   // a caller's option or input is unusable (bad flag, no files to sign)
  io_error,               // reading or writing a file failed
  not_found,              // a file the caller named does not exist
  key_error,              // a key or certificate file is unusable (format, type, permissions)
  unsafe_entry,           // the model holds a symlink, special file or unsafe name
  malformed_bundle,       // the bundle or its statement cannot be parsed
  unsupported,            // the bundle uses a feature drun does not implement
  signature_invalid,      // the signature, key hint or signer does not check out
  untrusted_certificate,  // the certificate chain does not lead to a trusted root
  model_mismatch,         // the model's files differ from the manifest (missing, extra, changed)
  digest_mismatch,        // bytes do not hash to the signed digest
  cancelled,              // the caller asked the operation to stop
  permission_denied,      // a peer refused: the caller is not authorized for what it asked
  busy,                   // a peer is at a limit (connections, buffers) and refused for now: try later
};

DRUN_API const std::error_category& error_category() noexcept;
inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

// A failure with its context: the operation, the file and byte range it concerns, the cause.
// message() renders "operation: file bytes [b, e): detail: strerror" with absent parts left out.
class DRUN_API error {
 public:
  error(errc code, std::string detail) : code_(code), detail_(std::move(detail)) {}

  errc code() const noexcept { return code_; }
  std::error_code error_code() const noexcept { return make_error_code(code_); }
  const std::string& detail() const noexcept { return detail_; }
  const std::string& path() const noexcept { return path_; }
  const std::string& operation() const noexcept { return operation_; }
  std::optional<std::pair<std::uint64_t, std::uint64_t>> range() const noexcept { return range_; }
  int sys_errno() const noexcept { return errno_; }
  // Where a fetch's failure came from: the source (origin URL or peer) last tried, and the piece.
  // Context for programs (the message already says it in words).
  const std::string& source() const noexcept { return source_; }
  std::optional<std::size_t> piece() const noexcept { return piece_; }

  error& with_path(std::string path) & { path_ = std::move(path); return *this; }
  error&& with_path(std::string path) && { path_ = std::move(path); return std::move(*this); }
  error& with_range(std::uint64_t begin, std::uint64_t end) & { range_.emplace(begin, end); return *this; }
  error&& with_range(std::uint64_t begin, std::uint64_t end) && { range_.emplace(begin, end); return std::move(*this); }
  error& with_operation(std::string op) & { operation_ = std::move(op); return *this; }
  error&& with_operation(std::string op) && { operation_ = std::move(op); return std::move(*this); }
  error& with_errno(int e) & { errno_ = e; return *this; }
  error&& with_errno(int e) && { errno_ = e; return std::move(*this); }
  error&& with_source(std::string source) && { source_ = std::move(source); return std::move(*this); }
  error&& with_piece(std::size_t piece) && { piece_ = piece; return std::move(*this); }
  // Re-labels the failure (verify turns a symlink found while walking into a model mismatch).
  error&& with_code(errc code) && { code_ = code; return std::move(*this); }

  std::string message() const;

 private:
  errc code_;
  std::string detail_;
  std::string path_;
  std::string operation_;
  std::optional<std::pair<std::uint64_t, std::uint64_t>> range_;
  int errno_ = 0;
  std::string source_;
  std::optional<std::size_t> piece_;
};

// Holds a T or an error. Accessing the wrong alternative is a programming error (asserts).
template <class T>
class [[nodiscard]] result {
 public:
  result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  result(class error err) : v_(std::in_place_index<1>, std::move(err)) {}  // NOLINT

  bool has_value() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  T& value() & { assert(has_value()); return std::get<0>(v_); }
  const T& value() const& { assert(has_value()); return std::get<0>(v_); }
  T&& value() && { assert(has_value()); return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const class error& error() const& { assert(!has_value()); return std::get<1>(v_); }
  class error&& error() && { assert(!has_value()); return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, class error> v_;
};

template <>
class [[nodiscard]] result<void> {
 public:
  result() = default;
  result(class error err) : err_(std::move(err)) {}  // NOLINT

  bool has_value() const noexcept { return !err_.has_value(); }
  explicit operator bool() const noexcept { return has_value(); }
  const class error& error() const& { assert(err_); return *err_; }
  class error&& error() && { assert(err_); return std::move(*err_); }

 private:
  std::optional<class error> err_;
};

}  // namespace drun

template <>
struct std::is_error_code_enum<drun::errc> : std::true_type {};

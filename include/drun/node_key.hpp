// The node key: the 32-byte secret from which every store data key is derived. It comes from a
// key source: "file:PATH" (a mounted Kubernetes Secret), "env:NAME", or "cmd:COMMAND" (stdout of
// an external KMS or Vault CLI). The text form is 64 hex characters or base64 of 32 bytes.
//
// WARNING: a node key decrypts every piece in the store. Key files must be readable by their owner
// only (load refuses others), and the bytes are wiped when the key is destroyed; never log them.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>

#include <cstddef>
#include <filesystem>
#include <memory>
#include <span>
#include <string_view>

namespace drun {

namespace detail { struct node_key_access; }

// Move-only, wiped on destruction, no printing operator.
class DRUN_API node_key {
 public:
  static constexpr std::size_t size = 32;

  static node_key generate();
  // Parses "file:PATH", "env:NAME" or "cmd:COMMAND". Errors: key_error (unreadable, wrong length,
  // bad encoding, file readable by others, command failed), not_found.
  static result<node_key> from_source(std::string_view spec);
  // Parses the text form (hex or base64; surrounding whitespace ignored).
  static result<node_key> from_text(std::string_view text);

  ~node_key();
  node_key(node_key&&) noexcept;
  node_key& operator=(node_key&&) noexcept;
  node_key(const node_key&) = delete;
  node_key& operator=(const node_key&) = delete;

  // Writes the key as 64 hex characters and a newline, mode 0600; refuses to overwrite.
  result<void> save(const std::filesystem::path& file) const;

 private:
  friend struct detail::node_key_access;
  struct impl;
  explicit node_key(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace drun

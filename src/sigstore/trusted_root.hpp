// A Sigstore trusted root (protobuf-specs TrustedRoot JSON, v0.1), parsed into the keys and
// certificates an offline keyless verifier needs. Parsing only: nothing here checks a bundle.
#pragma once

#include <drun/error.hpp>
#include <drun/keys.hpp>

#include "detail/openssl.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace drun::detail::sigstore {

// Milliseconds since the Unix epoch: the finest unit any Sigstore time carries (SCTs).
using millis = std::int64_t;

// A validFor window; an absent end is open.
struct time_window {
  millis start = 0;
  std::optional<millis> end;
  bool contains(millis t) const noexcept { return t >= start && (!end || t <= *end); }
};

// "2022-12-31T23:59:59.999Z" (RFC 3339, UTC, optional fraction) -> millis.
std::optional<millis> parse_rfc3339(std::string_view text);
std::string format_time(millis t);  // "2022-12-31T23:59:59Z"

// A transparency log or CT log key.
struct log_key {
  std::string base_url;
  std::string log_id;  // raw bytes: SHA-256 of the DER SubjectPublicKeyInfo (Rekor v1, CT)
  public_key key;
  time_window valid_for;
};

// A certificate authority (Fulcio) or timestamp authority: its chain, leaf-most first, root last.
struct authority {
  std::string name;  // "organization/commonName", for messages
  std::vector<x509_ptr> chain;
  time_window valid_for;
};

struct trusted_root {
  std::vector<authority> certificate_authorities;
  std::vector<log_key> tlogs;
  std::vector<log_key> ctlogs;
  std::vector<authority> timestamp_authorities;
};

// Errors: key_error naming the field at fault (the CLI's "unusable trust material", exit 2).
result<trusted_root> parse_trusted_root(std::string_view json_text);

}  // namespace drun::detail::sigstore

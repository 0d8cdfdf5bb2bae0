// Hex and base64 codecs. Decoders are strict: a malformed input is an error, never skipped.
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace drun::detail {

std::string hex_encode(std::span<const std::byte> bytes);
// Accepts lower- and upper-case digits; nullopt on odd length or a non-hex character.
std::optional<std::vector<std::byte>> hex_decode(std::string_view hex);

std::string base64_encode(std::span<const std::byte> bytes);
// Standard alphabet with '=' padding (RFC 4648 section 4); nullopt on anything else.
std::optional<std::string> base64_decode(std::string_view text);
// The same into a caller's buffer (at least text.size() / 4 * 3 bytes), so secrets can be decoded
// into guarded memory; returns the decoded length.
std::optional<std::size_t> base64_decode_into(std::string_view text, std::span<std::byte> out);

}  // namespace drun::detail

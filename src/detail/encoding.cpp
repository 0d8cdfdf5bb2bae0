// Hex and base64 codecs (strict decoders).
#include "detail/encoding.hpp"

#include <array>
#include <cstdint>

namespace drun::detail {
namespace {

constexpr char hex_digits[] = "0123456789abcdef";
constexpr char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

constexpr std::array<std::int8_t, 256> make_b64_table() {
  std::array<std::int8_t, 256> t{};
  for (auto& v : t) v = -1;
  for (int i = 0; i < 64; ++i) t[static_cast<unsigned char>(b64_alphabet[i])] = static_cast<std::int8_t>(i);
  return t;
}
constexpr auto b64_table = make_b64_table();

}  // namespace

std::string hex_encode(std::span<const std::byte> bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (std::byte b : bytes) {
    auto v = std::to_integer<unsigned>(b);
    out.push_back(hex_digits[v >> 4]);
    out.push_back(hex_digits[v & 15]);
  }
  return out;
}

std::optional<std::vector<std::byte>> hex_decode(std::string_view hex) {
  if (hex.size() % 2 != 0) return std::nullopt;
  std::vector<std::byte> out(hex.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) {
    int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[i] = static_cast<std::byte>((hi << 4) | lo);
  }
  return out;
}

std::string base64_encode(std::span<const std::byte> bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  auto at = [&](std::size_t k) { return std::to_integer<std::uint32_t>(bytes[k]); };
  for (; i + 3 <= bytes.size(); i += 3) {
    std::uint32_t v = at(i) << 16 | at(i + 1) << 8 | at(i + 2);
    out.push_back(b64_alphabet[v >> 18 & 63]);
    out.push_back(b64_alphabet[v >> 12 & 63]);
    out.push_back(b64_alphabet[v >> 6 & 63]);
    out.push_back(b64_alphabet[v & 63]);
  }
  std::size_t rest = bytes.size() - i;
  if (rest == 1) {
    std::uint32_t v = at(i) << 16;
    out.push_back(b64_alphabet[v >> 18 & 63]);
    out.push_back(b64_alphabet[v >> 12 & 63]);
    out += "==";
  } else if (rest == 2) {
    std::uint32_t v = at(i) << 16 | at(i + 1) << 8;
    out.push_back(b64_alphabet[v >> 18 & 63]);
    out.push_back(b64_alphabet[v >> 12 & 63]);
    out.push_back(b64_alphabet[v >> 6 & 63]);
    out += "=";
  }
  return out;
}

std::optional<std::size_t> base64_decode_into(std::string_view text, std::span<std::byte> out) {
  if (text.size() % 4 != 0 || out.size() < text.size() / 4 * 3) return std::nullopt;
  std::size_t len = 0;
  auto put = [&](std::uint32_t v) { out[len++] = static_cast<std::byte>(v & 0xff); };
  for (std::size_t i = 0; i < text.size(); i += 4) {
    bool last = i + 4 == text.size();
    int pad = 0;
    std::uint32_t v = 0;
    for (std::size_t k = 0; k < 4; ++k) {
      char c = text[i + k];
      if (c == '=') {
        // Padding only in the last quantum, only in its last two places, and only trailing.
        if (!last || k < 2) return std::nullopt;
        ++pad;
        v <<= 6;
        continue;
      }
      if (pad > 0) return std::nullopt;
      auto d = b64_table[static_cast<unsigned char>(c)];
      if (d < 0) return std::nullopt;
      v = v << 6 | static_cast<std::uint32_t>(d);
    }
    // Non-canonical encodings (stray bits under the padding) are refused.
    if ((pad == 1 && (v & 0xff) != 0) || (pad == 2 && (v & 0xffff) != 0)) return std::nullopt;
    put(v >> 16);
    if (pad < 2) put(v >> 8);
    if (pad < 1) put(v);
  }
  return len;
}

std::optional<std::string> base64_decode(std::string_view text) {
  std::string out(text.size() / 4 * 3, '\0');
  auto len = base64_decode_into(text, std::as_writable_bytes(std::span(out)));
  if (!len) return std::nullopt;
  out.resize(*len);
  return out;
}

}  // namespace drun::detail

// Frame I/O for the peer protocol.
#include "peer/wire.hpp"

#include "detail/encoding.hpp"
#include "transport/rdma.hpp"

#include <fmt/format.h>
#include <sodium.h>

#include <array>
#include <cstring>

namespace drun::peer {

std::size_t max_body(std::uint8_t type) noexcept {
  switch (static_cast<frame>(type)) {
    case frame::hello: return 8 + 8192 + 1 + traceparent_size;
    case frame::get_bundle:
    case frame::get_have: return 32;
    case frame::get_piece: return 40;
    case frame::welcome: return 4;
    case frame::body: return 8;
    case frame::data: return max_data_frame;
    case frame::error: return 2 + max_error_message;
    case frame::rdma_setup: return rdma::max_encoded_size(true);
    case frame::rdma_ready: return rdma::max_encoded_size(false);
  }
  return 0;
}

result<frame_header> decode_header(std::span<const std::byte, frame_header_size> head) {
  frame_header h;
  h.type = static_cast<std::uint8_t>(head[0]);
  reader rd{std::span<const std::byte>(head).subspan(1)};
  h.length = *rd.u32();
  std::size_t bound = max_body(h.type);
  if (bound == 0) return error(errc::malformed_bundle, fmt::format("unknown frame type 0x{:02x}", h.type));
  if (h.length > bound)
    return error(errc::malformed_bundle, fmt::format("frame type 0x{:02x} of {} bytes (at most {})", h.type, h.length, bound));
  return h;
}

result<frame_header> read_header(tls_stream& s, clock::time_point deadline, const std::atomic<bool>* stop) {
  std::array<std::byte, frame_header_size> head{};
  if (auto r = s.read_exact(head, deadline, stop); !r) return std::move(r).error();
  return decode_header(head);
}

result<frame_in> read_frame(tls_stream& s, clock::time_point deadline, const std::atomic<bool>* stop) {
  auto h = read_header(s, deadline, stop);
  if (!h) return std::move(h).error();
  frame_in f;
  f.type = h->type;
  f.body.resize(h->length);
  if (auto r = s.read_exact(f.body, deadline, stop); !r) return std::move(r).error();
  return f;
}

result<void> write_frame(tls_stream& s, frame type, std::span<const std::byte> body, clock::time_point deadline,
                         const std::atomic<bool>* stop) {
  // Header and body in one write when small, so a request is one TLS record.
  writer w;
  std::array<std::byte, 1> t{static_cast<std::byte>(type)};
  w.bytes(t).u32(static_cast<std::uint32_t>(body.size()));
  if (body.size() <= 4096) {
    w.bytes(body);
    return s.write_all(w.view(), deadline, stop);
  }
  if (auto r = s.write_all(w.view(), deadline, stop); !r) return r;
  return s.write_all(body, deadline, stop);
}

writer& writer::u8(std::uint8_t v) {
  buf_.push_back(static_cast<std::byte>(v));
  return *this;
}
writer& writer::u16(std::uint16_t v) {
  buf_.push_back(static_cast<std::byte>(v >> 8));
  buf_.push_back(static_cast<std::byte>(v));
  return *this;
}
writer& writer::u32(std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) buf_.push_back(static_cast<std::byte>(v >> shift));
  return *this;
}
writer& writer::u64(std::uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) buf_.push_back(static_cast<std::byte>(v >> shift));
  return *this;
}
writer& writer::bytes(std::span<const std::byte> b) {
  buf_.insert(buf_.end(), b.begin(), b.end());
  return *this;
}
void writer::wipe() noexcept { sodium_memzero(buf_.data(), buf_.size()); }

writer& writer::text(std::string_view t) { return bytes(std::as_bytes(std::span(t.data(), t.size()))); }

std::optional<std::span<const std::byte>> reader::bytes(std::size_t n) {
  if (n > left()) return std::nullopt;
  auto out = b_.subspan(pos_, n);
  pos_ += n;
  return out;
}
std::optional<std::uint8_t> reader::u8() {
  auto b = bytes(1);
  if (!b) return std::nullopt;
  return std::to_integer<std::uint8_t>((*b)[0]);
}
std::optional<std::uint16_t> reader::u16() {
  auto b = bytes(2);
  if (!b) return std::nullopt;
  return static_cast<std::uint16_t>((std::to_integer<unsigned>((*b)[0]) << 8) | std::to_integer<unsigned>((*b)[1]));
}
std::optional<std::uint32_t> reader::u32() {
  auto b = bytes(4);
  if (!b) return std::nullopt;
  std::uint32_t v = 0;
  for (auto x : *b) v = (v << 8) | std::to_integer<std::uint32_t>(x);
  return v;
}
std::optional<std::uint64_t> reader::u64() {
  auto b = bytes(8);
  if (!b) return std::nullopt;
  std::uint64_t v = 0;
  for (auto x : *b) v = (v << 8) | std::to_integer<std::uint64_t>(x);
  return v;
}

result<hello> decode_hello(std::span<const std::byte> body) {
  auto bad = [] { return error(errc::malformed_bundle, "expected a HELLO frame"); };
  reader rd(body);
  auto magic = rd.bytes(protocol_magic.size());
  auto version = rd.u16();
  auto token_len = rd.u16();
  if (!magic || !version || !token_len || std::memcmp(magic->data(), protocol_magic.data(), protocol_magic.size()) != 0)
    return bad();
  if (*version < oldest_protocol_version || *version > protocol_version)
    return error(errc::unsupported, fmt::format("this server speaks protocol versions {} to {}, not {}",
                                                oldest_protocol_version, protocol_version, *version));
  hello h;
  h.version = *version;
  auto token = rd.bytes(*token_len);
  if (!token) return bad();
  h.token = *token;
  if (h.version >= 2) {
    auto tp_len = rd.u8();
    auto tp = tp_len && (*tp_len == 0 || *tp_len == traceparent_size) ? rd.bytes(*tp_len) : std::nullopt;
    if (!tp) return bad();
    h.traceparent = *tp;
  }
  if (!rd.done()) return bad();
  return h;
}

void encode(writer& w, const hello& h) {
  w.text(protocol_magic).u16(h.version).u16(static_cast<std::uint16_t>(h.token.size())).bytes(h.token);
  if (h.version >= 2) w.u8(static_cast<std::uint8_t>(h.traceparent.size())).bytes(h.traceparent);
}

std::optional<request> decode_request(frame type, std::span<const std::byte> body) {
  if (type != frame::get_bundle && type != frame::get_have && type != frame::get_piece) return std::nullopt;
  reader rd(body);
  request r;
  r.type = type;
  auto id = rd.bytes(32);
  if (!id) return std::nullopt;
  r.artifact = *id;
  if (type == frame::get_piece) {
    auto file = rd.u32();
    auto piece = rd.u32();
    if (!file || !piece) return std::nullopt;
    r.file = *file, r.piece = *piece;
  }
  if (!rd.done()) return std::nullopt;
  return r;
}

void encode(writer& w, const request& r) {
  w.bytes(r.artifact);
  if (r.type == frame::get_piece) w.u32(r.file).u32(r.piece);
}

std::optional<welcome> decode_welcome(std::span<const std::byte> body) {
  reader rd(body);
  auto version = rd.u16();
  auto features = rd.u16();
  if (!version || !features || !rd.done()) return std::nullopt;
  return welcome{*version, *features};
}

void encode(writer& w, const welcome& m) { w.u16(m.version).u16(m.features); }

std::optional<std::uint64_t> decode_answer_length(std::span<const std::byte> body) {
  reader rd(body);
  auto length = rd.u64();
  if (!length || !rd.done()) return std::nullopt;
  return length;
}

void encode_answer_length(writer& w, std::uint64_t length) { w.u64(length); }

std::optional<error_frame> decode_error(std::span<const std::byte> body) {
  reader rd(body);
  auto code = rd.u16();
  if (!code || rd.left() > max_error_message) return std::nullopt;
  auto rest = *rd.bytes(rd.left());
  return error_frame{*code, std::string_view(reinterpret_cast<const char*>(rest.data()), rest.size())};
}

void encode(writer& w, const error_frame& e) { w.u16(e.code).text(e.message.substr(0, max_error_message)); }

std::optional<std::vector<bool>> decode_holdings(std::span<const std::byte> body, std::size_t pieces) {
  reader rd(body);
  auto count = rd.u32();
  auto bits = rd.bytes((pieces + 7) / 8);
  if (!count || *count != pieces || !bits || !rd.done()) return std::nullopt;
  std::vector<bool> have(pieces);
  for (std::size_t i = 0; i < pieces; ++i) have[i] = (std::to_integer<unsigned>((*bits)[i / 8]) & (0x80u >> (i % 8))) != 0;
  // Bits past the last piece are zero: anything else is another encoding of the same answer.
  if (pieces % 8 != 0 && (std::to_integer<unsigned>(bits->back()) & (0xffu >> (pieces % 8))) != 0) return std::nullopt;
  return have;
}

void encode_holdings(writer& w, const std::vector<bool>& have) {
  std::vector<std::byte> bits((have.size() + 7) / 8);
  for (std::size_t i = 0; i < have.size(); ++i)
    if (have[i]) bits[i / 8] |= static_cast<std::byte>(0x80u >> (i % 8));
  w.u32(static_cast<std::uint32_t>(have.size())).bytes(bits);
}

std::optional<std::vector<std::byte>> artifact_to_wire(std::string_view hex) {
  if (hex.size() != 64) return std::nullopt;
  auto raw = detail::hex_decode(hex);
  if (!raw || raw->size() != 32) return std::nullopt;
  return std::vector<std::byte>(raw->begin(), raw->end());
}

std::string artifact_from_wire(std::span<const std::byte> raw) { return detail::hex_encode(raw); }

}  // namespace drun::peer

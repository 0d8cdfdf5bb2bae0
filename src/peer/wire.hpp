// The peer protocol's frames (docs/peer-protocol.md): types, bounds, and reading and writing
// them over a TLS stream with deadlines.
#pragma once

#include <drun/error.hpp>

#include "peer/tls.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace drun::peer {

// Version 2 adds the caller's trace context to the HELLO; a server speaks both, and a client that
// is told a server speaks only 1 says its HELLO again in version 1 (with no trace context).
inline constexpr std::uint16_t protocol_version = 2;
inline constexpr std::uint16_t oldest_protocol_version = 1;
inline constexpr std::size_t traceparent_size = 55;  // W3C version 00
inline constexpr std::string_view protocol_magic = "DRUN";

enum class frame : std::uint8_t {
  hello = 0x01,
  get_bundle = 0x02,
  get_have = 0x03,
  get_piece = 0x04,
  rdma_setup = 0x05,
  welcome = 0x81,
  body = 0x82,
  data = 0x83,
  error = 0x84,
  rdma_ready = 0x85,
};

// WELCOME's features (a bit set; version 1 servers sent 0).
inline constexpr std::uint16_t feature_rdma = 1;

enum class wire_error : std::uint16_t {
  bad_request = 1,
  unsupported_version = 2,
  unauthenticated = 3,
  denied = 4,
  not_found = 5,
  busy = 6,
  internal = 7,
  rdma_unavailable = 8,
};

inline constexpr std::size_t max_data_frame = std::size_t{1} << 20;
inline constexpr std::size_t max_error_message = 1024;
// The longest answer: a piece (at most 64 MiB by the piece plan) or a bundle.
inline constexpr std::uint64_t max_answer = std::uint64_t{64} << 20;

// The largest body a frame type may carry; 0 for an unknown type.
std::size_t max_body(std::uint8_t type) noexcept;

struct frame_in {
  std::uint8_t type = 0;
  std::vector<std::byte> body;
};

struct frame_header {
  std::uint8_t type = 0;
  std::uint32_t length = 0;
};
inline constexpr std::size_t frame_header_size = 5;  // type, then the body's length (u32)
// Refuses an unknown type or a length over the type's bound. Errors: malformed_bundle.
result<frame_header> decode_header(std::span<const std::byte, frame_header_size> head);
// Reads a frame's header, refusing an unknown type or a length over its bound; the body is the
// caller's to read (straight into its own buffer: piece data is never copied twice).
result<frame_header> read_header(tls_stream& s, clock::time_point deadline, const std::atomic<bool>* stop);
// Reads one frame, refusing an unknown type or a length over its bound before reading the body.
// Errors: io_error, cancelled, malformed_bundle (the protocol error, with what was wrong).
result<frame_in> read_frame(tls_stream& s, clock::time_point deadline, const std::atomic<bool>* stop);
result<void> write_frame(tls_stream& s, frame type, std::span<const std::byte> body, clock::time_point deadline,
                         const std::atomic<bool>* stop);

// Big-endian encoding into a growing buffer, and bounds-checked decoding.
class writer {
 public:
  writer& u8(std::uint8_t v);
  writer& u16(std::uint16_t v);
  writer& u32(std::uint32_t v);
  writer& u64(std::uint64_t v);
  writer& bytes(std::span<const std::byte> b);
  writer& text(std::string_view t);
  std::span<const std::byte> view() const noexcept { return buf_; }
  void wipe() noexcept;  // zeroes what was written (it may hold a token)

 private:
  std::vector<std::byte> buf_;
};

class reader {
 public:
  explicit reader(std::span<const std::byte> b) : b_(b) {}
  std::optional<std::uint8_t> u8();
  std::optional<std::uint16_t> u16();
  std::optional<std::uint32_t> u32();
  std::optional<std::uint64_t> u64();
  std::optional<std::span<const std::byte>> bytes(std::size_t n);
  bool done() const noexcept { return pos_ == b_.size(); }
  std::size_t left() const noexcept { return b_.size() - pos_; }

 private:
  std::span<const std::byte> b_;
  std::size_t pos_ = 0;
};

// The bodies of the frames (docs/peer-protocol.md). Each decoder accepts exactly what its
// encoder writes and nothing else (no trailing bytes, no non-zero padding), so that one message
// has one encoding: the fuzz harnesses check that whatever decodes encodes back to the same bytes.
// Decoded views point into the body they were read from.

// HELLO: magic, version, token (u16 length), and from version 2 the caller's traceparent (u8
// length, 0 or traceparent_size).
struct hello {
  std::uint16_t version = protocol_version;
  std::span<const std::byte> token;        // a secret: whoever holds the body wipes it
  std::span<const std::byte> traceparent;  // empty when the caller named no trace
};
// Errors: unsupported (a version this side does not speak, named in the message, judged before
// the rest is read so that a later version's layout is never misread), malformed_bundle.
result<hello> decode_hello(std::span<const std::byte> body);
void encode(writer& w, const hello& h);

// GET_BUNDLE and GET_HAVE carry the artifact id; GET_PIECE adds the file and piece indexes.
struct request {
  frame type = frame::get_bundle;
  std::span<const std::byte> artifact;  // 32 bytes
  std::uint32_t file = 0, piece = 0;    // GET_PIECE only
};
std::optional<request> decode_request(frame type, std::span<const std::byte> body);
void encode(writer& w, const request& r);

// WELCOME: the version the server speaks on this connection and its features.
struct welcome {
  std::uint16_t version = protocol_version;
  std::uint16_t features = 0;
};
std::optional<welcome> decode_welcome(std::span<const std::byte> body);
void encode(writer& w, const welcome& m);

// BODY: the length of the answer that follows (DATA frames, or RDMA writes).
std::optional<std::uint64_t> decode_answer_length(std::span<const std::byte> body);
void encode_answer_length(writer& w, std::uint64_t length);

// ERROR: a code and the sender's words (at most max_error_message bytes, not yet sanitized).
struct error_frame {
  std::uint16_t code = 0;
  std::string_view message;
};
std::optional<error_frame> decode_error(std::span<const std::byte> body);
void encode(writer& w, const error_frame& e);  // cuts the message at max_error_message

// The answer to GET_HAVE: the piece count, then one bit per piece, most significant first.
// Decoding refuses another count than the caller's manifest has, and set padding bits.
std::optional<std::vector<bool>> decode_holdings(std::span<const std::byte> body, std::size_t pieces);
void encode_holdings(writer& w, const std::vector<bool>& have);

// 64 hex characters <-> the 32 raw bytes on the wire.
std::optional<std::vector<std::byte>> artifact_to_wire(std::string_view hex);
std::string artifact_from_wire(std::span<const std::byte> raw);

}  // namespace drun::peer

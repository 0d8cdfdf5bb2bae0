// The TCP+TLS data path: an answer's bytes as DATA frames in the TLS stream.
#include "transport/transport.hpp"

#include "peer/wire.hpp"

namespace drun::transport {
namespace {

class tcp_transport final : public data_path {
 public:
  explicit tcp_transport(peer::tls_stream& s) : s_(s) {}
  const char* kind() const noexcept override { return "tcp+tls"; }

  result<void> send(std::span<const std::byte> bytes, clock::time_point deadline, const std::atomic<bool>* stop,
                    const pace_fn& pace) override {
    for (std::size_t off = 0; off < bytes.size(); off += peer::max_data_frame) {
      auto chunk = bytes.subspan(off, std::min(peer::max_data_frame, bytes.size() - off));
      if (pace) {
        auto before = clock::now();
        pace(chunk.size());
        deadline += clock::now() - before;
      }
      if (auto r = peer::write_frame(s_, peer::frame::data, chunk, deadline, stop); !r) return r;
    }
    return {};
  }

  // Frames are read straight into out: piece data is never copied twice.
  result<void> receive(std::span<std::byte> out, clock::time_point deadline, const std::atomic<bool>* stop) override {
    std::size_t got = 0;
    while (got < out.size()) {
      auto d = peer::read_header(s_, deadline, stop);
      if (!d) return d.error().code() == errc::cancelled ? std::move(d).error() : error(errc::io_error, d.error().detail());
      if (static_cast<peer::frame>(d->type) != peer::frame::data || d->length == 0 || d->length > out.size() - got)
        return error(errc::io_error, "protocol error: a DATA frame that does not fit the answer");
      if (auto r = s_.read_exact(out.subspan(got, d->length), deadline, stop); !r)
        return r.error().code() == errc::cancelled ? std::move(r).error() : error(errc::io_error, r.error().detail());
      got += d->length;
    }
    return {};
  }

 private:
  peer::tls_stream& s_;
};

}  // namespace

std::unique_ptr<data_path> make_tcp_transport(peer::tls_stream& stream) {
  return std::make_unique<tcp_transport>(stream);
}

}  // namespace drun::transport

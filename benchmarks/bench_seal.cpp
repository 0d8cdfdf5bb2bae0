// Per-core AES-256-GCM sealing and opening at piece granularity (8 MiB pieces, streamed through
// the store's gcm class in 1 MiB chunks as put_piece does), in MB/s (10^6 bytes per second).
//
//   bench_seal SECONDS     prints "seal <MB/s>" and "open <MB/s>"
#include <drun/node_key.hpp>

#include "store/seal.hpp"

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

using namespace drun;

int main(int argc, char** argv) {
  double seconds = argc > 1 ? std::stod(argv[1]) : 3.0;
  constexpr std::size_t piece = 8 << 20, chunk = 1 << 20;
  auto key = node_key::generate();
  std::array<std::byte, 16> store_id{};
  std::array<std::byte, 32> artifact{};
  auto dk = std::move(store_detail::data_key::derive(key, store_id, artifact)).value();
  std::vector<std::byte> plain(piece), sealed(piece), opened(piece);
  for (std::size_t i = 0; i < piece; ++i) plain[i] = static_cast<std::byte>(i * 7 + 3);

  std::vector<store_detail::tag_bytes> tags;
  auto run = [&](bool seal) {
    std::uint64_t bytes = 0, gen = 0;
    auto start = std::chrono::steady_clock::now();
    for (;;) {
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (elapsed >= seconds) return static_cast<double>(bytes) / elapsed / 1e6;
      store_detail::piece_address at{artifact, 0, 0, 1, seal ? ++gen : 1};
      store_detail::gcm g(seal ? store_detail::gcm::mode::seal : store_detail::gcm::mode::open, dk, at);
      for (std::size_t off = 0; off < piece; off += chunk) {
        if (seal) g.update(std::span(plain).subspan(off, chunk), std::span(sealed).subspan(off, chunk));
        else g.update(std::span(sealed).subspan(off, chunk), std::span(opened).subspan(off, chunk));
      }
      if (seal) {
        tags.assign(1, g.seal_tag());
      } else if (!g.open_check(tags[0])) {
        std::fprintf(stderr, "tag check failed\n");
        std::exit(1);
      }
      bytes += piece;
    }
  };
  std::printf("seal %.1f\n", run(true));
  // Re-seal at generation 1 so the open loop authenticates the same piece every time.
  {
    store_detail::gcm g(store_detail::gcm::mode::seal, dk, {artifact, 0, 0, 1, 1});
    g.update(plain, sealed);
    tags.assign(1, g.seal_tag());
  }
  std::printf("open %.1f\n", run(false));
  return 0;
}

// Per-core hashing throughput, in the units `openssl speed` prints (1000 bytes per second).
//
//   bench_hash memory SECONDS      one thread hashing 8 MiB pieces from memory in 1 MiB updates,
//                                  as the piece hasher feeds OpenSSL
//   bench_hash manifest DIR        one thread building a shards manifest of DIR (pread + hash:
//                                  the real signing path), files expected in the page cache
//
// Prints one line: "<mode> <MB/s>" with MB = 10^6 bytes.
#include <drun/drun.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

int memory(double seconds) {
  constexpr std::size_t piece = 8 << 20, chunk = 1 << 20;
  std::vector<std::byte> buf(piece);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<std::byte>(i * 131 + 7);
  drun::hasher h(drun::hash_algorithm::sha256);
  std::uint64_t bytes = 0;
  auto start = std::chrono::steady_clock::now();
  while (seconds_since(start) < seconds) {
    h.reset();
    for (std::size_t off = 0; off < piece; off += chunk) h.update(std::span(buf).subspan(off, chunk));
    volatile auto sink = h.finish().bytes()[0];
    (void)sink;
    bytes += piece;
  }
  std::printf("memory %.1f\n", static_cast<double>(bytes) / seconds_since(start) / 1e6);
  return 0;
}

int manifest(const char* dir) {
  drun::manifest_options opts;
  opts.threads = 1;
  auto start = std::chrono::steady_clock::now();
  auto m = drun::build_manifest(dir, opts);
  double secs = seconds_since(start);
  if (!m) {
    std::fprintf(stderr, "%s\n", m.error().message().c_str());
    return 1;
  }
  std::printf("manifest %.1f\n", static_cast<double>(m->total_bytes()) / secs / 1e6);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "memory") == 0) return memory(std::stod(argv[2]));
  if (argc == 3 && std::strcmp(argv[1], "manifest") == 0) return manifest(argv[2]);
  std::fprintf(stderr, "usage: bench_hash memory SECONDS | bench_hash manifest DIR\n");
  return 2;
}

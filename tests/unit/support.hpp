// Test helpers: a temporary directory removed at scope exit, and small file writers.
#pragma once

#include <drun/error.hpp>
#include <drun/keys.hpp>
#include <drun/manifest.hpp>
#include <drun/sign.hpp>
#include <drun/verify.hpp>

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace drun::test {

class temp_dir {
 public:
  temp_dir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "drun-test-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& rel) const { return path_ / rel; }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::filesystem::path& p, const std::string& content) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << content;
}

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Deterministic pseudo-random content of n bytes.
inline std::string pattern(std::size_t n, unsigned seed = 1) {
  std::string s(n, '\0');
  std::uint32_t x = seed * 2654435761u + 1;
  for (auto& c : s) {
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    c = static_cast<char>(x & 0xff);
  }
  return s;
}

template <class T>
const error& error_of(const result<T>& r) {
  REQUIRE_FALSE(r.has_value());
  return r.error();
}

// Signs the model in `dir` with a fresh Ed25519 key at `piece_size`, and verifies the bundle
// back: the verified manifest, with the bundle text in *bundle.
inline verified_manifest sign_and_verify(const std::filesystem::path& dir, std::uint64_t piece_size, std::string* bundle) {
  manifest_options opts;
  opts.piece_size = piece_size;
  auto m = build_manifest(dir, opts);
  REQUIRE(m);
  auto k = private_key::generate(key_type::ed25519);
  REQUIRE(k);
  *bundle = std::move(sign_manifest(*m, *k)).value();
  auto v = verify_bundle(*bundle, trust_store::from_public_key(k->public_key()));
  REQUIRE(v);
  return std::move(v).value();
}

}  // namespace drun::test

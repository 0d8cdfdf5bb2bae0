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

inline void sh(const std::string& cmd) {
  REQUIRE_MESSAGE(std::system((cmd + " >/dev/null 2>&1").c_str()) == 0, cmd);
}

// A throwaway CA (ca.pem) and one certificate for 127.0.0.1 and localhost (node.pem, node.key;
// server and client alike), made with openssl as tests/python/peerkit.py makes them.
struct test_pki {
  temp_dir d;
  test_pki() {
    auto p = d.path().string();
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=ca -keyout " + p +
       "/ca.key -out " + p + "/ca.pem");
    sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=node -keyout " + p +
       "/node.key -out " + p + "/node.csr");
    write_file(d / "ext.cnf", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n");
    sh("openssl x509 -req -in " + p + "/node.csr -CA " + p + "/ca.pem -CAkey " + p +
       "/ca.key -CAcreateserial -days 2 -extfile " + p + "/ext.cnf -out " + p + "/node.pem");
    std::filesystem::permissions(d / "node.key", std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  }
  std::string file(const char* name) const { return (d / name).string(); }
};

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

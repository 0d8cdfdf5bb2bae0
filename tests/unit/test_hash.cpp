// Known-answer and streaming tests for SHA-256 and BLAKE2b-512.
#include <drun/hash.hpp>

#include "support.hpp"

#include <vector>

using namespace drun;

TEST_CASE("sha256 known answers (FIPS 180-2)") {
  CHECK(hash(hash_algorithm::sha256, as_bytes("")).hex() ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(hash(hash_algorithm::sha256, as_bytes("abc")).hex() ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(hash(hash_algorithm::sha256, as_bytes("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")).hex() ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST_CASE("blake2b-512 known answers (RFC 7693)") {
  CHECK(hash(hash_algorithm::blake2b, as_bytes("abc")).hex() ==
        "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1"
        "7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923");
  CHECK(hash(hash_algorithm::blake2b, as_bytes("")).size() == 64);
}

TEST_CASE("blake3 known answers (the BLAKE3 team's test vectors, and b3sum)") {
  CHECK(hash(hash_algorithm::blake3, as_bytes("")).hex() ==
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
  CHECK(hash(hash_algorithm::blake3, as_bytes("abc")).hex() ==
        "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85");
  // test_vectors.json: input byte i is i % 251; lengths around the 1024-byte chunk and the
  // SIMD batch sizes, where the tree and the dispatch change.
  auto vector = [](std::size_t n) {
    std::string s(n, '\0');
    for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>(i % 251);
    return hash(hash_algorithm::blake3, as_bytes(s)).hex();
  };
  CHECK(vector(1) == "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213");
  CHECK(vector(1024) == "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7");
  CHECK(vector(1025) == "d00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444");
  CHECK(vector(102400) == "bc3e3d41a1146b069abffad3c0d44860cf664390afce4d9661f7902e7943e085");
  CHECK(digest_size(hash_algorithm::blake3) == 32);
}

TEST_CASE("streaming equals one-shot across arbitrary chunk boundaries") {
  auto data = test::pattern(1 << 20);
  for (auto alg : {hash_algorithm::sha256, hash_algorithm::blake2b, hash_algorithm::blake3}) {
    auto expected = hash(alg, as_bytes(data));
    hasher h(alg);
    std::size_t off = 0, step = 1;
    while (off < data.size()) {
      auto n = std::min(step, data.size() - off);
      h.update(as_bytes(std::string_view(data).substr(off, n)));
      off += n;
      step = step * 3 + 7;
    }
    CHECK(h.finish() == expected);
    h.reset();
    h.update(as_bytes(data));
    CHECK(h.finish() == expected);
  }
}

TEST_CASE("digest equality is exact and algorithm-aware") {
  auto a = hash(hash_algorithm::sha256, as_bytes("model"));
  auto b = hash(hash_algorithm::sha256, as_bytes("model"));
  auto c = hash(hash_algorithm::sha256, as_bytes("Model"));
  CHECK(a == b);
  CHECK_FALSE(a == c);
  CHECK_FALSE(a == hash(hash_algorithm::blake2b, as_bytes("model")));
  auto flipped = std::vector<std::byte>(a.bytes().begin(), a.bytes().end());
  flipped[31] ^= std::byte{1};
  CHECK_FALSE(digest_equal(a.bytes(), flipped));
  CHECK_FALSE(digest_equal(a.bytes(), a.bytes().first(31)));
  CHECK(digest_equal(a.bytes(), b.bytes()));
}

TEST_CASE("hash algorithm names") {
  CHECK(parse_hash_algorithm("sha256") == hash_algorithm::sha256);
  CHECK(parse_hash_algorithm("blake2b") == hash_algorithm::blake2b);
  CHECK(parse_hash_algorithm("blake3") == hash_algorithm::blake3);
  CHECK_FALSE(parse_hash_algorithm("BLAKE3"));
  CHECK_FALSE(parse_hash_algorithm("SHA256"));
  CHECK(to_string(hash_algorithm::blake2b) == "blake2b");
  CHECK(to_string(hash_algorithm::blake3) == "blake3");
}

// SHA-256 through OpenSSL EVP (which picks SHA-NI/AVX2 code paths at run time), BLAKE2b-512
// through libsodium, and BLAKE3 through the BLAKE3 team's C implementation (SSE2/SSE4.1/AVX2/
// AVX-512, chosen at run time; built from Debian's librust-blake3-dev sources, see CMakeLists.txt).
#include <drun/hash.hpp>

#include "detail/encoding.hpp"
#include "detail/openssl.hpp"

#include <blake3.h>
#include <openssl/crypto.h>
#include <sodium.h>

#include <cassert>
#include <cstdlib>
#include <variant>

namespace drun {

std::string_view to_string(hash_algorithm alg) noexcept {
  switch (alg) {
    case hash_algorithm::sha256: return "sha256";
    case hash_algorithm::blake2b: return "blake2b";
    case hash_algorithm::blake3: return "blake3";
  }
  return "sha256";
}

std::optional<hash_algorithm> parse_hash_algorithm(std::string_view name) noexcept {
  if (name == "sha256") return hash_algorithm::sha256;
  if (name == "blake2b") return hash_algorithm::blake2b;
  if (name == "blake3") return hash_algorithm::blake3;
  return std::nullopt;
}

std::size_t digest_size(hash_algorithm alg) noexcept {
  return alg == hash_algorithm::blake2b ? crypto_generichash_blake2b_BYTES_MAX : 32;
}

digest::digest(hash_algorithm alg, std::span<const std::byte> bytes) : alg_(alg), size_(bytes.size()) {
  assert(bytes.size() == digest_size(alg));
  std::copy(bytes.begin(), bytes.end(), data_.begin());
}

std::string digest::hex() const { return detail::hex_encode(bytes()); }

bool digest_equal(std::span<const std::byte> a, std::span<const std::byte> b) noexcept {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

bool operator==(const digest& a, const digest& b) noexcept {
  return a.alg_ == b.alg_ && digest_equal(a.bytes(), b.bytes());
}

namespace {
// Fetched once: EVP_MD_fetch per hash would cost a provider lookup on every piece.
const EVP_MD* sha256_md() {
  static EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  if (!md) std::abort();  // OpenSSL without SHA-256 cannot run drun at all
  return md;
}
}  // namespace

struct hasher::impl {
  hash_algorithm alg;
  detail::evp_md_ctx_ptr sha;
  crypto_generichash_blake2b_state blake{};
  blake3_hasher b3{};

  explicit impl(hash_algorithm a) : alg(a) { reset(); }
  ~impl() {
    sodium_memzero(&blake, sizeof blake);
    sodium_memzero(&b3, sizeof b3);
  }
  void reset() {
    switch (alg) {
      case hash_algorithm::sha256:
        if (!sha) sha.reset(EVP_MD_CTX_new());
        if (!sha || EVP_DigestInit_ex2(sha.get(), sha256_md(), nullptr) != 1) std::abort();
        break;
      case hash_algorithm::blake2b:
        crypto_generichash_blake2b_init(&blake, nullptr, 0, crypto_generichash_blake2b_BYTES_MAX);
        break;
      case hash_algorithm::blake3: blake3_hasher_init(&b3); break;
    }
  }
};

hasher::hasher(hash_algorithm alg) : impl_(std::make_unique<impl>(alg)) {}
hasher::~hasher() = default;
hasher::hasher(hasher&&) noexcept = default;
hasher& hasher::operator=(hasher&&) noexcept = default;

hash_algorithm hasher::algorithm() const noexcept { return impl_->alg; }

void hasher::update(std::span<const std::byte> data) {
  if (data.empty()) return;
  switch (impl_->alg) {
    case hash_algorithm::sha256: EVP_DigestUpdate(impl_->sha.get(), data.data(), data.size()); break;
    case hash_algorithm::blake2b:
      crypto_generichash_blake2b_update(&impl_->blake, reinterpret_cast<const unsigned char*>(data.data()),
                                        data.size());
      break;
    case hash_algorithm::blake3: blake3_hasher_update(&impl_->b3, data.data(), data.size()); break;
  }
}

digest hasher::finish() {
  std::array<std::byte, digest::max_size> out{};
  std::size_t n = digest_size(impl_->alg);
  switch (impl_->alg) {
    case hash_algorithm::sha256: {
      unsigned len = 0;
      EVP_DigestFinal_ex(impl_->sha.get(), reinterpret_cast<unsigned char*>(out.data()), &len);
      break;
    }
    case hash_algorithm::blake2b:
      crypto_generichash_blake2b_final(&impl_->blake, reinterpret_cast<unsigned char*>(out.data()), n);
      break;
    case hash_algorithm::blake3: blake3_hasher_finalize(&impl_->b3, reinterpret_cast<std::uint8_t*>(out.data()), n); break;
  }
  return digest(impl_->alg, std::span(out.data(), n));
}

void hasher::reset() { impl_->reset(); }

digest hash(hash_algorithm alg, std::span<const std::byte> data) {
  hasher h(alg);
  h.update(data);
  return h.finish();
}

}  // namespace drun

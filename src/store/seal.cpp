// AES-256-GCM sealing and HKDF key derivation.
#include "store/seal.hpp"

#include "detail/encoding.hpp"
#include "store/node_key_data.hpp"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <sodium.h>

#include <cassert>
#include <cstdlib>
#include <cstring>

namespace drun::store_detail {
namespace {

bool hkdf(std::span<const std::byte> ikm, std::span<const std::byte> salt, std::string_view info,
          unsigned char* out, std::size_t out_len);

}  // namespace

bool hkdf_sha256(std::span<const std::byte> ikm, std::span<const std::byte> salt, std::string_view info,
                 std::span<std::byte> out) {
  return hkdf(ikm, salt, info, reinterpret_cast<unsigned char*>(out.data()), out.size());
}

namespace {

bool hkdf(std::span<const std::byte> ikm, std::span<const std::byte> salt, std::string_view info,
          unsigned char* out, std::size_t out_len) {
  EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
  EVP_KDF_CTX* ctx = kdf ? EVP_KDF_CTX_new(kdf) : nullptr;
  EVP_KDF_free(kdf);
  if (!ctx) return false;
  char digest[] = "SHA256";
  OSSL_PARAM params[5];
  std::size_t n = 0;
  params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0);
  params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<std::byte*>(ikm.data()), ikm.size());
  if (!salt.empty())  // no salt: HKDF's default of HashLen zero bytes
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<std::byte*>(salt.data()), salt.size());
  params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<char*>(info.data()), info.size());
  params[n] = OSSL_PARAM_construct_end();
  bool ok = EVP_KDF_derive(ctx, out, out_len, params) == 1;
  EVP_KDF_CTX_free(ctx);
  return ok;
}

void put_be(unsigned char* p, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i, v >>= 8) p[i] = static_cast<unsigned char>(v & 0xff);
}

}  // namespace

std::string key_fingerprint(const node_key& key) {
  std::array<std::byte, 16> fp{};
  if (!hkdf(detail::node_key_access::bytes(key), {}, "drun store key fingerprint v1",
            reinterpret_cast<unsigned char*>(fp.data()), fp.size()))
    std::abort();  // HKDF-SHA256 missing from OpenSSL: nothing can be sealed
  return detail::hex_encode(fp);
}

result<data_key> data_key::derive(const node_key& key, std::span<const std::byte> store_id,
                                  std::span<const std::byte> artifact_id) {
  std::array<std::byte, 64> salt{};
  assert(store_id.size() + artifact_id.size() <= salt.size());
  std::memcpy(salt.data(), store_id.data(), store_id.size());
  std::memcpy(salt.data() + store_id.size(), artifact_id.data(), artifact_id.size());
  auto k = std::make_unique<detail::secret_buffer>(32);
  if (!hkdf(detail::node_key_access::bytes(key), std::span(salt.data(), store_id.size() + artifact_id.size()),
            "drun store data key v1", k->uchar(), 32))
    return error(errc::key_error, "cannot derive the artifact's data key (HKDF)");
  return data_key(std::move(k));
}

nonce_bytes random_nonce() {
  nonce_bytes n;
  randombytes_buf(n.data(), n.size());
  return n;
}

nonce_bytes legacy_nonce(std::uint32_t key_version, std::uint64_t generation) {
  nonce_bytes n{};
  auto* p = reinterpret_cast<unsigned char*>(n.data());
  put_be(p, key_version, 4);
  put_be(p + 4, generation, 8);
  return n;
}

gcm::gcm(mode m, const data_key& key, const piece_address& where) : ctx_(EVP_CIPHER_CTX_new()), mode_(m) {
  auto* ctx = static_cast<EVP_CIPHER_CTX*>(ctx_);
  if (!ctx) std::abort();
  const auto* nonce = reinterpret_cast<const unsigned char*>(where.nonce.data());
  unsigned char aad[13 + 32 + 4 + 8 + 4 + 8];
  std::memcpy(aad, "drun-piece-v1", 13);
  std::memcpy(aad + 13, where.artifact.data(), 32);
  put_be(aad + 45, where.file, 4);
  put_be(aad + 49, where.piece, 8);
  put_be(aad + 57, where.key_version, 4);
  put_be(aad + 61, where.generation, 8);
  int len = 0;
  bool ok = m == mode::seal
                ? EVP_EncryptInit_ex2(ctx, EVP_aes_256_gcm(), key.bytes(), nonce, nullptr) == 1 &&
                      EVP_EncryptUpdate(ctx, nullptr, &len, aad, sizeof aad) == 1
                : EVP_DecryptInit_ex2(ctx, EVP_aes_256_gcm(), key.bytes(), nonce, nullptr) == 1 &&
                      EVP_DecryptUpdate(ctx, nullptr, &len, aad, sizeof aad) == 1;
  if (!ok) std::abort();
}

gcm::~gcm() { EVP_CIPHER_CTX_free(static_cast<EVP_CIPHER_CTX*>(ctx_)); }  // cleanses the key schedule

void gcm::update(std::span<const std::byte> in, std::span<std::byte> out) {
  assert(in.size() == out.size());
  auto* ctx = static_cast<EVP_CIPHER_CTX*>(ctx_);
  constexpr std::size_t max_chunk = std::size_t{1} << 30;  // EVP lengths are int
  for (std::size_t off = 0; off < in.size(); off += max_chunk) {
    int n = static_cast<int>(std::min(max_chunk, in.size() - off));
    int len = 0;
    auto* o = reinterpret_cast<unsigned char*>(out.data() + off);
    auto* i = reinterpret_cast<const unsigned char*>(in.data() + off);
    if ((mode_ == mode::seal ? EVP_EncryptUpdate(ctx, o, &len, i, n) : EVP_DecryptUpdate(ctx, o, &len, i, n)) != 1)
      std::abort();
  }
}

tag_bytes gcm::seal_tag() {
  assert(mode_ == mode::seal);
  auto* ctx = static_cast<EVP_CIPHER_CTX*>(ctx_);
  int len = 0;
  unsigned char tail[16];
  tag_bytes tag{};
  if (EVP_EncryptFinal_ex(ctx, tail, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, tag_size, tag.data()) != 1)
    std::abort();
  return tag;
}

bool gcm::open_check(const tag_bytes& tag) {
  assert(mode_ == mode::open);
  auto* ctx = static_cast<EVP_CIPHER_CTX*>(ctx_);
  tag_bytes copy = tag;
  int len = 0;
  unsigned char tail[16];
  return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, tag_size, copy.data()) == 1 &&
         EVP_DecryptFinal_ex(ctx, tail, &len) == 1;
}

}  // namespace drun::store_detail

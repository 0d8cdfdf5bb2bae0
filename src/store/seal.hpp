// Sealing pieces at rest: AES-256-GCM (OpenSSL EVP, AES-NI) under per-artifact data keys derived
// from the node key by HKDF-SHA256. Every seal draws a fresh random 96-bit nonce, kept in the index
// next to the tag: no state on disk decides a nonce, so a store whose index was rolled back,
// restored from a backup or cloned under a shared node key cannot repeat one (a counter in the
// index could). The associated data binds the artifact, file, piece, key version and generation,
// so a sealed piece cannot be moved, swapped or replayed.
#pragma once

#include <drun/error.hpp>
#include <drun/node_key.hpp>

#include "detail/secret.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace drun::store_detail {

inline constexpr std::size_t tag_size = 16;
using tag_bytes = std::array<std::byte, tag_size>;

// HKDF-SHA256 (RFC 5869) into out; false if OpenSSL lacks it.
bool hkdf_sha256(std::span<const std::byte> ikm, std::span<const std::byte> salt, std::string_view info,
                 std::span<std::byte> out);

// Identifies a node key without revealing it: HKDF(key, info "drun store key fingerprint v1").
std::string key_fingerprint(const node_key& key);

inline constexpr std::size_t nonce_size = 12;
using nonce_bytes = std::array<std::byte, nonce_size>;

// A fresh nonce from the OS CSPRNG. Random 96-bit nonces keep the chance of any repeat under one
// data key below 2^-32 up to 2^32 seals (NIST SP 800-38D 8.3); a data key seals one artifact's
// pieces, each a handful of times over the store's life, so that bound is never approached.
nonce_bytes random_nonce();

// Stores made before random nonces derived them from key version || generation; their pieces
// are still read that way (the index holds no nonce for them) and get random ones when resealed.
nonce_bytes legacy_nonce(std::uint32_t key_version, std::uint64_t generation);

// Where a sealed piece belongs (authenticated as associated data) and the nonce it is sealed under.
struct piece_address {
  std::array<std::byte, 32> artifact{};  // raw artifact id
  std::uint32_t file = 0;
  std::uint64_t piece = 0;
  std::uint32_t key_version = 0;
  std::uint64_t generation = 0;  // the index row's version, so a stale ciphertext never opens
  nonce_bytes nonce{};
};

// The data key of one artifact under one node key and store: HKDF-SHA256(node key,
// salt = store id || artifact id, info = "drun store data key v1"). Wiped when destroyed.
class data_key {
 public:
  static result<data_key> derive(const node_key& key, std::span<const std::byte> store_id,
                                 std::span<const std::byte> artifact_id);
  const unsigned char* bytes() const noexcept { return key_->uchar(); }

 private:
  explicit data_key(std::unique_ptr<detail::secret_buffer> k) : key_(std::move(k)) {}
  std::unique_ptr<detail::secret_buffer> key_;
};

// One AES-256-GCM operation, streamed chunk by chunk so a piece never needs a second buffer.
class gcm {
 public:
  enum class mode { seal, open };
  gcm(mode m, const data_key& key, const piece_address& where);
  ~gcm();
  gcm(const gcm&) = delete;
  gcm& operator=(const gcm&) = delete;

  // out.size() == in.size(); in and out may be the same buffer.
  void update(std::span<const std::byte> in, std::span<std::byte> out);
  tag_bytes seal_tag();
  // True when the tag authenticates everything passed to update(). Until then, no output of
  // update() may be released to anyone.
  [[nodiscard]] bool open_check(const tag_bytes& tag);

 private:
  void* ctx_;
  mode mode_;
};

}  // namespace drun::store_detail

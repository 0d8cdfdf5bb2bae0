// Content hashes: SHA-256 (OpenSSL EVP, SHA-NI where the CPU has it), BLAKE2b-512 (libsodium) and
// BLAKE3 (the BLAKE3 team's C implementation, SIMD chosen at run time), streaming and one-shot,
// with digests that compare in constant time.
#pragma once

#include <drun/config.hpp>

#include <array>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace drun {

enum class hash_algorithm { sha256, blake2b, blake3 };

// The OMS name of an algorithm: "sha256", "blake2b", "blake3".
DRUN_API std::string_view to_string(hash_algorithm alg) noexcept;
DRUN_API std::optional<hash_algorithm> parse_hash_algorithm(std::string_view name) noexcept;
// Digest length in bytes: 32 for sha256 and blake3, 64 for blake2b.
DRUN_API std::size_t digest_size(hash_algorithm alg) noexcept;

// A digest value tagged with its algorithm. Equality is constant time, so comparing an expected
// digest with one an attacker influences leaks nothing about where they differ.
class DRUN_API digest {
 public:
  static constexpr std::size_t max_size = 64;

  digest() = default;
  // Asserts that bytes.size() == digest_size(alg).
  digest(hash_algorithm alg, std::span<const std::byte> bytes);

  hash_algorithm algorithm() const noexcept { return alg_; }
  std::span<const std::byte> bytes() const noexcept { return {data_.data(), size_}; }
  std::size_t size() const noexcept { return size_; }
  std::string hex() const;

  friend DRUN_API bool operator==(const digest& a, const digest& b) noexcept;

 private:
  hash_algorithm alg_ = hash_algorithm::sha256;
  std::size_t size_ = 0;
  std::array<std::byte, max_size> data_{};
};

// Constant-time comparison of two byte strings of the same length; false when lengths differ.
DRUN_API bool digest_equal(std::span<const std::byte> a, std::span<const std::byte> b) noexcept;

// Streaming hasher. Move-only; not thread safe (one per thread). finish() may be called once,
// after which reset() starts a new computation with the same algorithm.
class DRUN_API hasher {
 public:
  explicit hasher(hash_algorithm alg);
  ~hasher();
  hasher(hasher&&) noexcept;
  hasher& operator=(hasher&&) noexcept;
  hasher(const hasher&) = delete;
  hasher& operator=(const hasher&) = delete;

  hash_algorithm algorithm() const noexcept;
  void update(std::span<const std::byte> data);
  digest finish();
  void reset();

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

// One-shot hash of a buffer.
DRUN_API digest hash(hash_algorithm alg, std::span<const std::byte> data);

inline std::span<const std::byte> as_bytes(std::string_view s) noexcept {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

}  // namespace drun

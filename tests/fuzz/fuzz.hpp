// Shared by the libFuzzer harnesses: views of the input, contract checks that abort (libFuzzer
// reports an abort as a crash and keeps the input), and the harnesses' fixed test keys.
#pragma once

#include <drun/hash.hpp>
#include <drun/log.hpp>

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>

namespace fuzz {

inline std::string_view text(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}
inline std::span<const std::byte> bytes(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const std::byte*>(data), size};
}

[[noreturn]] inline void broken(const char* contract, const char* file, int line) {
  std::fprintf(stderr, "%s:%d: contract broken: %s\n", file, line, contract);
  std::abort();
}

// A private directory for a harness's files, removed when the process exits.
inline std::filesystem::path scratch_dir(const char* name) {
  static std::filesystem::path dir;
  std::string pattern = std::string("/tmp/drun-fuzz-") + name + "-XXXXXX";
  if (!::mkdtemp(pattern.data())) std::abort();
  dir = pattern;
  std::atexit([] { std::filesystem::remove_all(dir); });
  return dir;
}

// Warnings about hostile input are the point of the exercise, not news: only errors are printed.
inline void quiet() { drun::configure_logging({drun::log_level::error, drun::log_format::text, "drun-fuzz"}); }

// A throwaway Ed25519 key pair for the harnesses and their seeds only (tests/fuzz/seeds.cpp signs
// the seed bundles and tokens with it). It protects nothing.
inline constexpr std::string_view test_private_pem =
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIG2Sfn6X2py55Ue2if6G24qHnPLQpSHdOwBLLij7MbP4\n"
    "-----END PRIVATE KEY-----\n";
inline constexpr std::string_view test_public_pem =
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEASm2ePOkBer6DqUIj6SyWTk088gTx4InLjkGnjyrN20U=\n"
    "-----END PUBLIC KEY-----\n";

// When the harnesses' seed tokens were issued and their checks run (2027-01-01T00:00:00Z): fixed,
// so that a corpus stays valid.
inline constexpr std::int64_t test_time = 1798761600;

// An Ed25519 signature by the test key over msg, checked with OpenSSL alone (not through drun).
inline bool signed_by_test_key(std::string_view msg, std::string_view sig) {
  static EVP_PKEY* key = [] {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(
        BIO_new_mem_buf(test_public_pem.data(), static_cast<int>(test_public_pem.size())), BIO_free);
    EVP_PKEY* k = PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr);
    if (!k) std::abort();
    return k;
  }();
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  return EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key) == 1 &&
         EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                          reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) == 1;
}

}  // namespace fuzz

#define FUZZ_REQUIRE(cond) ((cond) ? void(0) : ::fuzz::broken(#cond, __FILE__, __LINE__))

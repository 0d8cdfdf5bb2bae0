// Key text as drun loads it: public keys (PEM, of a bundle's trust or a token issuer), private
// keys (PKCS#8 or SEC1 PEM files) and node keys (hex or base64). The input's first byte picks the
// parser. Contract: a key that loads prints to a form that loads to the same key; a private key
// signs what its public half verifies.
#include "fuzz.hpp"
#include "key_data.hpp"
#include "store/node_key_data.hpp"

#include <drun/hash.hpp>
#include <drun/keys.hpp>
#include <drun/node_key.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>

namespace {

std::filesystem::path scratch;

std::filesystem::path write_scratch(const char* name, std::string_view text, mode_t mode) {
  auto file = scratch / name;
  std::filesystem::remove(file);
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  FUZZ_REQUIRE(fd >= 0);
  FUZZ_REQUIRE(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
  ::close(fd);
  return file;
}

void public_pem(std::string_view text) {
  auto key = drun::public_key::from_pem(text);
  if (!key) {
    FUZZ_REQUIRE(key.error().code() == drun::errc::key_error);
    return;
  }
  auto again = drun::public_key::from_pem(key->pem());
  FUZZ_REQUIRE(again && *again == *key && again->pem() == key->pem());
}

void private_pem(std::string_view text) {
  auto key = drun::private_key::load(write_scratch("private.pem", text, 0600));
  if (!key) {
    FUZZ_REQUIRE(key.error().code() == drun::errc::key_error);
    return;
  }
  auto msg = drun::as_bytes("a message to sign");
  auto sig = drun::detail::key_access::sign(*key, msg);
  FUZZ_REQUIRE(sig.has_value());
  FUZZ_REQUIRE(drun::detail::key_access::verify(key->public_key(), msg, drun::as_bytes(*sig)));
  auto saved = scratch / "saved.pem";
  std::filesystem::remove(saved);
  FUZZ_REQUIRE(key->save(saved).has_value());
  auto again = drun::private_key::load(saved);
  FUZZ_REQUIRE(again && again->public_key() == key->public_key());
}

void node_key_text(std::string_view text) {
  auto key = drun::node_key::from_text(text);
  if (!key) {
    FUZZ_REQUIRE(key.error().code() == drun::errc::key_error);
    return;
  }
  auto saved = scratch / "node.key";
  std::filesystem::remove(saved);
  FUZZ_REQUIRE(key->save(saved).has_value());
  auto again = drun::node_key::from_source("file:" + saved.string());
  FUZZ_REQUIRE(again.has_value());
  auto a = drun::detail::node_key_access::bytes(*key), b = drun::detail::node_key_access::bytes(*again);
  FUZZ_REQUIRE(a.size() == drun::node_key::size && std::equal(a.begin(), a.end(), b.begin(), b.end()));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  scratch = fuzz::scratch_dir("keys");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  auto text = fuzz::text(data + 1, size - 1);
  switch (data[0] % 3) {
    case 0: public_pem(text); break;
    case 1: private_pem(text); break;
    default: node_key_text(text); break;
  }
  return 0;
}

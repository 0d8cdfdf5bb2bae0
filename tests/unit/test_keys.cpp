// Key generation, PEM round trips, file permissions and hints.
#include <drun/hash.hpp>
#include <drun/keys.hpp>

#include "key_data.hpp"
#include "support.hpp"

#include <openssl/core_names.h>
#include <openssl/err.h>

#include <sys/stat.h>

using namespace drun;
using test::temp_dir;

TEST_CASE("every key type: generate, save 0600, load, same public key") {
  temp_dir d;
  for (auto t : {key_type::ed25519, key_type::ecdsa_p256, key_type::ecdsa_p384, key_type::ecdsa_p521}) {
    CAPTURE(to_string(t));
    auto k = private_key::generate(t);
    REQUIRE(k);
    CHECK(k->type() == t);
    auto path = d / std::string(to_string(t));
    REQUIRE(k->save(path));
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    CHECK(test::read_text(path).rfind("-----BEGIN PRIVATE KEY-----", 0) == 0);

    auto loaded = private_key::load(path);
    REQUIRE(loaded);
    CHECK(loaded->type() == t);
    CHECK(loaded->public_key() == k->public_key());

    auto pub_path = d / (std::string(to_string(t)) + ".pub");
    REQUIRE(save_public_key(k->public_key(), pub_path));
    auto pub = public_key::load(pub_path);
    REQUIRE(pub);
    CHECK(*pub == k->public_key());
    CHECK(pub->type() == t);

    // Refuses to overwrite either file.
    auto again = k->save(path);
    CHECK(test::error_of(again).message().find("refusing to overwrite") != std::string::npos);
  }
}

TEST_CASE("a private key readable by others is refused") {
  temp_dir d;
  auto k = private_key::generate(key_type::ecdsa_p256);
  REQUIRE(k);
  REQUIRE(k->save(d / "key"));
  for (mode_t mode : {0644u, 0640u, 0604u, 0660u}) {
    ::chmod((d / "key").c_str(), mode);
    auto r = private_key::load(d / "key");
    CHECK(test::error_of(r).code() == errc::key_error);
    CHECK(r.error().message().find("readable by its owner only") != std::string::npos);
  }
  ::chmod((d / "key").c_str(), 0400);
  CHECK(private_key::load(d / "key"));
}

TEST_CASE("bad key files name the cause") {
  temp_dir d;
  test::write_file(d / "junk", "not a key");
  ::chmod((d / "junk").c_str(), 0600);
  CHECK(test::error_of(private_key::load(d / "junk")).message().find("no PEM private key block") != std::string::npos);
  CHECK(test::error_of(private_key::load(d / "absent")).code() == errc::not_found);
  CHECK(test::error_of(public_key::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")).code() ==
        errc::key_error);
}

TEST_CASE("public key PEM is canonical and the hint is its SHA-256") {
  auto k = private_key::generate(key_type::ecdsa_p384);
  REQUIRE(k);
  auto pub = k->public_key();
  auto pem = pub.pem();
  CHECK(pem.rfind("-----BEGIN PUBLIC KEY-----\n", 0) == 0);
  CHECK(pem.substr(pem.size() - 25) == "-----END PUBLIC KEY-----\n");
  CHECK(pub.hint() == hash(hash_algorithm::sha256, as_bytes(pem)).hex());
  // Text before the BEGIN line is skipped.
  auto again = public_key::from_pem("Public-Key: (384 bit)\nsome text\n" + pem);
  REQUIRE(again);
  CHECK(*again == pub);
}

TEST_CASE("key type names") {
  CHECK(parse_key_type("ecdsa-p521") == key_type::ecdsa_p521);
  CHECK_FALSE(parse_key_type("rsa"));
}

TEST_CASE("a public key taken from a private key holds no secret") {
  for (auto t : {key_type::ed25519, key_type::ecdsa_p256}) {
    auto k = private_key::generate(t);
    REQUIRE(k);
    auto pub = k->public_key();
    EVP_PKEY* evp = detail::key_access::evp(pub);
    if (t == key_type::ed25519) {
      std::size_t len = 0;
      CHECK(EVP_PKEY_get_raw_private_key(evp, nullptr, &len) != 1);
    } else {
      BIGNUM* priv = nullptr;
      CHECK(EVP_PKEY_get_bn_param(evp, OSSL_PKEY_PARAM_PRIV_KEY, &priv) != 1);
      BN_clear_free(priv);
    }
    ERR_clear_error();
  }
}

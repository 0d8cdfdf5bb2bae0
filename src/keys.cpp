// Keys. OpenSSL parses and writes PEM/ASN.1 for every type and does ECDSA; libsodium does the
// Ed25519 arithmetic and holds its secret key in guarded memory that is wiped on free.
#include <drun/keys.hpp>

#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/openssl.hpp"
#include "detail/secret.hpp"
#include "key_data.hpp"

#include <drun/hash.hpp>

#include <fmt/format.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <sodium.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace drun {
namespace {

constexpr std::size_t max_key_file = 64 * 1024;

std::optional<key_type> type_of(EVP_PKEY* pkey) {
  if (EVP_PKEY_get_base_id(pkey) == EVP_PKEY_ED25519) return key_type::ed25519;
  if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_EC) return std::nullopt;
  char group[64] = {};
  std::size_t len = 0;
  if (EVP_PKEY_get_group_name(pkey, group, sizeof group, &len) != 1) return std::nullopt;
  std::string_view g(group, len);
  if (g == "prime256v1" || g == "P-256") return key_type::ecdsa_p256;
  if (g == "secp384r1" || g == "P-384") return key_type::ecdsa_p384;
  if (g == "secp521r1" || g == "P-521") return key_type::ecdsa_p521;
  return std::nullopt;
}

const char* digest_name(key_type t) {
  switch (t) {
    case key_type::ecdsa_p256: return "SHA256";
    case key_type::ecdsa_p384: return "SHA384";
    case key_type::ecdsa_p521: return "SHA512";
    case key_type::ed25519: break;
  }
  return nullptr;
}

// A PEM callback that refuses to prompt: drun never reads passphrases from a terminal.
int no_passphrase(char*, int, int, void*) { return -1; }

// Extracts the DER of a PEM private key ("PRIVATE KEY" or "EC PRIVATE KEY") into guarded memory.
// drun does this itself rather than through OpenSSL's PEM reader so no copy of the key text is
// freed unwiped. Encrypted keys are refused: drun never prompts for a passphrase.
result<std::unique_ptr<detail::secret_buffer>> decode_private_pem(std::string_view text) {
  // The first private key block counts; others (openssl ecparam's "EC PARAMETERS") are skipped.
  std::string_view label;
  std::size_t label_end = 0;
  for (std::size_t pos = 0;;) {
    auto begin = text.find("-----BEGIN ", pos);
    if (begin == std::string_view::npos) return error(errc::key_error, "no PEM private key block found");
    auto label_start = begin + 11;
    label_end = text.find("-----", label_start);
    if (label_end == std::string_view::npos) return error(errc::key_error, "malformed PEM BEGIN line");
    label = text.substr(label_start, label_end - label_start);
    if (label == "ENCRYPTED PRIVATE KEY")
      return error(errc::key_error, "private key is encrypted; drun needs an unencrypted PKCS#8 key (mode 0600)");
    if (label == "PRIVATE KEY" || label == "EC PRIVATE KEY") break;
    pos = label_end + 5;
  }
  auto body_start = label_end + 5;
  std::string end_line = fmt::format("-----END {}-----", label);
  auto body_end = text.find(end_line, body_start);
  if (body_end == std::string_view::npos) return error(errc::key_error, "PEM block has no END line");
  auto body = text.substr(body_start, body_end - body_start);
  if (body.find(':') != std::string_view::npos)
    return error(errc::key_error, "private key is encrypted (PEM headers); drun needs an unencrypted key");
  detail::secret_buffer b64(body.size());
  std::size_t n = 0;
  for (char c : body)
    if (c != '\n' && c != '\r' && c != ' ' && c != '\t') b64.data()[n++] = static_cast<std::byte>(c);
  auto der = std::make_unique<detail::secret_buffer>(n / 4 * 3);
  auto len = detail::base64_decode_into(b64.view(n), der->span());
  if (!len) return error(errc::key_error, "PEM body is not valid base64");
  auto out = std::make_unique<detail::secret_buffer>(*len);
  std::copy_n(der->data(), *len, out->data());
  return out;
}

}  // namespace

std::string_view to_string(key_type t) noexcept {
  switch (t) {
    case key_type::ed25519: return "ed25519";
    case key_type::ecdsa_p256: return "ecdsa-p256";
    case key_type::ecdsa_p384: return "ecdsa-p384";
    case key_type::ecdsa_p521: return "ecdsa-p521";
  }
  return "unknown";
}

std::optional<key_type> parse_key_type(std::string_view name) noexcept {
  for (auto t : {key_type::ed25519, key_type::ecdsa_p256, key_type::ecdsa_p384, key_type::ecdsa_p521})
    if (to_string(t) == name) return t;
  return std::nullopt;
}

// ---- public_key ---------------------------------------------------------------------------

struct public_key::impl {
  key_type type;
  detail::evp_pkey_ptr pkey;
  std::array<unsigned char, crypto_sign_PUBLICKEYBYTES> ed25519{};
  std::string pem;
};

public_key::public_key(std::shared_ptr<const impl> p) : impl_(std::move(p)) {}

result<public_key> detail::key_access::from_evp(EVP_PKEY* raw) {
  auto type = type_of(raw);
  if (!type)
    return error(errc::key_error, "unsupported public key type (Ed25519 or ECDSA P-256/P-384/P-521 expected)");
  // Re-encode as SubjectPublicKeyInfo and parse it back: the handle then holds public parts only,
  // so a public_key made from a private_key never keeps the secret alive.
  unsigned char* der = nullptr;
  int der_len = i2d_PUBKEY(raw, &der);
  if (der_len <= 0) return error(errc::key_error, "cannot encode public key: " + detail::openssl_errors());
  const unsigned char* cursor = der;
  detail::evp_pkey_ptr pub(d2i_PUBKEY(nullptr, &cursor, der_len));
  OPENSSL_free(der);
  if (!pub) return error(errc::key_error, "cannot decode public key: " + detail::openssl_errors());
  raw = pub.get();
  auto p = std::make_shared<public_key::impl>();
  p->type = *type;
  p->pkey = std::move(pub);
  if (*type == key_type::ed25519) {
    std::size_t len = p->ed25519.size();
    if (EVP_PKEY_get_raw_public_key(raw, p->ed25519.data(), &len) != 1 || len != p->ed25519.size())
      return error(errc::key_error, "cannot read Ed25519 public key");
  }
  detail::bio_ptr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PUBKEY(bio.get(), raw) != 1)
    return error(errc::key_error, "cannot encode public key: " + detail::openssl_errors());
  p->pem = detail::bio_contents(bio.get());
  return public_key(std::move(p));
}

EVP_PKEY* detail::key_access::evp(const public_key& key) { return key.impl_->pkey.get(); }

result<public_key> public_key::from_pem(std::string_view pem) {
  // PEM files may carry text (comments, openssl's "Public-Key:" dump) before the BEGIN line.
  auto begin = pem.find("-----BEGIN");
  if (begin == std::string_view::npos) return error(errc::key_error, "no PEM block found");
  auto bio = detail::memory_bio(pem.substr(begin));
  detail::evp_pkey_ptr pkey(PEM_read_bio_PUBKEY(bio.get(), nullptr, no_passphrase, nullptr));
  if (!pkey)
    return error(errc::key_error, "not a PEM public key (SubjectPublicKeyInfo): " + detail::openssl_errors());
  return detail::key_access::from_evp(pkey.get());
}

result<public_key> public_key::load(const std::filesystem::path& file) {
  auto text = detail::read_file(file, max_key_file);
  if (!text) {
    auto e = std::move(text).error();
    return std::move(e).with_path(file.string());
  }
  auto key = from_pem(*text);
  if (!key) return std::move(key).error().with_path(file.string());
  return key;
}

key_type public_key::type() const noexcept { return impl_->type; }
std::string public_key::pem() const { return impl_->pem; }
std::string public_key::hint() const { return hash(hash_algorithm::sha256, as_bytes(impl_->pem)).hex(); }
bool operator==(const public_key& a, const public_key& b) noexcept { return a.impl_->pem == b.impl_->pem; }

// ---- private_key --------------------------------------------------------------------------

struct private_key::impl {
  key_type type;
  detail::evp_pkey_ptr pkey;            // every type: PEM output and the public half
  std::unique_ptr<detail::secret_buffer> ed_sk; // Ed25519: libsodium's 64-byte secret key
};

private_key::private_key(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
private_key::~private_key() = default;
private_key::private_key(private_key&&) noexcept = default;
private_key& private_key::operator=(private_key&&) noexcept = default;
key_type private_key::type() const noexcept { return impl_->type; }

result<void> detail::key_access::finish_ed25519(private_key::impl& k) {
  detail::secret_buffer seed(crypto_sign_SEEDBYTES);
  std::size_t len = seed.size();
  if (EVP_PKEY_get_raw_private_key(k.pkey.get(), seed.uchar(), &len) != 1 || len != seed.size())
    return error(errc::key_error, "cannot read Ed25519 private key");
  k.ed_sk = std::make_unique<detail::secret_buffer>(crypto_sign_SECRETKEYBYTES);
  std::array<unsigned char, crypto_sign_PUBLICKEYBYTES> pk{};
  crypto_sign_seed_keypair(pk.data(), k.ed_sk->uchar(), seed.uchar());
  return {};
}

result<private_key> private_key::generate(key_type type) {
  auto k = std::make_unique<impl>();
  k->type = type;
  if (type == key_type::ed25519) {
    detail::secret_buffer seed(crypto_sign_SEEDBYTES);
    randombytes_buf(seed.data(), seed.size());
    k->pkey.reset(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed.uchar(), seed.size()));
    if (!k->pkey) return error(errc::key_error, "cannot create Ed25519 key: " + detail::openssl_errors());
    if (auto r = detail::key_access::finish_ed25519(*k); !r) return std::move(r).error();
  } else {
    const char* curve = type == key_type::ecdsa_p256 ? "P-256" : type == key_type::ecdsa_p384 ? "P-384" : "P-521";
    k->pkey.reset(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", curve));
    if (!k->pkey) return error(errc::key_error, "cannot generate ECDSA key: " + detail::openssl_errors());
  }
  return private_key(std::move(k));
}

result<private_key> private_key::load(const std::filesystem::path& file) {
  // Follow symlinks (a Kubernetes Secret mount is one), but judge the file actually opened.
  auto fd = detail::open_read(file, /*follow=*/true);
  if (!fd) return std::move(fd).error().with_operation("private key");
  if (auto r = detail::check_owner_only(fd->get(), "private key file", file); !r) return std::move(r).error();
  struct stat st {};
  if (::fstat(fd->get(), &st) != 0) return detail::sys_error("cannot stat", file, errno);
  auto size = static_cast<std::uint64_t>(st.st_size);
  if (size > max_key_file)
    return error(errc::key_error, fmt::format("private key file is too large ({} bytes)", size)).with_path(file.string());
  // The PEM text, its base64 body and the DER all live in guarded memory, wiped when freed.
  detail::secret_buffer text(static_cast<std::size_t>(size));
  if (auto r = detail::pread_exact(fd->get(), text.span(), 0, file); !r) return std::move(r).error();
  auto der = decode_private_pem(text.view(text.size()));
  if (!der) return std::move(der).error().with_path(file.string());
  const unsigned char* cursor = (*der)->uchar();
  auto k = std::make_unique<impl>();
  k->pkey.reset(d2i_AutoPrivateKey(nullptr, &cursor, static_cast<long>((*der)->size())));
  if (!k->pkey)
    return error(errc::key_error, "not a valid private key: " + detail::openssl_errors()).with_path(file.string());
  auto type = type_of(k->pkey.get());
  if (!type)
    return error(errc::key_error, "unsupported private key type (Ed25519 or ECDSA P-256/P-384/P-521 expected)")
        .with_path(file.string());
  k->type = *type;
  if (*type == key_type::ed25519)
    if (auto r = detail::key_access::finish_ed25519(*k); !r) return std::move(r).error().with_path(file.string());
  return private_key(std::move(k));
}

public_key private_key::public_key() const {
  auto pub = detail::key_access::from_evp(impl_->pkey.get());
  return std::move(pub).value();
}

result<void> private_key::save(const std::filesystem::path& file) const {
  // Secure-heap BIO: the PEM text of the key never sits in ordinary heap memory.
  detail::bio_ptr bio(BIO_new(BIO_s_secmem()));
  if (!bio || PEM_write_bio_PrivateKey(bio.get(), impl_->pkey.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
    return error(errc::key_error, "cannot encode private key: " + detail::openssl_errors());
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return detail::write_new_file(file, std::string_view(data, static_cast<std::size_t>(len)), 0600);
}

result<void> save_public_key(const public_key& key, const std::filesystem::path& file) {
  return detail::write_new_file(file, key.pem(), 0644);
}

// ---- signing ------------------------------------------------------------------------------

result<std::string> detail::key_access::sign(const private_key& key, std::span<const std::byte> msg) {
  const auto& k = *key.impl_;
  if (k.type == key_type::ed25519) {
    std::string sig(crypto_sign_BYTES, '\0');
    crypto_sign_detached(reinterpret_cast<unsigned char*>(sig.data()), nullptr,
                         reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), k.ed_sk->uchar());
    return sig;
  }
  detail::evp_md_ctx_ptr ctx(EVP_MD_CTX_new());
  std::size_t len = 0;
  if (!ctx ||
      EVP_DigestSignInit_ex(ctx.get(), nullptr, digest_name(k.type), nullptr, nullptr, k.pkey.get(), nullptr) != 1 ||
      EVP_DigestSign(ctx.get(), nullptr, &len, reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) != 1)
    return error(errc::key_error, "ECDSA signing failed: " + detail::openssl_errors());
  std::string sig(len, '\0');
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len,
                     reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) != 1)
    return error(errc::key_error, "ECDSA signing failed: " + detail::openssl_errors());
  sig.resize(len);
  return sig;
}

bool detail::key_access::verify(const public_key& key, std::span<const std::byte> msg,
                                std::span<const std::byte> sig) {
  const auto& k = *key.impl_;
  if (k.type == key_type::ed25519) {
    return sig.size() == crypto_sign_BYTES &&
           crypto_sign_verify_detached(reinterpret_cast<const unsigned char*>(sig.data()),
                                       reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
                                       k.ed25519.data()) == 0;
  }
  detail::evp_md_ctx_ptr ctx(EVP_MD_CTX_new());
  bool ok = ctx &&
            EVP_DigestVerifyInit_ex(ctx.get(), nullptr, digest_name(k.type), nullptr, nullptr, k.pkey.get(),
                                    nullptr) == 1 &&
            EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                             reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) == 1;
  detail::openssl_errors();  // a failed check leaves entries in the queue; drop them
  return ok;
}

}  // namespace drun

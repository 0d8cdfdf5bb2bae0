// Trust stores and certificate chains (OpenSSL X.509).
#include <drun/trust.hpp>

#include "detail/file.hpp"
#include "detail/openssl.hpp"
#include "key_data.hpp"
#include "trust_data.hpp"

#include <fmt/format.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <ctime>

namespace drun {
namespace {

constexpr std::size_t max_pem_file = 4 << 20;
constexpr std::size_t max_chain_length = 10;

result<std::vector<detail::x509_ptr>> read_pem_certificates(const std::filesystem::path& file) {
  auto text = detail::read_file(file, max_pem_file);
  if (!text) return std::move(text).error().with_path(file.string());
  auto bio = detail::memory_bio(*text);
  std::vector<detail::x509_ptr> certs;
  while (X509* c = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) certs.emplace_back(c);
  detail::openssl_errors();  // the loop ends on a "no start line" error: expected
  if (certs.empty()) return error(errc::key_error, "no PEM certificate found").with_path(file.string());
  return certs;
}

std::string subject_line(X509* cert) {
  detail::bio_ptr bio(BIO_new(BIO_s_mem()));
  X509_NAME_print_ex(bio.get(), X509_get_subject_name(cert), 0, XN_FLAG_ONELINE & ~ASN1_STRFLGS_ESC_MSB);
  return detail::bio_contents(bio.get());
}

std::string der_of(X509* cert) {
  unsigned char* buf = nullptr;
  int len = i2d_X509(cert, &buf);
  std::string out = len > 0 ? std::string(reinterpret_cast<char*>(buf), static_cast<std::size_t>(len)) : std::string();
  OPENSSL_free(buf);
  return out;
}

detail::x509_ptr parse_der(const std::string& der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  detail::x509_ptr cert(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  // Trailing bytes after the certificate are refused: one encoding, one meaning.
  if (cert && p != reinterpret_cast<const unsigned char*>(der.data()) + der.size()) cert.reset();
  return cert;
}

}  // namespace

struct trust_store::impl {
  std::optional<public_key> key;
  std::shared_ptr<const detail::trust_access::sigstore_trust> sigstore;  // immutable, shared by moves
  detail::x509_store_ptr roots;
  certificate_time_policy policy = certificate_time_policy::now;
};

trust_store::trust_store(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
trust_store::~trust_store() = default;
trust_store::trust_store(trust_store&&) noexcept = default;
trust_store& trust_store::operator=(trust_store&&) noexcept = default;

trust_store trust_store::from_public_key(public_key key) {
  auto p = std::make_unique<impl>();
  p->key.emplace(std::move(key));
  return trust_store(std::move(p));
}

result<trust_store> trust_store::from_ca_bundle(const std::filesystem::path& pem_file,
                                                certificate_time_policy policy) {
  auto certs = read_pem_certificates(pem_file);
  if (!certs) return std::move(certs).error();
  auto p = std::make_unique<impl>();
  p->roots.reset(X509_STORE_new());
  p->policy = policy;
  for (auto& c : *certs)
    if (X509_STORE_add_cert(p->roots.get(), c.get()) != 1)
      return error(errc::key_error, "cannot add root certificate: " + detail::openssl_errors()).with_path(pem_file.string());
  return trust_store(std::move(p));
}

result<trust_store> trust_store::from_sigstore(const std::filesystem::path& trusted_root_json, keyless_identity who) {
  auto text = detail::read_file(trusted_root_json, max_pem_file);
  if (!text) return std::move(text).error().with_path(trusted_root_json.string());
  auto t = from_sigstore_json(*text, std::move(who));
  if (!t) return std::move(t).error().with_path(trusted_root_json.string());
  return t;
}

result<trust_store> trust_store::from_sigstore_json(std::string_view trusted_root_json, keyless_identity who) {
  // "Any identity" is never a default: a keyless bundle can be made by anyone with an e-mail.
  if (who.identity.empty() || who.issuer.empty())
    return error(errc::invalid_argument, "keyless verification needs both an identity (the certificate's SAN) and an "
                                         "identity provider (its OIDC issuer)");
  auto root = detail::sigstore::parse_trusted_root(trusted_root_json);
  if (!root) return std::move(root).error();
  auto p = std::make_unique<impl>();
  p->sigstore = std::make_shared<const detail::trust_access::sigstore_trust>(detail::trust_access::sigstore_trust{
      std::move(*root), detail::sigstore::identity_policy{std::move(who.identity), std::move(who.issuer)}});
  return trust_store(std::move(p));
}

const detail::trust_access::sigstore_trust* detail::trust_access::sigstore(const trust_store& t) {
  return t.impl_->sigstore.get();
}

const std::optional<public_key>& detail::trust_access::key(const trust_store& t) { return t.impl_->key; }

result<std::pair<public_key, std::string>> detail::trust_access::verify_chain(
    const trust_store& t, const std::vector<std::string>& der_chain) {
  if (!t.impl_->roots)
    return error(errc::untrusted_certificate,
                 t.impl_->sigstore ? "bundle is signed with a certificate chain and no transparency log entry (the OMS "
                                     "certificate method); verify it against CA roots (--ca-bundle), not a Sigstore "
                                     "trusted root"
                                   : "bundle is signed with a certificate; verify it against CA roots (--ca-bundle), not "
                                     "a public key");
  if (der_chain.empty() || der_chain.size() > max_chain_length)
    return error(errc::malformed_bundle, fmt::format("certificate chain has {} certificates (1 to {} expected)",
                                                     der_chain.size(), max_chain_length));
  std::vector<x509_ptr> certs;
  for (std::size_t i = 0; i < der_chain.size(); ++i) {
    auto c = parse_der(der_chain[i]);
    if (!c) return error(errc::malformed_bundle, fmt::format("certificate {} of the chain is not valid DER", i));
    certs.push_back(std::move(c));
  }
  X509* leaf = certs[0].get();
  x509_stack_ptr untrusted(sk_X509_new_null());
  for (std::size_t i = 1; i < certs.size(); ++i) {
    X509_up_ref(certs[i].get());
    sk_X509_push(untrusted.get(), certs[i].get());
  }
  x509_store_ctx_ptr ctx(X509_STORE_CTX_new());
  if (!ctx || X509_STORE_CTX_init(ctx.get(), t.impl_->roots.get(), leaf, untrusted.get()) != 1)
    return error(errc::untrusted_certificate, "cannot set up chain verification: " + openssl_errors());
  if (t.impl_->policy == certificate_time_policy::leaf_not_before) {
    // The reference implementation's policy: the chain must have been valid when the leaf was
    // issued (short-lived signing certificates expire long before the model stops being used).
    std::tm tm{};
    if (ASN1_TIME_to_tm(X509_get0_notBefore(leaf), &tm) != 1)
      return error(errc::malformed_bundle, "leaf certificate has an unreadable notBefore");
    X509_STORE_CTX_set_time(ctx.get(), 0, timegm(&tm));
  }
  if (X509_verify_cert(ctx.get()) != 1) {
    int err = X509_STORE_CTX_get_error(ctx.get());
    openssl_errors();
    return error(errc::untrusted_certificate,
                 fmt::format("certificate chain does not verify: {} (leaf: {})", X509_verify_cert_error_string(err),
                             subject_line(leaf)));
  }
  // The leaf must be meant for signing code. Present extensions restrict (RFC 5280 4.2.1.3 and
  // 4.2.1.12): a keyUsage without digitalSignature, or an extendedKeyUsage without codeSigning
  // (a TLS server certificate, say), refuses the leaf; at least one of them must be present.
  std::uint32_t flags = X509_get_extension_flags(leaf);
  bool has_ku = flags & EXFLAG_KUSAGE, has_eku = flags & EXFLAG_XKUSAGE;
  if (X509_check_ca(leaf) != 0)
    return error(errc::untrusted_certificate,
                 fmt::format("the signing certificate is a CA certificate, not a signer ({})", subject_line(leaf)));
  if ((has_ku && !(X509_get_key_usage(leaf) & KU_DIGITAL_SIGNATURE)) ||
      (has_eku && !(X509_get_extended_key_usage(leaf) & XKU_CODE_SIGN)) || (!has_ku && !has_eku))
    return error(errc::untrusted_certificate,
                 fmt::format("leaf certificate is not for code signing: a keyUsage must include digitalSignature, an "
                             "extendedKeyUsage must include codeSigning, and one of them must be present ({})",
                             subject_line(leaf)));
  auto key = key_access::from_evp(X509_get0_pubkey(leaf));
  if (!key) return std::move(key).error();
  return std::pair{std::move(key).value(), subject_line(leaf)};
}

std::string detail::trust_access::subject_of(const std::string& der) {
  auto c = parse_der(der);
  return c ? subject_line(c.get()) : std::string();
}

struct certificate_chain::impl {
  std::vector<detail::x509_ptr> certs;  // leaf first
};

certificate_chain::certificate_chain(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
certificate_chain::~certificate_chain() = default;
certificate_chain::certificate_chain(certificate_chain&&) noexcept = default;
certificate_chain& certificate_chain::operator=(certificate_chain&&) noexcept = default;

result<certificate_chain> certificate_chain::load(const std::filesystem::path& leaf_pem,
                                                  const std::filesystem::path& chain_pem) {
  auto leaf = read_pem_certificates(leaf_pem);
  if (!leaf) return std::move(leaf).error();
  auto p = std::make_unique<impl>();
  p->certs.push_back(std::move((*leaf)[0]));
  if (!chain_pem.empty()) {
    auto chain = read_pem_certificates(chain_pem);
    if (!chain) return std::move(chain).error();
    for (auto& c : *chain) p->certs.push_back(std::move(c));
  }
  return certificate_chain(std::move(p));
}

bool certificate_chain::certifies(const public_key& key) const {
  return EVP_PKEY_eq(X509_get0_pubkey(impl_->certs[0].get()), detail::key_access::evp(key)) == 1;
}

std::string certificate_chain::leaf_subject() const { return subject_line(impl_->certs[0].get()); }

std::vector<std::string> detail::trust_access::der_chain(const certificate_chain& c) {
  std::vector<std::string> out;
  for (const auto& cert : c.impl_->certs) out.push_back(der_of(cert.get()));
  return out;
}

}  // namespace drun

// Fulcio leaves (chain, SCT, identity) and RFC 3161 timestamps, with OpenSSL's X.509 and TS code.
#include "sigstore/certificate.hpp"

#include <drun/hash.hpp>

#include "key_data.hpp"

#include <fmt/format.h>
#include <openssl/ct.h>
#include <openssl/ts.h>
#include <openssl/x509v3.h>

#include <ctime>

namespace drun::detail::sigstore {
namespace {

error untrusted(std::string detail) { return error(errc::untrusted_certificate, std::move(detail)); }

std::optional<millis> time_of(const ASN1_TIME* t) {
  std::tm tm{};
  if (!t || ASN1_TIME_to_tm(t, &tm) != 1) return std::nullopt;
  return static_cast<millis>(timegm(&tm)) * 1000;
}

std::string der_of_pubkey(X509* cert) {
  unsigned char* buf = nullptr;
  int len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(cert), &buf);
  std::string out = len > 0 ? std::string(reinterpret_cast<char*>(buf), static_cast<std::size_t>(len)) : std::string();
  OPENSSL_free(buf);
  return out;
}

std::string asn1_text(const ASN1_STRING* s) {
  return s ? std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)), static_cast<std::size_t>(ASN1_STRING_length(s)))
           : std::string();
}

// The raw extnValue of the extension with this dotted OID, if present.
std::optional<std::string> extension_value(X509* cert, const char* oid) {
  std::unique_ptr<ASN1_OBJECT, ossl_deleter<ASN1_OBJECT_free>> obj(OBJ_txt2obj(oid, 1));
  int loc = obj ? X509_get_ext_by_OBJ(cert, obj.get(), -1) : -1;
  if (loc < 0) return std::nullopt;
  return asn1_text(X509_EXTENSION_get_data(X509_get_ext(cert, loc)));
}

void put_be(std::string& out, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

using sct_list_ptr = std::unique_ptr<STACK_OF(SCT), decltype([](STACK_OF(SCT)* s) { SCT_LIST_free(s); })>;
using general_names_ptr = std::unique_ptr<GENERAL_NAMES, decltype([](GENERAL_NAMES* g) { GENERAL_NAMES_free(g); })>;
using ts_resp_ptr = std::unique_ptr<TS_RESP, ossl_deleter<TS_RESP_free>>;
using ts_verify_ctx_ptr = std::unique_ptr<TS_VERIFY_CTX, ossl_deleter<TS_VERIFY_CTX_free>>;

}  // namespace

result<validity> validity_of(X509* cert) {
  auto nb = time_of(X509_get0_notBefore(cert)), na = time_of(X509_get0_notAfter(cert));
  if (!nb || !na) return untrusted("the signing certificate has an unreadable validity period");
  return validity{*nb, *na};
}

result<x509_ptr> verify_fulcio_chain(X509* leaf, const trusted_root& root, millis at) {
  std::string last_problem = "the trusted root lists no certificate authority";
  for (const auto& ca : root.certificate_authorities) {
    x509_store_ptr store(X509_STORE_new());
    x509_stack_ptr untrusted_certs(sk_X509_new_null());
    if (!store || !untrusted_certs) return untrusted("out of memory setting up chain verification");
    // The root's chain is leaf-most first; its last certificate is the anchor (partial chains
    // allowed, so a root that lists an intermediate last still anchors there).
    X509_STORE_add_cert(store.get(), ca.chain.back().get());
    for (std::size_t i = 0; i + 1 < ca.chain.size(); ++i) {
      X509_up_ref(ca.chain[i].get());
      sk_X509_push(untrusted_certs.get(), ca.chain[i].get());
    }
    x509_store_ctx_ptr ctx(X509_STORE_CTX_new());
    if (!ctx || X509_STORE_CTX_init(ctx.get(), store.get(), leaf, untrusted_certs.get()) != 1)
      return untrusted("cannot set up chain verification: " + openssl_errors());
    X509_STORE_CTX_set_flags(ctx.get(), X509_V_FLAG_PARTIAL_CHAIN);
    X509_STORE_CTX_set_time(ctx.get(), 0, static_cast<time_t>(at / 1000));
    if (X509_verify_cert(ctx.get()) != 1) {
      last_problem = fmt::format("the leaf does not chain to a certificate authority of the trusted root at {} ({})",
                                 format_time(at), X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())));
      openssl_errors();
      continue;
    }
    if (!ca.valid_for.contains(at)) {
      last_problem = fmt::format("the leaf chains to certificate authority {}, whose validFor window ({} to {}) does not "
                                 "include the signing time {}",
                                 ca.name, format_time(ca.valid_for.start),
                                 ca.valid_for.end ? format_time(*ca.valid_for.end) : "open", format_time(at));
      continue;
    }
    STACK_OF(X509)* chain = X509_STORE_CTX_get0_chain(ctx.get());
    if (sk_X509_num(chain) < 2) return untrusted("the leaf certificate is itself the trust anchor");
    X509* issuer = sk_X509_value(chain, 1);
    X509_up_ref(issuer);
    x509_ptr out(issuer);
    // A signing certificate: not a CA, and meant for code signing (Fulcio always sets it).
    std::uint32_t flags = X509_get_extension_flags(leaf);
    if (X509_check_ca(leaf) != 0) return untrusted("the signing certificate is a CA certificate");
    if (!(flags & EXFLAG_XKUSAGE) || !(X509_get_extended_key_usage(leaf) & XKU_CODE_SIGN))
      return untrusted("the signing certificate has no code-signing extended key usage");
    if ((flags & EXFLAG_KUSAGE) && !(X509_get_key_usage(leaf) & KU_DIGITAL_SIGNATURE))
      return untrusted("the signing certificate's key usage does not include digitalSignature");
    return out;
  }
  return untrusted(std::move(last_problem));
}

result<void> verify_embedded_scts(X509* leaf, X509* issuer, const trusted_root& root) {
  int crit = 0;
  sct_list_ptr scts(static_cast<STACK_OF(SCT)*>(X509_get_ext_d2i(leaf, NID_ct_precert_scts, &crit, nullptr)));
  openssl_errors();
  if (!scts || sk_SCT_num(scts.get()) == 0)
    return untrusted("the signing certificate carries no embedded SCT: it was not logged to certificate transparency");
  // What the CT log signed: the precertificate's TBS, i.e. the leaf's TBS without the SCT list
  // (and without the poison extension, should one remain), re-encoded.
  x509_ptr pre(X509_dup(leaf));
  if (!pre) return untrusted("cannot copy the signing certificate");
  for (int nid : {NID_ct_precert_scts, NID_ct_precert_poison}) {
    int loc = X509_get_ext_by_NID(pre.get(), nid, -1);
    if (loc >= 0) X509_EXTENSION_free(X509_delete_ext(pre.get(), loc));
  }
  unsigned char* tbs_buf = nullptr;
  int tbs_len = i2d_re_X509_tbs(pre.get(), &tbs_buf);
  if (tbs_len <= 0) return untrusted("cannot re-encode the precertificate: " + openssl_errors());
  std::string tbs(reinterpret_cast<char*>(tbs_buf), static_cast<std::size_t>(tbs_len));
  OPENSSL_free(tbs_buf);
  auto issuer_key_hash = hash(hash_algorithm::sha256, as_bytes(der_of_pubkey(issuer)));

  std::string problem = "no embedded SCT is from a CT log of the trusted root";
  for (int i = 0; i < sk_SCT_num(scts.get()); ++i) {
    SCT* sct = sk_SCT_value(scts.get(), i);
    unsigned char* id = nullptr;
    std::size_t id_len = SCT_get0_log_id(sct, &id);
    std::string log_id(reinterpret_cast<char*>(id), id_len);
    const log_key* log = nullptr;
    for (const auto& l : root.ctlogs)
      if (l.log_id == log_id) log = &l;
    if (!log || SCT_get_version(sct) != SCT_VERSION_V1) continue;
    auto at = static_cast<millis>(SCT_get_timestamp(sct));
    if (!log->valid_for.contains(at)) {
      problem = fmt::format("the SCT's time {} is outside the validFor window of CT log {}", format_time(at), log->base_url);
      continue;
    }
    unsigned char* ext = nullptr;
    std::size_t ext_len = SCT_get0_extensions(sct, &ext);
    unsigned char* sig = nullptr;
    std::size_t sig_len = SCT_get0_signature(sct, &sig);
    // RFC 6962 3.2: digitally-signed struct of a precert_entry.
    std::string msg;
    put_be(msg, 0, 1);  // sct_version v1
    put_be(msg, 0, 1);  // signature_type certificate_timestamp
    put_be(msg, SCT_get_timestamp(sct), 8);
    put_be(msg, 1, 2);  // entry_type precert_entry
    msg.append(reinterpret_cast<const char*>(issuer_key_hash.bytes().data()), issuer_key_hash.size());
    put_be(msg, tbs.size(), 3);
    msg += tbs;
    put_be(msg, ext_len, 2);
    msg.append(reinterpret_cast<const char*>(ext), ext_len);
    if (key_access::verify(log->key, as_bytes(msg), {reinterpret_cast<const std::byte*>(sig), sig_len})) return {};
    problem = fmt::format("the embedded SCT from CT log {} does not verify: forged, or the certificate was altered",
                          log->base_url);
  }
  return untrusted(std::move(problem));
}

result<identity> identity_of(X509* leaf) {
  identity out;
  general_names_ptr names(static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(leaf, NID_subject_alt_name, nullptr, nullptr)));
  openssl_errors();
  for (int i = 0; names && i < sk_GENERAL_NAME_num(names.get()); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names.get(), i);
    if (n->type == GEN_EMAIL) out.names.push_back(asn1_text(n->d.rfc822Name));
    else if (n->type == GEN_URI) out.names.push_back(asn1_text(n->d.uniformResourceIdentifier));
  }
  if (out.names.empty()) return untrusted("the signing certificate has no e-mail or URI subject alternative name");
  if (auto v2 = extension_value(leaf, "1.3.6.1.4.1.57264.1.8")) {
    // The current issuer extension is a DER UTF8String.
    const auto* p = reinterpret_cast<const unsigned char*>(v2->data());
    std::unique_ptr<ASN1_UTF8STRING, ossl_deleter<ASN1_UTF8STRING_free>> s(d2i_ASN1_UTF8STRING(nullptr, &p, static_cast<long>(v2->size())));
    openssl_errors();
    if (!s || p != reinterpret_cast<const unsigned char*>(v2->data()) + v2->size())
      return untrusted("the signing certificate's OIDC issuer extension (1.3.6.1.4.1.57264.1.8) is not a UTF8String");
    out.issuer = asn1_text(s.get());
  } else if (auto v1 = extension_value(leaf, "1.3.6.1.4.1.57264.1.1")) {
    out.issuer = *v1;  // the legacy extension holds the issuer's raw bytes
  } else {
    return untrusted("the signing certificate has no OIDC issuer extension (1.3.6.1.4.1.57264.1.8 or .1.1)");
  }
  return out;
}

result<millis> verify_rfc3161(std::string_view response_der, std::string_view data, const trusted_root& root) {
  auto fail = [](std::string d) { return error(errc::signature_invalid, "RFC 3161 timestamp: " + std::move(d)); };
  const auto* p = reinterpret_cast<const unsigned char*>(response_der.data());
  ts_resp_ptr resp(d2i_TS_RESP(nullptr, &p, static_cast<long>(response_der.size())));
  if (!resp || p != reinterpret_cast<const unsigned char*>(response_der.data()) + response_der.size()) {
    openssl_errors();
    return fail("not a DER TimeStampResp");
  }
  TS_TST_INFO* info = TS_RESP_get_tst_info(resp.get());
  auto at = info ? time_of(TS_TST_INFO_get_time(info)) : std::nullopt;
  if (!at) return fail("the response holds no readable time");
  if (root.timestamp_authorities.empty()) return fail("the trusted root lists no timestamp authority");
  std::string problem;
  for (const auto& tsa : root.timestamp_authorities) {
    x509_store_ptr store(X509_STORE_new());
    x509_stack_ptr certs(sk_X509_new_null());
    if (!store || !certs) return fail("out of memory");
    X509_STORE_add_cert(store.get(), tsa.chain.back().get());
    X509_VERIFY_PARAM* param = X509_STORE_get0_param(store.get());
    X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_PARTIAL_CHAIN);
    X509_VERIFY_PARAM_set_time(param, static_cast<time_t>(*at / 1000));  // the TSA's certificate at stamping time
    for (const auto& c : tsa.chain) {
      X509_up_ref(c.get());
      sk_X509_push(certs.get(), c.get());
    }
    ts_verify_ctx_ptr ctx(TS_VERIFY_CTX_new());
    if (!ctx) return fail("out of memory");
    TS_VERIFY_CTX_set_flags(ctx.get(), TS_VFY_VERSION | TS_VFY_SIGNATURE | TS_VFY_DATA);
    TS_VERIFY_CTX_set_data(ctx.get(), BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
    TS_VERIFY_CTX_set_store(ctx.get(), store.release());  // the context owns store, certs and data
    TS_VERIFY_CTX_set_certs(ctx.get(), certs.release());
    if (TS_RESP_verify_response(ctx.get(), resp.get()) != 1) {
      problem = fmt::format("does not verify with timestamp authority {} ({})", tsa.name, openssl_errors());
      continue;
    }
    if (!tsa.valid_for.contains(*at)) {
      problem = fmt::format("timestamp authority {} was not valid at the stamped time {}", tsa.name, format_time(*at));
      continue;
    }
    return *at;
  }
  return fail(std::move(problem));
}

}  // namespace drun::detail::sigstore

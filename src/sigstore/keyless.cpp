// The order of keyless verification. Evidence first (what the log and the timestamp authorities
// vouch for, and when), then the certificate at those times, then whether the log recorded this
// very signature, then who signed. Times come only from verified evidence: a bundle's own
// claims (an integratedTime without a valid promise, the certificate's dates) never count.
#include "sigstore/keyless.hpp"

#include "sigstore/certificate.hpp"

#include "detail/encoding.hpp"
#include "key_data.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace drun::detail::sigstore {
namespace {

using vt = json::value_t;

constexpr std::size_t max_entries = 8, max_timestamps = 8;

error bad_bundle(std::string detail) { return error(errc::malformed_bundle, std::move(detail)); }

result<std::string> decode_raw_bytes(const json& obj, std::string_view where) {
  auto f = require_field(obj, "rawBytes", vt::string, where);
  if (!f) return std::move(f).error();
  auto der = base64_decode((*f)->get_ref<const std::string&>());
  if (!der || der->empty()) return bad_bundle(fmt::format("{}.rawBytes is not valid base64", where));
  return std::move(*der);
}

}  // namespace

error step_failed(std::string_view step, error e) {
  std::string detail = fmt::format("keyless verification failed at {}: {}", step, e.detail());
  return error(e.code(), std::move(detail));
}

result<keyless_material> parse_keyless_material(const json& vm) {
  keyless_material m;
  if (const json* cert = optional_field(vm, "certificate")) {
    if (!cert->is_object()) return bad_bundle("verificationMaterial.certificate is not an object");
    auto der = decode_raw_bytes(*cert, "verificationMaterial.certificate");
    if (!der) return std::move(der).error();
    m.leaf_der = std::move(*der);
  } else if (const json* chain = optional_field(vm, "x509CertificateChain")) {
    auto certs = chain->is_object() ? require_field(*chain, "certificates", vt::array, "x509CertificateChain")
                                    : result<const json*>(bad_bundle("x509CertificateChain is not an object"));
    if (!certs) return std::move(certs).error();
    if ((*certs)->empty() || !(**certs)[0].is_object()) return bad_bundle("x509CertificateChain has no certificates");
    // Only the leaf is used: intermediates come from the trusted root, never from the bundle.
    auto der = decode_raw_bytes((**certs)[0], "x509CertificateChain.certificates[0]");
    if (!der) return std::move(der).error();
    m.leaf_der = std::move(*der);
  } else {
    return bad_bundle("verificationMaterial has no certificate for a keyless bundle");
  }
  if (const json* entries = optional_field(vm, "tlogEntries")) {
    if (!entries->is_array() || entries->size() > max_entries)
      return bad_bundle(fmt::format("verificationMaterial.tlogEntries is not an array of at most {} entries", max_entries));
    for (std::size_t i = 0; i < entries->size(); ++i) {
      auto e = parse_tlog_entry((*entries)[i], fmt::format("tlogEntries[{}]", i));
      if (!e) return std::move(e).error();
      m.entries.push_back(std::move(*e));
    }
  }
  if (const json* tvd = optional_field(vm, "timestampVerificationData")) {
    if (!tvd->is_object()) return bad_bundle("timestampVerificationData is not an object");
    if (const json* list = optional_field(*tvd, "rfc3161Timestamps")) {
      if (!list->is_array() || list->size() > max_timestamps)
        return bad_bundle(fmt::format("rfc3161Timestamps is not an array of at most {} timestamps", max_timestamps));
      for (std::size_t i = 0; i < list->size(); ++i) {
        std::string w = fmt::format("rfc3161Timestamps[{}]", i);
        const json& t = (*list)[i];
        auto f = t.is_object() ? require_field(t, "signedTimestamp", vt::string, w)
                               : result<const json*>(bad_bundle(w + " is not an object"));
        if (!f) return std::move(f).error();
        auto der = base64_decode((*f)->get_ref<const std::string&>());
        if (!der || der->empty()) return bad_bundle(w + ".signedTimestamp is not valid base64");
        m.timestamps.push_back(std::move(*der));
      }
    }
  }
  return m;
}

result<keyless_signer> verify_keyless(const keyless_material& m, std::string_view payload_type, std::string_view payload,
                                      std::string_view signature, const trusted_root& root,
                                      const identity_policy& policy) {
  const auto* p = reinterpret_cast<const unsigned char*>(m.leaf_der.data());
  x509_ptr leaf(d2i_X509(nullptr, &p, static_cast<long>(m.leaf_der.size())));
  if (!leaf || p != reinterpret_cast<const unsigned char*>(m.leaf_der.data()) + m.leaf_der.size()) {
    openssl_errors();
    return bad_bundle("the bundle's signing certificate is not valid DER");
  }

  // Inclusion and time: every entry and every timestamp must verify; at least one entry must.
  if (m.entries.empty())
    return step_failed("transparency log", error(errc::signature_invalid, "the bundle has no transparency log entry"));
  std::vector<millis> times;
  for (const auto& entry : m.entries) {
    auto ev = verify_inclusion(entry, root);
    if (!ev) return step_failed("transparency log", std::move(ev).error());
    if (ev->integrated_time) {
      if (!ev->log->valid_for.contains(*ev->integrated_time))
        return step_failed("transparency log", error(errc::signature_invalid,
                                                     fmt::format("the entry was integrated at {}, outside the validFor "
                                                                 "window of log {}",
                                                                 format_time(*ev->integrated_time), ev->log->base_url)));
      times.push_back(*ev->integrated_time);
    }
  }
  for (const auto& ts : m.timestamps) {
    // Sigstore timestamps the signature bytes: the time at which this signature existed.
    auto t = verify_rfc3161(ts, signature, root);
    if (!t) return step_failed("timestamp", std::move(t).error());
    times.push_back(*t);
  }
  if (times.empty())
    return step_failed("signing time",
                       error(errc::signature_invalid,
                             "no verified signing time: the log entry has no signed entry timestamp (an inclusion proof "
                             "proves inclusion, not time) and the bundle has no RFC 3161 timestamp"));
  auto valid = validity_of(leaf.get());
  if (!valid) return step_failed("signing time", std::move(valid).error());
  for (millis t : times)
    if (t < valid->not_before || t > valid->not_after)
      return step_failed("signing time",
                         error(errc::untrusted_certificate,
                               fmt::format("the verified signing time {} is outside the certificate's validity ({} to "
                                           "{}): it was signed after the certificate expired or before it was issued",
                                           format_time(t), format_time(valid->not_before),
                                           format_time(valid->not_after))));

  // The chain at every trusted time.
  x509_ptr issuer;
  for (millis t : times) {
    auto i = verify_fulcio_chain(leaf.get(), root, t);
    if (!i) return step_failed("certificate chain", std::move(i).error());
    issuer = std::move(*i);
  }
  if (auto ok = verify_embedded_scts(leaf.get(), issuer.get(), root); !ok)
    return step_failed("SCT", std::move(ok).error());

  signed_envelope env{payload_type, payload, signature, m.leaf_der};
  for (const auto& entry : m.entries)
    if (auto ok = verify_body(entry, env); !ok) return step_failed("transparency log entry body", std::move(ok).error());

  auto who = identity_of(leaf.get());
  if (!who) return step_failed("identity", std::move(who).error());
  auto match = std::find(who->names.begin(), who->names.end(), policy.identity);
  if (match == who->names.end())
    return step_failed("identity", error(errc::untrusted_certificate,
                                         fmt::format("the certificate's identity is {}, not the required {}",
                                                     who->names.front(), policy.identity)));
  if (who->issuer != policy.issuer)
    return step_failed("identity", error(errc::untrusted_certificate,
                                         fmt::format("the certificate's OIDC issuer is {}, not the required {}",
                                                     who->issuer, policy.issuer)));
  auto key = key_access::from_evp(X509_get0_pubkey(leaf.get()));
  if (!key) return step_failed("certificate chain", std::move(key).error());
  return keyless_signer{std::move(*key), *match, who->issuer, *std::min_element(times.begin(), times.end())};
}

}  // namespace drun::detail::sigstore

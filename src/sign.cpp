// Signing: DSSE PAE over the statement, packed as a Sigstore bundle v0.3 (OMS key or certificate
// method).
#include <drun/sign.hpp>
#include <drun/verify.hpp>

#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/json.hpp"
#include "key_data.hpp"
#include "manifest_data.hpp"
#include "trust_data.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace drun {

std::string pre_authentication_encoding(std::string_view payload_type, std::span<const std::byte> payload) {
  std::string pae = fmt::format("DSSEv1 {} {} {} ", payload_type.size(), payload_type, payload.size());
  pae.append(reinterpret_cast<const char*>(payload.data()), payload.size());
  return pae;
}

result<std::string> sign_manifest(const manifest& m, const private_key& key, const certificate_chain* chain) {
  auto pub = key.public_key();
  if (chain && !chain->certifies(pub))
    return error(errc::invalid_argument,
                 fmt::format("the signing certificate ({}) does not certify the signing key", chain->leaf_subject()));
  std::string payload = m.statement_json();
  std::string pae = pre_authentication_encoding(in_toto_payload_type, as_bytes(payload));
  auto sig = detail::key_access::sign(key, as_bytes(pae));
  if (!sig) return std::move(sig).error();

  using ojson = nlohmann::ordered_json;
  ojson material;
  if (chain) {
    ojson certs = ojson::array();
    for (const auto& der : detail::trust_access::der_chain(*chain))
      certs.push_back({{"rawBytes", detail::base64_encode(as_bytes(der))}});
    material["x509CertificateChain"] = {{"certificates", certs}};
  } else {
    material["publicKey"] = {{"hint", pub.hint()}};
  }
  material["tlogEntries"] = ojson::array();
  ojson bundle{{"mediaType", bundle_media_type},
               {"verificationMaterial", material},
               {"dsseEnvelope",
                {{"payload", detail::base64_encode(as_bytes(payload))},
                 {"payloadType", in_toto_payload_type},
                 {"signatures", ojson::array({{{"sig", detail::base64_encode(as_bytes(*sig))}}})}}}};
  std::string text = bundle.dump(2) + "\n";
  // Refused here rather than by every verifier later: a bundle nobody can verify helps nobody.
  if (text.size() > max_bundle_size)
    return error(errc::invalid_argument,
                 fmt::format("the bundle would be {} bytes ({} resources), over the {} bytes verifiers accept: "
                             "sign with a larger piece size (fewer pieces)",
                             text.size(), m.resource_count(), max_bundle_size));
  return text;
}

result<void> write_file_atomically(const std::filesystem::path& file, std::string_view content, unsigned mode) {
  auto dir = file.has_parent_path() ? file.parent_path() : std::filesystem::path(".");
  std::string tmpl = (dir / ("." + file.filename().string() + ".tmp.XXXXXX")).string();
  int fd_raw = ::mkstemp(tmpl.data());
  if (fd_raw < 0) return detail::sys_error("cannot create a temporary file", dir, errno);
  detail::unique_fd fd(fd_raw);
  auto r = detail::write_all(fd.get(), content, tmpl);
  if (r && ::fchmod(fd.get(), static_cast<mode_t>(mode)) != 0) r = detail::sys_error("cannot chmod", tmpl, errno);
  if (r && ::fsync(fd.get()) != 0) r = detail::sys_error("cannot fsync", tmpl, errno);
  if (r && ::rename(tmpl.c_str(), file.c_str()) != 0) r = detail::sys_error("cannot rename into place", file, errno);
  if (!r) {
    ::unlink(tmpl.c_str());
    return r;
  }
  // Make the rename itself durable.
  detail::unique_fd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd) ::fsync(dfd.get());
  return {};
}

}  // namespace drun

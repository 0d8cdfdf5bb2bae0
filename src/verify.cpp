// Verification: strict bundle parsing, signature and chain checks, statement validation, and
// the comparison of a model on disk with its verified manifest.
#include <drun/sign.hpp>
#include <drun/verify.hpp>

#include "detail/audit.hpp"
#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/json.hpp"
#include "detail/log.hpp"
#include "key_data.hpp"
#include "manifest_data.hpp"
#include "sigstore/certificate.hpp"
#include "trust_data.hpp"

#include <fmt/format.h>
#include <openssl/crypto.h>

#include <algorithm>
#include <unordered_map>

namespace drun {
namespace {

using detail::json;
using vt = json::value_t;

error bad_bundle(std::string detail) { return error(errc::malformed_bundle, std::move(detail)); }

// Sigstore bundle media types drun reads: v0.3 in both spellings, v0.2 and v0.1 (keyless
// bundles of older clients; same envelope, the leaf in x509CertificateChain).
bool known_media_type(std::string_view t) {
  return t == "application/vnd.dev.sigstore.bundle.v0.3+json" ||
         t == "application/vnd.dev.sigstore.bundle+json;version=0.3" ||
         t == "application/vnd.dev.sigstore.bundle+json;version=0.2" ||
         t == "application/vnd.dev.sigstore.bundle+json;version=0.1";
}

// A keyless bundle's leaf names its signer; read for display before anything is verified.
void describe_keyless_signer(const std::string& leaf_der, signer_info& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(leaf_der.data());
  detail::x509_ptr leaf(d2i_X509(nullptr, &p, static_cast<long>(leaf_der.size())));
  detail::openssl_errors();
  if (!leaf) return;
  if (auto who = detail::sigstore::identity_of(leaf.get())) {
    s.subject = who->names.front();
    s.issuer = who->issuer;
  }
}

// A bundle's parts, parsed but not yet authenticated.
struct parsed_bundle {
  std::string payload;               // decoded statement bytes, exactly as signed
  std::string signature;             // decoded signature bytes
  signer_info signer;
  std::vector<std::string> chain;    // DER certificates, leaf first (certificate method)
  json material;                     // verificationMaterial, for keyless verification
};

result<std::string> decode_base64_field(const json& obj, std::string_view key, std::string_view where) {
  auto f = detail::require_field(obj, key, vt::string, where);
  if (!f) return std::move(f).error();
  auto decoded = detail::base64_decode((*f)->get_ref<const std::string&>());
  if (!decoded) return bad_bundle(fmt::format("{}.{} is not valid base64", where, key));
  return std::move(*decoded);
}

// The values an unauthenticated bundle may hold: a keyless v0.1 bundle with a chain, a Rekor entry,
// its inclusion proof (up to 64 hashes) and a checkpoint has under 200.
constexpr std::size_t max_bundle_values = 4096;

result<parsed_bundle> parse_bundle(std::string_view text) {
  if (text.size() > max_bundle_size)
    return bad_bundle(fmt::format("bundle is too large ({} bytes, at most {})", text.size(), max_bundle_size));
  // Parsed before anything is authenticated: a real bundle holds a few dozen values (the payload
  // is one base64 string, parsed only once its signature verified), so more is hostile.
  auto doc = detail::parse_json_strict(text, "bundle", max_bundle_values);
  if (!doc) return std::move(doc).error();
  if (!doc->is_object()) return bad_bundle("bundle is not a JSON object");

  auto media = detail::require_field(*doc, "mediaType", vt::string, "bundle");
  if (!media) return std::move(media).error();
  if (!known_media_type((*media)->get_ref<const std::string&>()))
    return error(errc::unsupported, fmt::format("bundle mediaType \"{}\" is not a Sigstore bundle v0.2/v0.3",
                                                (*media)->get<std::string>()));
  if (!doc->contains("dsseEnvelope"))
    return error(errc::unsupported, "bundle has no dsseEnvelope (message-signature bundles are not OMS)");
  auto env = detail::require_field(*doc, "dsseEnvelope", vt::object, "bundle");
  if (!env) return std::move(env).error();
  auto ptype = detail::require_field(**env, "payloadType", vt::string, "dsseEnvelope");
  if (!ptype) return std::move(ptype).error();
  if ((*ptype)->get_ref<const std::string&>() != in_toto_payload_type)
    return bad_bundle(fmt::format("dsseEnvelope.payloadType is \"{}\", not {}", (*ptype)->get<std::string>(),
                                  in_toto_payload_type));
  parsed_bundle b;
  auto payload = decode_base64_field(**env, "payload", "dsseEnvelope");
  if (!payload) return std::move(payload).error();
  b.payload = std::move(*payload);
  auto sigs = detail::require_field(**env, "signatures", vt::array, "dsseEnvelope");
  if (!sigs) return std::move(sigs).error();
  if ((*sigs)->size() != 1)
    return bad_bundle(fmt::format("dsseEnvelope has {} signatures; OMS bundles carry exactly one", (*sigs)->size()));
  if (!(**sigs)[0].is_object()) return bad_bundle("dsseEnvelope.signatures[0] is not an object");
  auto sig = decode_base64_field((**sigs)[0], "sig", "dsseEnvelope.signatures[0]");
  if (!sig) return std::move(sig).error();
  b.signature = std::move(*sig);  // "keyid" is ignored, whatever its value

  auto material = detail::require_field(*doc, "verificationMaterial", vt::object, "bundle");
  if (!material) return std::move(material).error();
  // Keyless: the v0.3 `certificate`, or (v0.1/v0.2) a chain with transparency log entries. The
  // OMS certificate method writes a chain and an empty tlogEntries.
  const json* tlog = detail::optional_field(**material, "tlogEntries");
  bool logged = tlog && tlog->is_array() && !tlog->empty();
  if (const json* pk = detail::optional_field(**material, "publicKey")) {
    if (!pk->is_object()) return bad_bundle("verificationMaterial.publicKey is not an object");
    b.signer.method = "key";
    if (const json* hint = detail::optional_field(*pk, "hint")) {
      if (!hint->is_string()) return bad_bundle("verificationMaterial.publicKey.hint is not a string");
      b.signer.key_hint = hint->get<std::string>();
    }
    // An older variant embeds the key as rawBytes: never trusted, the user's key decides.
  } else if (const json* chain = detail::optional_field(**material, "x509CertificateChain")) {
    if (!chain->is_object()) return bad_bundle("verificationMaterial.x509CertificateChain is not an object");
    auto certs = detail::require_field(*chain, "certificates", vt::array, "x509CertificateChain");
    if (!certs) return std::move(certs).error();
    for (std::size_t i = 0; i < (*certs)->size(); ++i) {
      const json& c = (**certs)[i];
      if (!c.is_object()) return bad_bundle(fmt::format("x509CertificateChain.certificates[{}] is not an object", i));
      auto der = decode_base64_field(c, "rawBytes", fmt::format("x509CertificateChain.certificates[{}]", i));
      if (!der) return std::move(der).error();
      b.chain.push_back(std::move(*der));
    }
    if (b.chain.empty()) return bad_bundle("x509CertificateChain has no certificates");
    if (logged) {
      b.signer.method = "sigstore";
      describe_keyless_signer(b.chain[0], b.signer);
    } else {
      b.signer.method = "certificate";
      b.signer.subject = detail::trust_access::subject_of(b.chain[0]);
    }
  } else if (const json* cert = detail::optional_field(**material, "certificate")) {
    if (!cert->is_object()) return bad_bundle("verificationMaterial.certificate is not an object");
    auto der = decode_base64_field(*cert, "rawBytes", "verificationMaterial.certificate");
    if (!der) return std::move(der).error();
    b.chain.push_back(std::move(*der));
    b.signer.method = "sigstore";
    describe_keyless_signer(b.chain[0], b.signer);
  } else {
    return bad_bundle("verificationMaterial has no publicKey, x509CertificateChain or certificate");
  }
  b.material = **material;
  return b;
}

}  // namespace

// ---- verified_manifest ----------------------------------------------------------------------

struct verified_manifest::impl {
  std::string artifact_id;
  detail::manifest_data data;
  signer_info signer;
  std::vector<manifest_file> files;
  std::vector<manifest_piece> pieces;
};

namespace {

// Groups resources into files (in order of first appearance) and their pieces (by offset).
void index_resources(const detail::manifest_data& data, std::vector<manifest_file>& files,
                     std::vector<manifest_piece>& pieces) {
  std::unordered_map<std::string, std::vector<const detail::resource*>> by_file;
  std::vector<std::string> order;
  for (const auto& r : data.resources) {
    auto [it, inserted] = by_file.try_emplace(r.file);
    if (inserted) order.push_back(r.file);
    it->second.push_back(&r);
  }
  for (const auto& name : order) {
    auto& rs = by_file[name];
    std::sort(rs.begin(), rs.end(), [](auto* a, auto* b) { return a->range && b->range && a->range->begin < b->range->begin; });
    manifest_file f{name, std::nullopt, pieces.size(), rs.size()};
    if (data.method == serialization_method::shards) f.size = rs.back()->range->end;
    for (const auto* r : rs) pieces.push_back({files.size(), r->range, r->value});
    files.push_back(std::move(f));
  }
}

}  // namespace

struct detail::verified_access {
  static verified_manifest make(std::string artifact_id, manifest_data data, signer_info signer) {
    auto p = std::make_unique<verified_manifest::impl>();
    p->artifact_id = std::move(artifact_id);
    p->data = std::move(data);
    p->signer = std::move(signer);
    index_resources(p->data, p->files, p->pieces);
    return verified_manifest(std::move(p));
  }
};

verified_manifest::verified_manifest(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
verified_manifest::~verified_manifest() = default;
verified_manifest::verified_manifest(verified_manifest&&) noexcept = default;
verified_manifest& verified_manifest::operator=(verified_manifest&&) noexcept = default;
const std::string& verified_manifest::artifact_id() const noexcept { return impl_->artifact_id; }
serialization_method verified_manifest::method() const noexcept { return impl_->data.method; }
hash_algorithm verified_manifest::hash_type() const noexcept { return impl_->data.hash; }
std::uint64_t verified_manifest::shard_size() const noexcept { return impl_->data.shard_size; }
const std::string& verified_manifest::subject_name() const noexcept { return impl_->data.subject_name; }
const signer_info& verified_manifest::signer() const noexcept { return impl_->signer; }
const std::vector<manifest_file>& verified_manifest::files() const noexcept { return impl_->files; }
const std::vector<manifest_piece>& verified_manifest::pieces() const noexcept { return impl_->pieces; }
const std::vector<std::string>& verified_manifest::ignore_paths() const noexcept { return impl_->data.ignore_paths; }
bool verified_manifest::allow_symlinks() const noexcept { return impl_->data.allow_symlinks; }

verified_piece::verified_piece(std::string artifact_id, std::size_t index, std::size_t file, byte_range range,
                               std::vector<std::byte> bytes)
    : artifact_id_(std::move(artifact_id)), index_(index), file_(file), range_(range), bytes_(std::move(bytes)) {}
verified_piece::~verified_piece() { OPENSSL_cleanse(bytes_.data(), bytes_.size()); }
verified_piece::verified_piece(verified_piece&&) noexcept = default;
verified_piece& verified_piece::operator=(verified_piece&& o) noexcept {
  if (this != &o) {
    OPENSSL_cleanse(bytes_.data(), bytes_.size());
    artifact_id_ = std::move(o.artifact_id_);
    index_ = o.index_;
    file_ = o.file_;
    range_ = o.range_;
    bytes_ = std::move(o.bytes_);
  }
  return *this;
}
std::vector<std::byte> verified_piece::release() && noexcept { return std::move(bytes_); }

result<verified_piece> verified_manifest::check_piece(std::size_t index, std::vector<std::byte>&& bytes) const {
  if (index >= impl_->pieces.size())
    return error(errc::invalid_argument, fmt::format("piece {} does not exist ({} pieces)", index, impl_->pieces.size()));
  const auto& p = impl_->pieces[index];
  const auto& name = impl_->files[p.file].name;
  byte_range range = p.range.value_or(byte_range{0, bytes.size()});
  if (bytes.size() != range.size())
    return error(errc::digest_mismatch, fmt::format("piece has {} bytes; the manifest signs {}", bytes.size(), range.size()))
        .with_path(name)
        .with_range(range.begin, range.end);
  if (!(hash(impl_->data.hash, bytes) == p.expected))
    return error(errc::digest_mismatch, fmt::format("{} digest mismatch", to_string(impl_->data.hash)))
        .with_path(name)
        .with_range(range.begin, range.end);
  return verified_piece(impl_->artifact_id, index, p.file, range, std::move(bytes));
}

// ---- bundles ---------------------------------------------------------------------------------

result<std::string> read_bundle_file(const std::filesystem::path& file) {
  return detail::read_file(file, max_bundle_size, errc::malformed_bundle);
}

namespace {

result<verified_manifest> check_bundle(std::string_view bundle_json, const trust_store& trust) {
  auto b = parse_bundle(bundle_json);
  if (!b) return std::move(b).error();

  std::optional<public_key> key;
  const auto* keyless = detail::trust_access::sigstore(trust);
  if (b->signer.method == "sigstore") {
    if (!keyless)
      return error(errc::untrusted_certificate,
                   "bundle is signed keyless (a Sigstore Fulcio certificate with transparency log entries); verify it "
                   "with a Sigstore trusted root and an identity policy (--trusted-root, --identity, "
                   "--identity-provider)");
    auto material = detail::sigstore::parse_keyless_material(b->material);
    if (!material) return std::move(material).error();
    auto signer = detail::sigstore::verify_keyless(*material, in_toto_payload_type, b->payload, b->signature,
                                                   keyless->root, keyless->policy);
    if (!signer) return std::move(signer).error();
    std::string pae = pre_authentication_encoding(in_toto_payload_type, as_bytes(b->payload));
    if (!detail::key_access::verify(signer->key, as_bytes(pae), as_bytes(b->signature)))
      return detail::sigstore::step_failed(
          "DSSE signature", error(errc::signature_invalid, "the envelope's signature does not verify with the signing "
                                                           "certificate's key: the payload or signature was modified"));
    auto data = detail::parse_statement(b->payload);
    if (!data) return std::move(data).error();
    b->signer.subject = std::move(signer->identity);
    b->signer.issuer = std::move(signer->issuer);
    return detail::verified_access::make(hash(hash_algorithm::sha256, as_bytes(b->payload)).hex(),
                                         std::move(*data), std::move(b->signer));
  }
  if (keyless)
    return error(errc::signature_invalid,
                 fmt::format("bundle is signed with a {}, not keyless; verify it with {}, not a Sigstore trusted root",
                             b->signer.method, b->signer.method == "key" ? "the publisher's public key" : "CA roots"));
  if (b->signer.method == "key") {
    const auto& trusted = detail::trust_access::key(trust);
    if (!trusted)
      return error(errc::signature_invalid,
                   "bundle is signed with a key; verify it with the publisher's public key, not CA roots");
    if (!b->signer.key_hint.empty() && b->signer.key_hint != trusted->hint())
      return error(errc::signature_invalid,
                   fmt::format("bundle's public key hint {} does not match the given {} public key (hint {})",
                               b->signer.key_hint, to_string(trusted->type()), trusted->hint()));
    key = trusted;
  } else {
    auto leaf = detail::trust_access::verify_chain(trust, b->chain);
    if (!leaf) return std::move(leaf).error();
    key = std::move(leaf->first);
  }
  std::string pae = pre_authentication_encoding(in_toto_payload_type, as_bytes(b->payload));
  if (!detail::key_access::verify(*key, as_bytes(pae), as_bytes(b->signature)))
    return error(errc::signature_invalid,
                 fmt::format("signature does not verify with the {} public key (hint {}): the bundle was "
                             "modified or signed by another key",
                             to_string(key->type()), key->hint()));

  // Only now, with the payload authenticated, is the statement parsed.
  auto data = detail::parse_statement(b->payload);
  if (!data) return std::move(data).error();
  return detail::verified_access::make(hash(hash_algorithm::sha256, as_bytes(b->payload)).hex(),
                                       std::move(*data), std::move(b->signer));
}

}  // namespace

result<verified_manifest> verify_bundle(std::string_view bundle_json, const trust_store& trust) {
  auto r = check_bundle(bundle_json, trust);
  if (!detail::auditing()) return r;
  // The artifact id is the payload's digest: what a refused bundle claims to be, for the record.
  std::string claimed;
  if (auto s = inspect_bundle(bundle_json)) claimed = s->artifact_id;
  if (!r) {
    detail::audit("bundle.refused", {{"artifact", claimed}, {"reason", r.error().message()}});
    return r;
  }
  const auto& who = r->signer();
  detail::audit("bundle.verified", {{"artifact", r->artifact_id()}, {"subject", r->subject_name()},
                                    {"signer.method", who.method}, {"signer.key_hint", who.key_hint},
                                    {"signer.subject", who.subject}, {"signer.issuer", who.issuer}});
  return r;
}

result<bundle_summary> inspect_bundle(std::string_view bundle_json) {
  auto b = parse_bundle(bundle_json);
  if (!b) return std::move(b).error();
  auto data = detail::parse_statement(b->payload);
  if (!data) return std::move(data).error();
  bundle_summary s;
  s.artifact_id = hash(hash_algorithm::sha256, as_bytes(b->payload)).hex();
  s.method = data->method;
  s.hash_type = data->hash;
  s.shard_size = data->shard_size;
  s.subject_name = data->subject_name;
  s.signer = std::move(b->signer);
  s.ignore_paths = data->ignore_paths;
  index_resources(*data, s.files, s.pieces);
  s.piece_count = s.pieces.size();
  return s;
}

// ---- models -----------------------------------------------------------------------------------

result<void> verify_model(const verified_manifest& m, const std::filesystem::path& model,
                          const verify_options& options) {
  model_policy policy;
  policy.allow_symlinks = m.allow_symlinks();
  policy.ignore_paths = m.ignore_paths();
  policy.ignore_paths.insert(policy.ignore_paths.end(), options.ignore_paths.begin(), options.ignore_paths.end());
  auto local = enumerate_model(model, policy);
  if (!local) {
    // A symlink or special file where the manifest expects plain files is a mismatch, not misuse.
    if (local.error().code() == errc::unsafe_entry)
      return std::move(local).error().with_code(errc::model_mismatch);
    return std::move(local).error();
  }

  const auto& files = m.files();
  bool local_single = local->size() == 1 && (*local)[0].name == ".";
  std::vector<std::string> problems, accepted_empty;
  std::vector<std::size_t> local_of(files.size(), SIZE_MAX);
  std::vector<bool> matched(local->size(), false);
  if (local_single) {
    // A single-file model: the reference names it ".", the spec its basename; accept both.
    std::string base = model.filename().string();
    for (std::size_t i = 0; i < files.size(); ++i) {
      if (files[i].name == "." || (files.size() == 1 && files[i].name == base)) {
        local_of[i] = 0;
        matched[0] = true;
      } else {
        problems.push_back(fmt::format("{}: missing from the model (listed in the manifest)", files[i].name));
      }
    }
    if (!matched[0] && !options.ignore_unsigned_files)
      problems.push_back(fmt::format("{}: not in the manifest (unsigned file)", base));
  } else {
    std::unordered_map<std::string_view, std::size_t> index;
    for (std::size_t k = 0; k < local->size(); ++k) index.emplace((*local)[k].name, k);
    for (std::size_t i = 0; i < files.size(); ++i) {
      if (files[i].name == ".") {
        problems.push_back(fmt::format("the manifest describes a single file, but {} is a directory", model.string()));
        continue;
      }
      auto it = index.find(files[i].name);
      if (it == index.end()) {
        problems.push_back(fmt::format("{}: missing from the model (listed in the manifest)", files[i].name));
        continue;
      }
      local_of[i] = it->second;
      matched[it->second] = true;
    }
    // In shards mode an empty file has no resource (nothing to hash): the signature cannot say
    // whether the publisher's model had it, so it passes only when the caller said it accepts that.
    bool shards = m.method() == serialization_method::shards;
    if (!options.ignore_unsigned_files)
      for (std::size_t k = 0; k < local->size(); ++k) {
        if (matched[k]) continue;
        bool empty = shards && (*local)[k].size == 0;
        if (empty && options.allow_unsigned_empty_files) {
          accepted_empty.push_back((*local)[k].name);
          continue;
        }
        problems.push_back(empty ? fmt::format("{}: an empty file not in the manifest (unsigned: the shards format "
                                               "cannot sign empty files; accept them with "
                                               "--allow-unsigned-empty-files)",
                                               (*local)[k].name)
                                 : fmt::format("{}: not in the manifest (unsigned file)", (*local)[k].name));
      }
  }
  for (std::size_t i = 0; i < files.size(); ++i) {
    if (local_of[i] == SIZE_MAX || !files[i].size) continue;
    auto actual = (*local)[local_of[i]].size;
    if (actual != *files[i].size)
      problems.push_back(fmt::format("{}: size differs (signed {} bytes, found {})", files[i].name, *files[i].size, actual));
  }
  if (!problems.empty()) {
    std::string detail = "model does not match its manifest: ";
    for (std::size_t k = 0; k < problems.size() && k < 10; ++k) detail += (k ? "; " : "") + problems[k];
    if (problems.size() > 10) detail += fmt::format("; and {} more", problems.size() - 10);
    return error(errc::model_mismatch, std::move(detail));
  }
  if (!accepted_empty.empty()) {
    // Whoever asked for this hears, every time, exactly what the signature did not vouch for.
    std::string names;
    for (std::size_t k = 0; k < accepted_empty.size() && k < 10; ++k) names += (k ? ", " : "") + accepted_empty[k];
    if (accepted_empty.size() > 10) names += fmt::format(" and {} more", accepted_empty.size() - 10);
    detail::log(log_level::warning, fmt::format("{}: accepted {} unsigned empty {} (allow_unsigned_empty_files): {}",
                                                model.string(), accepted_empty.size(),
                                                accepted_empty.size() == 1 ? "file" : "files", names));
  }

  std::vector<detail::hash_task> tasks;
  const auto& pieces = m.pieces();
  tasks.reserve(pieces.size());
  for (const auto& p : pieces) {
    auto k = local_of[p.file];
    tasks.push_back({k, p.range.value_or(byte_range{0, (*local)[k].size})});
  }
  auto digests = detail::hash_ranges(*local, tasks, m.hash_type(), options.threads, m.allow_symlinks(), options.progress);
  if (!digests) {
    // A file replaced or resized under the verifier is a model that does not match.
    if (digests.error().code() == errc::unsafe_entry) return std::move(digests).error().with_code(errc::model_mismatch);
    return std::move(digests).error();
  }
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i)
    if (!((*digests)[i] == pieces[i].expected) && bad++ == 0) first = i;
  if (bad == 0) return {};
  const auto& p = pieces[first];
  std::string name = files[p.file].name == "." ? model.filename().string() : files[p.file].name;
  std::string detail = fmt::format("{} digest mismatch{}", to_string(m.hash_type()), p.range ? "" : " (whole file)");
  if (bad > 1) detail += fmt::format(" (and {} more {} differ)", bad - 1, bad == 2 ? "piece" : "pieces");
  error e(errc::digest_mismatch, std::move(detail));
  e.with_path(name);
  if (p.range) e.with_range(p.range->begin, p.range->end);
  return e;
}

}  // namespace drun

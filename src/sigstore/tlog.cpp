// Rekor evidence: SET, Merkle inclusion proof, signed checkpoint, canonical body.
#include "sigstore/tlog.hpp"

#include <drun/hash.hpp>

#include "detail/encoding.hpp"
#include "key_data.hpp"

#include <fmt/format.h>
#include <openssl/pem.h>

#include <charconv>

namespace drun::detail::sigstore {
namespace {

using vt = json::value_t;

constexpr std::size_t max_proof_hashes = 64;  // a tree of 2^64 leaves needs at most 64

error bad_bundle(std::string detail) { return error(errc::malformed_bundle, std::move(detail)); }
error evidence_error(std::string detail) { return error(errc::signature_invalid, std::move(detail)); }

// protobuf JSON writes int64 as a decimal string; accept a JSON integer too.
result<std::uint64_t> integer_field(const json& obj, std::string_view key, std::string_view where) {
  auto it = obj.find(key);
  if (it == obj.end()) return bad_bundle(fmt::format("{} has no \"{}\"", where, key));
  if (it->is_number_unsigned()) return it->get<std::uint64_t>();
  if (it->is_string()) {
    const auto& s = it->get_ref<const std::string&>();
    std::uint64_t v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc() && end == s.data() + s.size() && !s.empty()) return v;
  }
  return bad_bundle(fmt::format("{}.{} is not a non-negative integer", where, key));
}

result<std::string> base64_field(const json& obj, std::string_view key, std::string_view where) {
  auto f = require_field(obj, key, vt::string, where);
  if (!f) return std::move(f).error();
  auto bytes = base64_decode((*f)->get_ref<const std::string&>());
  if (!bytes) return bad_bundle(fmt::format("{}.{} is not valid base64", where, key));
  return std::move(*bytes);
}

std::string sha256_raw(std::string_view bytes) {
  auto d = hash(hash_algorithm::sha256, as_bytes(bytes));
  return std::string(reinterpret_cast<const char*>(d.bytes().data()), d.size());
}

std::string node_hash(std::string_view left, std::string_view right) {
  std::string buf;
  buf.reserve(1 + left.size() + right.size());
  buf.push_back('\x01');
  buf.append(left).append(right);
  return sha256_raw(buf);
}

const log_key* find_log(const trusted_root& root, const std::string& log_id) {
  for (const auto& l : root.tlogs)
    if (l.log_id == log_id) return &l;
  return nullptr;
}

// A checkpoint (C2SP signed note): "<origin>\n<size>\n<base64 root>\n[extension lines]\n\n"
// followed by signature lines "— <name> <base64(4-byte key hint || signature)>\n". Only the
// signature of the trusted log counts; any line of it verifying is enough (other witnesses
// may cosign a note).
result<void> verify_checkpoint(const std::string& note, const inclusion_proof& proof, const log_key& log) {
  auto split = note.find("\n\n");
  if (split == std::string::npos) return evidence_error("checkpoint is not a signed note (no blank line before the signatures)");
  std::string_view body(note.data(), split + 1);
  std::vector<std::string_view> lines;
  for (std::size_t pos = 0; pos < body.size();) {
    auto nl = body.find('\n', pos);
    lines.push_back(body.substr(pos, nl - pos));
    pos = nl + 1;
  }
  if (lines.size() < 3) return evidence_error("checkpoint has fewer than three lines (origin, size, root hash)");
  std::uint64_t size = 0;
  auto [end, ec] = std::from_chars(lines[1].data(), lines[1].data() + lines[1].size(), size);
  if (ec != std::errc() || end != lines[1].data() + lines[1].size())
    return evidence_error("checkpoint's tree size is not a number");
  auto root = base64_decode(lines[2]);
  if (!root) return evidence_error("checkpoint's root hash is not base64");
  bool signed_by_log = false;
  std::string_view sigs(note.data() + split + 2, note.size() - split - 2);
  constexpr std::string_view dash = "\xE2\x80\x94 ";  // U+2014 EM DASH, then a space
  while (!sigs.empty()) {
    auto nl = sigs.find('\n');
    if (nl == std::string_view::npos) return evidence_error("checkpoint signature line does not end with a newline");
    std::string_view line = sigs.substr(0, nl);
    sigs.remove_prefix(nl + 1);
    if (line.substr(0, dash.size()) != dash) return evidence_error("checkpoint signature line does not start with \"\u2014 \"");
    line.remove_prefix(dash.size());
    auto space = line.rfind(' ');
    if (space == std::string_view::npos) return evidence_error("checkpoint signature line has no key name");
    auto blob = base64_decode(line.substr(space + 1));
    if (!blob || blob->size() < 5) return evidence_error("checkpoint signature is not base64 of a key hint and a signature");
    std::string_view sig(blob->data() + 4, blob->size() - 4);
    if (key_access::verify(log.key, as_bytes(body), as_bytes(sig))) signed_by_log = true;
  }
  if (!signed_by_log)
    return evidence_error(fmt::format("checkpoint is not signed by the log's key ({}): it was signed by another key "
                                      "or altered", log.base_url));
  if (size != proof.tree_size || *root != proof.root_hash)
    return evidence_error(fmt::format("checkpoint (tree size {}) does not match the inclusion proof (tree size {}, "
                                      "another root hash)", size, proof.tree_size));
  return {};
}

std::optional<std::string> pem_certificate_der(std::string_view pem) {
  bio_ptr bio = memory_bio(pem);
  x509_ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  openssl_errors();
  if (!cert) return std::nullopt;
  unsigned char* buf = nullptr;
  int len = i2d_X509(cert.get(), &buf);
  if (len <= 0) return std::nullopt;
  std::string out(reinterpret_cast<char*>(buf), static_cast<std::size_t>(len));
  OPENSSL_free(buf);
  return out;
}

// One {"algorithm": a, "value": hex} (v1 bodies) compared with SHA-256 of bytes.
bool hash_object_matches(const json* h, std::string_view bytes) {
  if (!h || !h->is_object()) return false;
  auto alg = h->find("algorithm"), value = h->find("value");
  if (alg == h->end() || value == h->end() || !alg->is_string() || !value->is_string()) return false;
  return alg->get<std::string>() == "sha256" && value->get<std::string>() == hash(hash_algorithm::sha256, as_bytes(bytes)).hex();
}

const json* at(const json& obj, std::initializer_list<const char*> path) {
  const json* cur = &obj;
  for (const char* k : path) {
    if (!cur->is_object()) return nullptr;
    auto it = cur->find(k);
    if (it == cur->end()) return nullptr;
    cur = &*it;
  }
  return cur;
}

std::optional<std::string> decoded_string(const json* j) {
  if (!j || !j->is_string()) return std::nullopt;
  return base64_decode(j->get_ref<const std::string&>());
}

}  // namespace

bool merkle_inclusion_holds(std::uint64_t index, std::uint64_t tree_size, std::span<const std::byte> leaf_hash,
                            const std::vector<std::string>& path, std::span<const std::byte> root) {
  if (index >= tree_size || leaf_hash.size() != 32 || root.size() != 32) return false;
  std::uint64_t fn = index, sn = tree_size - 1;
  std::string r(reinterpret_cast<const char*>(leaf_hash.data()), leaf_hash.size());
  for (const auto& p : path) {
    if (p.size() != 32 || sn == 0) return false;
    if ((fn & 1) || fn == sn) {
      r = node_hash(p, r);
      while (!(fn & 1) && fn != 0) {
        fn >>= 1;
        sn >>= 1;
      }
    } else {
      r = node_hash(r, p);
    }
    fn >>= 1;
    sn >>= 1;
  }
  return sn == 0 && digest_equal(as_bytes(r), root);
}

result<tlog_entry> parse_tlog_entry(const json& e, std::string_view where) {
  if (!e.is_object()) return bad_bundle(fmt::format("{} is not an object", where));
  tlog_entry t;
  auto index = integer_field(e, "logIndex", where);
  if (!index) return std::move(index).error();
  t.log_index = *index;
  auto id = require_field(e, "logId", vt::object, where);
  if (!id) return std::move(id).error();
  auto key_id = base64_field(**id, "keyId", fmt::format("{}.logId", where));
  if (!key_id) return std::move(key_id).error();
  t.log_id = std::move(*key_id);
  auto kv = require_field(e, "kindVersion", vt::object, where);
  if (!kv) return std::move(kv).error();
  std::string kvw = fmt::format("{}.kindVersion", where);
  auto kind = require_field(**kv, "kind", vt::string, kvw);
  if (!kind) return std::move(kind).error();
  auto version = require_field(**kv, "version", vt::string, kvw);
  if (!version) return std::move(version).error();
  t.kind = (*kind)->get<std::string>();
  t.version = (*version)->get<std::string>();
  if (optional_field(e, "integratedTime")) {
    auto it = integer_field(e, "integratedTime", where);
    if (!it) return std::move(it).error();
    if (*it > static_cast<std::uint64_t>(INT64_MAX / 1000)) return bad_bundle(fmt::format("{}.integratedTime is out of range", where));
    if (*it != 0) t.integrated_time = static_cast<std::int64_t>(*it);
  }
  if (const json* promise = optional_field(e, "inclusionPromise")) {
    if (!promise->is_object()) return bad_bundle(fmt::format("{}.inclusionPromise is not an object", where));
    auto set = base64_field(*promise, "signedEntryTimestamp", fmt::format("{}.inclusionPromise", where));
    if (!set) return std::move(set).error();
    t.signed_entry_timestamp = std::move(*set);
  }
  if (const json* proof = optional_field(e, "inclusionProof")) {
    std::string pw = fmt::format("{}.inclusionProof", where);
    if (!proof->is_object()) return bad_bundle(pw + " is not an object");
    inclusion_proof p;
    auto pi = integer_field(*proof, "logIndex", pw);
    if (!pi) return std::move(pi).error();
    auto size = integer_field(*proof, "treeSize", pw);
    if (!size) return std::move(size).error();
    auto root = base64_field(*proof, "rootHash", pw);
    if (!root) return std::move(root).error();
    // SHA-256 nodes: a hash of another length is a malformed proof, not one that fails to hold.
    if (root->size() != 32) return bad_bundle(fmt::format("{}.rootHash is {} bytes, not 32", pw, root->size()));
    p.log_index = *pi;
    p.tree_size = *size;
    p.root_hash = std::move(*root);
    if (const json* hashes = optional_field(*proof, "hashes")) {
      if (!hashes->is_array() || hashes->size() > max_proof_hashes)
        return bad_bundle(fmt::format("{}.hashes is not an array of at most {} hashes", pw, max_proof_hashes));
      for (const auto& h : *hashes) {
        auto bytes = h.is_string() ? base64_decode(h.get_ref<const std::string&>()) : std::nullopt;
        if (!bytes) return bad_bundle(fmt::format("{}.hashes holds a value that is not base64", pw));
        if (bytes->size() != 32)
          return bad_bundle(fmt::format("{}.hashes holds a hash of {} bytes, not 32", pw, bytes->size()));
        p.hashes.push_back(std::move(*bytes));
      }
    }
    if (const json* cp = optional_field(*proof, "checkpoint")) {
      auto env = cp->is_object() ? require_field(*cp, "envelope", vt::string, pw + ".checkpoint")
                                 : result<const json*>(bad_bundle(pw + ".checkpoint is not an object"));
      if (!env) return std::move(env).error();
      p.checkpoint = (*env)->get<std::string>();
    }
    t.proof = std::move(p);
  }
  auto body = base64_field(e, "canonicalizedBody", where);
  if (!body) return std::move(body).error();
  if (body->empty()) return bad_bundle(fmt::format("{}.canonicalizedBody is empty", where));
  t.body = std::move(*body);
  return t;
}

result<tlog_evidence> verify_inclusion(const tlog_entry& entry, const trusted_root& root) {
  const log_key* log = find_log(root, entry.log_id);
  if (!log)
    return evidence_error(fmt::format("the entry's log (id {}) is not a transparency log of the trusted root",
                                      hex_encode(as_bytes(entry.log_id))));
  tlog_evidence out;
  out.log = log;
  bool included = false;
  if (entry.signed_entry_timestamp) {
    if (!entry.integrated_time) return evidence_error("the entry has a signed entry timestamp but no integratedTime");
    // Rekor signs the canonical JSON (RFC 8785: sorted keys, no spaces) of these four fields;
    // base64 and hex need no escaping, so the text is exact.
    std::string signed_text = fmt::format(R"({{"body":"{}","integratedTime":{},"logID":"{}","logIndex":{}}})",
                                          base64_encode(as_bytes(entry.body)), *entry.integrated_time,
                                          hex_encode(as_bytes(entry.log_id)), entry.log_index);
    if (!key_access::verify(log->key, as_bytes(signed_text), as_bytes(*entry.signed_entry_timestamp)))
      return evidence_error(fmt::format("signed entry timestamp does not verify with the key of {}: the entry's body, "
                                        "integrated time or index was altered, or another key signed it",
                                        log->base_url));
    out.integrated_time = *entry.integrated_time * 1000;
    included = true;
  }
  if (entry.proof) {
    const auto& p = *entry.proof;
    std::string leaf(1, '\0');  // RFC 6962 leaf hash: SHA-256(0x00 || entry)
    leaf += entry.body;
    std::string leaf_hash = sha256_raw(leaf);
    if (!merkle_inclusion_holds(p.log_index, p.tree_size, as_bytes(leaf_hash), p.hashes, as_bytes(p.root_hash)))
      return evidence_error(fmt::format("inclusion proof does not lead from this entry (index {}) to the root hash "
                                        "of a tree of {} entries: it is a proof for another entry or was altered",
                                        p.log_index, p.tree_size));
    // A root hash is only as good as the signature on it: without a checkpoint the proof is
    // consistent but proves nothing, and a signed entry timestamp must carry inclusion alone.
    if (p.checkpoint) {
      if (auto ok = verify_checkpoint(*p.checkpoint, p, *log); !ok) return std::move(ok).error();
      included = true;
    }
  }
  if (!included)
    return evidence_error("the entry carries neither a signed entry timestamp nor an inclusion proof with a signed "
                          "checkpoint: nothing proves it is in the log");
  return out;
}

result<void> verify_body(const tlog_entry& entry, const signed_envelope& env) {
  auto doc = parse_json_strict(entry.body, "canonicalized body");
  if (!doc) return evidence_error(doc.error().detail());
  auto mismatch = [&](std::string_view what) {
    return evidence_error(fmt::format("the {} {} entry's {} does not match this bundle: the entry records another "
                                      "signature", entry.kind, entry.version, what));
  };
  const json* kind = at(*doc, {"kind"});
  const json* api = at(*doc, {"apiVersion"});
  if (!kind || !api || !kind->is_string() || !api->is_string() || kind->get<std::string>() != entry.kind ||
      api->get<std::string>() != entry.version)
    return evidence_error(fmt::format("the entry's body is not of its declared kind {} {}", entry.kind, entry.version));
  // Every kind records one signature and its verifier; compare all of them.
  const json* sigs = nullptr;
  if (entry.kind == "dsse" && entry.version == "0.0.1") {
    if (!hash_object_matches(at(*doc, {"spec", "payloadHash"}), env.payload)) return mismatch("payloadHash");
    sigs = at(*doc, {"spec", "signatures"});
  } else if (entry.kind == "intoto" && entry.version == "0.0.2") {
    if (!hash_object_matches(at(*doc, {"spec", "content", "payloadHash"}), env.payload)) return mismatch("payloadHash");
    const json* type = at(*doc, {"spec", "content", "envelope", "payloadType"});
    if (type && (!type->is_string() || type->get<std::string>() != env.payload_type)) return mismatch("payloadType");
    sigs = at(*doc, {"spec", "content", "envelope", "signatures"});
  } else if (entry.kind == "dsse" && entry.version == "0.0.2") {
    const json* ph = at(*doc, {"spec", "dsseV002", "payloadHash"});
    auto digest = ph ? decoded_string(at(*ph, {"digest"})) : std::nullopt;
    const json* alg = ph ? at(*ph, {"algorithm"}) : nullptr;
    if (!digest || !alg || !alg->is_string() || alg->get<std::string>() != "SHA2_256" ||
        *digest != sha256_raw(env.payload))
      return mismatch("payloadHash");
    sigs = at(*doc, {"spec", "dsseV002", "signatures"});
  } else {
    return error(errc::unsupported, fmt::format("transparency log entries of kind {} {} are not supported (dsse 0.0.1, "
                                                "dsse 0.0.2 and intoto 0.0.2 are)", entry.kind, entry.version));
  }
  if (!sigs || !sigs->is_array() || sigs->size() != 1) return mismatch("signature list (exactly one expected)");
  const json& s = (*sigs)[0];
  std::optional<std::string> sig, verifier;
  if (entry.kind == "intoto") {
    // intoto 0.0.2 stores the envelope's base64 signature base64-encoded once more.
    auto once = decoded_string(at(s, {"sig"}));
    if (once) sig = base64_decode(*once);
    if (auto pem = decoded_string(at(s, {"publicKey"}))) verifier = pem_certificate_der(*pem);
  } else if (entry.version == "0.0.1") {
    sig = decoded_string(at(s, {"signature"}));
    if (auto pem = decoded_string(at(s, {"verifier"}))) verifier = pem_certificate_der(*pem);
  } else {
    sig = decoded_string(at(s, {"content"}));
    verifier = decoded_string(at(s, {"verifier", "x509Certificate", "rawBytes"}));
  }
  if (!sig || *sig != env.signature) return mismatch("signature");
  if (!verifier || *verifier != env.leaf_der) return mismatch("verifier certificate");
  return {};
}

}  // namespace drun::detail::sigstore

// Transparency-log evidence in a Sigstore bundle (Rekor v1 and v2 entries): the signed entry
// timestamp, RFC 6962 inclusion proofs against signed checkpoints, and the match between an
// entry's canonical body and the signature it is supposed to record.
#pragma once

#include <drun/error.hpp>

#include "detail/json.hpp"
#include "sigstore/trusted_root.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace drun::detail::sigstore {

struct inclusion_proof {
  std::uint64_t log_index = 0;  // index of the entry in the tree the proof is for
  std::uint64_t tree_size = 0;
  std::string root_hash;                // 32 raw bytes
  std::vector<std::string> hashes;      // audit path, 32 raw bytes each
  std::optional<std::string> checkpoint;  // the signed note text
};

struct tlog_entry {
  std::uint64_t log_index = 0;
  std::string log_id;  // raw bytes
  std::string kind, version;
  std::optional<std::int64_t> integrated_time;  // seconds; absent (0) in Rekor v2 entries
  std::optional<std::string> signed_entry_timestamp;  // DER signature
  std::optional<inclusion_proof> proof;
  std::string body;  // the canonicalized body bytes
};

// Parses verificationMaterial.tlogEntries[i]. Errors: malformed_bundle naming the field.
result<tlog_entry> parse_tlog_entry(const json& e, std::string_view where);

// What a log entry proves once checked: that it is in the log, and (with a signed entry
// timestamp only) when it was integrated.
struct tlog_evidence {
  std::optional<millis> integrated_time;
  const log_key* log = nullptr;
};

// Checks the entry's SET (when present) and inclusion proof plus checkpoint (when present),
// with the key of the trusted log that the entry names; at least one must prove inclusion.
// Errors: signature_invalid whose detail names the failed check.
result<tlog_evidence> verify_inclusion(const tlog_entry& entry, const trusted_root& root);

// The signature an entry must record: the envelope's payload and signature, the leaf that made it.
struct signed_envelope {
  std::string_view payload_type;
  std::string_view payload;
  std::string_view signature;
  std::string_view leaf_der;
};

// Checks that the entry's body (kind dsse 0.0.1 or 0.0.2, intoto 0.0.2) is for this envelope.
// Errors: signature_invalid naming the field that differs, unsupported for other kinds.
result<void> verify_body(const tlog_entry& entry, const signed_envelope& env);

// RFC 6962 / RFC 9162 section 2.1.3.2: true when `path` leads from leaf_hash at index to root.
bool merkle_inclusion_holds(std::uint64_t index, std::uint64_t tree_size, std::span<const std::byte> leaf_hash,
                            const std::vector<std::string>& path, std::span<const std::byte> root);

}  // namespace drun::detail::sigstore

// A tamper-evident audit log: one JSON line per security decision (a bundle verified or refused,
// a fetch completed or failed, a peer request granted or denied, a token refused, a store
// import, removal, collection, key rotation or scrub finding), for proving later which model
// bytes a node loaded, from whom, and who was refused.
//
// Each record carries the SHA-256 of the line before it, so an edit, a deletion, an insertion or
// a reordering breaks the chain at that record. Every `checkpoint_every` records and when a log
// is closed, a checkpoint record signed with the audit key (Ed25519) covers the chain head and the
// record count; a copy of the latest checkpoint is kept beside the log (FILE.head), so that
// cutting records off the end, checkpoints included, shows too. What the last checkpoint does not
// cover yet can be rewritten by whoever can write the file: ship checkpoints off the node (each is
// also logged at info level) where that matters.
//
// Several processes may append to one log: each record is written under an exclusive lock on the
// file, in one write(). A process killed during that write leaves a torn line, which the next
// writer steps over (its record says so) and audit_verify reports as torn, not as tampering.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/keys.hpp>
#include <drun/log.hpp>

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace drun {

struct audit_options {
  std::filesystem::path file;
  // Signs the checkpoints; must be Ed25519 (drun keygen --type ed25519). Without it the chain is
  // still written, with no checkpoints.
  std::shared_ptr<const private_key> key;
  std::size_t checkpoint_every = 64;  // records between checkpoints (at least 1)
};

class DRUN_API audit_log {
 public:
  // Opens (creates, mode 0640) the log. Errors: key_error (the key is not Ed25519), io_error,
  // invalid_argument (not a regular file, checkpoint_every 0).
  static result<std::shared_ptr<audit_log>> open(audit_options options);

  ~audit_log();  // close()
  audit_log(const audit_log&) = delete;
  audit_log& operator=(const audit_log&) = delete;

  // Appends one record: an event name ("fetch.completed") and its fields. Thread safe.
  result<void> append(std::string_view event, std::span<const log_attribute> fields);
  result<void> append(std::string_view event, std::initializer_list<log_attribute> fields) {
    return append(event, std::span<const log_attribute>(fields.begin(), fields.size()));
  }
  // Appends a signed checkpoint now (nothing without a key).
  result<void> checkpoint();
  // A checkpoint when this writer appended records since the last one; later appends fail.
  result<void> close();

  const std::filesystem::path& file() const noexcept;

 private:
  struct impl;
  explicit audit_log(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// The library's audit log (a library setting, like logging): its security decisions are
// appended there. Null (the default) records nothing. A record that cannot be written is logged
// as an error and counted (drun_audit_write_failures_total); the decision itself stands.
DRUN_API void set_audit_log(std::shared_ptr<audit_log> log);
DRUN_API std::shared_ptr<audit_log> current_audit_log();

struct audit_report {
  std::uint64_t records = 0;            // checkpoints included
  std::uint64_t checkpoints = 0;
  std::uint64_t last_checkpoint = 0;    // its sequence number; 0: none
  std::uint64_t unsealed = 0;           // records after the last checkpoint
  std::vector<std::uint64_t> torn_lines;  // line numbers (1-based) of torn records the chain steps over
  bool torn_tail = false;               // the file ends in a torn line (a writer killed mid-append)
};

// Checks the chain, every checkpoint's signature with `key`, and that the log still holds the
// checkpoint in FILE.head (a log with checkpoints and no head file fails too). Errors:
// signature_invalid (tampering: the message names the first line that fails and why), not_found,
// io_error.
DRUN_API result<audit_report> audit_verify(const std::filesystem::path& file, const public_key& key);

}  // namespace drun

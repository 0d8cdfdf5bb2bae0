// The encrypted piece store: where verified pieces live on a node, shared by every process on it.
// Every piece is sealed with AES-256-GCM under a per-artifact key derived from the node key;
// nothing in the store directory is model plaintext. A SQLite index (WAL) records which pieces
// are stored, and a piece is marked stored only after its sealed bytes are durable.
//
// Thread safety: one store object may be used from several threads; several processes may open
// the same directory at once.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/node_key.hpp>
#include <drun/piece.hpp>
#include <drun/verify.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace drun {

struct artifact_summary {
  std::string id;                 // hex SHA-256 of the signed payload
  std::string subject;
  std::uint64_t bytes = 0;        // plaintext size of all files (the space the store reserves)
  std::size_t pieces = 0;
  std::size_t stored_pieces = 0;
  bool pinned = false;
  std::int64_t last_access = 0;   // Unix seconds
};

struct stored_file {
  std::string name;               // manifest name ("." for a single-file model)
  std::uint64_t size = 0;
  std::size_t first_piece = 0;
  std::size_t pieces = 0;
  std::size_t stored_pieces = 0;
};

struct artifact_details {
  artifact_summary summary;
  std::uint64_t piece_size = 0;
  std::vector<stored_file> files;
  std::vector<std::uint32_t> key_versions;  // of the stored pieces
};

// What a scrub found: a piece that failed (named by artifact, file and piece), or damage to the
// index (file empty: an artifact's file list; artifact empty too: the index itself).
struct scrub_failure {
  std::string artifact;
  std::string file;
  std::size_t piece = 0;
  byte_range range;
  std::string reason;
};

struct gc_options {
  std::optional<std::chrono::seconds> ttl;   // remove artifacts not accessed for this long
  std::optional<std::uint64_t> high_bytes;   // when the store holds more than this ...
  std::uint64_t low_bytes = 0;               // ... remove least recently used artifacts down to this
};

struct gc_report {
  std::vector<std::string> removed;
  std::vector<std::string> in_use;           // would have been removed, but another process reads them
  std::uint64_t bytes_freed = 0;
};

class store;

// What remains to bring of an artifact: the pieces not stored yet, and their total size.
struct missing_pieces {
  std::vector<std::size_t> indices;
  std::size_t already_stored = 0;
  std::uint64_t bytes = 0;
};

// Fills chunk with a piece's bytes starting at offset (relative to the piece).
using piece_source = std::function<result<void>(std::span<std::byte> chunk, std::uint64_t offset)>;

// Random access to an artifact's verified plaintext, by file and offset: what a model loader
// needs. While one is open, no other process can remove the artifact.
class DRUN_API artifact_reader {
 public:
  ~artifact_reader();
  artifact_reader(artifact_reader&&) noexcept;
  artifact_reader& operator=(artifact_reader&&) noexcept;

  const std::vector<stored_file>& files() const noexcept;
  // Decrypts [offset, offset + out.size()) of a file into out. Every piece is authenticated
  // (its tag, then its signed digest) before the call returns; until it returns successfully the
  // contents of out are unspecified (a whole piece is decrypted in place), and on failure out is
  // wiped and the piece is dropped from the store. Errors: invalid_argument (range),
  // model_mismatch (piece not stored), digest_mismatch (tag or signed digest check failed), io_error.
  result<void> read(std::size_t file, std::uint64_t offset, std::span<std::byte> out) const;

 private:
  friend class store;
  struct impl;
  explicit artifact_reader(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// The largest piece (shard) the store takes. It seals a piece as one AES-GCM message, which can
// be at most 64 GiB, and a fetch holds each piece in memory until it is checked; 4 GiB is four
// times the reference tool's default shard.
inline constexpr std::uint64_t max_stored_piece_size = std::uint64_t{4} << 30;

// What a read checks before it returns plaintext. The tag proves the bytes are what a holder of
// the data key sealed; the signed digest proves they are what the publisher signed, so a piece
// forged under a leaked data key is refused too. tag_only is for callers that hand the bytes to
// someone who checks the digest anyway (the peer server: every receiver verifies every piece).
enum class read_check { digest, tag_only };

// The modes of what materialize creates: owner_only (0600 files, 0700 directories; weights are
// often proprietary, and an export directory is easily shared by accident) or umask (0666 and
// 0777 less the process umask, as cp and tar create them).
enum class export_modes { owner_only, umask };

class store;

// An export under way (store::begin_export): the artifact's files are written under a staging
// directory inside dest, from verified pieces as a fetch receives them (write) and from the store
// for the rest (commit). Nothing reaches a final path before commit(), which syncs every file and
// moves them into place; destroyed without a successful commit(), the writer removes the staging
// directory, so an interrupted or failed export leaves dest as it was.
class DRUN_API export_writer {
 public:
  ~export_writer();
  export_writer(export_writer&&) noexcept;
  export_writer& operator=(export_writer&&) noexcept;
  export_writer(const export_writer&) = delete;
  export_writer& operator=(const export_writer&) = delete;

  // A verified piece of the artifact, written at its place (thread safe: pieces do not overlap).
  result<void> write(const verified_piece& piece);
  // Brings every piece not written from the store (decrypted, tag and digest checked), syncs the
  // files, and moves them into dest.
  result<void> commit();

  struct impl;  // opaque: defined in src/store/store.cpp

 private:
  friend class store;
  explicit export_writer(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// When a piece_batch commits: whichever bound is reached first.
struct commit_limits {
  std::uint64_t max_bytes = std::uint64_t{256} << 20;  // uncommitted bytes
  std::size_t max_pieces = 64;                         // uncommitted pieces (one index transaction)
  // Age of the oldest uncommitted piece. Short, because peers see a piece only once it is stored
  // (a swarm relays fresh pieces) and a crash loses what waits; the sync is off the writers' path,
  // so even this short a delay takes the syncs out of an import's time (README, Performance).
  std::chrono::milliseconds max_delay{20};
};

// Group commit (store::begin_batch): pieces put into a batch are sealed and written at once, and
// become durable and stored together, one fdatasync per data file and one index transaction per
// commit instead of one of each per piece. A commit happens when a bound of commit_limits is
// reached (on the batch's own thread, so writers go on), on commit(), and on destruction. Until its
// commit a piece is not stored: readers and peers do not see it, a crash loses it (at most the
// uncommitted pieces, never a piece marked stored whose bytes are not durable), and another writer
// of the same piece waits for it. Thread safe. The manifest must outlive the batch.
class DRUN_API piece_batch {
 public:
  ~piece_batch();  // commits what is pending; a failure there leaves those pieces missing
  piece_batch(piece_batch&&) noexcept;
  piece_batch& operator=(piece_batch&&) noexcept;
  piece_batch(const piece_batch&) = delete;
  piece_batch& operator=(const piece_batch&) = delete;

  // As store::put_piece and store::put_piece_streamed, except that true means "sealed, stored at
  // the next commit". A failure of a commit made on the batch's thread is returned by the next
  // put or commit, and then every later one.
  result<bool> put(const verified_piece& piece);
  result<bool> put_streamed(std::size_t index, const piece_source& source);
  // Makes every piece put before this call durable and stored; returns how many pieces this batch
  // has committed in all.
  result<std::size_t> commit();

  struct impl;  // opaque: defined in src/store/write.cpp

 private:
  friend class store;
  explicit piece_batch(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

class DRUN_API store {
 public:
  // Opens or creates a store directory (mode 0700), keeping the node key for as long as the store
  // is open. A directory or file of the store owned by another user, or a directory writable by
  // group or others, is refused (permission_denied): whoever can write there could plant pieces
  // or roll the index back. The first key used becomes the store's key; any other key is refused (key_error
  // "wrong key"), as is a key retired by rotate_key.
  static result<store> open(const std::filesystem::path& dir, node_key key);

  // Sets a damaged index aside (renamed index.sqlite.damaged-UNIXTIME, with its -wal and -shm
  // files), under the store's exclusive lock, so that the next open starts the store empty: what
  // it held is fetched or imported again. For an index that open or scrub reports as damaged
  // beyond repair. Returns the name it was set aside as. Errors: not_found, io_error.
  static result<std::filesystem::path> set_aside_index(const std::filesystem::path& dir);

  // Re-seals every stored piece under new_key, which becomes the store's only key. Crash safe:
  // a rotation interrupted at any point is finished by calling this again with the same keys,
  // and no piece is lost. Holds the store exclusively while it runs.
  static result<void> rotate_key(const std::filesystem::path& dir, const node_key& old_key,
                                 const node_key& new_key);

  ~store();
  store(store&&) noexcept;
  store& operator=(store&&) noexcept;

  // Registers a verified artifact (idempotent): keeps the bundle and reserves one data file per
  // file. Only shards manifests are stored (they give every piece a signed digest). Errors:
  // invalid_argument (files manifest, shards over max_stored_piece_size), io_error (including no space).
  result<void> add_artifact(const verified_manifest& m, std::string_view bundle_json);
  // Seals and stores a verified piece of a registered artifact. Returns false when it was already
  // stored (nothing is rewritten). The index marks it stored only after its bytes are durable.
  result<bool> put_piece(const verified_manifest& m, const verified_piece& piece);
  // Seals piece `index` of a registered artifact from `source`, which fills each chunk with the
  // piece's bytes at the given offset within the piece. The bytes are checked against the signed
  // digest on the way through, and the piece is marked stored only if they match
  // (digest_mismatch otherwise). Memory is two 1 MiB buffers whatever the piece size.
  result<bool> put_piece_streamed(const verified_manifest& m, std::size_t index, const piece_source& source);
  // Many pieces, committed in groups (piece_batch): what imports and fetches use.
  result<piece_batch> begin_batch(const verified_manifest& m, commit_limits limits = {});
  // The bundle an artifact was registered with (verified then; verify again before trusting it
  // elsewhere). Errors: invalid_argument (not an id), not_found, model_mismatch.
  result<std::string> bundle(const std::string& artifact);
  // Which pieces of an artifact are stored, by piece index.
  result<std::vector<bool>> stored_pieces(const std::string& artifact);
  // The pieces of a verified artifact still to bring (import and fetch resume from here).
  result<missing_pieces> missing(const verified_manifest& m);
  // Decrypts a stored piece into out (out.size() must be the piece's size); see artifact_reader.
  result<void> read_piece(const std::string& artifact, std::size_t piece, std::span<std::byte> out,
                          read_check check = read_check::digest);
  // Streams a stored piece through `scratch` (any size; it decides the chunks) into sink, so that
  // memory does not grow with the piece: a first pass authenticates it (releasing nothing), a
  // second decrypts it again into sink. Should the piece change on disk between the passes (only
  // someone bypassing the store's locks can do that), the second pass fails its tag check and the
  // call fails after sink has seen bytes: a caller must then discard everything sink received.
  using piece_sink = std::function<result<void>(std::span<const std::byte> chunk)>;
  result<void> stream_piece(const std::string& artifact, std::size_t piece, std::span<std::byte> scratch,
                            const piece_sink& sink, read_check check = read_check::digest);

  result<artifact_reader> open_artifact(const std::string& artifact);
  // Writes every file's plaintext under dest (created; must not exist or be empty), through a
  // staging directory inside dest: on failure nothing of the artifact is left there. Staging
  // directories that a killed export left in dest (plaintext not yet checked) are removed first.
  // Files are created 0600 and directories 0700 unless modes says umask.
  result<void> materialize(const std::string& artifact, const std::filesystem::path& dest,
                           export_modes modes = export_modes::owner_only);
  // The same, in two steps, so that a fetch writes each piece out as it verifies it rather than
  // decrypting the store again afterwards (export_writer).
  result<export_writer> begin_export(const std::string& artifact, const std::filesystem::path& dest,
                                     export_modes modes = export_modes::owner_only);

  // The full id of the one artifact whose id starts with prefix (>= 8 hex characters).
  result<std::string> resolve(std::string_view prefix);
  result<std::vector<artifact_summary>> list();
  result<artifact_details> show(const std::string& artifact);
  result<void> set_pinned(const std::string& artifact, bool pinned);
  // Errors: invalid_argument when another process is reading the artifact.
  result<void> remove(const std::string& artifact);
  result<gc_report> gc(const gc_options& options);
  // Checks the index (SQLite's integrity check; damage to its indexes is rebuilt), each
  // artifact's rows against its signed manifest (damaged rows are rewritten from it, their pieces
  // missing), then every stored piece's tag and signed digest (of one artifact, or all); drops
  // and reports what fails. Errors: model_mismatch when the index's tables are damaged beyond
  // that repair (the message says what to do), io_error, key_error.
  result<std::vector<scrub_failure>> scrub(const std::optional<std::string>& artifact = std::nullopt);

  struct impl;  // opaque: defined in src/store/store.cpp

 private:
  explicit store(std::unique_ptr<impl> p);
  std::shared_ptr<impl> impl_;
};

struct import_report {
  std::size_t stored = 0;           // pieces sealed by this call
  std::size_t already_stored = 0;   // pieces found in the store (resume)
  std::size_t failed = 0;           // pieces whose bytes did not match the signed digest
};

// Brings a local copy of a verified artifact into the store: registers it, then streams, checks
// and seals every piece not yet stored, on `threads` threads (0: one per core), each holding two
// 1 MiB buffers whatever the model or piece size. Pieces that verify are kept even when others
// fail; the first failure is returned as the error (naming file and byte range).
DRUN_API result<import_report> import_model(store& s, const verified_manifest& m, std::string_view bundle_json,
                                            const std::filesystem::path& model, unsigned threads = 0,
                                            const progress_callback& progress = {});

}  // namespace drun

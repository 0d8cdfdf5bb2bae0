// The store's insides, shared by the files that implement it (src/store/*.cpp): the index row of
// a piece, the locks, the owned-file checks, and store::impl itself. Not a public header.
#pragma once

#include <drun/hash.hpp>
#include <drun/store.hpp>
#include <drun/verify.hpp>

#include "detail/file.hpp"
#include "metrics/registry.hpp"
#include "store/seal.hpp"
#include "store/sqlite.hpp"

#include <fmt/format.h>
#include <sodium.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <fcntl.h>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace drun::store_detail {

constexpr std::int64_t state_missing = 0, state_stored = 2;  // 1 ("writing") is no longer used
constexpr std::size_t io_chunk = std::size_t{1} << 20;

inline std::int64_t now_seconds() { return static_cast<std::int64_t>(std::time(nullptr)); }

// An flock held for a scope.
class flock_guard {
 public:
  flock_guard(int fd, int op) : fd_(fd) { while (::flock(fd_, op) != 0 && errno == EINTR) {} }
  ~flock_guard() { ::flock(fd_, LOCK_UN); }
  flock_guard(const flock_guard&) = delete;
  flock_guard& operator=(const flock_guard&) = delete;

 private:
  int fd_;
};

// The store-wide lock, shared by every operation and exclusive to rotate_key. Each operation opens
// the lock file itself: flock belongs to an open file description, so threads sharing one
// descriptor would release each other's locks.
class store_lock {
 public:
  store_lock(const std::filesystem::path& dir, int op)
      : fd_(::open((dir / "lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600)) {
    if (fd_ >= 0)
      while (::flock(fd_, op) != 0 && errno == EINTR) {
      }
  }
  ~store_lock() {
    if (fd_ >= 0) ::close(fd_);
  }
  store_lock(const store_lock&) = delete;
  store_lock& operator=(const store_lock&) = delete;

 private:
  int fd_;
};

// An open-file-description byte-range lock: released by the kernel if the process dies, so a
// writer killed mid-piece never blocks the next one.
result<void> range_lock(int fd, short type, std::uint64_t begin, std::uint64_t len);

std::array<std::byte, 32> raw_id(const std::string& hex);

bool valid_artifact_id(std::string_view id);

result<void> pwrite_all(int fd, std::span<const std::byte> data, std::uint64_t offset, const std::filesystem::path& p);

// A store shared with another user is not ours to trust: whoever can write into it can plant files,
// swap the index or roll it back. Every directory and file the store opens must belong to this
// user, and no directory may be writable by group or others.
result<void> check_owned(const struct stat& st, const std::filesystem::path& p, bool directory);

// Opens (creating when flags say so) a file of the store, refusing one that is not a regular file
// of this user's: a planted symlink, FIFO or foreign file.
result<detail::unique_fd> open_owned(const std::filesystem::path& p, int flags, const char* what);

struct piece_row {
  std::size_t file = 0;
  std::uint64_t offset = 0, length = 0;
  std::int64_t state = 0;
  std::uint64_t generation = 0;
  std::uint32_t key_version = 0;
  store_detail::tag_bytes tag{};
  store_detail::nonce_bytes nonce{};
  std::vector<std::byte> digest;
  hash_algorithm hash = hash_algorithm::sha256;
  std::string file_name;
};

result<void> make_dir(const std::filesystem::path& p);

// The error for an index damaged past what drun rebuilds: it names the file and what to do.
error index_beyond_repair(const std::filesystem::path& store_dir, std::string_view what);

enum class open_mode { normal, rotation };

result<std::unique_ptr<store::impl>> open_impl(const std::filesystem::path& dir, const node_key& key, open_mode mode,
                                               const std::string* pending_fp = nullptr);

}  // namespace drun::store_detail

namespace drun {

struct store::impl {
  // While a store is open its holdings show in the process's metrics. The collector is removed
  // first thing on destruction, before the database it reads closes.
  std::uint64_t metrics_collector = 0;
  ~impl() {
    if (metrics_collector) metrics::remove_store_collector(metrics_collector);
  }
  metrics::store_usage usage() {
    metrics::store_usage u;
    std::lock_guard lock(db_mutex);
    auto st = db.prepare("SELECT count(*), coalesce(sum(length), 0) FROM pieces WHERE state = ?");
    if (!st) return u;
    st->bind(1, store_detail::state_stored);
    (void)st->each([&] {
      u.pieces = static_cast<std::uint64_t>(st->int64(0));
      u.bytes = static_cast<std::uint64_t>(st->int64(1));
    });
    return u;
  }

  std::filesystem::path dir;
  store_detail::database db;
  std::mutex db_mutex;  // one connection, many threads: transactions must not interleave
  // Writers of one data file take turns here, by (artifact, file) hashed onto a stripe. The
  // kernel serializes buffered writes to one inode anyway, and its lock spins on the CPU while
  // another writer copies; waiting here sleeps instead. A 2 GiB fetch from nginx took 7.0-7.5
  // core-seconds with these turns and 8.0-8.6 without (three paired runs, AMD EPYC, 2 cores).
  std::array<std::mutex, 32> write_stripes;
  std::mutex& write_stripe(const std::string& artifact, std::size_t file) {
    return write_stripes[(std::hash<std::string>{}(artifact) ^ (file * 0x9e3779b97f4a7c15ULL)) % write_stripes.size()];
  }
  std::array<std::byte, 16> store_id{};
  std::uint32_t key_version = 0;
  std::optional<node_key> owned_key;  // set by open(); rotate_key borrows its caller's keys instead
  const node_key* key = nullptr;
  std::mutex keys_mutex;
  std::map<std::string, std::shared_ptr<store_detail::data_key>> data_keys;

  // An artifact's layout (files, and each piece's file, range and digest) comes from its signed
  // manifest, not from the index: the index can be damaged (a flipped bit, a torn page) while
  // each piece still opens, and a lost or altered row must not turn into a short or missing file.
  // stored_bundle: the bundle kept with the artifact, checked against the id (its payload's hash).
  result<std::pair<std::string, bundle_summary>> stored_bundle(const std::string& id) const;
  // SQLite's integrity check of the index; damage confined to its indexes (rows a lookup cannot
  // find) is rebuilt with REINDEX: true when that was done. Damage to the tables themselves is an
  // error naming the index. Caller holds db_mutex.
  result<bool> check_index();
  struct layout_damage {
    std::vector<std::size_t> pieces;  // rows missing, extra or disagreeing with the manifest
    bool files = false;               // the file list disagrees
    bool hash_type = false;           // the artifact row names another hash than the manifest
    std::string first;                // what the first disagreement is, for the message
    bool none() const { return pieces.empty() && !files && !hash_type; }
  };
  // Compares the index's rows of an artifact with its signed layout. Caller holds db_mutex.
  result<layout_damage> check_layout(const std::string& id, const bundle_summary& signed_layout);
  // Rewrites the damaged rows from the signed layout, their pieces as missing (a fetch or import
  // brings them back). Caller holds db_mutex.
  result<void> repair_layout(const std::string& id, const bundle_summary& signed_layout, const layout_damage& damage);

  std::filesystem::path artifact_dir(const std::string& id) const { return dir / "artifacts" / id; }
  std::filesystem::path data_file(const std::string& id, std::size_t file) const {
    return artifact_dir(id) / "data" / std::to_string(file);
  }

  result<std::shared_ptr<store_detail::data_key>> data_key_for(const std::string& id, const node_key& k,
                                                               bool cache = true) {
    std::lock_guard lock(keys_mutex);
    if (cache)
      if (auto it = data_keys.find(id); it != data_keys.end()) return it->second;
    auto raw = store_detail::raw_id(id);
    auto dk = store_detail::data_key::derive(k, store_id, raw);
    if (!dk) return std::move(dk).error();
    auto p = std::make_shared<store_detail::data_key>(std::move(dk).value());
    if (cache) data_keys[id] = p;
    return p;
  }

  // A process that opened the store before a rotate_key must not seal or judge pieces with the
  // retired key: it gets a key error and drops nothing. Caller holds db_mutex.
  result<void> check_key_current() {
    auto st = db.prepare("SELECT state FROM key_versions WHERE version = ?");
    if (!st) return std::move(st).error();
    st->bind(1, key_version);
    auto row = st->step();
    if (!row) return std::move(row).error();
    if (!*row || st->text(0) != "active")
      return error(errc::key_error, "the store's node key was rotated since it was opened: reopen it with the new key");
    return {};
  }

  result<store_detail::piece_row> load_piece(const std::string& id, std::size_t piece) {
    auto st = db.prepare(
        "SELECT p.file, p.offset, p.length, p.state, p.generation, p.key_version, p.tag, p.digest, f.name, p.nonce, "
        "a.hash_type FROM pieces p JOIN files f ON f.artifact = p.artifact AND f.idx = p.file "
        "JOIN artifacts a ON a.id = p.artifact WHERE p.artifact = ? AND p.idx = ?");
    if (!st) return std::move(st).error();
    st->bind(1, id).bind(2, static_cast<std::int64_t>(piece));
    auto row = st->step();
    if (!row) return std::move(row).error();
    if (!*row) return error(errc::not_found, fmt::format("artifact {} has no piece {} in the store index (if its "
                                                        "manifest has one, the index is damaged: `drun cache verify` "
                                                        "rebuilds it)",
                                                        id.substr(0, 12), piece));
    store_detail::piece_row r;
    r.file = static_cast<std::size_t>(st->int64(0));
    r.offset = static_cast<std::uint64_t>(st->int64(1));
    r.length = static_cast<std::uint64_t>(st->int64(2));
    r.state = st->int64(3);
    r.generation = static_cast<std::uint64_t>(st->int64(4));
    r.key_version = static_cast<std::uint32_t>(st->int64(5));
    auto tag = st->blob(6);
    if (tag.size() == r.tag.size()) std::copy(tag.begin(), tag.end(), r.tag.begin());
    auto dg = st->blob(7);
    r.digest.assign(dg.begin(), dg.end());
    r.file_name = st->text(8);
    auto nonce = st->blob(9);
    if (st->is_null(9)) {
      r.nonce = store_detail::legacy_nonce(r.key_version, r.generation);
    } else {
      if (nonce.size() != r.nonce.size()) return error(errc::model_mismatch, "store index is damaged (nonce)");
      std::copy(nonce.begin(), nonce.end(), r.nonce.begin());
    }
    auto alg = parse_hash_algorithm(st->text(10));
    if (!alg) return error(errc::model_mismatch, "store index is damaged (hash type)");
    r.hash = *alg;
    return r;
  }

  static store_detail::piece_address address(const std::string& id, std::size_t piece, const store_detail::piece_row& row) {
    return {store_detail::raw_id(id), static_cast<std::uint32_t>(row.file), piece, row.key_version, row.generation, row.nonce};
  }

  // Generations come in durably reserved blocks, so a write costs no index commit before it.
  static constexpr std::uint64_t generation_block = 256;
  std::mutex generation_mutex;
  std::uint64_t generation_next = 0, generation_end = 0;

  result<std::uint64_t> take_generation() {
    std::lock_guard g(generation_mutex);
    if (generation_next == generation_end) {
      std::lock_guard lock(db_mutex);
      auto txn = store_detail::transaction::begin(db);
      if (!txn) return std::move(txn).error();
      auto st = db.prepare("UPDATE meta SET value = value + ? WHERE key = 'next_generation' RETURNING value - ?");
      if (!st) return std::move(st).error();
      st->bind(1, static_cast<std::int64_t>(generation_block)).bind(2, static_cast<std::int64_t>(generation_block));
      auto row = st->step();
      if (!row) return std::move(row).error();
      auto first = static_cast<std::uint64_t>(st->int64(0));
      st->reset();
      if (auto r = txn->commit(); !r) return std::move(r).error();
      generation_next = first;
      generation_end = first + generation_block;
    }
    return generation_next++;
  }

  result<std::uint64_t> next_generation() {  // caller holds a store_detail::transaction
    auto st = db.prepare("UPDATE meta SET value = value + 1 WHERE key = 'next_generation' RETURNING value - 1");
    if (!st) return std::move(st).error();
    auto row = st->step();
    if (!row) return std::move(row).error();
    return static_cast<std::uint64_t>(st->int64(0));
  }

  result<void> set_piece_state(const std::string& id, std::size_t piece, std::int64_t from, std::int64_t to,
                               std::uint64_t generation) {
    auto st = db.prepare("UPDATE pieces SET state = ? WHERE artifact = ? AND idx = ? AND state = ? AND generation = ?");
    if (!st) return std::move(st).error();
    st->bind(1, to).bind(2, id).bind(3, static_cast<std::int64_t>(piece)).bind(4, from)
        .bind(5, static_cast<std::int64_t>(generation));
    return st->run();
  }

  // Decrypts one piece into out, checking the tag and (unless the caller passes tag_only) the
  // signed digest before returning; drops it on failure. The tag says the bytes are what a holder
  // of the data key wrote; only the digest says they are what the publisher signed, so a piece
  // forged by someone who learnt the key (or a store bug) is still never handed out as verified.
  // With a sink, out is a scratch buffer of any size: each decrypted chunk goes to the sink
  // (whose output must stay unreleased until this returns success).
  using chunk_sink = std::function<result<void>(std::span<const std::byte> plain, std::uint64_t offset)>;
  result<void> open_piece(const std::string& id, std::size_t piece, std::span<std::byte> out,
                          const chunk_sink& sink = {}, read_check check = read_check::digest) {
    store_detail::piece_row row;
    {
      std::lock_guard lock(db_mutex);
      auto r = load_piece(id, piece);
      if (!r) return std::move(r).error();
      row = std::move(*r);
    }
    if (row.state != store_detail::state_stored)
      return error(errc::model_mismatch,
                   fmt::format("piece {} is not in the store (import or fetch the artifact again)", piece))
          .with_path(row.file_name)
          .with_range(row.offset, row.offset + row.length);
    if (sink ? out.empty() : out.size() != row.length)
      return error(errc::invalid_argument, fmt::format("buffer of {} bytes for a piece of {}", out.size(), row.length));
    if (row.key_version != key_version) {
      std::lock_guard lock(db_mutex);
      if (auto r = check_key_current(); !r) return r;
      return error(errc::key_error, fmt::format("piece {} is sealed under key version {}, not {}", piece,
                                                row.key_version, key_version));
    }
    // Never release bytes that did not authenticate; forget the piece so it gets fetched again.
    auto drop = [&](errc code, std::string why) {
      metrics::global().store_open_failures.add();
      sodium_memzero(out.data(), out.size());
      std::lock_guard lock(db_mutex);
      auto txn = store_detail::transaction::begin(db);
      if (txn && set_piece_state(id, piece, store_detail::state_stored, store_detail::state_missing, row.generation)) (void)txn->commit();
      return error(code, fmt::format("piece {} {}; dropped from the store", piece, why))
          .with_path(row.file_name)
          .with_range(row.offset, row.offset + row.length);
    };
    auto dk = data_key_for(id, *key);
    if (!dk) return std::move(dk).error();
    auto path = data_file(id, row.file);
    auto fd = store_detail::open_owned(path, O_RDONLY, "cannot open");
    if (!fd) {
      if (fd.error().sys_errno() == ENOENT) return drop(errc::model_mismatch, "has lost its data file");
      return std::move(fd).error();
    }
    if (auto r = store_detail::range_lock(fd->get(), F_RDLCK, row.offset, row.length); !r) return r;
    store_detail::gcm gcm(store_detail::gcm::mode::open, **dk, address(id, piece, row));
    std::optional<hasher> h;
    if (check == read_check::digest) h.emplace(row.hash);
    const std::uint64_t step = sink ? out.size() : store_detail::io_chunk;  // with a sink, the scratch size decides
    for (std::uint64_t off = 0; off < row.length; off += step) {
      auto n = std::min<std::uint64_t>(step, row.length - off);
      auto chunk = sink ? out.first(n) : out.subspan(off, n);
      if (auto r = detail::pread_exact(fd->get(), chunk, row.offset + off, path); !r) {
        if (r.error().sys_errno() == 0) return drop(errc::model_mismatch, "lies past the end of its truncated data file");
        sodium_memzero(out.data(), out.size());
        return r;
      }
      gcm.update(chunk, chunk);
      if (h) h->update(chunk);
      if (sink)
        if (auto r = sink(chunk, off); !r) {
          sodium_memzero(out.data(), out.size());
          return r;
        }
    }
    if (!gcm.open_check(row.tag))
      return drop(errc::digest_mismatch, "failed its authentication tag (corrupted, moved or replayed on disk)");
    if (h && !digest_equal(h->finish().bytes(), row.digest))
      return drop(errc::digest_mismatch, fmt::format("does not match its signed {} digest although its tag verified "
                                                     "(forged by a holder of the data key)",
                                                     to_string(row.hash)));
    return {};
  }

  result<void> touch(const std::string& id) {
    std::lock_guard lock(db_mutex);
    auto st = db.prepare("UPDATE artifacts SET last_access = ? WHERE id = ?");
    if (!st) return std::move(st).error();
    st->bind(1, store_detail::now_seconds()).bind(2, id);
    return st->run();
  }

  result<detail::unique_fd> artifact_lock(const std::string& id) {
    // Never created here (add_artifact does): re-creating it inside a directory that remove() is
    // deleting would make that removal fail.
    int fd = ::open((artifact_dir(id) / "lock").c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return detail::sys_error("cannot open the artifact lock", artifact_dir(id), errno);
    return detail::unique_fd(fd);
  }
};


// What an open artifact_reader holds (export.cpp reads through one too).
struct artifact_reader::impl {
  std::shared_ptr<store::impl> s;
  std::string id;
  std::vector<stored_file> files;
  std::vector<byte_range> piece_ranges;  // by piece index
  detail::unique_fd artifact_lock;       // LOCK_SH for the reader's lifetime: no one removes it
};

}  // namespace drun

// The encrypted piece store: layout, index, sealing, reading, materializing, GC, scrub, rotation.
//
// Layout of a store directory (mode 0700):
//   index.sqlite                     the metadata index (WAL)
//   lock                             flock: shared for every operation, exclusive for rotate_key
//   init.lock                        flock: serializes opening (WAL switch, schema, key check)
//   artifacts/<id>/bundle.sig        the bundle as received (public metadata)
//   artifacts/<id>/lock              flock: shared by readers and writers, exclusive to remove
//   artifacts/<id>/data/<file>       one ciphertext file per model file, at plaintext offsets
#include <drun/store.hpp>

#include "detail/audit.hpp"
#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/thread_pool.hpp"
#include "metrics/registry.hpp"
#include "store/fault.hpp"
#include "store/seal.hpp"
#include "store/sqlite.hpp"

#include <drun/hash.hpp>
#include <drun/manifest.hpp>
#include <drun/sign.hpp>

#include <fmt/format.h>
#include <sodium.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <ctime>
#include <dirent.h>
#include <fcntl.h>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace drun {

using store_detail::database;
using store_detail::transaction;

namespace {

constexpr std::int64_t state_missing = 0, state_stored = 2;  // 1 ("writing") is no longer used
constexpr std::size_t io_chunk = std::size_t{1} << 20;

const char* schema = R"sql(
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS key_versions(version INTEGER PRIMARY KEY, fingerprint TEXT UNIQUE NOT NULL,
                                        state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts(id TEXT PRIMARY KEY, subject TEXT, hash_type TEXT NOT NULL, bytes INTEGER NOT NULL,
                                     piece_size INTEGER NOT NULL, created INTEGER, last_access INTEGER,
                                     pinned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS files(artifact TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,
                                 PRIMARY KEY(artifact, idx));
CREATE TABLE IF NOT EXISTS pieces(artifact TEXT NOT NULL, idx INTEGER NOT NULL, file INTEGER NOT NULL,
                                  offset INTEGER NOT NULL, length INTEGER NOT NULL, digest BLOB NOT NULL,
                                  state INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 0,
                                  key_version INTEGER NOT NULL DEFAULT 0, tag BLOB, PRIMARY KEY(artifact, idx));
CREATE TABLE IF NOT EXISTS rotation_journal(artifact TEXT NOT NULL, idx INTEGER NOT NULL, key_version INTEGER NOT NULL,
                                            generation INTEGER NOT NULL, tag BLOB NOT NULL, ciphertext BLOB NOT NULL,
                                            PRIMARY KEY(artifact, idx));
)sql";

// Columns added after the first release, and added to older indexes when they are opened. A NULL
// nonce marks a piece sealed before random nonces: its nonce is derived as it was then.
struct added_column { const char* table; const char* name; const char* definition; };
constexpr added_column added_columns[] = {
    {"pieces", "nonce", "nonce BLOB"},
    {"rotation_journal", "nonce", "nonce BLOB"},
};

std::int64_t now_seconds() { return static_cast<std::int64_t>(std::time(nullptr)); }

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
result<void> range_lock(int fd, short type, std::uint64_t begin, std::uint64_t len) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(begin);
  fl.l_len = static_cast<off_t>(len);
  while (::fcntl(fd, F_OFD_SETLKW, &fl) != 0) {
    if (errno != EINTR) return error(errc::io_error, "cannot lock a piece range").with_errno(errno);
  }
  return {};
}

std::array<std::byte, 32> raw_id(const std::string& hex) {
  std::array<std::byte, 32> out{};
  auto raw = detail::hex_decode(hex);
  if (raw && raw->size() == 32) std::copy(raw->begin(), raw->end(), out.begin());
  return out;
}

bool valid_artifact_id(std::string_view id) {
  return id.size() == 64 && std::all_of(id.begin(), id.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

result<void> pwrite_all(int fd, std::span<const std::byte> data, std::uint64_t offset, const std::filesystem::path& p) {
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pwrite(fd, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return detail::sys_error("write failed", p, errno);
    }
    done += static_cast<std::size_t>(n);
  }
  return {};
}

// A store shared with another user is not ours to trust: whoever can write into it can plant files,
// swap the index or roll it back. Every directory and file the store opens must belong to this
// user, and no directory may be writable by group or others.
result<void> check_owned(const struct stat& st, const std::filesystem::path& p, bool directory) {
  if (st.st_uid != ::geteuid())
    return error(errc::invalid_argument,
                 fmt::format("is owned by uid {}, not by this user (uid {}): a store must belong to the user "
                             "that runs drun",
                             st.st_uid, ::geteuid()))
        .with_path(p.string());
  if (directory && (st.st_mode & 022) != 0)
    return error(errc::invalid_argument, fmt::format("is writable by group or others (mode {:04o}): chmod 700 it",
                                                      st.st_mode & 07777))
        .with_path(p.string());
  return {};
}

// Opens (creating when flags say so) a file of the store, refusing one that is not a regular file
// of this user's: a planted symlink, FIFO or foreign file.
result<detail::unique_fd> open_owned(const std::filesystem::path& p, int flags, const char* what) {
  int raw;
  do raw = ::open(p.c_str(), flags | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0600);
  while (raw < 0 && errno == EINTR);
  if (raw < 0) return detail::sys_error(what, p, errno);
  detail::unique_fd fd(raw);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return detail::sys_error("cannot stat", p, errno);
  if (!S_ISREG(st.st_mode)) return error(errc::io_error, "is not a regular file").with_path(p.string());
  if (auto r = check_owned(st, p, false); !r) return std::move(r).error();
  ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
  return fd;
}

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

}  // namespace

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
    st->bind(1, state_stored);
    (void)st->each([&] {
      u.pieces = static_cast<std::uint64_t>(st->int64(0));
      u.bytes = static_cast<std::uint64_t>(st->int64(1));
    });
    return u;
  }

  std::filesystem::path dir;
  database db;
  std::mutex db_mutex;  // one connection, many threads: transactions must not interleave
  std::array<std::byte, 16> store_id{};
  std::uint32_t key_version = 0;
  std::optional<node_key> owned_key;  // set by open(); rotate_key borrows its caller's keys instead
  const node_key* key = nullptr;
  std::mutex keys_mutex;
  std::map<std::string, std::shared_ptr<store_detail::data_key>> data_keys;

  std::filesystem::path artifact_dir(const std::string& id) const { return dir / "artifacts" / id; }
  std::filesystem::path data_file(const std::string& id, std::size_t file) const {
    return artifact_dir(id) / "data" / std::to_string(file);
  }

  result<std::shared_ptr<store_detail::data_key>> data_key_for(const std::string& id, const node_key& k,
                                                               bool cache = true) {
    std::lock_guard lock(keys_mutex);
    if (cache)
      if (auto it = data_keys.find(id); it != data_keys.end()) return it->second;
    auto raw = raw_id(id);
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

  result<piece_row> load_piece(const std::string& id, std::size_t piece) {
    auto st = db.prepare(
        "SELECT p.file, p.offset, p.length, p.state, p.generation, p.key_version, p.tag, p.digest, f.name, p.nonce, "
        "a.hash_type FROM pieces p JOIN files f ON f.artifact = p.artifact AND f.idx = p.file "
        "JOIN artifacts a ON a.id = p.artifact WHERE p.artifact = ? AND p.idx = ?");
    if (!st) return std::move(st).error();
    st->bind(1, id).bind(2, static_cast<std::int64_t>(piece));
    auto row = st->step();
    if (!row) return std::move(row).error();
    if (!*row) return error(errc::not_found, fmt::format("artifact {} has no piece {}", id.substr(0, 12), piece));
    piece_row r;
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
      if (nonce.size() != r.nonce.size()) return error(errc::io_error, "store index is damaged (nonce)");
      std::copy(nonce.begin(), nonce.end(), r.nonce.begin());
    }
    auto alg = parse_hash_algorithm(st->text(10));
    if (!alg) return error(errc::io_error, "store index is damaged (hash type)");
    r.hash = *alg;
    return r;
  }

  static store_detail::piece_address address(const std::string& id, std::size_t piece, const piece_row& row) {
    return {raw_id(id), static_cast<std::uint32_t>(row.file), piece, row.key_version, row.generation, row.nonce};
  }

  // Generations come in durably reserved blocks, so a write costs no index commit before it.
  static constexpr std::uint64_t generation_block = 256;
  std::mutex generation_mutex;
  std::uint64_t generation_next = 0, generation_end = 0;

  result<std::uint64_t> take_generation() {
    std::lock_guard g(generation_mutex);
    if (generation_next == generation_end) {
      std::lock_guard lock(db_mutex);
      auto txn = transaction::begin(db);
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

  result<std::uint64_t> next_generation() {  // caller holds a transaction
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
    piece_row row;
    {
      std::lock_guard lock(db_mutex);
      auto r = load_piece(id, piece);
      if (!r) return std::move(r).error();
      row = std::move(*r);
    }
    if (row.state != state_stored)
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
      auto txn = transaction::begin(db);
      if (txn && set_piece_state(id, piece, state_stored, state_missing, row.generation)) (void)txn->commit();
      return error(code, fmt::format("piece {} {}; dropped from the store", piece, why))
          .with_path(row.file_name)
          .with_range(row.offset, row.offset + row.length);
    };
    auto dk = data_key_for(id, *key);
    if (!dk) return std::move(dk).error();
    auto path = data_file(id, row.file);
    auto fd = open_owned(path, O_RDONLY, "cannot open");
    if (!fd) {
      if (fd.error().sys_errno() == ENOENT) return drop(errc::model_mismatch, "has lost its data file");
      return std::move(fd).error();
    }
    if (auto r = range_lock(fd->get(), F_RDLCK, row.offset, row.length); !r) return r;
    store_detail::gcm gcm(store_detail::gcm::mode::open, **dk, address(id, piece, row));
    std::optional<hasher> h;
    if (check == read_check::digest) h.emplace(row.hash);
    const std::uint64_t step = sink ? out.size() : io_chunk;  // with a sink, the scratch size decides
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
    st->bind(1, now_seconds()).bind(2, id);
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

namespace {

result<void> make_dir(const std::filesystem::path& p) {
  if (::mkdir(p.c_str(), 0700) != 0 && errno != EEXIST) return detail::sys_error("cannot create directory", p, errno);
  struct stat st {};
  if (::lstat(p.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return error(errc::io_error, "is not a directory").with_path(p.string());
  return check_owned(st, p, /*directory=*/true);
}

enum class open_mode { normal, rotation };

result<std::unique_ptr<store::impl>> open_impl(const std::filesystem::path& dir, const node_key& key, open_mode mode,
                                               const std::string* pending_fp = nullptr);

}  // namespace

store::store(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
store::~store() = default;
store::store(store&&) noexcept = default;
store& store::operator=(store&&) noexcept = default;

namespace {

result<std::unique_ptr<store::impl>> open_impl(const std::filesystem::path& dir, const node_key& key, open_mode mode,
                                               const std::string* pending_fp) {
  if (auto r = make_dir(dir); !r) return std::move(r).error();
  if (auto r = make_dir(dir / "artifacts"); !r) return std::move(r).error();
  auto p = std::make_unique<store::impl>();
  p->dir = dir;
  p->key = &key;
  if (auto l = open_owned(dir / "lock", O_RDWR | O_CREAT, "cannot open the store lock"); !l) return std::move(l).error();
  // Opening is serialized by its own short lock: switching a new index to WAL and creating the
  // schema can fail with "database is locked" when two processes create the store at once.
  auto init_fd = open_owned(dir / "init.lock", O_RDWR | O_CREAT, "cannot open the store lock");
  if (!init_fd) return std::move(init_fd).error();
  flock_guard init_lock(init_fd->get(), LOCK_EX);
  // The index holds no secrets, but nobody else needs to read it: create it 0600 (SQLite gives its
  // -wal and -shm files the same mode).
  if (auto x = open_owned(dir / "index.sqlite", O_RDWR | O_CREAT, "cannot open the store index"); !x)
    return std::move(x).error();
  auto db = database::open(dir / "index.sqlite");
  if (!db) return std::move(db).error();
  p->db = std::move(*db);

  auto txn = transaction::begin(p->db);
  if (!txn) return std::move(txn).error();
  if (auto r = p->db.exec(schema); !r) return std::move(r).error();
  for (const auto& c : added_columns) {
    auto info = p->db.prepare(fmt::format("SELECT 1 FROM pragma_table_info('{}') WHERE name = '{}'", c.table, c.name));
    if (!info) return std::move(info).error();
    auto has = info->step();
    if (!has) return std::move(has).error();
    if (!*has)
      if (auto r = p->db.exec(fmt::format("ALTER TABLE {} ADD COLUMN {}", c.table, c.definition).c_str()); !r)
        return std::move(r).error();
  }
  // The store id salts every data key, so two stores under one node key never share a nonce space.
  {
    auto st = p->db.prepare("SELECT value FROM meta WHERE key = 'store_id'");
    if (!st) return std::move(st).error();
    auto row = st->step();
    if (!row) return std::move(row).error();
    if (*row) {
      auto b = st->blob(0);
      if (b.size() != p->store_id.size()) return error(errc::io_error, "store index is damaged (store id)");
      std::copy(b.begin(), b.end(), p->store_id.begin());
    } else {
      randombytes_buf(p->store_id.data(), p->store_id.size());
      auto ins = p->db.prepare("INSERT INTO meta(key, value) VALUES ('store_id', ?), ('next_generation', 1)");
      if (!ins) return std::move(ins).error();
      ins->bind_blob(1, p->store_id);
      if (auto r = ins->run(); !r) return std::move(r).error();
    }
  }
  std::string fp = store_detail::key_fingerprint(key);
  auto st = p->db.prepare("SELECT version, fingerprint, state FROM key_versions ORDER BY version");
  if (!st) return std::move(st).error();
  bool any = false, found = false, pending_other = false;
  for (;;) {
    auto row = st->step();
    if (!row) return std::move(row).error();
    if (!*row) break;
    any = true;
    auto version = static_cast<std::uint32_t>(st->int64(0));
    auto f = st->text(1), state = st->text(2);
    if (state == "pending" && (!pending_fp || f != *pending_fp)) pending_other = true;
    if (f != fp) continue;
    found = true;
    if (state == "retired")
      return error(errc::key_error, "wrong key: this node key was retired by rotate-key").with_path(dir.string());
    if (state == "pending" && mode == open_mode::normal)
      return error(errc::key_error, "a key rotation to this key is incomplete: run drun cache rotate-key again")
          .with_path(dir.string());
    p->key_version = version;
  }
  if (!any) {
    auto ins = p->db.prepare("INSERT INTO key_versions(version, fingerprint, state) VALUES (1, ?, 'active')");
    if (!ins) return std::move(ins).error();
    ins->bind(1, fp);
    if (auto r = ins->run(); !r) return std::move(r).error();
    p->key_version = 1;
  } else if (!found) {
    return error(errc::key_error, "wrong key: this store was created with another node key").with_path(dir.string());
  } else if (pending_other) {
    return error(errc::key_error, "a key rotation is incomplete: finish it with drun cache rotate-key")
        .with_path(dir.string());
  }
  if (auto r = txn->commit(); !r) return std::move(r).error();
  return p;
}

}  // namespace

result<store> store::open(const std::filesystem::path& dir, node_key key) {
  auto p = open_impl(dir, key, open_mode::normal);
  if (!p) return std::move(p).error();
  (*p)->owned_key.emplace(std::move(key));
  (*p)->key = &*(*p)->owned_key;
  (*p)->metrics_collector = metrics::add_store_collector([raw = p->get()] { return raw->usage(); });
  return store(std::move(*p));
}

result<void> store::add_artifact(const verified_manifest& m, std::string_view bundle_json) {
  if (m.method() != serialization_method::shards)
    return error(errc::invalid_argument,
                 "the store keeps shards manifests only (every piece needs a signed digest); re-sign with "
                 "drun sign --method shards");
  if (m.shard_size() > max_stored_piece_size)
    return error(errc::invalid_argument,
                 fmt::format("the manifest's shards are {} bytes; the store takes shards of at most {} bytes (4 GiB): "
                             "re-sign with a smaller shard size",
                             m.shard_size(), max_stored_piece_size));
  store_lock g(impl_->dir, LOCK_SH);
  const std::string& id = m.artifact_id();
  bool stale = false;
  {
    std::lock_guard lock(impl_->db_mutex);
    auto st = impl_->db.prepare("SELECT 1 FROM artifacts WHERE id = ?");
    if (!st) return std::move(st).error();
    st->bind(1, id);
    auto row = st->step();
    if (!row) return std::move(row).error();
    stale = *row;
    if (*row && std::filesystem::exists(impl_->artifact_dir(id) / "lock")) return {};
  }
  // Rows without their directory (deleted behind the store's back): start the artifact over.
  if (stale)
    if (auto r = remove(id); !r) return r;
  auto adir = impl_->artifact_dir(id);
  for (const auto& d : {adir, adir / "data"})
    if (auto r = make_dir(d); !r) return r;
  auto cleanup = [&](error e) {
    std::error_code ec;
    std::filesystem::remove_all(adir, ec);
    return e;
  };
  if (auto r = write_file_atomically(adir / "bundle.sig", bundle_json, 0600); !r) return cleanup(std::move(r).error());
  if (auto l = open_owned(adir / "lock", O_RDWR | O_CREAT, "cannot create"); !l) return cleanup(std::move(l).error());
  std::uint64_t total = 0;
  for (std::size_t f = 0; f < m.files().size(); ++f) {
    auto size = m.files()[f].size.value_or(0);
    total += size;
    auto path = impl_->data_file(id, f);
    auto guard = open_owned(path, O_RDWR | O_CREAT, "cannot create");
    if (!guard) return cleanup(std::move(guard).error());
    int fd = guard->get();
    // Reserve the space now: running out of disk is reported here, not halfway through.
    if (size > 0)
      if (int e = ::posix_fallocate(fd, 0, static_cast<off_t>(size)); e != 0)
        return cleanup(detail::sys_error("cannot reserve space for", path, e));
  }
  std::lock_guard lock(impl_->db_mutex);
  auto txn = transaction::begin(impl_->db);
  if (!txn) return cleanup(std::move(txn).error());
  auto ins = impl_->db.prepare(
      "INSERT OR IGNORE INTO artifacts(id, subject, hash_type, bytes, piece_size, created, last_access) "
      "VALUES (?, ?, ?, ?, ?, ?, ?)");
  if (!ins) return cleanup(std::move(ins).error());
  ins->bind(1, id).bind(2, m.subject_name()).bind(3, to_string(m.hash_type())).bind(4, static_cast<std::int64_t>(total))
      .bind(5, static_cast<std::int64_t>(m.shard_size())).bind(6, now_seconds()).bind(7, now_seconds());
  if (auto r = ins->run(); !r) return cleanup(std::move(r).error());
  auto fins = impl_->db.prepare("INSERT OR IGNORE INTO files(artifact, idx, name, size) VALUES (?, ?, ?, ?)");
  if (!fins) return cleanup(std::move(fins).error());
  for (std::size_t f = 0; f < m.files().size(); ++f) {
    fins->bind(1, id).bind(2, static_cast<std::int64_t>(f)).bind(3, m.files()[f].name)
        .bind(4, static_cast<std::int64_t>(m.files()[f].size.value_or(0)));
    if (auto r = fins->run(); !r) return cleanup(std::move(r).error());
  }
  auto pins = impl_->db.prepare(
      "INSERT OR IGNORE INTO pieces(artifact, idx, file, offset, length, digest) VALUES (?, ?, ?, ?, ?, ?)");
  if (!pins) return cleanup(std::move(pins).error());
  for (std::size_t i = 0; i < m.pieces().size(); ++i) {
    const auto& p = m.pieces()[i];
    pins->bind(1, id).bind(2, static_cast<std::int64_t>(i)).bind(3, static_cast<std::int64_t>(p.file))
        .bind(4, static_cast<std::int64_t>(p.range->begin)).bind(5, static_cast<std::int64_t>(p.range->size()))
        .bind_blob(6, p.expected.bytes());
    if (auto r = pins->run(); !r) return cleanup(std::move(r).error());
  }
  if (auto r = txn->commit(); !r) return cleanup(std::move(r).error());
  return {};
}

// Seals one piece from `source` into its place. With check_digest, the plaintext is hashed on the
// way through and the piece is marked stored only if it matches its signed digest; otherwise the
// caller already holds verified bytes. Either way the index says "stored" only after fdatasync.
static result<bool> write_piece(store::impl& s, const verified_manifest& m, std::size_t index,
                                const piece_source& source, bool check_digest) {
  store_lock g(s.dir, LOCK_SH);
  const std::string& id = m.artifact_id();
  if (index >= m.pieces().size() || !m.pieces()[index].range)
    return error(errc::invalid_argument, fmt::format("piece {} does not exist", index));
  const auto& mp = m.pieces()[index];
  const auto range = *mp.range;
  const auto& name = m.files()[mp.file].name;
  auto alock = s.artifact_lock(id);
  if (!alock) return std::move(alock).error();
  flock_guard ga(alock->get(), LOCK_SH);  // remove() waits for writers too
  auto path = s.data_file(id, mp.file);
  // O_CREAT: a data file deleted behind the store's back is recreated, and its pieces refilled.
  auto opened = open_owned(path, O_WRONLY | O_CREAT, "cannot open");
  if (!opened) return std::move(opened).error();
  detail::unique_fd fd = std::move(*opened);
  // Another process writing the same piece holds this range; wait, then see whether it finished.
  if (auto r = range_lock(fd.get(), F_WRLCK, range.begin, range.size()); !r) return std::move(r).error();
  {
    std::lock_guard lock(s.db_mutex);
    if (auto r = s.check_key_current(); !r) return std::move(r).error();
    auto row = s.load_piece(id, index);
    if (!row) return std::move(row).error();
    if (row->state == state_stored) return false;
  }
  // A fresh generation (the row's version, authenticated) and a fresh random nonce for every write:
  // the nonce never depends on what the index says, so a rolled-back index cannot repeat one.
  auto gen = s.take_generation();
  if (!gen) return std::move(gen).error();
  std::uint64_t generation = *gen;
  const auto nonce = store_detail::random_nonce();

  auto dk = s.data_key_for(id, *s.key);
  if (!dk) return std::move(dk).error();
  store_detail::gcm gcm(store_detail::gcm::mode::seal, **dk,
                        {raw_id(id), static_cast<std::uint32_t>(mp.file), index, s.key_version, generation, nonce});
  hasher h(m.hash_type());
  std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(io_chunk, range.size()));
  std::vector<std::byte> plain(chunk), sealed(chunk);
  auto wipe = [&] { sodium_memzero(plain.data(), plain.size()); };
  for (std::uint64_t off = 0; off < range.size(); off += chunk) {
    auto n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk, range.size() - off));
    auto in = std::span(plain.data(), n);
    if (auto r = source(in, off); !r) {
      wipe();
      return std::move(r).error();
    }
    if (check_digest) h.update(in);
    gcm.update(in, std::span(sealed.data(), n));
    if (auto r = pwrite_all(fd.get(), std::span(sealed.data(), n), range.begin + off, path); !r) {
      wipe();
      return std::move(r).error();
    }
  }
  wipe();
  auto tag = gcm.seal_tag();
  // Bytes that do not match the signed digest were written, but are never marked stored.
  if (check_digest && !(h.finish() == mp.expected))
    return error(errc::digest_mismatch, fmt::format("{} digest mismatch", to_string(m.hash_type())))
        .with_path(name)
        .with_range(range.begin, range.end);
  // Durable bytes first, then the index says "stored".
  if (::fdatasync(fd.get()) != 0) return detail::sys_error("cannot sync", path, errno);

  std::lock_guard lock(s.db_mutex);
  auto txn = transaction::begin(s.db);
  if (!txn) return std::move(txn).error();
  auto st = s.db.prepare(
      "UPDATE pieces SET state = ?, tag = ?, generation = ?, key_version = ?, nonce = ? WHERE artifact = ? AND idx = ?");
  if (!st) return std::move(st).error();
  st->bind(1, state_stored).bind_blob(2, tag).bind(3, static_cast<std::int64_t>(generation))
      .bind(4, s.key_version).bind_blob(5, nonce).bind(6, id).bind(7, static_cast<std::int64_t>(index));
  if (auto r = st->run(); !r) return std::move(r).error();
  auto touch = s.db.prepare("UPDATE artifacts SET last_access = ? WHERE id = ?");
  if (!touch) return std::move(touch).error();
  touch->bind(1, now_seconds()).bind(2, id);
  if (auto r = touch->run(); !r) return std::move(r).error();
  if (auto r = txn->commit(); !r) return std::move(r).error();
  return true;
}

namespace {

// A seal that failed for the store's sake (disk, index), not for the bytes' (a mismatch in a
// streamed piece is the sender's fault, counted by whoever fetched it).
result<bool> counted_seal(result<bool> r) {
  if (r && *r) metrics::global().store_pieces_sealed.add();
  if (!r && r.error().code() != errc::digest_mismatch && r.error().code() != errc::cancelled)
    metrics::global().store_seal_failures.add();
  return r;
}

}  // namespace

result<bool> store::put_piece(const verified_manifest& m, const verified_piece& piece) {
  // A piece verified for another artifact, or another piece of this one, carries a valid digest
  // for the wrong place: sealing it here would make the store serve it as this piece.
  const auto i = piece.index();
  if (piece.artifact_id() != m.artifact_id() || i >= m.pieces().size() || !m.pieces()[i].range ||
      *m.pieces()[i].range != piece.range() || m.pieces()[i].file != piece.file() ||
      piece.bytes().size() != piece.range().size())
    return error(errc::invalid_argument,
                 fmt::format("piece {} was verified for artifact {}, not for piece {} of artifact {}", i,
                             piece.artifact_id().substr(0, 12), i, m.artifact_id().substr(0, 12)));
  auto bytes = piece.bytes();
  return counted_seal(write_piece(*impl_, m, piece.index(),
                     [&](std::span<std::byte> chunk, std::uint64_t offset) -> result<void> {
                       std::copy_n(bytes.begin() + static_cast<std::ptrdiff_t>(offset), chunk.size(), chunk.begin());
                       return {};
                     },
                     /*check_digest=*/false));
}

result<bool> store::put_piece_streamed(const verified_manifest& m, std::size_t index, const piece_source& source) {
  return counted_seal(write_piece(*impl_, m, index, source, /*check_digest=*/true));
}

result<std::vector<bool>> store::stored_pieces(const std::string& artifact) {
  std::lock_guard lock(impl_->db_mutex);
  auto st = impl_->db.prepare("SELECT idx, state FROM pieces WHERE artifact = ? ORDER BY idx");
  if (!st) return std::move(st).error();
  st->bind(1, artifact);
  std::vector<bool> out;
  auto rows = st->each([&] {
    auto idx = static_cast<std::size_t>(st->int64(0));
    if (out.size() <= idx) out.resize(idx + 1);
    out[idx] = st->int64(1) == state_stored;
  });
  if (!rows) return std::move(rows).error();
  return out;
}

result<std::string> store::bundle(const std::string& artifact) {
  if (artifact.size() != 64 || !std::all_of(artifact.begin(), artifact.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c)) || (c >= 'a' && c <= 'f');
      }))
    return error(errc::invalid_argument, "not an artifact id");
  auto text = read_bundle_file(impl_->artifact_dir(artifact) / "bundle.sig");
  if (!text) {
    if (text.error().code() == errc::not_found)
      return error(errc::not_found, fmt::format("no artifact {} in the store", artifact));
    return std::move(text).error();
  }
  // The file was verified when it came in; a swapped one is caught by its payload's hash.
  auto summary = inspect_bundle(*text);
  if (!summary || summary->artifact_id != artifact)
    return error(errc::model_mismatch, fmt::format("the stored bundle of {} does not match its id", artifact));
  return text;
}

result<missing_pieces> store::missing(const verified_manifest& m) {
  auto stored = stored_pieces(m.artifact_id());
  if (!stored) return std::move(stored).error();
  missing_pieces out;
  for (std::size_t i = 0; i < m.pieces().size(); ++i) {
    if (i < stored->size() && (*stored)[i]) {
      ++out.already_stored;
    } else {
      out.indices.push_back(i);
      out.bytes += m.pieces()[i].range->size();
    }
  }
  return out;
}

result<void> store::read_piece(const std::string& artifact, std::size_t piece, std::span<std::byte> out,
                               read_check check) {
  store_lock g(impl_->dir, LOCK_SH);
  return impl_->open_piece(artifact, piece, out, {}, check);
}

result<void> store::stream_piece(const std::string& artifact, std::size_t piece, std::span<std::byte> scratch,
                                 const piece_sink& sink, read_check check) {
  if (scratch.empty()) return error(errc::invalid_argument, "no scratch buffer to stream a piece through");
  store_lock g(impl_->dir, LOCK_SH);
  // First pass: authenticate, releasing nothing. Second: decrypt again and release chunk by chunk.
  // Its own tag check catches a piece changed on disk in between (only someone bypassing the
  // store's locks can), and then the caller must throw away what the sink was given.
  auto nothing = [](std::span<const std::byte>, std::uint64_t) { return result<void>(); };
  if (auto r = impl_->open_piece(artifact, piece, scratch, nothing, check); !r) return r;
  return impl_->open_piece(artifact, piece, scratch,
                           [&](std::span<const std::byte> plain, std::uint64_t) { return sink(plain); }, check);
}

result<std::string> store::resolve(std::string_view prefix) {
  if (prefix.size() < 8 || prefix.size() > 64 ||
      !std::all_of(prefix.begin(), prefix.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); }))
    return error(errc::invalid_argument, fmt::format("\"{}\" is not an artifact id (8 to 64 hex characters)", prefix));
  std::string lower(prefix);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  std::lock_guard lock(impl_->db_mutex);
  auto st = impl_->db.prepare("SELECT id FROM artifacts WHERE substr(id, 1, ?) = ?");
  if (!st) return std::move(st).error();
  st->bind(1, static_cast<std::int64_t>(lower.size())).bind(2, lower);
  std::vector<std::string> ids;
  auto rows = st->each([&] {
    ids.push_back(st->text(0));
  });
  if (!rows) return std::move(rows).error();
  if (ids.empty()) return error(errc::invalid_argument, fmt::format("no artifact {} in the store", lower));
  if (ids.size() > 1) return error(errc::invalid_argument, fmt::format("{} artifacts start with {}", ids.size(), lower));
  return ids[0];
}

result<std::vector<artifact_summary>> store::list() {
  std::lock_guard lock(impl_->db_mutex);
  auto st = impl_->db.prepare(
      "SELECT a.id, a.subject, a.bytes, a.pinned, a.last_access, "
      "(SELECT count(*) FROM pieces p WHERE p.artifact = a.id), "
      "(SELECT count(*) FROM pieces p WHERE p.artifact = a.id AND p.state = 2) "
      "FROM artifacts a ORDER BY a.last_access DESC, a.id");
  if (!st) return std::move(st).error();
  std::vector<artifact_summary> out;
  auto rows = st->each([&] {
    out.push_back({st->text(0), st->text(1), static_cast<std::uint64_t>(st->int64(2)),
                   static_cast<std::size_t>(st->int64(5)), static_cast<std::size_t>(st->int64(6)), st->int64(3) != 0,
                   st->int64(4)});
  });
  if (!rows) return std::move(rows).error();
  return out;
}

result<artifact_details> store::show(const std::string& artifact) {
  auto all = list();
  if (!all) return std::move(all).error();
  auto it = std::find_if(all->begin(), all->end(), [&](const artifact_summary& a) { return a.id == artifact; });
  if (it == all->end()) return error(errc::invalid_argument, fmt::format("no artifact {} in the store", artifact));
  artifact_details d;
  d.summary = *it;
  std::lock_guard lock(impl_->db_mutex);
  auto ps = impl_->db.prepare("SELECT piece_size FROM artifacts WHERE id = ?");
  if (!ps) return std::move(ps).error();
  ps->bind(1, artifact);
  if (auto r = ps->step(); r && *r) d.piece_size = static_cast<std::uint64_t>(ps->int64(0));
  auto st = impl_->db.prepare(
      "SELECT f.idx, f.name, f.size, "
      "(SELECT min(idx) FROM pieces p WHERE p.artifact = f.artifact AND p.file = f.idx), "
      "(SELECT count(*) FROM pieces p WHERE p.artifact = f.artifact AND p.file = f.idx), "
      "(SELECT count(*) FROM pieces p WHERE p.artifact = f.artifact AND p.file = f.idx AND p.state = 2) "
      "FROM files f WHERE f.artifact = ? ORDER BY f.idx");
  if (!st) return std::move(st).error();
  st->bind(1, artifact);
  auto rows = st->each([&] {
    d.files.push_back({st->text(1), static_cast<std::uint64_t>(st->int64(2)),
                       st->is_null(3) ? 0 : static_cast<std::size_t>(st->int64(3)),
                       static_cast<std::size_t>(st->int64(4)), static_cast<std::size_t>(st->int64(5))});
  });
  if (!rows) return std::move(rows).error();
  auto kv = impl_->db.prepare("SELECT DISTINCT key_version FROM pieces WHERE artifact = ? AND state = 2 ORDER BY 1");
  if (!kv) return std::move(kv).error();
  kv->bind(1, artifact);
  auto versions = kv->each([&] {
    d.key_versions.push_back(static_cast<std::uint32_t>(kv->int64(0)));
  });
  if (!versions) return std::move(versions).error();
  return d;
}

result<void> store::set_pinned(const std::string& artifact, bool pinned) {
  std::lock_guard lock(impl_->db_mutex);
  auto st = impl_->db.prepare("UPDATE artifacts SET pinned = ? WHERE id = ?");
  if (!st) return std::move(st).error();
  st->bind(1, pinned ? 1 : 0).bind(2, artifact);
  return st->run();
}

result<void> store::remove(const std::string& artifact) {
  if (!valid_artifact_id(artifact)) return error(errc::invalid_argument, "not an artifact id");
  store_lock g(impl_->dir, LOCK_SH);
  auto adir = impl_->artifact_dir(artifact);
  detail::unique_fd alock;
  if (std::filesystem::exists(adir)) {
    auto l = impl_->artifact_lock(artifact);
    if (!l) return std::move(l).error();
    if (::flock(l->get(), LOCK_EX | LOCK_NB) != 0)
      return error(errc::invalid_argument, "artifact is in use by another process").with_path(artifact);
    alock = std::move(*l);
  }
  {
    std::lock_guard lock(impl_->db_mutex);
    auto txn = transaction::begin(impl_->db);
    if (!txn) return std::move(txn).error();
    for (const char* sql : {"DELETE FROM pieces WHERE artifact = ?", "DELETE FROM files WHERE artifact = ?",
                            "DELETE FROM rotation_journal WHERE artifact = ?", "DELETE FROM artifacts WHERE id = ?"}) {
      auto st = impl_->db.prepare(sql);
      if (!st) return std::move(st).error();
      st->bind(1, artifact);
      if (auto r = st->run(); !r) return std::move(r).error();
    }
    if (auto r = txn->commit(); !r) return std::move(r).error();
  }
  // Rows first, files second: a crash in between leaves an orphan directory that gc sweeps, never
  // a row pointing at missing data.
  std::error_code ec;
  std::filesystem::remove_all(adir, ec);
  if (ec) return error(errc::io_error, "cannot remove the artifact's files").with_path(adir.string()).with_errno(ec.value());
  {
    std::lock_guard lock(impl_->keys_mutex);
    impl_->data_keys.erase(artifact);
  }
  detail::audit("store.removed", {{"store", impl_->dir.string()}, {"artifact", artifact}});
  return {};
}

result<gc_report> store::gc(const gc_options& options) {
  auto all = list();
  if (!all) return std::move(all).error();
  gc_report report;
  std::sort(all->begin(), all->end(), [](auto& a, auto& b) { return a.last_access < b.last_access; });  // LRU first
  std::uint64_t total = 0;
  for (const auto& a : *all) total += a.bytes;
  auto try_remove = [&](const artifact_summary& a) -> result<bool> {
    auto r = remove(a.id);
    if (r) {
      metrics::global().store_gc_evictions.add();
      report.removed.push_back(a.id);
      report.bytes_freed += a.bytes;
      total -= a.bytes;
      return true;
    }
    if (r.error().code() == errc::invalid_argument) {
      report.in_use.push_back(a.id);
      return false;
    }
    return std::move(r).error();
  };
  std::vector<bool> gone(all->size(), false);
  if (options.ttl) {
    auto cutoff = now_seconds() - options.ttl->count();
    for (std::size_t i = 0; i < all->size(); ++i) {
      const auto& a = (*all)[i];
      if (a.pinned || a.last_access > cutoff) continue;
      auto r = try_remove(a);
      if (!r) return std::move(r).error();
      gone[i] = *r;
    }
  }
  if (options.high_bytes && total > *options.high_bytes) {
    for (std::size_t i = 0; i < all->size() && total > options.low_bytes; ++i) {
      if (gone[i] || (*all)[i].pinned) continue;
      auto r = try_remove((*all)[i]);
      if (!r) return std::move(r).error();
    }
  }
  // Sweep directories whose rows are gone (a remove interrupted between its two steps). Young
  // ones are left alone: add_artifact creates the directory before its rows.
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(impl_->dir / "artifacts", ec)) {
    auto name = entry.path().filename().string();
    if (!valid_artifact_id(name)) continue;
    struct stat info {};
    if (::lstat(entry.path().c_str(), &info) != 0 || now_seconds() - info.st_mtime < 600) continue;
    auto l = impl_->artifact_lock(name);
    if (l && ::flock(l->get(), LOCK_EX | LOCK_NB) != 0) continue;  // someone is using it after all
    std::lock_guard lock(impl_->db_mutex);
    auto st = impl_->db.prepare("SELECT 1 FROM artifacts WHERE id = ?");
    if (!st) return std::move(st).error();
    st->bind(1, name);
    auto row = st->step();
    if (row && !*row) std::filesystem::remove_all(entry.path(), ec);
  }
  if (!report.removed.empty())
    detail::audit("store.gc", {{"store", impl_->dir.string()}, {"removed", report.removed.size()},
                               {"bytes_freed", report.bytes_freed}});
  return report;
}

result<std::vector<scrub_failure>> store::scrub(const std::optional<std::string>& artifact) {
  store_lock g(impl_->dir, LOCK_SH);
  struct todo { std::string id; std::size_t piece; };
  std::vector<todo> work;
  {
    std::lock_guard lock(impl_->db_mutex);
    auto st = impl_->db.prepare(
        "SELECT p.artifact, p.idx FROM pieces p "
        "WHERE p.state = 2 AND (? IS NULL OR p.artifact = ?) ORDER BY p.artifact, p.idx");
    if (!st) return std::move(st).error();
    if (artifact) st->bind(1, *artifact).bind(2, *artifact);
    auto rows = st->each([&] {
      work.push_back({st->text(0), static_cast<std::size_t>(st->int64(1))});
    });
    if (!rows) return std::move(rows).error();
  }
  std::vector<scrub_failure> failures;
  std::vector<std::byte> buf;
  std::string locked_id;
  detail::unique_fd artifact_lock;
  bool gone = false;
  for (const auto& w : work) {
    if (w.id != locked_id) {
      // Hold the artifact like a reader, so rm and gc leave it alone while it is checked, and
      // skip it quietly if it was removed between listing and locking.
      locked_id = w.id;
      artifact_lock.reset();
      auto l = impl_->artifact_lock(w.id);
      gone = !l;
      if (l) {
        ::flock(l->get(), LOCK_SH);
        artifact_lock = std::move(*l);
        auto still = show(w.id);
        gone = !still;
      }
    }
    if (gone) continue;
    piece_row row;
    {
      std::lock_guard lock(impl_->db_mutex);
      auto r = impl_->load_piece(w.id, w.piece);
      if (!r) return std::move(r).error();
      row = std::move(*r);
    }
    // Streamed through a 1 MiB scratch buffer, so memory does not grow with the piece; open_piece
    // checks the tag and the signed digest and drops a piece that fails either.
    buf.resize(io_chunk);
    auto opened = impl_->open_piece(w.id, w.piece, buf, [](std::span<const std::byte>, std::uint64_t) {
      return result<void>();
    });
    if (!opened) {
      // Only a piece that is bad is a failure; a bad key or a failing disk stops the scrub.
      auto code = opened.error().code();
      if (code != errc::digest_mismatch && code != errc::model_mismatch) return std::move(opened).error();
      metrics::global().store_scrub_findings.add();
      failures.push_back({w.id, row.file_name, w.piece, {row.offset, row.offset + row.length}, opened.error().detail()});
      detail::audit("store.scrub_finding", {{"store", impl_->dir.string()}, {"artifact", w.id}, {"file", row.file_name},
                                            {"piece", w.piece}, {"reason", opened.error().detail()}});
    }
  }
  sodium_memzero(buf.data(), buf.size());
  return failures;
}

// ---- reading ----------------------------------------------------------------------------------

struct artifact_reader::impl {
  std::shared_ptr<store::impl> s;
  std::string id;
  std::vector<stored_file> files;
  std::vector<byte_range> piece_ranges;  // by piece index
  detail::unique_fd artifact_lock;       // LOCK_SH for the reader's lifetime: no one removes it
};

artifact_reader::artifact_reader(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
artifact_reader::~artifact_reader() = default;
artifact_reader::artifact_reader(artifact_reader&&) noexcept = default;
artifact_reader& artifact_reader::operator=(artifact_reader&&) noexcept = default;
const std::vector<stored_file>& artifact_reader::files() const noexcept { return impl_->files; }

result<artifact_reader> store::open_artifact(const std::string& artifact) {
  if (!valid_artifact_id(artifact)) return error(errc::invalid_argument, "not an artifact id");
  auto l = impl_->artifact_lock(artifact);
  if (!l) return error(errc::invalid_argument, fmt::format("no artifact {} in the store", artifact));
  ::flock(l->get(), LOCK_SH);
  // Checked under the lock: a remove that won the race has deleted the rows by now.
  auto d = show(artifact);
  if (!d) return std::move(d).error();
  auto p = std::make_unique<artifact_reader::impl>();
  p->s = impl_;
  p->id = artifact;
  p->files = d->files;
  p->artifact_lock = std::move(*l);
  {
    std::lock_guard lock(impl_->db_mutex);
    auto st = impl_->db.prepare("SELECT idx, offset, length FROM pieces WHERE artifact = ? ORDER BY idx");
    if (!st) return std::move(st).error();
    st->bind(1, artifact);
    auto rows = st->each([&] {
      auto off = static_cast<std::uint64_t>(st->int64(1));
      p->piece_ranges.push_back({off, off + static_cast<std::uint64_t>(st->int64(2))});
    });
    if (!rows) return std::move(rows).error();
  }
  if (auto r = impl_->touch(artifact); !r) return std::move(r).error();
  return artifact_reader(std::move(p));
}

result<void> artifact_reader::read(std::size_t file, std::uint64_t offset, std::span<std::byte> out) const {
  if (file >= impl_->files.size()) return error(errc::invalid_argument, fmt::format("no file {}", file));
  const auto& f = impl_->files[file];
  if (offset > f.size || out.size() > f.size - offset)
    return error(errc::invalid_argument, "read past the end of the file").with_path(f.name);
  store_lock g(impl_->s->dir, LOCK_SH);
  // The pieces the range touches, decrypted in parallel (a model loader reads gigabytes at once).
  struct segment {
    std::size_t piece;
    std::uint64_t from, to;
  };
  std::vector<segment> segments;
  const std::uint64_t begin = offset, end = offset + out.size();
  for (std::size_t k = f.first_piece; k < f.first_piece + f.pieces; ++k) {
    auto r = impl_->piece_ranges[k];
    if (r.end <= begin || r.begin >= end) continue;
    segments.push_back({k, std::max(begin, r.begin), std::min(end, r.end)});
  }
  unsigned workers = detail::worker_count(0, segments.size());
  std::vector<std::vector<std::byte>> scratch(workers);
  std::mutex failure_mutex;
  std::optional<error> failure;
  detail::parallel_for(segments.size(), workers, [&](std::size_t i, unsigned w) {
    const auto& seg = segments[i];
    auto r = impl_->piece_ranges[seg.piece];
    auto dst = out.subspan(seg.from - begin, seg.to - seg.from);
    result<void> res;
    if (seg.from == r.begin && seg.to == r.end) {
      res = impl_->s->open_piece(impl_->id, seg.piece, dst);  // the whole piece: straight into out
    } else {
      scratch[w].resize(r.size());
      res = impl_->s->open_piece(impl_->id, seg.piece, scratch[w]);
      if (res) std::copy_n(scratch[w].begin() + static_cast<std::ptrdiff_t>(seg.from - r.begin), dst.size(), dst.begin());
    }
    if (res) return true;
    std::lock_guard lock(failure_mutex);
    if (!failure) failure = std::move(res).error();
    return false;
  });
  for (auto& sc : scratch) sodium_memzero(sc.data(), sc.size());
  if (failure) {
    sodium_memzero(out.data(), out.size());
    return std::move(*failure);
  }
  return {};
}

// ---- materialize --------------------------------------------------------------------------------

namespace {

constexpr std::string_view staging_prefix = ".drun-export-";

// Opens (creating) each directory of rel below dirfd without following symlinks; returns the fd of
// the last directory and the final component.
result<std::pair<detail::unique_fd, std::string>> open_parent(int dirfd, const std::string& rel, mode_t dir_mode) {
  detail::unique_fd cur(::dup(dirfd));
  std::size_t start = 0;
  for (;;) {
    auto slash = rel.find('/', start);
    if (slash == std::string::npos) return std::pair{std::move(cur), rel.substr(start)};
    auto part = rel.substr(start, slash - start);
    if (::mkdirat(cur.get(), part.c_str(), dir_mode) != 0 && errno != EEXIST)
      return error(errc::io_error, "cannot create directory").with_path(rel).with_errno(errno);
    int next = ::openat(cur.get(), part.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (next < 0) return error(errc::io_error, "cannot open directory").with_path(rel).with_errno(errno);
    cur = detail::unique_fd(next);
    start = slash + 1;
  }
}

// Removes the staging directories of exports that were killed (ours only: owned by this user);
// they hold incomplete files. One that a running export holds (flock) is left alone; whatever
// else dest holds stays.
void remove_stale_staging(const std::filesystem::path& dest) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dest, ec)) {
    struct stat st {};
    auto name = e.path().filename().string();
    if (!name.starts_with(staging_prefix) || ::lstat(e.path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode) ||
        st.st_uid != ::geteuid())
      continue;
    detail::unique_fd d(::open(e.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!d || ::flock(d.get(), LOCK_EX | LOCK_NB) != 0) continue;  // in use by a running export
    std::filesystem::remove_all(e.path(), ec);
  }
}

}  // namespace

namespace store_detail {
std::atomic<int> fail_export_rename_after{-1};
}

// What an export keeps between begin_export() and commit(): the staging directory inside dest,
// one open file per model file in it, and which pieces have their plaintext there.
struct export_writer::impl {
  std::shared_ptr<store::impl> st;
  artifact_reader reader;  // keeps the artifact from being removed while the export runs
  std::string id;
  std::vector<byte_range> ranges;  // by piece index
  std::filesystem::path dest;
  detail::unique_fd dest_fd, staging_fd;
  std::string staging;
  struct out_file {
    std::string name;
    detail::unique_fd fd;
  };
  std::vector<out_file> files;               // by file index
  std::vector<std::size_t> piece_file;       // file index of each piece
  std::vector<std::string> top_level;        // what moves into dest at commit
  std::mutex mutex;
  std::vector<bool> written;                 // pieces whose plaintext is in the staging files
  std::vector<std::filesystem::path> created;  // directories begin_export made, dest last
  bool done = false;

  explicit impl(artifact_reader r) : reader(std::move(r)) {}
  ~impl() {
    if (done) return;
    std::error_code ec;
    if (!staging.empty()) std::filesystem::remove_all(dest / staging, ec);  // unverified or incomplete
    // dest as it was found: what was made for the export goes too (rmdir: only if still empty).
    for (auto it = created.rbegin(); it != created.rend(); ++it) ::rmdir(it->c_str());
  }
  result<void> put(std::size_t piece, std::uint64_t offset, std::span<const std::byte> plain) {
    const auto& f = files[piece_file[piece]];
    return pwrite_all(f.fd.get(), plain, ranges[piece].begin + offset, dest / f.name);
  }
};

export_writer::export_writer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
export_writer::~export_writer() = default;
export_writer::export_writer(export_writer&&) noexcept = default;
export_writer& export_writer::operator=(export_writer&&) noexcept = default;

result<export_writer> store::begin_export(const std::string& artifact, const std::filesystem::path& dest_arg,
                                          export_modes modes) {
  // "model/" and "model" are one destination (and one mode for it).
  std::filesystem::path dest = dest_arg.lexically_normal();
  if (!dest.has_filename() && dest.has_parent_path()) dest = dest.parent_path();
  const mode_t file_mode = modes == export_modes::owner_only ? 0600 : 0666;  // open() and mkdir() apply the umask
  const mode_t dir_mode = modes == export_modes::owner_only ? 0700 : 0777;
  auto d = show(artifact);
  if (!d) return std::move(d).error();
  struct stat st {};
  if (::lstat(dest.c_str(), &st) == 0) {
    std::error_code ec;
    if (S_ISDIR(st.st_mode)) remove_stale_staging(dest);
    if (!S_ISDIR(st.st_mode) || !std::filesystem::is_empty(dest, ec))
      return error(errc::invalid_argument, "destination exists and is not an empty directory").with_path(dest.string());
  }
  auto reader = open_artifact(artifact);
  if (!reader) return std::move(reader).error();
  auto ranges = reader->impl_->piece_ranges;
  auto w = std::make_unique<export_writer::impl>(std::move(*reader));
  if (::lstat(dest.c_str(), &st) != 0) {
    // The missing directories down to dest, outermost first, so that a failed export removes them.
    for (auto p = dest; !p.empty() && ::lstat(p.c_str(), &st) != 0; p = p.parent_path()) {
      w->created.insert(w->created.begin(), p);
      if (p == p.parent_path()) break;
    }
    for (const auto& p : w->created)
      if (::mkdir(p.c_str(), p == dest ? dir_mode : 0777) != 0 && errno != EEXIST)
        return detail::sys_error("cannot create the destination", p, errno);
  }
  w->st = impl_;
  w->id = artifact;
  w->ranges = std::move(ranges);
  w->dest = dest;
  int dfd = ::open(dest.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dfd < 0) return detail::sys_error("cannot open the destination", dest, errno);
  w->dest_fd = detail::unique_fd(dfd);
  // Everything is written under a staging directory first; only complete, synced files move out.
  std::array<std::byte, 6> rnd{};
  randombytes_buf(rnd.data(), rnd.size());
  std::string staging = std::string(staging_prefix) + detail::hex_encode(rnd);
  if (::mkdirat(w->dest_fd.get(), staging.c_str(), 0700) != 0) return detail::sys_error("cannot create", dest / staging, errno);
  w->staging = staging;  // from here on, the writer's destructor removes it
  int sfd = ::openat(w->dest_fd.get(), staging.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (sfd < 0) return detail::sys_error("cannot open", dest / staging, errno);
  w->staging_fd = detail::unique_fd(sfd);
  // Held until the writer ends, so that another export into dest does not take it for a stale one.
  if (::flock(w->staging_fd.get(), LOCK_EX | LOCK_NB) != 0) return detail::sys_error("cannot lock", dest / staging, errno);
  w->piece_file.resize(w->ranges.size());
  w->written.assign(w->piece_file.size(), false);
  for (std::size_t fi = 0; fi < d->files.size(); ++fi) {
    const auto& f = d->files[fi];
    // A single-file model is named "." in its manifest: it takes its subject's name.
    std::string name = f.name == "." ? d->summary.subject : f.name;
    if (!is_safe_relative_path(name) || (f.name == "." && name.find('/') != std::string::npos))
      return error(errc::invalid_argument, fmt::format("cannot export a file named \"{}\"", name));
    auto parent = open_parent(w->staging_fd.get(), name, dir_mode);
    if (!parent) return std::move(parent).error();
    int ofd = ::openat(parent->first.get(), parent->second.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                       file_mode);
    if (ofd < 0) return detail::sys_error("cannot create", dest / name, errno);
    w->files.push_back({name, detail::unique_fd(ofd)});
    for (std::size_t i = 0; i < f.pieces; ++i)
      if (f.first_piece + i < w->piece_file.size()) w->piece_file[f.first_piece + i] = fi;
    auto top = name.substr(0, name.find('/'));
    if (std::find(w->top_level.begin(), w->top_level.end(), top) == w->top_level.end()) w->top_level.push_back(top);
  }
  return export_writer(std::move(w));
}

result<void> export_writer::write(const verified_piece& piece) {
  auto& w = *impl_;
  if (w.done) return error(errc::invalid_argument, "the export is already committed");
  if (piece.artifact_id() != w.id || piece.index() >= w.piece_file.size() ||
      piece.range() != w.ranges[piece.index()])
    return error(errc::invalid_argument, "a piece of another artifact");
  if (auto r = w.put(piece.index(), 0, piece.bytes()); !r) return r;
  std::lock_guard lock(w.mutex);
  w.written[piece.index()] = true;
  return {};
}

result<void> export_writer::commit() {
  auto& w = *impl_;
  if (w.done) return error(errc::invalid_argument, "the export is already committed");
  // The pieces no caller wrote come from the store: each is decrypted chunk by chunk straight
  // into its staging file, pieces in parallel; a piece whose tag or digest fails at the end fails
  // the export, and the staging directory goes with it.
  std::vector<std::size_t> todo;
  for (std::size_t k = 0; k < w.written.size(); ++k)
    if (!w.written[k]) todo.push_back(k);
  unsigned workers = detail::worker_count(0, todo.size());
  std::vector<std::vector<std::byte>> bufs(workers);
  std::mutex failure_mutex;
  std::optional<error> failure;
  detail::parallel_for(todo.size(), workers, [&](std::size_t i, unsigned t) {
    std::size_t k = todo[i];
    bufs[t].resize(io_chunk);
    store_lock g(w.st->dir, LOCK_SH);
    auto r = w.st->open_piece(w.id, k, bufs[t],
                              [&](std::span<const std::byte> plain, std::uint64_t offset) { return w.put(k, offset, plain); });
    if (!r) {
      std::lock_guard lock(failure_mutex);
      if (!failure) failure = std::move(r).error();
      return false;
    }
    return true;
  });
  for (auto& b : bufs) sodium_memzero(b.data(), b.size());
  if (failure) return std::move(*failure);
  for (const auto& f : w.files)
    if (::fsync(f.fd.get()) != 0) return detail::sys_error("cannot sync", w.dest / f.name, errno);
  // Into place, never over something that appeared in dest meanwhile; on a failure, what was
  // already moved goes back, so dest is left as it was found.
  for (std::size_t i = 0; i < w.top_level.size(); ++i) {
    const char* top = w.top_level[i].c_str();
    bool injected = store_detail::fail_export_rename_after.load() == static_cast<int>(i);
    if (injected || ::renameat2(w.staging_fd.get(), top, w.dest_fd.get(), top, RENAME_NOREPLACE) != 0) {
      int e = injected ? EIO : errno;
      for (std::size_t j = i; j-- > 0;)
        ::renameat2(w.dest_fd.get(), w.top_level[j].c_str(), w.staging_fd.get(), w.top_level[j].c_str(), RENAME_NOREPLACE);
      return detail::sys_error("cannot move into place", w.dest / top, e);
    }
  }
  w.done = true;
  ::unlinkat(w.dest_fd.get(), w.staging.c_str(), AT_REMOVEDIR);
  ::fsync(w.dest_fd.get());
  return {};
}

result<void> store::materialize(const std::string& artifact, const std::filesystem::path& dest, export_modes modes) {
  auto w = begin_export(artifact, dest, modes);
  if (!w) return std::move(w).error();
  return w->commit();
}

// ---- key rotation -------------------------------------------------------------------------------

result<void> store::rotate_key(const std::filesystem::path& dir, const node_key& old_key, const node_key& new_key) {
  std::string new_fp = store_detail::key_fingerprint(new_key);
  if (new_fp == store_detail::key_fingerprint(old_key))
    return error(errc::invalid_argument, "the new key is the store's current key");
  auto opened = open_impl(dir, old_key, open_mode::rotation, &new_fp);
  if (!opened) return std::move(opened).error();
  auto& s = **opened;
  store_lock g(s.dir, LOCK_EX);
  auto old_version = s.key_version;
  std::uint32_t new_version = 0;
  {
    auto txn = transaction::begin(s.db);
    if (!txn) return std::move(txn).error();
    auto st = s.db.prepare("SELECT version FROM key_versions WHERE fingerprint = ?");
    if (!st) return std::move(st).error();
    st->bind(1, new_fp);
    auto row = st->step();
    if (!row) return std::move(row).error();
    if (*row) {
      new_version = static_cast<std::uint32_t>(st->int64(0));
      // Only a rotation to this key that was interrupted may be resumed; a retired key stays retired.
      auto state = s.db.prepare("SELECT state FROM key_versions WHERE version = ?");
      if (!state) return std::move(state).error();
      state->bind(1, new_version);
      if (auto r = state->step(); !r || !*r || state->text(0) != "pending")
        return error(errc::invalid_argument, "the new key was retired by an earlier rotation: use a fresh key");
    } else {
      auto ins = s.db.prepare(
          "INSERT INTO key_versions(version, fingerprint, state) "
          "VALUES ((SELECT max(version) + 1 FROM key_versions), ?, 'pending') RETURNING version");
      if (!ins) return std::move(ins).error();
      ins->bind(1, new_fp);
      auto r = ins->step();
      if (!r) return std::move(r).error();
      new_version = static_cast<std::uint32_t>(ins->int64(0));
    }
    if (auto r = txn->commit(); !r) return std::move(r).error();
  }

  // Redo log: a piece's new ciphertext is committed to rotation_journal before it overwrites the
  // old one in place, so a crash at any point leaves either the old piece (index unchanged) or a
  // journal entry that this loop finishes.
  auto finish_journal = [&]() -> result<void> {
    for (;;) {
      std::string id;
      std::int64_t idx = 0, version = 0, generation = 0;
      std::vector<std::byte> tag;
      {
        auto st = s.db.prepare(
            "SELECT j.artifact, j.idx, j.key_version, j.generation, j.tag, j.ciphertext, p.file, p.offset "
            "FROM rotation_journal j JOIN pieces p ON p.artifact = j.artifact AND p.idx = j.idx LIMIT 1");
        if (!st) return std::move(st).error();
        auto row = st->step();
        if (!row) return std::move(row).error();
        if (!*row) return {};
        id = st->text(0);
        idx = st->int64(1);
        version = st->int64(2);
        generation = st->int64(3);
        tag.assign(st->blob(4).begin(), st->blob(4).end());
        // Written straight from SQLite's row: no second copy of the piece in memory.
        auto path = s.data_file(id, static_cast<std::size_t>(st->int64(6)));
        auto fd = open_owned(path, O_WRONLY | O_CREAT, "cannot open");
        if (!fd) return std::move(fd).error();
        if (auto r = pwrite_all(fd->get(), st->blob(5), static_cast<std::uint64_t>(st->int64(7)), path); !r) return r;
        if (::fdatasync(fd->get()) != 0) return detail::sys_error("cannot sync", path, errno);
      }
      auto txn = transaction::begin(s.db);
      if (!txn) return std::move(txn).error();
      // The journal's nonce goes with its ciphertext (NULL for an entry journalled by an older drun,
      // whose nonce was derived from version and generation).
      auto up = s.db.prepare(
          "UPDATE pieces SET key_version = ?, generation = ?, tag = ?, state = 2, "
          "nonce = (SELECT nonce FROM rotation_journal WHERE artifact = ?4 AND idx = ?5) WHERE artifact = ?4 AND idx = ?5");
      if (!up) return std::move(up).error();
      up->bind(1, version).bind(2, generation).bind_blob(3, tag).bind(4, id).bind(5, idx);
      if (auto r = up->run(); !r) return r;
      auto del = s.db.prepare("DELETE FROM rotation_journal WHERE artifact = ? AND idx = ?");
      if (!del) return std::move(del).error();
      del->bind(1, id).bind(2, idx);
      if (auto r = del->run(); !r) return r;
      if (auto r = txn->commit(); !r) return r;
    }
  };
  if (auto r = finish_journal(); !r) return r;

  std::vector<std::byte> plain, sealed;
  for (;;) {
    std::string id;
    std::size_t idx = 0, file = 0;
    piece_row row;
    {
      auto st = s.db.prepare(
          "SELECT artifact, idx FROM pieces WHERE state = 2 AND key_version != ? ORDER BY artifact, idx LIMIT 1");
      if (!st) return std::move(st).error();
      st->bind(1, new_version);
      auto next = st->step();
      if (!next) return std::move(next).error();
      if (!*next) break;
      id = st->text(0);
      idx = static_cast<std::size_t>(st->int64(1));
    }
    auto r = s.load_piece(id, idx);
    if (!r) return std::move(r).error();
    row = std::move(*r);
    file = row.file;
    plain.resize(row.length);
    sealed.resize(row.length);
    auto old_dk = s.data_key_for(id, old_key, /*cache=*/false);
    auto new_dk = s.data_key_for(id, new_key, /*cache=*/false);
    if (!old_dk) return std::move(old_dk).error();
    if (!new_dk) return std::move(new_dk).error();
    auto path = s.data_file(id, file);
    auto fd = detail::open_read(path);
    if (!fd) return std::move(fd).error();
    if (auto rr = detail::pread_exact(fd->get(), plain, row.offset, path); !rr) return rr;
    store_detail::gcm open(store_detail::gcm::mode::open, **old_dk, store::impl::address(id, idx, row));
    open.update(plain, plain);
    // Only what was signed is carried over: a piece forged under the old key must not come out of
    // the rotation with a fresh, valid tag.
    if (!open.open_check(row.tag) || !digest_equal(hash(row.hash, plain).bytes(), row.digest)) {
      // Already corrupt: nothing to carry over. Drop it so a fetch or import brings it back.
      auto txn = transaction::begin(s.db);
      if (!txn) return std::move(txn).error();
      if (auto rr = s.set_piece_state(id, idx, state_stored, state_missing, row.generation); !rr) return rr;
      if (auto rr = txn->commit(); !rr) return rr;
      continue;
    }
    std::uint64_t generation = 0;
    {
      auto txn = transaction::begin(s.db);
      if (!txn) return std::move(txn).error();
      auto gen = s.next_generation();
      if (!gen) return std::move(gen).error();
      generation = *gen;
      if (auto rr = txn->commit(); !rr) return rr;
    }
    const auto nonce = store_detail::random_nonce();
    store_detail::gcm seal(store_detail::gcm::mode::seal, **new_dk,
                           {raw_id(id), static_cast<std::uint32_t>(file), idx, new_version, generation, nonce});
    seal.update(plain, sealed);
    auto tag = seal.seal_tag();
    sodium_memzero(plain.data(), plain.size());
    {
      auto txn = transaction::begin(s.db);
      if (!txn) return std::move(txn).error();
      auto ins = s.db.prepare(
          "INSERT OR REPLACE INTO rotation_journal(artifact, idx, key_version, generation, tag, ciphertext, nonce) "
          "VALUES (?, ?, ?, ?, ?, ?, ?)");
      if (!ins) return std::move(ins).error();
      ins->bind(1, id).bind(2, static_cast<std::int64_t>(idx)).bind(3, new_version)
          .bind(4, static_cast<std::int64_t>(generation)).bind_blob(5, tag).bind_blob_static(6, sealed)
          .bind_blob(7, nonce);
      if (auto rr = ins->run(); !rr) return rr;
      if (auto rr = txn->commit(); !rr) return rr;
    }
    if (auto rr = finish_journal(); !rr) return rr;
  }

  auto txn = transaction::begin(s.db);
  if (!txn) return std::move(txn).error();
  auto st = s.db.prepare(
      "UPDATE key_versions SET state = CASE WHEN version = ? THEN 'active' ELSE 'retired' END "
      "WHERE version = ? OR version = ?");
  if (!st) return std::move(st).error();
  st->bind(1, new_version).bind(2, new_version).bind(3, old_version);
  if (auto r = st->run(); !r) return r;
  if (auto r = txn->commit(); !r) return r;
  // The journal held whole pieces; give their pages back (best effort: another process may be
  // holding a read transaction open).
  (void)s.db.exec("VACUUM");
  metrics::global().store_key_rotations.add();
  detail::audit("store.key_rotated", {{"store", dir.string()}});
  return {};
}

}  // namespace drun

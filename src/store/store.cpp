// The encrypted piece store: opening, registering artifacts, what it holds, removal, GC, scrub.
// Writing pieces is in write.cpp, reading them in read.cpp, exports in export.cpp, key rotation in
// rotate.cpp; what they share (the index row, the locks, store::impl) in impl.hpp.
//
// Layout of a store directory (mode 0700):
//   index.sqlite                     the metadata index (WAL)
//   lock                             flock: shared for every operation, exclusive for rotate_key
//   init.lock                        flock: serializes opening (WAL switch, schema, key check)
//   artifacts/<id>/bundle.sig        the bundle as received (public metadata)
//   artifacts/<id>/lock              flock: shared by readers and writers, exclusive to remove
//   artifacts/<id>/data/<file>       one ciphertext file per model file, at plaintext offsets
#include "store/impl.hpp"

#include "detail/audit.hpp"
#include "detail/encoding.hpp"
#include "detail/log.hpp"

#include <drun/manifest.hpp>
#include <drun/sign.hpp>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <dirent.h>

namespace drun {

using namespace store_detail;

namespace {

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

// Every table's columns, as (table, column, type, not null, key) lines.
result<std::string> columns_of(database& db) {
  auto st = db.prepare(
      "SELECT m.name, p.name, p.type, p.\"notnull\", p.pk FROM sqlite_schema m, pragma_table_info(m.name) p "
      "WHERE m.type = 'table' ORDER BY m.name, p.cid");
  if (!st) return std::move(st).error();
  std::string out;
  if (auto r = st->each([&] {
        out += fmt::format("{} {} {} {} {}\n", st->text(0), st->text(1), st->text(2), st->int64(3), st->int64(4));
      });
      !r)
    return std::move(r).error();
  return out;
}

// The index's tables must be the ones drun makes. A flipped bit in the schema's text (a renamed
// column, say) passes SQLite's integrity check and would fail every later query obscurely.
result<void> check_schema(database& db, const std::filesystem::path& dir) {
  auto reference = database::open(":memory:");
  if (!reference) return std::move(reference).error();
  if (auto r = reference->exec(schema); !r) return std::move(r).error();
  for (const auto& c : added_columns)
    if (auto r = reference->exec(fmt::format("ALTER TABLE {} ADD COLUMN {}", c.table, c.definition).c_str()); !r)
      return std::move(r).error();
  auto want = columns_of(*reference);
  if (!want) return std::move(want).error();
  auto have = columns_of(db);
  if (!have) return std::move(have).error();
  if (*have != *want) return index_beyond_repair(dir, "its tables are not the ones drun makes");
  return {};
}

}  // namespace

namespace store_detail {

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

result<void> make_dir(const std::filesystem::path& p) {
  if (::mkdir(p.c_str(), 0700) != 0 && errno != EEXIST) return detail::sys_error("cannot create directory", p, errno);
  struct stat st {};
  if (::lstat(p.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return error(errc::io_error, "is not a directory").with_path(p.string());
  return check_owned(st, p, /*directory=*/true);
}

namespace {

// A damaged fingerprint in the index reads like another node key. A stored piece sealed under the
// active key that opens (its GCM tag checks) under `key` proves that key is the store's: returns
// that key version, or nothing when no such piece opens (then it is another key, or unprovable).
// Nothing is dropped on the way. Caller holds the open's transaction.
result<std::optional<std::uint32_t>> active_key_proven_by_a_piece(store::impl& s, const node_key& key) {
  auto st = s.db.prepare(
      "SELECT p.artifact, p.idx FROM pieces p JOIN key_versions k ON k.version = p.key_version "
      "WHERE p.state = ? AND k.state = 'active' ORDER BY p.length LIMIT 1");
  if (!st) return std::move(st).error();
  st->bind(1, state_stored);
  auto row = st->step();
  if (!row) return std::move(row).error();
  if (!*row) return std::optional<std::uint32_t>{};
  auto id = st->text(0);
  auto piece = static_cast<std::size_t>(st->int64(1));
  auto r = s.load_piece(id, piece);
  if (!r) return std::optional<std::uint32_t>{};
  auto dk = s.data_key_for(id, key, false);
  if (!dk) return std::move(dk).error();
  auto fd = open_owned(s.data_file(id, r->file), O_RDONLY, "cannot open");
  if (!fd) return std::optional<std::uint32_t>{};
  gcm g(gcm::mode::open, **dk, store::impl::address(id, piece, *r));
  std::vector<std::byte> chunk(static_cast<std::size_t>(std::min<std::uint64_t>(io_chunk, r->length)));
  for (std::uint64_t off = 0; off < r->length; off += chunk.size()) {
    auto part = std::span(chunk).first(static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), r->length - off)));
    if (!detail::pread_exact(fd->get(), part, r->offset + off, s.data_file(id, r->file))) {
      sodium_memzero(chunk.data(), chunk.size());
      return std::optional<std::uint32_t>{};
    }
    g.update(part, part);
  }
  sodium_memzero(chunk.data(), chunk.size());  // plaintext, never released
  if (!g.open_check(r->tag)) return std::optional<std::uint32_t>{};
  return std::optional<std::uint32_t>{r->key_version};
}

}  // namespace

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
  if (auto r = check_schema(p->db, dir); !r) return std::move(r).error();
  // The store id salts every data key, so two stores under one node key never share a nonce space.
  {
    auto st = p->db.prepare("SELECT value FROM meta WHERE key = 'store_id'");
    if (!st) return std::move(st).error();
    auto row = st->step();
    if (!row) return std::move(row).error();
    if (*row) {
      auto b = st->blob(0);
      if (b.size() != p->store_id.size()) return error(errc::model_mismatch, "store index is damaged (store id)");
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
    auto proven = pending_other ? result<std::optional<std::uint32_t>>(std::optional<std::uint32_t>{})
                                : active_key_proven_by_a_piece(*p, key);
    if (!proven) return std::move(proven).error();
    if (!*proven)
      return error(errc::key_error, "wrong key: this store was created with another node key").with_path(dir.string());
    // The key is the store's and its record in the index was damaged: the record is rewritten.
    auto fix = p->db.prepare("UPDATE key_versions SET fingerprint = ? WHERE version = ?");
    if (!fix) return std::move(fix).error();
    fix->bind(1, fp).bind(2, static_cast<std::int64_t>(**proven));
    if (auto r = fix->run(); !r) return std::move(r).error();
    p->key_version = **proven;
    detail::log(log_level::warning, "the store index's record of the node key was damaged; a stored piece proved the key, "
                "and the record was rewritten", {{"store", dir.string()}});
    detail::audit("store.key_record_repaired", {{"store", dir.string()}, {"key_version", **proven}});
  } else if (pending_other) {
    return error(errc::key_error, "a key rotation is incomplete: finish it with drun cache rotate-key")
        .with_path(dir.string());
  }
  if (auto r = txn->commit(); !r) return std::move(r).error();
  return p;
}

}  // namespace store_detail

store::store(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
store::~store() = default;
store::store(store&&) noexcept = default;
store& store::operator=(store&&) noexcept = default;

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
        return cleanup(detail::sys_error(fmt::format("cannot reserve {} bytes", size), path, e));
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
  auto b = impl_->stored_bundle(artifact);
  if (!b) return std::move(b).error();
  return std::move(b->first);
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
  std::vector<scrub_failure> failures;
  auto finding = [&](scrub_failure f) {
    metrics::global().store_scrub_findings.add();
    detail::audit("store.scrub_finding", {{"store", impl_->dir.string()}, {"artifact", f.artifact}, {"file", f.file},
                                          {"piece", f.piece}, {"reason", f.reason}});
    failures.push_back(std::move(f));
  };
  // The index first, then each artifact's rows against its signed manifest, then every piece.
  {
    std::lock_guard lock(impl_->db_mutex);
    auto repaired = impl_->check_index();
    if (!repaired) return std::move(repaired).error();
    if (*repaired) finding({"", "", 0, {}, "the store index's own indexes were damaged: rebuilt (REINDEX)"});
  }
  std::vector<std::string> ids;
  {
    std::lock_guard lock(impl_->db_mutex);
    auto st = impl_->db.prepare("SELECT id FROM artifacts WHERE (? IS NULL OR id = ?) ORDER BY id");
    if (!st) return std::move(st).error();
    if (artifact) st->bind(1, *artifact).bind(2, *artifact);
    if (auto r = st->each([&] { ids.push_back(st->text(0)); }); !r) return std::move(r).error();
  }
  for (const auto& id : ids) {
    // Held like a reader (rm and gc wait), and skipped if it was removed since it was listed.
    auto held = impl_->artifact_lock(id);
    if (!held) continue;
    ::flock(held->get(), LOCK_SH);
    if (!show(id)) continue;
    auto signed_bundle = impl_->stored_bundle(id);
    if (!signed_bundle) {
      finding({id, "", 0, {}, fmt::format("{}: `drun cache rm` it and fetch it again", signed_bundle.error().message())});
      continue;
    }
    const auto& layout = signed_bundle->second;
    std::lock_guard lock(impl_->db_mutex);
    auto damage = impl_->check_layout(id, layout);
    if (!damage) return std::move(damage).error();
    if (damage->none()) continue;
    if (auto r = impl_->repair_layout(id, layout, *damage); !r) return std::move(r).error();
    if (damage->hash_type)
      finding({id, "", 0, {}, "the index entry of the artifact's hash type was damaged: rewritten from the signed manifest"});
    if (damage->files)
      finding({id, "", 0, {}, fmt::format("the index's file list was damaged ({}): rewritten from the signed manifest",
                                          damage->first)});
    for (auto k : damage->pieces) {
      scrub_failure f{id, "", k, {},
                      fmt::format("piece {}'s index entry was damaged: reset from the signed manifest, to be fetched again", k)};
      if (k < layout.pieces.size()) {
        f.file = layout.files[layout.pieces[k].file].name;
        f.range = layout.pieces[k].range.value_or(byte_range{});
      }
      finding(std::move(f));
    }
  }
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
      if (!r && r.error().code() == errc::model_mismatch) {
        // The row cannot say how its piece was sealed (a damaged nonce, say): the piece is lost.
        auto drop = impl_->db.prepare("UPDATE pieces SET state = ? WHERE artifact = ? AND idx = ?");
        if (!drop) return std::move(drop).error();
        drop->bind(1, state_missing).bind(2, w.id).bind(3, static_cast<std::int64_t>(w.piece));
        if (auto d = drop->run(); !d) return std::move(d).error();
        finding({w.id, "", w.piece, {}, fmt::format("piece {}: {}; dropped from the store", w.piece, r.error().detail())});
        continue;
      }
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
      finding({w.id, row.file_name, w.piece, {row.offset, row.offset + row.length}, opened.error().detail()});
    }
  }
  sodium_memzero(buf.data(), buf.size());
  return failures;
}

}  // namespace drun

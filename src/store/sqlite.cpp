// SQLite RAII wrappers.
#include "store/sqlite.hpp"

#include <fmt/format.h>
#include <sqlite3.h>

#include <cerrno>

namespace drun::store_detail {

result<database> database::open(const std::filesystem::path& file) {
  database d;
  int rc = sqlite3_open_v2(file.c_str(), &d.db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOFOLLOW,
                           nullptr);
  if (rc != SQLITE_OK) return d.last_error("cannot open the store index");
  sqlite3_busy_timeout(d.db_, 60000);
  sqlite3_extended_result_codes(d.db_, 1);
  // WAL: readers never block the writer and a crash never corrupts the index. synchronous=FULL:
  // a committed "stored" survives power loss, since the piece bytes were fsynced before it.
  for (const char* pragma : {"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON"})
    if (auto r = d.exec(pragma); !r) return std::move(r).error();
  return d;
}

database::~database() {
  if (db_) sqlite3_close_v2(db_);
}

database& database::operator=(database&& o) noexcept {
  if (this != &o) {
    if (db_) sqlite3_close_v2(db_);
    db_ = o.db_;
    o.db_ = nullptr;
  }
  return *this;
}

namespace {

// One error for every failed SQLite call. A damaged file (a flipped bit, a torn page, a file that
// is not a database at all) is an integrity failure of the store, named with the index's path and
// what repairs it, rather than an opaque I/O error.
error index_error(sqlite3* db, int code, std::string_view what) {
  std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
  switch (code & 0xff) {
    case SQLITE_FULL: return error(errc::io_error, fmt::format("{}: {}", what, msg)).with_errno(ENOSPC);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: {
      const char* file = db ? sqlite3_db_filename(db, "main") : nullptr;
      auto damaged = fmt::format("the store index {} is damaged ({}): `drun cache verify` rebuilds what it can",
                                 file && *file ? file : "index.sqlite", msg);
      return error(errc::model_mismatch, what == "store index" ? damaged : fmt::format("{}: {}", what, damaged));
    }
    default: return error(errc::io_error, fmt::format("{}: {}", what, msg));
  }
}

}  // namespace

error database::last_error(std::string_view what) const {
  return index_error(db_, db_ ? sqlite3_errcode(db_) : SQLITE_CANTOPEN, what);
}

result<void> database::exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    auto e = last_error("store index");
    sqlite3_free(err);
    return e;
  }
  return {};
}

result<statement> database::prepare(std::string_view sql) {
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db_, sql.data(), static_cast<int>(sql.size()), &s, nullptr) != SQLITE_OK)
    return last_error("store index");
  return statement(s, db_);
}

statement::~statement() {
  if (stmt_) sqlite3_finalize(stmt_);
}

statement& statement::bind(int i, std::int64_t v) {
  sqlite3_bind_int64(stmt_, i, v);
  return *this;
}
statement& statement::bind(int i, std::string_view text) {
  sqlite3_bind_text(stmt_, i, text.data(), static_cast<int>(text.size()), SQLITE_TRANSIENT);
  return *this;
}
statement& statement::bind_blob(int i, std::span<const std::byte> blob) {
  sqlite3_bind_blob64(stmt_, i, blob.data(), blob.size(), SQLITE_TRANSIENT);
  return *this;
}

statement& statement::bind_blob_static(int i, std::span<const std::byte> blob) {
  sqlite3_bind_blob64(stmt_, i, blob.data(), blob.size(), SQLITE_STATIC);
  return *this;
}

result<bool> statement::step() {
  int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return index_error(db_, rc, "store index");
}

result<void> statement::run() {
  for (;;) {
    auto r = step();
    if (!r) return std::move(r).error();
    if (!*r) break;
  }
  reset();
  return {};
}

void statement::reset() {
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
}

std::int64_t statement::int64(int col) const { return sqlite3_column_int64(stmt_, col); }
std::string statement::text(int col) const {
  auto* p = sqlite3_column_text(stmt_, col);
  return p ? std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(sqlite3_column_bytes(stmt_, col)))
           : std::string();
}
std::span<const std::byte> statement::blob(int col) const {
  auto* p = static_cast<const std::byte*>(sqlite3_column_blob(stmt_, col));
  return {p, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, col))};
}
bool statement::is_null(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }

result<transaction> transaction::begin(database& db) {
  if (auto r = db.exec("BEGIN IMMEDIATE"); !r) return std::move(r).error();
  return transaction(&db);
}

transaction::~transaction() {
  if (db_) (void)db_->exec("ROLLBACK");
}

result<void> transaction::commit() {
  auto r = db_->exec("COMMIT");
  if (r) db_ = nullptr;
  return r;
}

}  // namespace drun::store_detail

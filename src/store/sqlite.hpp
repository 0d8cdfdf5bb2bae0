// A thin RAII layer over SQLite for the store's index: connections, prepared statements and
// IMMEDIATE transactions, with SQLite errors turned into drun errors.
#pragma once

#include <drun/error.hpp>

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

struct sqlite3;
struct sqlite3_stmt;

namespace drun::store_detail {

class statement;

class database {
 public:
  // Opens (creating) the file in WAL mode with a busy timeout, so concurrent processes wait
  // rather than fail. Errors: io_error.
  static result<database> open(const std::filesystem::path& file);
  database() = default;
  ~database();
  database(database&& o) noexcept : db_(o.db_) { o.db_ = nullptr; }
  database& operator=(database&& o) noexcept;

  result<void> exec(const char* sql);
  result<statement> prepare(std::string_view sql);
  error last_error(std::string_view what) const;
  sqlite3* handle() const noexcept { return db_; }

 private:
  sqlite3* db_ = nullptr;
};

class statement {
 public:
  statement(sqlite3_stmt* s, sqlite3* db) : stmt_(s), db_(db) {}
  ~statement();
  statement(statement&& o) noexcept : stmt_(o.stmt_), db_(o.db_) { o.stmt_ = nullptr; }
  statement& operator=(statement&&) = delete;

  statement& bind(int i, std::int64_t v);
  statement& bind(int i, std::string_view text);
  statement& bind_blob(int i, std::span<const std::byte> blob);
  // Binds without copying: blob must stay alive and unchanged until the statement is reset.
  statement& bind_blob_static(int i, std::span<const std::byte> blob);
  // Steps once: true when a row is available, false when done.
  result<bool> step();
  // Steps to completion (for statements that return no rows).
  result<void> run();
  // Calls on_row() for every row, with this statement positioned on it.
  template <class F>
  result<void> each(F&& on_row) {
    for (;;) {
      auto row = step();
      if (!row) return std::move(row).error();
      if (!*row) return {};
      on_row();
    }
  }
  void reset();

  std::int64_t int64(int col) const;
  std::string text(int col) const;
  std::span<const std::byte> blob(int col) const;
  bool is_null(int col) const;

 private:
  sqlite3_stmt* stmt_;
  sqlite3* db_;
};

// BEGIN IMMEDIATE ... COMMIT; rolls back when destroyed uncommitted.
class transaction {
 public:
  static result<transaction> begin(database& db);
  ~transaction();
  transaction(transaction&& o) noexcept : db_(o.db_) { o.db_ = nullptr; }
  transaction& operator=(transaction&&) = delete;
  result<void> commit();

 private:
  explicit transaction(database* db) : db_(db) {}
  database* db_;
};

}  // namespace drun::store_detail

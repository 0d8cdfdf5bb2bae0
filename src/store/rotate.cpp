// Key rotation: every stored piece re-sealed under a new node key, crash safe through a redo
// journal in the index.
#include "store/impl.hpp"

#include "detail/audit.hpp"

namespace drun {

using namespace store_detail;

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

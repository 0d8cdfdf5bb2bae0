// An artifact's layout in the index checked against (and repaired from) its signed manifest.
#include "store/impl.hpp"

#include "detail/audit.hpp"

#include <algorithm>

namespace drun {

using namespace store_detail;

result<std::pair<std::string, bundle_summary>> store::impl::stored_bundle(const std::string& id) const {
  auto text = read_bundle_file(artifact_dir(id) / "bundle.sig");
  if (!text) {
    if (text.error().code() == errc::not_found) return error(errc::not_found, fmt::format("no artifact {} in the store", id));
    return std::move(text).error();
  }
  // The file was verified when it came in; a swapped or damaged one is caught by its payload's hash.
  auto summary = inspect_bundle(*text);
  if (!summary || summary->artifact_id != id)
    return error(errc::model_mismatch, fmt::format("the stored bundle of {} does not match its id", id));
  return std::pair{std::move(*text), std::move(*summary)};
}

error store_detail::index_beyond_repair(const std::filesystem::path& store_dir, std::string_view what) {
  return error(errc::model_mismatch,
               fmt::format("the store index {} is damaged beyond what drun can rebuild ({}): `drun cache verify "
                           "--reset-index` sets it aside and starts the store empty (what it held is fetched or "
                           "imported again)",
                           (store_dir / "index.sqlite").string(), what));
}

result<std::filesystem::path> store::set_aside_index(const std::filesystem::path& dir) {
  const auto index = dir / "index.sqlite";
  if (!std::filesystem::exists(index)) return error(errc::not_found, "the store has no index").with_path(index.string());
  store_lock exclusive(dir, LOCK_EX);  // no operation of another process is halfway through it
  const auto aside = dir / fmt::format("index.sqlite.damaged-{}", now_seconds());
  for (const char* suffix : {"", "-wal", "-shm"}) {
    std::filesystem::path from = index.string() + suffix, to = aside.string() + suffix;
    if (::rename(from.c_str(), to.c_str()) != 0 && errno != ENOENT)
      return detail::sys_error("cannot set the damaged index aside", from, errno);
  }
  detail::audit("store.index_set_aside", {{"store", dir.string()}, {"as", aside.string()}});
  return aside;
}

namespace {

// The rows of PRAGMA integrity_check: {"ok"} for a sound index.
result<std::vector<std::string>> integrity_problems(database& db) {
  auto st = db.prepare("PRAGMA integrity_check(20)");
  if (!st) return std::move(st).error();
  std::vector<std::string> rows;
  if (auto r = st->each([&] { rows.push_back(st->text(0)); }); !r) return std::move(r).error();
  if (rows.size() == 1 && rows[0] == "ok") rows.clear();
  return rows;
}

}  // namespace

result<bool> store::impl::check_index() {
  auto problems = integrity_problems(db);
  if (!problems) return std::move(problems).error();
  if (problems->empty()) return false;
  auto first = problems->front();
  if (auto r = db.exec("REINDEX"); r) {
    auto again = integrity_problems(db);
    if (!again) return std::move(again).error();
    if (again->empty()) return true;
    first = again->front();
  }
  return index_beyond_repair(dir, first);
}

result<store::impl::layout_damage> store::impl::check_layout(const std::string& id, const bundle_summary& signed_layout) {
  layout_damage damage;
  auto note = [&](std::string what) {
    if (damage.first.empty()) damage.first = std::move(what);
  };
  // Every piece row is read with the artifact's hash type: a damaged one would fail them all.
  auto hs = db.prepare("SELECT hash_type FROM artifacts WHERE id = ?");
  if (!hs) return std::move(hs).error();
  hs->bind(1, id);
  auto hash_row = hs->each([&] {
    if (hs->text(0) != to_string(signed_layout.hash_type)) {
      damage.hash_type = true;
      note("its hash type is not the signed manifest's");
    }
  });
  if (!hash_row) return std::move(hash_row).error();
  auto fs = db.prepare("SELECT idx, name, size FROM files WHERE artifact = ? ORDER BY idx");
  if (!fs) return std::move(fs).error();
  fs->bind(1, id);
  std::size_t nfiles = 0;
  auto file_rows = fs->each([&] {
    auto idx = static_cast<std::size_t>(fs->int64(0));
    const auto& want = signed_layout.files;
    if (idx != nfiles || idx >= want.size() || fs->text(1) != want[idx].name ||
        static_cast<std::uint64_t>(fs->int64(2)) != want[idx].size.value_or(0)) {
      damage.files = true;
      note(fmt::format("file {} is not the signed manifest's", idx));
    }
    ++nfiles;
  });
  if (!file_rows) return std::move(file_rows).error();
  if (nfiles != signed_layout.files.size()) {
    damage.files = true;
    note(fmt::format("it lists {} files, the signed manifest {}", nfiles, signed_layout.files.size()));
  }
  const auto& want = signed_layout.pieces;
  std::vector<bool> seen(want.size(), false);
  auto ps = db.prepare("SELECT idx, file, offset, length, digest FROM pieces WHERE artifact = ? ORDER BY idx");
  if (!ps) return std::move(ps).error();
  ps->bind(1, id);
  auto piece_rows = ps->each([&] {
    auto raw = ps->int64(0);
    auto idx = static_cast<std::size_t>(raw);
    if (raw < 0 || idx >= want.size() || seen[idx]) {
      damage.pieces.push_back(static_cast<std::size_t>(raw));  // an extra row: repair deletes it
      note(fmt::format("it has a piece {} the signed manifest does not", raw));
      return;
    }
    seen[idx] = true;
    const auto& w = want[idx];
    auto digest = ps->blob(4);
    auto expected = w.expected.bytes();
    if (static_cast<std::size_t>(ps->int64(1)) != w.file || !w.range ||
        static_cast<std::uint64_t>(ps->int64(2)) != w.range->begin ||
        static_cast<std::uint64_t>(ps->int64(3)) != w.range->size() ||
        !std::equal(digest.begin(), digest.end(), expected.begin(), expected.end())) {
      damage.pieces.push_back(idx);
      note(fmt::format("piece {} is not where the signed manifest puts it", idx));
    }
  });
  if (!piece_rows) return std::move(piece_rows).error();
  for (std::size_t k = 0; k < want.size(); ++k)
    if (!seen[k]) {
      damage.pieces.push_back(k);
      note(fmt::format("piece {} is missing", k));
    }
  std::sort(damage.pieces.begin(), damage.pieces.end());
  damage.pieces.erase(std::unique(damage.pieces.begin(), damage.pieces.end()), damage.pieces.end());
  return damage;
}

result<void> store::impl::repair_layout(const std::string& id, const bundle_summary& signed_layout,
                                        const layout_damage& damage) {
  auto txn = transaction::begin(db);
  if (!txn) return std::move(txn).error();
  if (damage.hash_type) {
    auto up = db.prepare("UPDATE artifacts SET hash_type = ? WHERE id = ?");
    if (!up) return std::move(up).error();
    up->bind(1, to_string(signed_layout.hash_type)).bind(2, id);
    if (auto r = up->run(); !r) return r;
  }
  if (damage.files) {
    auto del = db.prepare("DELETE FROM files WHERE artifact = ?");
    if (!del) return std::move(del).error();
    del->bind(1, id);
    if (auto r = del->run(); !r) return r;
    auto ins = db.prepare("INSERT INTO files(artifact, idx, name, size) VALUES (?, ?, ?, ?)");
    if (!ins) return std::move(ins).error();
    for (std::size_t f = 0; f < signed_layout.files.size(); ++f) {
      ins->bind(1, id).bind(2, static_cast<std::int64_t>(f)).bind(3, signed_layout.files[f].name)
          .bind(4, static_cast<std::int64_t>(signed_layout.files[f].size.value_or(0)));
      if (auto r = ins->run(); !r) return r;
    }
  }
  // A damaged row loses what it said about its piece (tag, nonce, state): it comes back missing,
  // and the piece is fetched or imported again into its signed place.
  auto del = db.prepare("DELETE FROM pieces WHERE artifact = ? AND idx = ?");
  auto ins = db.prepare("INSERT INTO pieces(artifact, idx, file, offset, length, digest) VALUES (?, ?, ?, ?, ?, ?)");
  if (!del) return std::move(del).error();
  if (!ins) return std::move(ins).error();
  for (auto k : damage.pieces) {
    del->bind(1, id).bind(2, static_cast<std::int64_t>(k));
    if (auto r = del->run(); !r) return r;
    if (k >= signed_layout.pieces.size()) continue;
    const auto& p = signed_layout.pieces[k];
    if (!p.range) continue;  // files manifests are never stored (add_artifact refuses them)
    ins->bind(1, id).bind(2, static_cast<std::int64_t>(k)).bind(3, static_cast<std::int64_t>(p.file))
        .bind(4, static_cast<std::int64_t>(p.range->begin)).bind(5, static_cast<std::int64_t>(p.range->size()))
        .bind_blob(6, p.expected.bytes());
    if (auto r = ins->run(); !r) return r;
  }
  return txn->commit();
}

}  // namespace drun

// Sealing pieces into the store: each piece is checked (when streamed), sealed under a fresh nonce
// and written at its place; the index marks it stored only once its bytes are durable.
#include "store/impl.hpp"

#include <drun/manifest.hpp>

#include <algorithm>

namespace drun {

using namespace store_detail;

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

}  // namespace drun

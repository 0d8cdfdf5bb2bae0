// Reading the store: single pieces (checked, streamed or whole) and random access by file and
// offset for model loaders.
#include "store/impl.hpp"

#include "detail/thread_pool.hpp"

#include <algorithm>

namespace drun {

using namespace store_detail;

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
  auto signed_bundle = impl_->stored_bundle(artifact);
  if (!signed_bundle) return std::move(signed_bundle).error();
  auto p = std::make_unique<artifact_reader::impl>();
  p->s = impl_;
  p->id = artifact;
  p->files = d->files;
  p->artifact_lock = std::move(*l);
  {
    std::lock_guard lock(impl_->db_mutex);
    // What a reader serves is laid out as signed: a damaged index fails here, never as a short file.
    auto damage = impl_->check_layout(artifact, signed_bundle->second);
    if (!damage) return std::move(damage).error();
    if (!damage->none())
      return error(errc::model_mismatch,
                   fmt::format("the store index disagrees with the signed manifest of {} ({}): the index is damaged; "
                               "`drun cache verify` repairs it, then import or fetch again",
                               artifact.substr(0, 12), damage->first));
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

}  // namespace drun

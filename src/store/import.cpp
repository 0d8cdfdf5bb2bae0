// Importing a local model into the store: read, check against the signed digest, seal, in
// parallel with bounded memory, committed in groups.
#include <drun/store.hpp>

#include "detail/audit.hpp"
#include "detail/file.hpp"
#include "detail/thread_pool.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <mutex>

namespace drun {

result<import_report> import_model(store& s, const verified_manifest& m, std::string_view bundle_json,
                                   const std::filesystem::path& model, unsigned threads,
                                   const progress_callback& progress) {
  if (auto r = s.add_artifact(m, bundle_json); !r) return std::move(r).error();
  auto plan = s.missing(m);
  if (!plan) return std::move(plan).error();
  // Group commit: pieces become durable and stored a batch at a time, not one fdatasync each.
  auto batch = s.begin_batch(m);
  if (!batch) return std::move(batch).error();
  import_report report;
  report.already_stored = plan->already_stored;
  const std::vector<std::size_t>& todo = plan->indices;
  const std::uint64_t total = plan->bytes;
  // Pieces are streamed: each thread holds two 1 MiB buffers, whatever the piece size.
  unsigned workers = detail::worker_count(threads, todo.size());
  std::mutex mutex;
  std::optional<error> first_failure, fatal;
  std::size_t first_failure_piece = SIZE_MAX;
  std::atomic<std::size_t> sealed{0}, failed{0};
  std::atomic<std::uint64_t> done{0};
  detail::parallel_for(todo.size(), workers, [&](std::size_t t, unsigned) {
    std::size_t index = todo[t];
    const auto& piece = m.pieces()[index];
    const auto& file = m.files()[piece.file];
    auto path = file.name == "." ? model : model / file.name;
    auto stop = [&](error e) {
      std::lock_guard lock(mutex);
      if (!fatal) fatal = std::move(e);
      return false;
    };
    auto failure = [&](error e) {
      failed.fetch_add(1);
      std::lock_guard lock(mutex);
      if (index < first_failure_piece) {
        first_failure_piece = index;
        first_failure = std::move(e);
      }
      return true;
    };
    auto fd = detail::open_read(path, m.allow_symlinks());
    if (!fd) return stop(std::move(fd).error());
    bool short_file = false;
    auto put = batch->put_streamed(index, [&](std::span<std::byte> chunk, std::uint64_t offset) -> result<void> {
      auto r = detail::pread_exact(fd->get(), chunk, piece.range->begin + offset, path);
      if (!r && r.error().sys_errno() == 0) short_file = true;
      return r;
    });
    if (!put) {
      // A file shorter than signed, or bytes that differ from the signature: the model does not
      // match. Anything else (the store, the disk) stops the import.
      if (short_file)
        return failure(error(errc::model_mismatch, "the file is shorter than signed")
                           .with_path(file.name)
                           .with_range(piece.range->begin, piece.range->end));
      if (put.error().code() == errc::digest_mismatch) return failure(std::move(put).error());
      return stop(std::move(put).error());
    }
    if (*put) sealed.fetch_add(1);
    std::uint64_t now = done.fetch_add(piece.range->size()) + piece.range->size();
    if (progress) progress(now, total);
    return true;
  });
  if (fatal) return std::move(*fatal);
  if (auto r = batch->commit(); !r) return std::move(r).error();
  report.stored = sealed.load();
  report.failed = failed.load();
  if (first_failure) {
    std::string detail = first_failure->detail();
    if (report.failed > 1) detail += fmt::format(" (and {} more pieces failed)", report.failed - 1);
    error e(first_failure->code(), std::move(detail));
    e.with_path(first_failure->path());
    if (auto r = first_failure->range()) e.with_range(r->first, r->second);
    detail::audit("store.import_failed", {{"artifact", m.artifact_id()}, {"model", model.string()},
                                          {"pieces_sealed", report.stored}, {"pieces_failed", report.failed},
                                          {"error", e.message()}});
    return e;
  }
  detail::audit("store.imported", {{"artifact", m.artifact_id()}, {"subject", m.subject_name()}, {"model", model.string()},
                                   {"pieces_sealed", report.stored}, {"pieces_already_stored", report.already_stored}});
  return report;
}

}  // namespace drun

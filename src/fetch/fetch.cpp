// The fetch session: parallel piece downloads, each checked against the signed manifest before
// it is sealed, with retries across sources and bounded memory.
#include <drun/fetch.hpp>

#include "detail/thread_pool.hpp"

#include <fmt/format.h>
#include <sodium.h>

#include <algorithm>
#include <mutex>
#include <random>
#include <thread>

namespace drun {

result<fetch_report> fetch(store& s, const verified_manifest& m, std::string_view bundle_json,
                           const std::vector<std::unique_ptr<source>>& sources, const fetch_options& options) {
  if (sources.empty()) return error(errc::invalid_argument, "no sources to fetch from");
  if (auto r = s.add_artifact(m, bundle_json); !r) return std::move(r).error();
  auto plan = s.missing(m);
  if (!plan) return std::move(plan).error();
  fetch_report report;
  for (const auto& src : sources) report.sources.push_back({src->name()});
  report.already_stored = plan->already_stored;
  const std::vector<std::size_t>& todo = plan->indices;
  const std::uint64_t total = plan->bytes;
  // One piece buffer per worker: the budget bounds memory whatever the model size.
  std::uint64_t piece = std::max<std::uint64_t>(1, m.shard_size());
  unsigned workers = std::max<unsigned>(1, std::min<unsigned>(options.connections,
                                                               static_cast<unsigned>(options.memory_budget / piece)));
  workers = detail::worker_count(workers, todo.size());

  std::mutex mutex;
  std::optional<error> fatal, failed_piece;
  std::atomic<std::uint64_t> done{0};
  std::atomic<std::size_t> fetched{0};
  std::vector<std::vector<std::byte>> buffers(workers);
  auto cancelled = [&] { return options.cancel && options.cancel->load(); };
  // Sleeps until `until`, waking early when the fetch is cancelled.
  auto nap = [&](std::chrono::steady_clock::time_point until) {
    while (!cancelled()) {
      auto now = std::chrono::steady_clock::now();
      if (now >= until) return;
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(until - now, std::chrono::milliseconds(50)));
    }
  };
  // Bandwidth limit: the session may have received at most rate * elapsed bytes; a worker that is
  // ahead sleeps until the bytes it holds are due.
  const auto start = std::chrono::steady_clock::now();
  std::atomic<std::uint64_t> received{0};
  auto pace = [&](std::uint64_t n) {
    if (!options.max_bytes_per_second) return;
    auto total_received = received.fetch_add(n) + n;
    nap(start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(
                    static_cast<double>(total_received) / static_cast<double>(options.max_bytes_per_second))));
  };
  auto report_progress = [&](std::uint64_t bytes_done, std::size_t pieces_done) {
    if (!options.progress) return;
    fetch_progress p{bytes_done, total, pieces_done, todo.size(), 0, 0};
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (secs > 0) p.bytes_per_second = static_cast<double>(bytes_done) / secs;
    if (p.bytes_per_second > 0) p.seconds_left = static_cast<double>(total - bytes_done) / p.bytes_per_second;
    options.progress(p);
  };
  detail::parallel_for(todo.size(), workers, [&](std::size_t t, unsigned w) {
    if (cancelled()) return false;
    std::size_t index = todo[t];
    const auto& mp = m.pieces()[index];
    const auto& name = m.files()[mp.file].name;
    auto& buf = buffers[w];
    buf.resize(mp.range->size());
    std::mt19937_64 rng(index * 0x9e3779b97f4a7c15ull + w);
    std::optional<error> last;
    bool mismatch_seen = false;
    auto backoff = options.first_backoff;
    for (unsigned attempt = 0; attempt < options.attempts_per_piece; ++attempt) {
      // Spread pieces over the sources, and move to the next source on every retry.
      std::size_t k = (index + attempt) % sources.size();
      auto got = sources[k]->fetch(name, *mp.range, buf, options.cancel);
      if (cancelled()) break;
      if (got) {
        pace(buf.size());
        auto verified = m.check_piece(index, buf);
        if (verified) {
          auto put = s.put_piece(m, *verified);
          if (!put) {
            std::lock_guard lock(mutex);
            if (!fatal) fatal = std::move(put).error();
            return false;
          }
          std::lock_guard lock(mutex);
          report.sources[k].pieces += 1;
          report.sources[k].bytes += buf.size();
          report_progress(done.fetch_add(buf.size()) + buf.size(), fetched.fetch_add(1) + 1);
          return true;
        }
        // Bytes that do not match the signature are charged to the source that sent them.
        mismatch_seen = true;
        std::lock_guard lock(mutex);
        report.sources[k].rejected += 1;
        last = error(errc::digest_mismatch, fmt::format("{} digest mismatch in what {} sent",
                                                        to_string(m.hash_type()), sources[k]->name()))
                   .with_path(name)
                   .with_range(mp.range->begin, mp.range->end);
      } else {
        std::lock_guard lock(mutex);
        report.sources[k].errors += 1;
        last = std::move(got).error();
      }
      if (attempt + 1 == options.attempts_per_piece) break;
      // Exponential backoff with jitter, so retries from many workers do not arrive together.
      auto jitter = std::chrono::milliseconds(rng() % static_cast<std::uint64_t>(backoff.count() + 1));
      nap(std::chrono::steady_clock::now() + backoff / 2 + jitter / 2);
      backoff *= 2;
    }
    sodium_memzero(buf.data(), buf.size());
    if (cancelled()) return false;
    std::lock_guard lock(mutex);
    if (!failed_piece || mismatch_seen) {
      std::string detail = fmt::format("piece {} failed from every source after {} attempts: {}", index,
                                       options.attempts_per_piece, last ? last->message() : "no attempt");
      failed_piece = error(mismatch_seen ? errc::digest_mismatch : errc::io_error, std::move(detail))
                         .with_path(name)
                         .with_range(mp.range->begin, mp.range->end);
    }
    return true;  // other pieces go on: what verifies is kept for the next run
  });
  for (auto& b : buffers) sodium_memzero(b.data(), b.size());
  if (fatal) return std::move(*fatal);
  if (cancelled())
    return error(errc::cancelled, fmt::format("the fetch was cancelled after storing {} of {} pieces; run it again to "
                                              "fetch the rest", fetched.load(), todo.size()));
  report.fetched = fetched.load();
  report.bytes = done.load();
  if (failed_piece) return std::move(*failed_piece);
  return report;
}

}  // namespace drun

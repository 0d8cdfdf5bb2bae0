// The fetch session: a scheduler hands pieces to workers (peers first, rarest first; origins for
// what no peer holds), each piece is checked against the signed manifest before it is sealed,
// and failures are charged to the source that caused them.
#include <drun/fetch.hpp>

#include "detail/audit.hpp"
#include "detail/log.hpp"
#include "detail/thread_pool.hpp"
#include "metrics/registry.hpp"

#include <drun/trace.hpp>

#include <fmt/format.h>
#include <sodium.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

namespace drun {
namespace {

using clock = std::chrono::steady_clock;

enum class piece_state { pending, in_flight, done, failed };

struct piece_slot {
  piece_state state = piece_state::pending;
  unsigned attempts = 0;               // origin failures and digest mismatches
  clock::time_point not_before{};      // backoff after an origin failure
  std::chrono::milliseconds backoff{};
  std::optional<error> last;
};

struct source_slot {
  bool peer = false;
  bool usable = true;                  // false once banned or dropped
  unsigned in_flight = 0;
  unsigned consecutive_errors = 0;
  std::vector<bool> have;              // peers: what they announced
  std::vector<bool> refused;           // pieces it announced, then said it does not hold
  std::string last_error;              // why it was last refused or failed
  errc last_code = errc::io_error;
  // A peer at its limits says so (errc::busy): it is asked again after a backoff, and its refusals
  // count as failures only once it has been busy for longer than peer_wait. Anyone can make a
  // peer busy for a while (connections are cheap), and that must not cost its callers the peer.
  clock::time_point busy_until{}, busy_since{};
  std::chrono::milliseconds busy_backoff{0};
};

constexpr unsigned max_peer_errors = 3;  // a peer failing this often in a row is dropped

}  // namespace

namespace {

metrics::source_kind kind_of(const source& src) {
  if (!src.is_peer()) return metrics::source_kind::origin;
  return src.carried_by_rdma() ? metrics::source_kind::rdma : metrics::source_kind::peer;
}

result<fetch_report> fetch_session(store& s, const verified_manifest& m, std::string_view bundle_json,
                                   const std::vector<std::unique_ptr<source>>& sources, const fetch_options& options) {
  auto& counts = metrics::global();
  if (sources.empty()) return error(errc::invalid_argument, "no sources to fetch from");
  if (auto r = s.add_artifact(m, bundle_json); !r) return std::move(r).error();
  auto plan = s.missing(m);
  if (!plan) return std::move(plan).error();
  // With an output directory, each verified piece is also written there as it arrives (one pass
  // per byte); commit() brings what was already stored and moves the files into place.
  std::optional<export_writer> out;
  if (!options.out.empty()) {
    auto w = s.begin_export(m.artifact_id(), options.out, options.out_modes);
    if (!w) return std::move(w).error();
    out.emplace(std::move(*w));
  }
  fetch_report report;
  const std::size_t piece_count = m.pieces().size();
  std::vector<source_slot> src(sources.size());
  bool any_origin = false, any_peer = false;
  for (std::size_t k = 0; k < sources.size(); ++k) {
    report.sources.push_back({sources[k]->name()});
    src[k].peer = report.sources[k].peer = sources[k]->is_peer();
    (src[k].peer ? any_peer : any_origin) = true;
  }
  report.already_stored = plan->already_stored;
  const std::vector<std::size_t>& todo = plan->indices;
  const std::uint64_t total = plan->bytes;
  std::vector<piece_slot> slots(todo.size());
  for (auto& sl : slots) sl.backoff = options.first_backoff;
  // Ties in rarity are broken by a per-session shuffle, so nodes started together ask for
  // different pieces first and can trade them.
  std::vector<std::size_t> order(todo.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::mt19937_64 shuffle_rng(randombytes_random());
  std::shuffle(order.begin(), order.end(), shuffle_rng);

  std::uint64_t piece = std::max<std::uint64_t>(1, m.shard_size());
  unsigned workers = std::max<unsigned>(1, std::min<unsigned>(options.connections,
                                                               static_cast<unsigned>(options.memory_budget / piece)));
  workers = detail::worker_count(workers, todo.size());

  std::mutex mutex;
  std::condition_variable changed;
  std::optional<error> fatal;
  std::size_t remaining = todo.size();  // pending or in flight
  std::uint64_t done_bytes = 0;
  std::size_t done_pieces = 0;
  clock::time_point last_refresh{}, last_progress = clock::now();
  bool refreshing = false;

  auto cancelled = [&] { return options.cancel && options.cancel->load(); };
  auto nap = [&](clock::time_point until) {
    while (!cancelled()) {
      auto now = clock::now();
      if (now >= until) return;
      std::this_thread::sleep_for(std::min<clock::duration>(until - now, std::chrono::milliseconds(50)));
    }
  };
  const auto start = clock::now();
  std::atomic<std::uint64_t> received{0};
  auto pace = [&](std::uint64_t n) {
    if (!options.max_bytes_per_second) return;
    auto total_received = received.fetch_add(n) + n;
    nap(start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(
                    static_cast<double>(total_received) / static_cast<double>(options.max_bytes_per_second))));
  };
  auto report_progress = [&] {  // under the mutex
    if (!options.progress) return;
    fetch_progress p{done_bytes, total, done_pieces, todo.size(), 0, 0};
    double secs = std::chrono::duration<double>(clock::now() - start).count();
    if (secs > 0) p.bytes_per_second = static_cast<double>(done_bytes) / secs;
    if (p.bytes_per_second > 0) p.seconds_left = static_cast<double>(total - done_bytes) / p.bytes_per_second;
    options.progress(p);
  };
  auto finish = [&](std::size_t t, piece_state st) {  // under the mutex
    slots[t].state = st;
    --remaining;
    changed.notify_all();
  };
  auto drop_source = [&](std::size_t k, bool banned) {  // under the mutex
    if (src[k].usable) {  // once per peer
      (banned ? counts.peers_banned : counts.peers_dropped).add();
      detail::log(log_level::warning,
                  banned ? "peer banned for this fetch: it sent bytes that do not match the signed digest"
                         : "peer dropped for this fetch",
                  {{"peer", sources[k]->name()}, {"artifact", m.artifact_id()},
                   {"reason", banned ? std::string("digest mismatch") : src[k].last_error}});
    }
    src[k].usable = false;
    (banned ? report.sources[k].banned : report.sources[k].dropped) = true;
    changed.notify_all();
  };
  // A peer's failure (under the mutex): busy is a backoff, denial a drop, the rest count up.
  auto peer_failed = [&](std::size_t k, errc code) {
    auto& x = src[k];
    if (code == errc::busy) {
      auto now = clock::now();
      if (x.busy_backoff.count() == 0) x.busy_since = now;
      x.busy_backoff = std::clamp(x.busy_backoff * 2, std::chrono::milliseconds(100), std::chrono::milliseconds(2000));
      x.busy_until = now + x.busy_backoff;
      if (now - x.busy_since > options.peer_wait) drop_source(k, false);
    } else if (code == errc::permission_denied || ++x.consecutive_errors >= max_peer_errors) {
      drop_source(k, false);
    }
  };
  // Asks every usable peer what it holds; called without the mutex, by one worker at a time.
  auto refresh = [&] {
    std::vector<std::pair<std::size_t, result<std::optional<std::vector<bool>>>>> answers;
    for (std::size_t k = 0; k < sources.size(); ++k) {
      {
        std::lock_guard lock(mutex);
        if (!src[k].peer || !src[k].usable) continue;
      }
      answers.emplace_back(k, sources[k]->holdings(m.artifact_id(), piece_count, options.cancel));
    }
    std::lock_guard lock(mutex);
    for (auto& [k, a] : answers) {
      if (a && *a) {
        // Pieces a peer announced and then refused to send are not believed again: a peer that
        // keeps announcing what it will not serve must not hold the fetch up.
        auto& have = **a;
        for (std::size_t i = 0; i < have.size() && i < src[k].refused.size(); ++i)
          if (src[k].refused[i]) have[i] = false;
        src[k].have = std::move(have);
      } else if (!a && a.error().code() == errc::not_found) {
        src[k].have.clear();  // it does not have the artifact (yet): it holds nothing
      } else if (!a) {
        report.sources[k].errors += 1;
        src[k].last_error = a.error().message();
        src[k].last_code = a.error().code();
        peer_failed(k, a.error().code());
      }
    }
    last_refresh = clock::now();
    refreshing = false;
    changed.notify_all();
  };

  // Picks the next (piece, source), or waits. Returns false when the worker should stop.
  auto pick = [&](std::unique_lock<std::mutex>& lock, std::size_t& t_out, std::size_t& k_out) -> bool {
    for (;;) {
      if (cancelled() || fatal || remaining == 0) return false;
      auto now = clock::now();
      if (any_peer && !refreshing && now - last_refresh >= options.peer_refresh) {
        refreshing = true;
        lock.unlock();
        refresh();
        lock.lock();
        continue;
      }
      // Until the peers have answered once, nothing is known to be on a peer: wait rather than
      // send everything to the origins.
      if (any_peer && last_refresh == clock::time_point{}) {
        changed.wait_for(lock, options.peer_refresh);
        continue;
      }
      // Rarest first among pieces some usable peer holds and has room for.
      std::size_t best_t = SIZE_MAX, best_k = SIZE_MAX, best_rarity = SIZE_MAX;
      bool waiting_for_peer = false, any_pending = false;
      for (std::size_t t : order) {
        if (slots[t].state != piece_state::pending) continue;
        any_pending = true;
        std::size_t index = todo[t], holders = 0, k_free = SIZE_MAX;
        for (std::size_t k = 0; k < src.size(); ++k) {
          if (!src[k].peer || !src[k].usable || index >= src[k].have.size() || !src[k].have[index]) continue;
          ++holders;
          if (src[k].busy_until > now) continue;  // a busy holder is waited for, not replaced
          if (src[k].in_flight < options.per_peer && (k_free == SIZE_MAX || src[k].in_flight < src[k_free].in_flight))
            k_free = k;
        }
        if (holders == 0) continue;
        if (k_free == SIZE_MAX) {
          waiting_for_peer = true;
          continue;
        }
        if (holders < best_rarity) best_t = t, best_k = k_free, best_rarity = holders;
      }
      if (best_t != SIZE_MAX) {
        t_out = best_t, k_out = best_k;
        return true;
      }
      // Origins take what no peer holds, once its backoff has passed.
      if (any_origin) {
        clock::time_point soonest = clock::time_point::max();
        for (std::size_t t : order) {
          auto& sl = slots[t];
          if (sl.state != piece_state::pending) continue;
          std::size_t index = todo[t];
          bool held = false;
          for (std::size_t k = 0; k < src.size() && !held; ++k)
            held = src[k].peer && src[k].usable && index < src[k].have.size() && src[k].have[index];
          if (held) continue;
          if (!options.origin_owners.empty()) {
            // Another node's share: wait for it to bring the piece, unless it is gone or late.
            std::size_t owner = options.origin_owners[index % options.origin_owners.size()];
            if (owner != fetch_self && owner < src.size() && src[owner].usable && now - start < options.peer_wait) {
              waiting_for_peer = true;
              continue;
            }
          }
          if (sl.not_before > now) {
            soonest = std::min(soonest, sl.not_before);
            continue;
          }
          // Spread pieces over the origins, and move to the next origin on every retry.
          std::vector<std::size_t> origins;
          for (std::size_t k = 0; k < src.size(); ++k)
            if (!src[k].peer) origins.push_back(k);
          std::size_t k = origins[(index + sl.attempts) % origins.size()];
          // In a swarm, one piece at a time per origin: the origin's link is shared by every
          // member, and a piece finished early is a piece the others can start trading.
          if (!options.origin_owners.empty() && src[k].in_flight >= 1) {
            waiting_for_peer = true;
            break;
          }
          t_out = t, k_out = k;
          return true;
        }
        if (soonest != clock::time_point::max()) {
          changed.wait_until(lock, std::min(soonest, now + options.peer_refresh));
          continue;
        }
      }
      // Nothing to start: a worker that would idle asks the peers again sooner (a tenth of the
      // refresh period), so pieces that appear are picked up quickly.
      bool idle_refresh = any_peer && any_pending && !refreshing && now - last_refresh >= options.peer_refresh / 10;
      if (idle_refresh) {
        last_refresh = now - options.peer_refresh;  // due: the next pass refreshes
        continue;
      }
      if (!any_pending || waiting_for_peer) {
        changed.wait_for(lock, options.peer_refresh / 10);
        continue;
      }
      // Pieces that no usable source holds: wait for peers to get them, for a while.
      bool peers_left = std::any_of(src.begin(), src.end(), [](const source_slot& x) { return x.peer && x.usable; });
      if (!peers_left || now - last_progress > options.peer_wait) {
        for (std::size_t t = 0; t < slots.size(); ++t) {
          if (slots[t].state != piece_state::pending) continue;
          if (!slots[t].last) {
            std::string why = peers_left ? fmt::format("no peer has held it for {} ms", options.peer_wait.count())
                                         : std::string("no usable source holds it");
            for (const auto& x : src)
              if (!x.last_error.empty()) why += "; " + x.last_error;
            // Every source refused us: an authorization failure (exit 4), not a network one.
            auto code = std::all_of(src.begin(), src.end(), [](const source_slot& x) {
              return x.last_code == errc::permission_denied;
            }) ? errc::permission_denied : errc::io_error;
            slots[t].last = error(code, std::move(why));
          }
          finish(t, piece_state::failed);
        }
        continue;
      }
      changed.wait_for(lock, options.peer_refresh);
    }
  };

  std::vector<std::vector<std::byte>> buffers(workers);
  const trace_context* trace = detail::current_trace();  // the fetch's, for the workers' messages
  detail::parallel_for(workers, workers, [&](std::size_t, unsigned w) {
    detail::trace_scope in_trace(trace);
    std::mt19937_64 rng(randombytes_random() + w);
    auto& buf = buffers[w];
    std::unique_lock lock(mutex);
    std::size_t t = 0, k = 0;
    while (pick(lock, t, k)) {
      auto& sl = slots[t];
      sl.state = piece_state::in_flight;
      src[k].in_flight++;
      const std::size_t index = todo[t];
      const auto& mp = m.pieces()[index];
      const auto& name = m.files()[mp.file].name;
      lock.unlock();

      buf.resize(mp.range->size());
      piece_request req{m.artifact_id(), name, mp.file, index, *mp.range};
      auto got = sources[k]->fetch(req, buf, options.cancel);
      std::optional<result<verified_piece>> verified;
      result<bool> put = false;
      if (got && !cancelled()) {
        pace(buf.size());
        verified.emplace(m.check_piece(index, std::move(buf)));
        if (*verified) {
          put = s.put_piece(m, **verified);
          if (put && out)
            if (auto written = out->write(**verified); !written) put = std::move(written).error();
          buf = std::move(**verified).release();  // the buffer serves the next piece
        }
      }
      sodium_memzero(buf.data(), buf.size());

      lock.lock();
      src[k].in_flight--;
      changed.notify_all();
      auto& tally = report.sources[k];
      if (cancelled()) {
        sl.state = piece_state::pending;
        break;
      }
      if (got && *verified && put) {
        const auto kind = kind_of(*sources[k]);
        counts.fetch_pieces[kind].add();
        counts.fetch_bytes[kind].add(mp.range->size());
        tally.pieces += 1;
        tally.bytes += mp.range->size();
        src[k].consecutive_errors = 0;
        src[k].busy_backoff = std::chrono::milliseconds(0);
        done_bytes += mp.range->size();
        done_pieces += 1;
        last_progress = clock::now();
        if (log_enabled(log_level::debug))
          detail::log(log_level::debug, "piece stored", {{"source", sources[k]->name()}, {"piece", index}, {"bytes", mp.range->size()}});
        finish(t, piece_state::done);
        report_progress();
        continue;
      }
      if (got && *verified && !put) {  // the store failed: nothing else can succeed
        if (!fatal) fatal = std::move(put).error();
        break;
      }
      sl.state = piece_state::pending;
      bool charge_piece = !src[k].peer;
      if (got) {
        // Bytes that do not match the signature are charged to the source that sent them; a peer
        // that sends one is banned for the session.
        tally.rejected += 1;
        counts.fetch_rejected[kind_of(*sources[k])].add();
        detail::log(log_level::warning, "piece rejected: its bytes do not match the signed digest",
                    {{"source", sources[k]->name()}, {"artifact", m.artifact_id()}, {"piece", index}, {"file", name}});
        sl.last = error(errc::digest_mismatch, fmt::format("{} digest mismatch in what {} sent",
                                                           to_string(m.hash_type()), sources[k]->name()))
                      .with_path(name)
                      .with_range(mp.range->begin, mp.range->end)
                      .with_source(sources[k]->name());
        if (src[k].peer) drop_source(k, true);
        charge_piece = true;
      } else {
        tally.errors += 1;
        auto code = got.error().code();
        src[k].last_error = got.error().message();
        src[k].last_code = code;
        sl.last = std::move(got).error().with_source(sources[k]->name());
        if (src[k].peer) {
          // A peer that no longer holds the piece is fine; one that refuses us or keeps failing
          // is dropped, and its pieces go elsewhere.
          if (code == errc::not_found && index < src[k].have.size()) {
            src[k].have[index] = false;
            if (src[k].refused.size() < src[k].have.size()) src[k].refused.resize(src[k].have.size());
            src[k].refused[index] = true;
          } else {
            peer_failed(k, code);
          }
        }
      }
      if (charge_piece && ++sl.attempts >= options.attempts_per_piece) {
        finish(t, piece_state::failed);
        continue;
      }
      counts.fetch_retries.add();
      if (!src[k].peer) {
        // Exponential backoff with jitter, so retries from many workers do not arrive together.
        auto jitter = std::chrono::milliseconds(rng() % static_cast<std::uint64_t>(sl.backoff.count() + 1));
        sl.not_before = clock::now() + sl.backoff / 2 + jitter / 2;
        sl.backoff *= 2;
      }
    }
    return true;
  });
  for (auto& b : buffers) sodium_memzero(b.data(), b.size());
  if (fatal) return std::move(*fatal);
  report.fetched = done_pieces;
  report.bytes = done_bytes;
  if (cancelled())
    return error(errc::cancelled, fmt::format("the fetch was cancelled after storing {} of {} pieces; run it again to "
                                              "fetch the rest", done_pieces, todo.size()));
  // The first failed piece names the failure; a mismatch (integrity) outranks a network failure.
  const piece_slot* worst = nullptr;
  std::size_t worst_t = 0;
  for (std::size_t t = 0; t < slots.size(); ++t) {
    if (slots[t].state != piece_state::failed) continue;
    bool mismatch = slots[t].last && slots[t].last->code() == errc::digest_mismatch;
    if (!worst || (mismatch && !(worst->last && worst->last->code() == errc::digest_mismatch))) worst = &slots[t], worst_t = t;
  }
  if (worst) {
    std::size_t index = todo[worst_t];
    const auto& mp = m.pieces()[index];
    errc code = worst->last ? worst->last->code() : errc::io_error;
    if (code != errc::digest_mismatch && code != errc::permission_denied) code = errc::io_error;
    return error(code, worst->attempts ? fmt::format("piece {} failed from every source after {} attempts: {}", index,
                                                     worst->attempts, worst->last->message())
                                       : fmt::format("piece {}: {}", index,
                                                     worst->last ? worst->last->message() : "no source delivered it"))
        .with_path(m.files()[mp.file].name)
        .with_range(mp.range->begin, mp.range->end)
        .with_source(worst->last ? worst->last->source() : std::string())
        .with_piece(index);
  }
  if (out)
    if (auto r = out->commit(); !r) return std::move(r).error();
  return report;
}

}  // namespace

result<fetch_report> fetch(store& s, const verified_manifest& m, std::string_view bundle_json,
                           const std::vector<std::unique_ptr<source>>& sources, const fetch_options& options) {
  // The fetch's span: a child of the caller's trace (options, else the thread's), or a new trace. Every message about this
  // fetch, here and on the peers it asks (they read it from the HELLO), carries its trace id.
  const trace_context* caller = detail::current_trace();
  trace_context trace = caller ? caller->child() : trace_context::fresh();
  if (!options.traceparent.empty()) {
    auto parent = trace_context::parse(options.traceparent);
    if (!parent) return std::move(parent).error();
    trace = parent->child();
  }
  detail::trace_scope in_trace(&trace);
  detail::log(log_level::info, "fetch started",
              {{"artifact", m.artifact_id()}, {"subject", m.subject_name()}, {"sources", sources.size()}});
  const auto start = clock::now();
  auto r = fetch_session(s, m, bundle_json, sources, options);
  const double seconds = std::chrono::duration<double>(clock::now() - start).count();
  auto& counts = metrics::global();
  counts.fetch_duration.observe(seconds);
  const auto outcome = r                                       ? metrics::fetch_result::ok
                       : r.error().code() == errc::cancelled ? metrics::fetch_result::cancelled
                                                             : metrics::fetch_result::failed;
  counts.fetches[outcome].add();
  if (!r) {
    detail::log(r.error().code() == errc::cancelled ? log_level::info : log_level::error, "fetch failed",
                {{"artifact", m.artifact_id()}, {"error", r.error().message()}, {"seconds", seconds}});
    detail::audit("fetch.failed", {{"artifact", m.artifact_id()}, {"subject", m.subject_name()},
                                   {"error", r.error().message()}});
    return r;
  }
  // Pieces and bytes by source, and the peers banned: what the audit trail must be able to show
  // (the record carries the trace id itself, from the scope above).
  std::uint64_t from_origins = 0, from_peers = 0;
  std::size_t pieces_origins = 0, pieces_peers = 0;
  std::string banned;
  for (const auto& t : r->sources) {
    (t.peer ? from_peers : from_origins) += t.bytes;
    (t.peer ? pieces_peers : pieces_origins) += t.pieces;
    if (t.banned) banned += (banned.empty() ? "" : ",") + t.source;
  }
  detail::log(log_level::info, "fetch completed",
              {{"artifact", m.artifact_id()}, {"pieces", r->fetched}, {"already_stored", r->already_stored},
               {"bytes", r->bytes}, {"bytes.origin", from_origins}, {"bytes.peer", from_peers}, {"seconds", seconds}});
  detail::audit("fetch.completed", {{"artifact", m.artifact_id()}, {"subject", m.subject_name()},
                                    {"pieces_from_origins", pieces_origins}, {"pieces_from_peers", pieces_peers},
                                    {"pieces_already_stored", r->already_stored}, {"bytes", r->bytes},
                                    {"peers_banned", banned}});
  return r;
}

std::vector<std::size_t> swarm_origin_owners(std::vector<std::string> members, const std::string& self,
                                             const std::vector<std::string>& source_addresses) {
  std::sort(members.begin(), members.end());
  members.erase(std::unique(members.begin(), members.end()), members.end());
  std::vector<std::size_t> owners;
  for (const auto& m : members) {
    if (m == self) {
      owners.push_back(fetch_self);
      continue;
    }
    auto it = std::find(source_addresses.begin(), source_addresses.end(), m);
    if (it != source_addresses.end()) owners.push_back(static_cast<std::size_t>(it - source_addresses.begin()));
  }
  if (std::find(owners.begin(), owners.end(), fetch_self) == owners.end()) return {};  // not a member
  return owners;
}

}  // namespace drun

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
  std::size_t held = 0;                // peers: the most pieces they announced, when that grew,
  clock::time_point grew{}, answered{};  // and when they last answered what they hold
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

// One fetch under way: the plan, the state of every piece and source, and what the workers
// share. Members marked "under the mutex" are called with `mutex` held.
class session {
 public:
  session(const verified_manifest& m, const std::vector<std::unique_ptr<source>>& sources,
          const fetch_options& options, missing_pieces plan, piece_batch batch, std::optional<export_writer> out);
  result<fetch_report> run();

 private:
  bool cancelled() const { return options_.cancel && options_.cancel->load(); }
  void nap(clock::time_point until) const;
  void pace(std::uint64_t n);
  void report_progress();                               // under the mutex
  void finish(std::size_t t, piece_state st);           // under the mutex
  void drop_source(std::size_t k, bool banned);         // under the mutex
  void peer_failed(std::size_t k, errc code);           // under the mutex
  void refresh();                                       // without the mutex, one worker at a time
  bool pick(std::unique_lock<std::mutex>& lock, std::size_t& t_out, std::size_t& k_out);
  bool pick_from_peers(clock::time_point now, std::size_t& t_out, std::size_t& k_out, bool& waiting, bool& any_pending);
  std::optional<clock::time_point> pick_from_origin(clock::time_point now, std::size_t& t_out, std::size_t& k_out,
                                                    bool& waiting, bool& picked);
  void fail_what_no_source_holds(bool peers_left);      // under the mutex
  void work(unsigned w);
  void delivered(std::size_t t, std::size_t k);         // under the mutex
  // Charges a failed delivery to its source; the piece goes back to pending, or fails.
  void charge(std::size_t t, std::size_t k, result<void>& got, std::mt19937_64& rng);  // under the mutex
  result<fetch_report> outcome();

  const verified_manifest& m_;
  const std::vector<std::unique_ptr<source>>& sources_;
  const fetch_options& options_;
  metrics::registry& counts_ = metrics::global();
  missing_pieces plan_;
  const std::vector<std::size_t>& todo_ = plan_.indices;
  piece_batch batch_;  // verified pieces are sealed through it and committed in groups
  std::optional<export_writer> out_;
  fetch_report report_;
  std::vector<source_slot> src_;
  std::vector<piece_slot> slots_;
  std::vector<std::size_t> order_;  // the order pieces are considered in (shuffled)
  bool any_origin_ = false, any_peer_ = false;
  unsigned workers_ = 1;

  std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<error> fatal_;
  std::size_t remaining_ = 0;  // pending or in flight
  std::uint64_t done_bytes_ = 0;
  std::size_t done_pieces_ = 0;
  clock::time_point last_refresh_{}, last_progress_ = clock::now();
  bool refreshing_ = false;
  const clock::time_point start_ = clock::now();
  clock::duration slowest_origin_piece_{};
  std::atomic<std::uint64_t> received_{0};

  // In a swarm, whether a member's share of the origin's pieces is still worth waiting for: it is
  // usable, the wait is under peer_wait, and it is not stuck. A member whose own fetch died (a
  // full disk, a crash of its fetch while its server lives on) announces a frozen set forever:
  // stuck is an answer that shows no growth for four times the slowest piece this node took from
  // an origin, and at least peer_wait / 6 (a guess at a first piece's time, before there is a
  // measure). Only answers count, so a member that has not been heard from (a slow refresh, a
  // cut link) is not judged, and it is still given up on after peer_wait.
  bool worth_waiting_for(std::size_t owner, clock::time_point now) const {
    const auto& o = src_[owner];
    auto patience = std::max<clock::duration>(options_.peer_wait / 6, 4 * slowest_origin_piece_);
    return o.usable && now - start_ < options_.peer_wait && o.answered - std::max(start_, o.grew) < patience;
  }
};

session::session(const verified_manifest& m, const std::vector<std::unique_ptr<source>>& sources,
                 const fetch_options& options, missing_pieces plan, piece_batch batch,
                 std::optional<export_writer> out)
    : m_(m), sources_(sources), options_(options), plan_(std::move(plan)), batch_(std::move(batch)),
      out_(std::move(out)),
      src_(sources.size()), slots_(plan_.indices.size()), order_(plan_.indices.size()),
      remaining_(plan_.indices.size()) {
  for (std::size_t k = 0; k < sources_.size(); ++k) {
    report_.sources.push_back({sources_[k]->name()});
    src_[k].peer = report_.sources[k].peer = sources_[k]->is_peer();
    (src_[k].peer ? any_peer_ : any_origin_) = true;
  }
  report_.already_stored = plan_.already_stored;
  for (auto& sl : slots_) sl.backoff = options_.first_backoff;
  // Ties in rarity are broken by a per-session shuffle, so nodes started together ask for
  // different pieces first and can trade them.
  for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
  std::mt19937_64 shuffle_rng(randombytes_random());
  std::shuffle(order_.begin(), order_.end(), shuffle_rng);
  std::uint64_t piece = std::max<std::uint64_t>(1, m_.shard_size());
  workers_ = std::max<unsigned>(1, std::min<unsigned>(options_.connections,
                                                       static_cast<unsigned>(options_.memory_budget / piece)));
  workers_ = detail::worker_count(workers_, todo_.size());
}

void session::nap(clock::time_point until) const {
  while (!cancelled()) {
    auto now = clock::now();
    if (now >= until) return;
    std::this_thread::sleep_for(std::min<clock::duration>(until - now, std::chrono::milliseconds(50)));
  }
}

void session::pace(std::uint64_t n) {
  if (!options_.max_bytes_per_second) return;
  auto total_received = received_.fetch_add(n) + n;
  nap(start_ + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(
                   static_cast<double>(total_received) / static_cast<double>(options_.max_bytes_per_second))));
}

void session::report_progress() {
  if (!options_.progress) return;
  fetch_progress p{done_bytes_, plan_.bytes, done_pieces_, todo_.size(), 0, 0};
  double secs = std::chrono::duration<double>(clock::now() - start_).count();
  if (secs > 0) p.bytes_per_second = static_cast<double>(done_bytes_) / secs;
  if (p.bytes_per_second > 0) p.seconds_left = static_cast<double>(plan_.bytes - done_bytes_) / p.bytes_per_second;
  options_.progress(p);
}

void session::finish(std::size_t t, piece_state st) {
  slots_[t].state = st;
  --remaining_;
  changed_.notify_all();
}

void session::drop_source(std::size_t k, bool banned) {
  if (src_[k].usable) {  // once per peer
    (banned ? counts_.peers_banned : counts_.peers_dropped).add();
    detail::log(log_level::warning,
                banned ? "peer banned for this fetch: it sent bytes that do not match the signed digest"
                       : "peer dropped for this fetch",
                {{"peer", sources_[k]->name()}, {"artifact", m_.artifact_id()},
                 {"reason", banned ? std::string("digest mismatch") : src_[k].last_error}});
  }
  src_[k].usable = false;
  (banned ? report_.sources[k].banned : report_.sources[k].dropped) = true;
  changed_.notify_all();
}

// Busy is a backoff, denial a drop, the rest count up.
void session::peer_failed(std::size_t k, errc code) {
  auto& x = src_[k];
  if (code == errc::busy) {
    auto now = clock::now();
    if (x.busy_backoff.count() == 0) x.busy_since = now;
    x.busy_backoff = std::clamp(x.busy_backoff * 2, std::chrono::milliseconds(100), std::chrono::milliseconds(2000));
    x.busy_until = now + x.busy_backoff;
    if (now - x.busy_since > options_.peer_wait) drop_source(k, false);
  } else if (code == errc::permission_denied || ++x.consecutive_errors >= max_peer_errors) {
    drop_source(k, false);
  }
}

// Asks every usable peer what it holds.
void session::refresh() {
  struct answer {
    std::size_t k;
    result<std::optional<std::vector<bool>>> a;
    clock::time_point at;  // when it came: one peer's slow answer must not age the others'
  };
  std::vector<answer> answers;
  for (std::size_t k = 0; k < sources_.size(); ++k) {
    {
      std::lock_guard lock(mutex_);
      if (!src_[k].peer || !src_[k].usable) continue;
    }
    auto a = sources_[k]->holdings(m_.artifact_id(), m_.pieces().size(), options_.cancel);
    answers.push_back({k, std::move(a), clock::now()});
  }
  std::lock_guard lock(mutex_);
  for (auto& [k, a, at] : answers) {
    if (a || a.error().code() == errc::not_found) src_[k].answered = at;
    if (a && *a) {
      // Pieces a peer announced and then refused to send are not believed again: a peer that
      // keeps announcing what it will not serve must not hold the fetch up.
      auto& have = **a;
      for (std::size_t i = 0; i < have.size() && i < src_[k].refused.size(); ++i)
        if (src_[k].refused[i]) have[i] = false;
      src_[k].have = std::move(have);
      if (auto n = static_cast<std::size_t>(std::count(src_[k].have.begin(), src_[k].have.end(), true));
          n > src_[k].held)
        src_[k].held = n, src_[k].grew = at;
    } else if (!a && a.error().code() == errc::not_found) {
      src_[k].have.clear();  // it does not have the artifact (yet): it holds nothing
    } else if (!a) {
      report_.sources[k].errors += 1;
      src_[k].last_error = a.error().message();
      src_[k].last_code = a.error().code();
      peer_failed(k, a.error().code());
    }
  }
  last_refresh_ = clock::now();
  refreshing_ = false;
  changed_.notify_all();
}

// Rarest first among pieces some usable peer holds and has room for (under the mutex).
bool session::pick_from_peers(clock::time_point now, std::size_t& t_out, std::size_t& k_out, bool& waiting,
                              bool& any_pending) {
  std::size_t best_t = SIZE_MAX, best_k = SIZE_MAX, best_rarity = SIZE_MAX;
  for (std::size_t t : order_) {
    if (slots_[t].state != piece_state::pending) continue;
    any_pending = true;
    std::size_t index = todo_[t], holders = 0, k_free = SIZE_MAX;
    for (std::size_t k = 0; k < src_.size(); ++k) {
      if (!src_[k].peer || !src_[k].usable || index >= src_[k].have.size() || !src_[k].have[index]) continue;
      ++holders;
      if (src_[k].busy_until > now) continue;  // a busy holder is waited for, not replaced
      if (src_[k].in_flight < options_.per_peer && (k_free == SIZE_MAX || src_[k].in_flight < src_[k_free].in_flight))
        k_free = k;
    }
    if (holders == 0) continue;
    if (k_free == SIZE_MAX) {
      waiting = true;
      continue;
    }
    if (holders < best_rarity) best_t = t, best_k = k_free, best_rarity = holders;
  }
  if (best_t == SIZE_MAX) return false;
  t_out = best_t, k_out = best_k;
  return true;
}

// Origins take what no peer holds, once its backoff has passed (under the mutex). Sets picked;
// otherwise returns the soonest time a backoff ends, if any.
std::optional<clock::time_point> session::pick_from_origin(clock::time_point now, std::size_t& t_out,
                                                           std::size_t& k_out, bool& waiting, bool& picked) {
  clock::time_point soonest = clock::time_point::max();
  for (std::size_t t : order_) {
    auto& sl = slots_[t];
    if (sl.state != piece_state::pending) continue;
    std::size_t index = todo_[t];
    bool held = false;
    for (std::size_t k = 0; k < src_.size() && !held; ++k)
      held = src_[k].peer && src_[k].usable && index < src_[k].have.size() && src_[k].have[index];
    if (held) continue;
    if (!options_.origin_owners.empty()) {
      // Another node's share: wait for it to bring the piece, unless it is gone, late or stuck.
      std::size_t owner = options_.origin_owners[index % options_.origin_owners.size()];
      if (owner != fetch_self && owner < src_.size() && worth_waiting_for(owner, now)) {
        waiting = true;
        continue;
      }
    }
    if (sl.not_before > now) {
      soonest = std::min(soonest, sl.not_before);
      continue;
    }
    // Spread pieces over the origins, and move to the next origin on every retry.
    std::vector<std::size_t> origins;
    for (std::size_t k = 0; k < src_.size(); ++k)
      if (!src_[k].peer) origins.push_back(k);
    std::size_t k = origins[(index + sl.attempts) % origins.size()];
    // In a swarm, one piece at a time per origin: the origin's link is shared by every member,
    // and a piece finished early is a piece the others can start trading.
    if (!options_.origin_owners.empty() && src_[k].in_flight >= 1) {
      waiting = true;
      break;
    }
    t_out = t, k_out = k;
    picked = true;
    return std::nullopt;
  }
  if (soonest == clock::time_point::max()) return std::nullopt;
  return soonest;
}

// Pieces that no usable source holds, after waiting for peers to get them (under the mutex).
void session::fail_what_no_source_holds(bool peers_left) {
  for (std::size_t t = 0; t < slots_.size(); ++t) {
    if (slots_[t].state != piece_state::pending) continue;
    if (!slots_[t].last) {
      std::string why = peers_left ? fmt::format("no peer has held it for {} ms", options_.peer_wait.count())
                                   : std::string("no usable source holds it");
      for (const auto& x : src_)
        if (!x.last_error.empty()) why += "; " + x.last_error;
      // Every source refused us: an authorization failure (exit 4), not a network one.
      auto code = std::all_of(src_.begin(), src_.end(), [](const source_slot& x) {
        return x.last_code == errc::permission_denied;
      }) ? errc::permission_denied : errc::io_error;
      slots_[t].last = error(code, std::move(why));
    }
    finish(t, piece_state::failed);
  }
}

// Picks the next (piece, source), or waits. Returns false when the worker should stop.
bool session::pick(std::unique_lock<std::mutex>& lock, std::size_t& t_out, std::size_t& k_out) {
  for (;;) {
    if (cancelled() || fatal_ || remaining_ == 0) return false;
    auto now = clock::now();
    if (any_peer_ && !refreshing_ && now - last_refresh_ >= options_.peer_refresh) {
      refreshing_ = true;
      lock.unlock();
      refresh();
      lock.lock();
      continue;
    }
    // Until the peers have answered once, nothing is known to be on a peer: wait rather than
    // send everything to the origins.
    if (any_peer_ && last_refresh_ == clock::time_point{}) {
      changed_.wait_for(lock, options_.peer_refresh);
      continue;
    }
    bool waiting_for_peer = false, any_pending = false;
    if (pick_from_peers(now, t_out, k_out, waiting_for_peer, any_pending)) return true;
    if (any_origin_) {
      bool picked = false;
      auto soonest = pick_from_origin(now, t_out, k_out, waiting_for_peer, picked);
      if (picked) return true;
      if (soonest) {
        changed_.wait_until(lock, std::min(*soonest, now + options_.peer_refresh));
        continue;
      }
    }
    // Nothing to start: a worker that would idle asks the peers again sooner (a tenth of the
    // refresh period), so pieces that appear are picked up quickly.
    bool idle_refresh = any_peer_ && any_pending && !refreshing_ && now - last_refresh_ >= options_.peer_refresh / 10;
    if (idle_refresh) {
      last_refresh_ = now - options_.peer_refresh;  // due: the next pass refreshes
      continue;
    }
    if (!any_pending || waiting_for_peer) {
      changed_.wait_for(lock, options_.peer_refresh / 10);
      continue;
    }
    // Pieces that no usable source holds: wait for peers to get them, for a while.
    bool peers_left = std::any_of(src_.begin(), src_.end(), [](const source_slot& x) { return x.peer && x.usable; });
    if (!peers_left || now - last_progress_ > options_.peer_wait) {
      fail_what_no_source_holds(peers_left);
      continue;
    }
    changed_.wait_for(lock, options_.peer_refresh);
  }
}

// A piece verified and stored (under the mutex).
void session::delivered(std::size_t t, std::size_t k) {
  const std::size_t index = todo_[t];
  const auto size = m_.pieces()[index].range->size();
  const auto kind = kind_of(*sources_[k]);
  counts_.fetch_pieces[kind].add();
  counts_.fetch_bytes[kind].add(size);
  auto& tally = report_.sources[k];
  tally.pieces += 1;
  tally.bytes += size;
  src_[k].consecutive_errors = 0;
  src_[k].busy_backoff = std::chrono::milliseconds(0);
  done_bytes_ += size;
  done_pieces_ += 1;
  last_progress_ = clock::now();
  if (log_enabled(log_level::debug))
    detail::log(log_level::debug, "piece stored", {{"source", sources_[k]->name()}, {"piece", index}, {"bytes", size}});
  finish(t, piece_state::done);
  report_progress();
}

// What a source sent did not verify (got holds no error), or it failed to send (got is its
// error): charged to that source, and the piece goes back to pending or fails (under the mutex).
void session::charge(std::size_t t, std::size_t k, result<void>& got, std::mt19937_64& rng) {
  auto& sl = slots_[t];
  const std::size_t index = todo_[t];
  const auto& mp = m_.pieces()[index];
  const auto& name = m_.files()[mp.file].name;
  auto& tally = report_.sources[k];
  sl.state = piece_state::pending;
  bool charge_piece = !src_[k].peer;
  if (got) {
    // Bytes that do not match the signature are charged to the source that sent them; a peer
    // that sends one is banned for the session.
    tally.rejected += 1;
    counts_.fetch_rejected[kind_of(*sources_[k])].add();
    detail::log(log_level::warning, "piece rejected: its bytes do not match the signed digest",
                {{"source", sources_[k]->name()}, {"artifact", m_.artifact_id()}, {"piece", index}, {"file", name}});
    sl.last = error(errc::digest_mismatch,
                    fmt::format("{} digest mismatch in what {} sent", to_string(m_.hash_type()), sources_[k]->name()))
                  .with_path(name)
                  .with_range(mp.range->begin, mp.range->end)
                  .with_source(sources_[k]->name());
    if (src_[k].peer) drop_source(k, true);
    charge_piece = true;
  } else {
    tally.errors += 1;
    auto code = got.error().code();
    src_[k].last_error = got.error().message();
    src_[k].last_code = code;
    sl.last = std::move(got).error().with_source(sources_[k]->name());
    if (src_[k].peer) {
      // A peer that no longer holds the piece is fine; one that refuses us or keeps failing is
      // dropped, and its pieces go elsewhere.
      if (code == errc::not_found && index < src_[k].have.size()) {
        src_[k].have[index] = false;
        if (src_[k].refused.size() < src_[k].have.size()) src_[k].refused.resize(src_[k].have.size());
        src_[k].refused[index] = true;
      } else {
        peer_failed(k, code);
      }
    }
  }
  if (charge_piece && ++sl.attempts >= options_.attempts_per_piece) {
    finish(t, piece_state::failed);
    return;
  }
  counts_.fetch_retries.add();
  if (!src_[k].peer) {
    // Exponential backoff with jitter, so retries from many workers do not arrive together.
    auto jitter = std::chrono::milliseconds(rng() % static_cast<std::uint64_t>(sl.backoff.count() + 1));
    sl.not_before = clock::now() + sl.backoff / 2 + jitter / 2;
    sl.backoff *= 2;
  }
}

// One worker: picks a piece, brings it from its source without the mutex, checks it against the
// signed digest, seals it (and writes it out), and reports back.
void session::work(unsigned w) {
  std::mt19937_64 rng(randombytes_random() + w);
  std::vector<std::byte> buf;
  std::unique_lock lock(mutex_);
  std::size_t t = 0, k = 0;
  while (pick(lock, t, k)) {
    slots_[t].state = piece_state::in_flight;
    src_[k].in_flight++;
    const std::size_t index = todo_[t];
    const auto& mp = m_.pieces()[index];
    lock.unlock();

    buf.resize(mp.range->size());
    const manifest_file& file = m_.files()[mp.file];
    const bool whole_file = file.piece_count == 1 && mp.range->begin == 0 && file.size == mp.range->end;
    piece_request req{m_.artifact_id(), file.name, mp.file, index, *mp.range,
                      whole_file ? &mp.expected : nullptr};
    const auto began = clock::now();
    auto got = sources_[k]->fetch(req, buf, options_.cancel);
    bool verified = false;
    result<bool> put = false;
    if (got && !cancelled()) {
      pace(buf.size());
      auto piece = m_.check_piece(index, std::move(buf));
      verified = piece.has_value();
      if (piece) {
        put = batch_.put(*piece);
        if (put && out_)
          if (auto written = out_->write(*piece); !written) put = std::move(written).error();
        buf = std::move(*piece).release();  // the buffer serves the next piece, which overwrites it
      }
    }

    lock.lock();
    src_[k].in_flight--;
    changed_.notify_all();
    if (cancelled()) {
      slots_[t].state = piece_state::pending;
      break;
    }
    if (got && verified && put) {
      if (!src_[k].peer) slowest_origin_piece_ = std::max(slowest_origin_piece_, clock::now() - began);
      delivered(t, k);
      continue;
    }
    if (got && verified && !put) {  // the store failed: nothing else can succeed
      if (!fatal_) fatal_ = std::move(put).error();
      break;
    }
    charge(t, k, got, rng);
  }
  lock.unlock();
  buf.resize(buf.capacity());  // a shorter last piece left older plaintext past its end
  sodium_memzero(buf.data(), buf.size());
}

result<fetch_report> session::outcome() {
  // What was verified is kept, whatever happens next: durable and stored before anything is reported.
  auto committed = batch_.commit();
  if (fatal_) return std::move(*fatal_);
  if (!committed) return std::move(committed).error();
  report_.fetched = done_pieces_;
  report_.bytes = done_bytes_;
  if (cancelled())
    return error(errc::cancelled, fmt::format("the fetch was cancelled after storing {} of {} pieces; run it again to "
                                              "fetch the rest", done_pieces_, todo_.size()));
  // The first failed piece names the failure; a mismatch (integrity) outranks a network failure.
  const piece_slot* worst = nullptr;
  std::size_t worst_t = 0;
  for (std::size_t t = 0; t < slots_.size(); ++t) {
    if (slots_[t].state != piece_state::failed) continue;
    bool mismatch = slots_[t].last && slots_[t].last->code() == errc::digest_mismatch;
    if (!worst || (mismatch && !(worst->last && worst->last->code() == errc::digest_mismatch))) worst = &slots_[t], worst_t = t;
  }
  if (worst) {
    std::size_t index = todo_[worst_t];
    const auto& mp = m_.pieces()[index];
    errc code = worst->last ? worst->last->code() : errc::io_error;
    if (code != errc::digest_mismatch && code != errc::permission_denied) code = errc::io_error;
    return error(code, worst->attempts ? fmt::format("piece {} failed from every source after {} attempts: {}", index,
                                                     worst->attempts, worst->last->message())
                                       : fmt::format("piece {}: {}", index,
                                                     worst->last ? worst->last->message() : "no source delivered it"))
        .with_path(m_.files()[mp.file].name)
        .with_range(mp.range->begin, mp.range->end)
        .with_source(worst->last ? worst->last->source() : std::string())
        .with_piece(index);
  }
  if (out_)
    if (auto r = out_->commit(); !r) return std::move(r).error();
  return std::move(report_);
}

result<fetch_report> session::run() {
  const trace_context* trace = detail::current_trace();  // the fetch's, for the workers' messages
  detail::parallel_for(workers_, workers_, [&](std::size_t, unsigned w) {
    detail::trace_scope in_trace(trace);
    work(w);
    return true;
  });
  return outcome();
}

result<fetch_report> fetch_session(store& s, const verified_manifest& m, std::string_view bundle_json,
                                   const std::vector<std::unique_ptr<source>>& sources, const fetch_options& options) {
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
  auto batch = s.begin_batch(m);
  if (!batch) return std::move(batch).error();
  session run(m, sources, options, std::move(*plan), std::move(*batch), std::move(out));
  return run.run();
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

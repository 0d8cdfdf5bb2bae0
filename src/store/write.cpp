// Sealing pieces into the store. Each piece is checked (when streamed), sealed under a fresh nonce
// and written at its place at once; the index marks pieces stored in groups, only once their bytes
// are durable: one fdatasync per data file and one transaction per group (piece_batch), or per
// piece for store::put_piece.
#include "store/fault.hpp"
#include "store/impl.hpp"

#include <drun/manifest.hpp>

#include <algorithm>
#include <condition_variable>
#include <memory>
#include <set>
#include <thread>

namespace drun {

using namespace store_detail;

namespace store_detail {
std::atomic<bool> fail_next_commit_sync{false};
}

namespace {

// What a group of uncommitted pieces holds until the index marks them stored: the store lock (no
// rotation may retire the key they were sealed under), the artifact lock (no removal), and one
// descriptor per data file carrying the pieces' byte-range locks (no other writer rewrites them
// meanwhile). Released when the last piece of the group is committed or given up.
struct held_locks {
  store_lock store;
  detail::unique_fd artifact;
  std::mutex mutex;
  std::map<std::size_t, detail::unique_fd> data;  // by file index

  explicit held_locks(const std::filesystem::path& dir) : store(dir, LOCK_SH) {}

  static result<std::shared_ptr<held_locks>> take(store::impl& s, const std::string& id) {
    auto h = std::make_shared<held_locks>(s.dir);
    auto a = s.artifact_lock(id);
    if (!a) return std::move(a).error();
    while (::flock(a->get(), LOCK_SH) != 0 && errno == EINTR) {
    }
    h->artifact = std::move(*a);
    return h;
  }

  result<int> data_fd(store::impl& s, const std::string& id, std::size_t file) {
    std::lock_guard lock(mutex);
    if (auto it = data.find(file); it != data.end()) return it->second.get();
    // O_CREAT: a data file deleted behind the store's back is recreated, and its pieces refilled.
    auto fd = open_owned(s.data_file(id, file), O_WRONLY | O_CREAT, "cannot open");
    if (!fd) return std::move(fd).error();
    return data.emplace(file, std::move(*fd)).first->second.get();
  }
};

// A piece's plaintext: bytes in memory that verified (sealed from where they lie), or a stream
// that fills a scratch buffer chunk by chunk and is checked against the digest as it is sealed.
struct plaintext {
  std::span<const std::byte> bytes;
  const piece_source* stream = nullptr;
};

// A piece sealed and written, not yet durable nor marked stored.
struct pending_piece {
  std::size_t index = 0, file = 0;
  std::uint64_t bytes = 0;
  tag_bytes tag{};
  std::uint64_t generation = 0;
  nonce_bytes nonce{};
  std::shared_ptr<held_locks> locks;
};

// Seals one piece from `source` into its place, under the locks of `held`. A streamed plaintext
// is hashed on the way through and bytes that do not match the signed digest are refused
// (written, but never marked stored); bytes in memory were verified by the caller.
// Returns nothing when the piece is already stored.
result<std::optional<pending_piece>> seal_piece(store::impl& s, const verified_manifest& m, std::size_t index,
                                                const plaintext& source, const std::shared_ptr<held_locks>& held) {
  const std::string& id = m.artifact_id();
  if (index >= m.pieces().size() || !m.pieces()[index].range)
    return error(errc::invalid_argument, fmt::format("piece {} does not exist", index));
  const auto& mp = m.pieces()[index];
  const auto range = *mp.range;
  auto path = s.data_file(id, mp.file);
  auto fd = held->data_fd(s, id, mp.file);
  if (!fd) return std::move(fd).error();
  // Another process writing the same piece holds this range; wait, then see whether it finished.
  if (auto r = range_lock(*fd, F_WRLCK, range.begin, range.size()); !r) return std::move(r).error();
  auto give_up = [&](error e) {
    (void)range_lock(*fd, F_UNLCK, range.begin, range.size());
    return e;
  };
  {
    std::lock_guard lock(s.db_mutex);
    if (auto r = s.check_key_current(); !r) return give_up(std::move(r).error());
    auto row = s.load_piece(id, index);
    if (!row) return give_up(std::move(row).error());
    if (row->state == state_stored) {
      (void)range_lock(*fd, F_UNLCK, range.begin, range.size());
      return std::optional<pending_piece>();
    }
  }
  // A fresh generation (the row's version, authenticated) and a fresh random nonce for every write:
  // the nonce never depends on what the index says, so a rolled-back index cannot repeat one.
  auto gen = s.take_generation();
  if (!gen) return give_up(std::move(gen).error());
  pending_piece p{index, mp.file, range.size(), {}, *gen, random_nonce(), held};

  auto dk = s.data_key_for(id, *s.key);
  if (!dk) return give_up(std::move(dk).error());
  gcm sealer(gcm::mode::seal, **dk, {raw_id(id), static_cast<std::uint32_t>(mp.file), index, s.key_version,
                                     p.generation, p.nonce});
  const bool check_digest = source.stream != nullptr;
  hasher h(m.hash_type());
  std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(io_chunk, range.size()));
  // Bytes already in memory are sealed from where they lie; a streamed source fills `plain`.
  // Neither scratch buffer is zero-filled first: every byte is written before it is read.
  auto plain = !check_digest ? nullptr : std::make_unique_for_overwrite<std::byte[]>(chunk);
  auto sealed = std::make_unique_for_overwrite<std::byte[]>(chunk);
  std::size_t filled = 0;
  auto wipe = [&] {
    if (plain) sodium_memzero(plain.get(), filled);
  };
  for (std::uint64_t off = 0; off < range.size(); off += chunk) {
    auto n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk, range.size() - off));
    std::span<const std::byte> in;
    if (!check_digest) {
      in = source.bytes.subspan(static_cast<std::size_t>(off), n);
    } else {
      filled = std::max(filled, n);
      if (auto r = (*source.stream)(std::span(plain.get(), n), off); !r) {
        wipe();
        return give_up(std::move(r).error());
      }
      in = std::span<const std::byte>(plain.get(), n);
    }
    if (check_digest) h.update(in);
    sealer.update(in, std::span(sealed.get(), n));
    auto written = [&] {
      std::lock_guard turn(s.write_stripe(id, mp.file));
      return pwrite_all(*fd, std::span<const std::byte>(sealed.get(), n), range.begin + off, path);
    }();
    if (!written) {
      wipe();
      return give_up(std::move(written).error());
    }
  }
  wipe();
  p.tag = sealer.seal_tag();
  if (check_digest && !(h.finish() == mp.expected))
    return give_up(error(errc::digest_mismatch, fmt::format("{} digest mismatch", to_string(m.hash_type())))
                       .with_path(m.files()[mp.file].name)
                       .with_range(range.begin, range.end));
  return std::optional<pending_piece>(std::move(p));
}

// Durable bytes first (one fdatasync per data file of the group), then one transaction marks every
// piece stored. On failure none is marked: they stay missing and are brought again.
result<void> commit_pieces(store::impl& s, const std::string& id, const std::vector<pending_piece>& pieces) {
  if (pieces.empty()) return {};
  std::set<std::pair<const held_locks*, std::size_t>> synced;
  for (const auto& p : pieces) {
    if (!synced.emplace(p.locks.get(), p.file).second) continue;
    int fd;
    {
      std::lock_guard lock(p.locks->mutex);
      fd = p.locks->data.at(p.file).get();
    }
    int e = fail_next_commit_sync.exchange(false) ? EIO : ::fdatasync(fd) != 0 ? errno : 0;
    if (e != 0) return detail::sys_error("cannot sync", s.data_file(id, p.file), e);
  }
  std::lock_guard lock(s.db_mutex);
  auto txn = transaction::begin(s.db);
  if (!txn) return std::move(txn).error();
  auto st = s.db.prepare(
      "UPDATE pieces SET state = ?, tag = ?, generation = ?, key_version = ?, nonce = ? WHERE artifact = ? AND idx = ?");
  if (!st) return std::move(st).error();
  for (const auto& p : pieces) {
    st->bind(1, state_stored).bind_blob(2, p.tag).bind(3, static_cast<std::int64_t>(p.generation))
        .bind(4, s.key_version).bind_blob(5, p.nonce).bind(6, id).bind(7, static_cast<std::int64_t>(p.index));
    if (auto r = st->run(); !r) return std::move(r).error();
    st->reset();
  }
  auto touch = s.db.prepare("UPDATE artifacts SET last_access = ? WHERE id = ?");
  if (!touch) return std::move(touch).error();
  touch->bind(1, now_seconds()).bind(2, id);
  if (auto r = touch->run(); !r) return std::move(r).error();
  return txn->commit();
}

// A seal that failed for the store's sake (disk, index), not for the bytes' (a mismatch in a
// streamed piece is the sender's fault, counted by whoever fetched it).
void count_failure(const error& e) {
  if (e.code() != errc::digest_mismatch && e.code() != errc::cancelled) metrics::global().store_seal_failures.add();
}

// A piece verified for another artifact, or another piece of this one, carries a valid digest for
// the wrong place: sealing it here would make the store serve it as this piece.
result<plaintext> source_of(const verified_manifest& m, const verified_piece& piece) {
  const auto i = piece.index();
  if (piece.artifact_id() != m.artifact_id() || i >= m.pieces().size() || !m.pieces()[i].range ||
      *m.pieces()[i].range != piece.range() || m.pieces()[i].file != piece.file() ||
      piece.bytes().size() != piece.range().size())
    return error(errc::invalid_argument,
                 fmt::format("piece {} was verified for artifact {}, not for piece {} of artifact {}", i,
                             piece.artifact_id().substr(0, 12), i, m.artifact_id().substr(0, 12)));
  return plaintext{piece.bytes(), nullptr};
}

// One piece, durable and stored before this returns.
result<bool> put_one(store::impl& s, const verified_manifest& m, std::size_t index, const plaintext& source) {
  auto r = [&]() -> result<bool> {
    auto held = held_locks::take(s, m.artifact_id());
    if (!held) return std::move(held).error();
    auto p = seal_piece(s, m, index, source, *held);
    if (!p) return std::move(p).error();
    if (!*p) return false;
    std::vector<pending_piece> one;
    one.push_back(std::move(**p));
    if (auto c = commit_pieces(s, m.artifact_id(), one); !c) return std::move(c).error();
    return true;
  }();
  if (r && *r) metrics::global().store_pieces_sealed.add();
  if (!r) count_failure(r.error());
  return r;
}

}  // namespace

result<bool> store::put_piece(const verified_manifest& m, const verified_piece& piece) {
  auto source = source_of(m, piece);
  if (!source) return std::move(source).error();
  return put_one(*impl_, m, piece.index(), *source);
}

result<bool> store::put_piece_streamed(const verified_manifest& m, std::size_t index, const piece_source& source) {
  return put_one(*impl_, m, index, plaintext{{}, &source});
}

// ---- group commit -------------------------------------------------------------------------------

struct piece_batch::impl {
  using clock = std::chrono::steady_clock;

  std::shared_ptr<store::impl> s;
  const verified_manifest& m;
  const commit_limits limits;

  std::mutex mutex;
  std::condition_variable changed;
  std::vector<pending_piece> pending;
  std::uint64_t pending_bytes = 0;
  clock::time_point oldest{};
  std::shared_ptr<held_locks> held;  // the locks new pieces join; a new group after each commit
  std::set<std::size_t> claimed;     // pieces being sealed or waiting for their commit
  std::size_t committing = 0;        // commits under way (their pieces are out of `pending`)
  std::size_t committed = 0;
  std::optional<error> failure;      // the first failed commit: every later call returns it
  bool stopping = false;
  std::thread flusher;

  impl(std::shared_ptr<store::impl> st, const verified_manifest& man, commit_limits l)
      : s(std::move(st)), m(man), limits(l) {
    flusher = std::thread([this] { flush_loop(); });
  }
  ~impl() {
    {
      std::lock_guard lock(mutex);
      stopping = true;
    }
    changed.notify_all();
    flusher.join();
    std::unique_lock lock(mutex);
    (void)commit_pending(lock);
  }

  bool full() const { return pending_bytes >= limits.max_bytes || pending.size() >= limits.max_pieces; }

  // On the batch's thread: commits when a bound is reached, so the writers never wait for a sync.
  void flush_loop() {
    std::unique_lock lock(mutex);
    while (!stopping) {
      if (pending.empty()) {
        changed.wait(lock);
      } else if (!full() && clock::now() < oldest + limits.max_delay) {
        changed.wait_until(lock, oldest + limits.max_delay);
      } else {
        (void)commit_pending(lock);
      }
    }
  }

  // Takes what is pending and commits it without the mutex (writers go on sealing meanwhile).
  result<void> commit_pending(std::unique_lock<std::mutex>& lock) {
    if (pending.empty()) return {};
    std::vector<pending_piece> group;
    group.swap(pending);
    pending_bytes = 0;
    held.reset();  // the next piece starts a new group: this one's locks go with its commit
    ++committing;
    lock.unlock();
    auto r = commit_pieces(*s, m.artifact_id(), group);
    if (r) metrics::global().store_pieces_sealed.add(group.size());
    else
      metrics::global().store_seal_failures.add(group.size());
    const std::size_t n = group.size();
    std::vector<std::size_t> indices;
    for (const auto& p : group) indices.push_back(p.index);
    group.clear();  // releases the group's locks before anyone is told
    lock.lock();
    --committing;
    for (auto i : indices) claimed.erase(i);
    if (r) committed += n;
    else if (!failure)
      failure = r.error();
    changed.notify_all();
    return r;
  }

  result<bool> put(std::size_t index, const plaintext& source) {
    std::shared_ptr<held_locks> group;
    {
      std::unique_lock lock(mutex);
      // Back-pressure: no more than two groups' worth waits for a sync that is slower than writers.
      changed.wait(lock, [&] {
        return failure || (pending_bytes < 2 * limits.max_bytes && pending.size() < 2 * limits.max_pieces);
      });
      if (failure) return *failure;
      if (!claimed.insert(index).second) return false;  // being sealed or committed by this batch
      if (!held) {
        auto h = held_locks::take(*s, m.artifact_id());
        if (!h) {
          claimed.erase(index);
          return std::move(h).error();
        }
        held = std::move(*h);
      }
      group = held;
    }
    auto p = seal_piece(*s, m, index, source, group);
    std::unique_lock lock(mutex);
    if (!p || !*p) {
      claimed.erase(index);
      if (!p) {
        count_failure(p.error());
        return std::move(p).error();
      }
      return false;
    }
    const bool first = pending.empty();
    if (first) oldest = clock::now();
    pending_bytes += (*p)->bytes;
    pending.push_back(std::move(**p));
    if (first || full()) changed.notify_all();  // the batch's thread: a deadline to keep, or a commit due
    return true;
  }

  result<std::size_t> commit() {
    std::unique_lock lock(mutex);
    (void)commit_pending(lock);  // its failure, if any, is recorded in `failure`
    // Pieces that the batch's thread took before this call are durable only when it is done.
    changed.wait(lock, [&] { return committing == 0; });
    if (failure) return *failure;
    return committed;
  }
};

piece_batch::piece_batch(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
piece_batch::~piece_batch() = default;
piece_batch::piece_batch(piece_batch&&) noexcept = default;
piece_batch& piece_batch::operator=(piece_batch&&) noexcept = default;

result<bool> piece_batch::put(const verified_piece& piece) {
  auto source = source_of(impl_->m, piece);
  if (!source) return std::move(source).error();
  return impl_->put(piece.index(), *source);
}

result<bool> piece_batch::put_streamed(std::size_t index, const piece_source& source) {
  return impl_->put(index, plaintext{{}, &source});
}

result<std::size_t> piece_batch::commit() { return impl_->commit(); }

result<piece_batch> store::begin_batch(const verified_manifest& m, commit_limits limits) {
  if (limits.max_bytes == 0 || limits.max_pieces == 0)
    return error(errc::invalid_argument, "a batch needs room for at least one piece");
  return piece_batch(std::make_unique<piece_batch::impl>(impl_, m, limits));
}

}  // namespace drun

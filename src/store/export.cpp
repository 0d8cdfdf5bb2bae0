// Exports: an artifact's plaintext written under a destination through a staging directory, from
// a fetch's verified pieces as they arrive and from the store for the rest.
#include "store/fault.hpp"
#include "store/impl.hpp"

#include "detail/encoding.hpp"
#include "detail/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <dirent.h>

namespace drun {

using namespace store_detail;

namespace {

constexpr std::string_view staging_prefix = ".drun-export-";

// Opens (creating) each directory of rel below dirfd without following symlinks; returns the fd of
// the last directory and the final component.
result<std::pair<detail::unique_fd, std::string>> open_parent(int dirfd, const std::string& rel, mode_t dir_mode) {
  detail::unique_fd cur(::dup(dirfd));
  std::size_t start = 0;
  for (;;) {
    auto slash = rel.find('/', start);
    if (slash == std::string::npos) return std::pair{std::move(cur), rel.substr(start)};
    auto part = rel.substr(start, slash - start);
    if (::mkdirat(cur.get(), part.c_str(), dir_mode) != 0 && errno != EEXIST)
      return error(errc::io_error, "cannot create directory").with_path(rel).with_errno(errno);
    int next = ::openat(cur.get(), part.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (next < 0) return error(errc::io_error, "cannot open directory").with_path(rel).with_errno(errno);
    cur = detail::unique_fd(next);
    start = slash + 1;
  }
}

// Removes the staging directories of exports that were killed (ours only: owned by this user);
// they hold incomplete files. One that a running export holds (flock) is left alone; whatever
// else dest holds stays.
void remove_stale_staging(const std::filesystem::path& dest) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dest, ec)) {
    struct stat st {};
    auto name = e.path().filename().string();
    if (!name.starts_with(staging_prefix) || ::lstat(e.path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode) ||
        st.st_uid != ::geteuid())
      continue;
    detail::unique_fd d(::open(e.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!d || ::flock(d.get(), LOCK_EX | LOCK_NB) != 0) continue;  // in use by a running export
    std::filesystem::remove_all(e.path(), ec);
  }
}

}  // namespace

namespace store_detail {
std::atomic<int> fail_export_rename_after{-1};
}

// What an export keeps between begin_export() and commit(): the staging directory inside dest,
// one open file per model file in it, and which pieces have their plaintext there.
struct export_writer::impl {
  std::shared_ptr<store::impl> st;
  artifact_reader reader;  // keeps the artifact from being removed while the export runs
  std::string id;
  std::vector<byte_range> ranges;  // by piece index
  std::filesystem::path dest;
  detail::unique_fd dest_fd, staging_fd;
  std::string staging;
  struct out_file {
    std::string name;
    detail::unique_fd fd;
    // Its writers take turns: the kernel serializes buffered writes to one inode anyway and spins
    // on the CPU while it does (see store::impl::write_stripes).
    std::unique_ptr<std::mutex> turn = std::make_unique<std::mutex>();
  };
  std::vector<out_file> files;               // by file index
  std::vector<std::size_t> piece_file;       // file index of each piece
  std::vector<std::string> top_level;        // what moves into dest at commit
  std::mutex mutex;
  std::vector<bool> written;                 // pieces whose plaintext is in the staging files
  std::vector<std::filesystem::path> created;  // directories begin_export made, dest last
  bool done = false;

  explicit impl(artifact_reader r) : reader(std::move(r)) {}
  ~impl() {
    if (done) return;
    std::error_code ec;
    if (!staging.empty()) std::filesystem::remove_all(dest / staging, ec);  // unverified or incomplete
    // dest as it was found: what was made for the export goes too (rmdir: only if still empty).
    for (auto it = created.rbegin(); it != created.rend(); ++it) ::rmdir(it->c_str());
  }
  result<void> put(std::size_t piece, std::uint64_t offset, std::span<const std::byte> plain) {
    const auto& f = files[piece_file[piece]];
    std::lock_guard lock(*f.turn);
    return pwrite_all(f.fd.get(), plain, ranges[piece].begin + offset, dest / f.name);
  }
};

export_writer::export_writer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
export_writer::~export_writer() = default;
export_writer::export_writer(export_writer&&) noexcept = default;
export_writer& export_writer::operator=(export_writer&&) noexcept = default;

result<export_writer> store::begin_export(const std::string& artifact, const std::filesystem::path& dest_arg,
                                          export_modes modes) {
  // "model/" and "model" are one destination (and one mode for it).
  std::filesystem::path dest = dest_arg.lexically_normal();
  if (!dest.has_filename() && dest.has_parent_path()) dest = dest.parent_path();
  const mode_t file_mode = modes == export_modes::owner_only ? 0600 : 0666;  // open() and mkdir() apply the umask
  const mode_t dir_mode = modes == export_modes::owner_only ? 0700 : 0777;
  auto d = show(artifact);
  if (!d) return std::move(d).error();
  struct stat st {};
  if (::lstat(dest.c_str(), &st) == 0) {
    std::error_code ec;
    if (S_ISDIR(st.st_mode)) remove_stale_staging(dest);
    if (!S_ISDIR(st.st_mode) || !std::filesystem::is_empty(dest, ec))
      return error(errc::invalid_argument, "destination exists and is not an empty directory").with_path(dest.string());
  }
  auto reader = open_artifact(artifact);
  if (!reader) return std::move(reader).error();
  auto ranges = reader->impl_->piece_ranges;
  auto w = std::make_unique<export_writer::impl>(std::move(*reader));
  if (::lstat(dest.c_str(), &st) != 0) {
    // The missing directories down to dest, outermost first, so that a failed export removes them.
    for (auto p = dest; !p.empty() && ::lstat(p.c_str(), &st) != 0; p = p.parent_path()) {
      w->created.insert(w->created.begin(), p);
      if (p == p.parent_path()) break;
    }
    for (const auto& p : w->created)
      if (::mkdir(p.c_str(), p == dest ? dir_mode : 0777) != 0 && errno != EEXIST)
        return detail::sys_error("cannot create the destination", p, errno);
  }
  w->st = impl_;
  w->id = artifact;
  w->ranges = std::move(ranges);
  w->dest = dest;
  int dfd = ::open(dest.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dfd < 0) return detail::sys_error("cannot open the destination", dest, errno);
  w->dest_fd = detail::unique_fd(dfd);
  // Everything is written under a staging directory first; only complete, synced files move out.
  std::array<std::byte, 6> rnd{};
  randombytes_buf(rnd.data(), rnd.size());
  std::string staging = std::string(staging_prefix) + detail::hex_encode(rnd);
  if (::mkdirat(w->dest_fd.get(), staging.c_str(), 0700) != 0) return detail::sys_error("cannot create", dest / staging, errno);
  w->staging = staging;  // from here on, the writer's destructor removes it
  int sfd = ::openat(w->dest_fd.get(), staging.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (sfd < 0) return detail::sys_error("cannot open", dest / staging, errno);
  w->staging_fd = detail::unique_fd(sfd);
  // Held until the writer ends, so that another export into dest does not take it for a stale one.
  if (::flock(w->staging_fd.get(), LOCK_EX | LOCK_NB) != 0) return detail::sys_error("cannot lock", dest / staging, errno);
  w->piece_file.resize(w->ranges.size());
  w->written.assign(w->piece_file.size(), false);
  for (std::size_t fi = 0; fi < d->files.size(); ++fi) {
    const auto& f = d->files[fi];
    // A single-file model is named "." in its manifest: it takes its subject's name.
    std::string name = f.name == "." ? d->summary.subject : f.name;
    if (!is_safe_relative_path(name) || (f.name == "." && name.find('/') != std::string::npos))
      return error(errc::invalid_argument, fmt::format("cannot export a file named \"{}\"", name));
    auto parent = open_parent(w->staging_fd.get(), name, dir_mode);
    if (!parent) return std::move(parent).error();
    int ofd = ::openat(parent->first.get(), parent->second.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                       file_mode);
    if (ofd < 0) return detail::sys_error("cannot create", dest / name, errno);
    w->files.push_back({name, detail::unique_fd(ofd)});
    for (std::size_t i = 0; i < f.pieces; ++i)
      if (f.first_piece + i < w->piece_file.size()) w->piece_file[f.first_piece + i] = fi;
    auto top = name.substr(0, name.find('/'));
    if (std::find(w->top_level.begin(), w->top_level.end(), top) == w->top_level.end()) w->top_level.push_back(top);
  }
  return export_writer(std::move(w));
}

result<void> export_writer::write(const verified_piece& piece) {
  auto& w = *impl_;
  if (w.done) return error(errc::invalid_argument, "the export is already committed");
  if (piece.artifact_id() != w.id || piece.index() >= w.piece_file.size() ||
      piece.range() != w.ranges[piece.index()])
    return error(errc::invalid_argument, "a piece of another artifact");
  if (auto r = w.put(piece.index(), 0, piece.bytes()); !r) return r;
  std::lock_guard lock(w.mutex);
  w.written[piece.index()] = true;
  return {};
}

result<void> export_writer::commit() {
  auto& w = *impl_;
  if (w.done) return error(errc::invalid_argument, "the export is already committed");
  // The pieces no caller wrote come from the store: each is decrypted chunk by chunk straight
  // into its staging file, pieces in parallel; a piece whose tag or digest fails at the end fails
  // the export, and the staging directory goes with it.
  std::vector<std::size_t> todo;
  for (std::size_t k = 0; k < w.written.size(); ++k)
    if (!w.written[k]) todo.push_back(k);
  unsigned workers = detail::worker_count(0, todo.size());
  std::vector<std::vector<std::byte>> bufs(workers);
  std::mutex failure_mutex;
  std::optional<error> failure;
  detail::parallel_for(todo.size(), workers, [&](std::size_t i, unsigned t) {
    std::size_t k = todo[i];
    bufs[t].resize(io_chunk);
    store_lock g(w.st->dir, LOCK_SH);
    auto r = w.st->open_piece(w.id, k, bufs[t],
                              [&](std::span<const std::byte> plain, std::uint64_t offset) { return w.put(k, offset, plain); });
    if (!r) {
      std::lock_guard lock(failure_mutex);
      if (!failure) failure = std::move(r).error();
      return false;
    }
    return true;
  });
  for (auto& b : bufs) sodium_memzero(b.data(), b.size());
  if (failure) return std::move(*failure);
  for (const auto& f : w.files)
    if (::fsync(f.fd.get()) != 0) return detail::sys_error("cannot sync", w.dest / f.name, errno);
  // Into place, never over something that appeared in dest meanwhile; on a failure, what was
  // already moved goes back, so dest is left as it was found.
  for (std::size_t i = 0; i < w.top_level.size(); ++i) {
    const char* top = w.top_level[i].c_str();
    bool injected = store_detail::fail_export_rename_after.load() == static_cast<int>(i);
    if (injected || ::renameat2(w.staging_fd.get(), top, w.dest_fd.get(), top, RENAME_NOREPLACE) != 0) {
      int e = injected ? EIO : errno;
      for (std::size_t j = i; j-- > 0;)
        ::renameat2(w.dest_fd.get(), w.top_level[j].c_str(), w.staging_fd.get(), w.top_level[j].c_str(), RENAME_NOREPLACE);
      return detail::sys_error("cannot move into place", w.dest / top, e);
    }
  }
  w.done = true;
  ::unlinkat(w.dest_fd.get(), w.staging.c_str(), AT_REMOVEDIR);
  ::fsync(w.dest_fd.get());
  return {};
}

result<void> store::materialize(const std::string& artifact, const std::filesystem::path& dest, export_modes modes) {
  auto w = begin_export(artifact, dest, modes);
  if (!w) return std::move(w).error();
  return w->commit();
}

}  // namespace drun

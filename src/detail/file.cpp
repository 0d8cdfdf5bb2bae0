// POSIX file helpers.
#include "detail/file.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <random>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace drun::detail {

void unique_fd::reset() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

error sys_error(std::string_view what, const std::filesystem::path& path, int err) {
  return error(err == ENOENT ? errc::not_found : errc::io_error, std::string(what))
      .with_path(path.string())
      .with_errno(err);
}

result<unique_fd> open_read(const std::filesystem::path& path, bool follow) {
  // O_NONBLOCK: opening a FIFO planted where a file is expected must fail, not hang.
  int flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | (follow ? 0 : O_NOFOLLOW);
  int raw;
  do raw = ::open(path.c_str(), flags);
  while (raw < 0 && errno == EINTR);
  if (raw < 0) return sys_error("cannot open", path, errno);
  unique_fd fd(raw);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return sys_error("cannot stat", path, errno);
  if (!S_ISREG(st.st_mode)) return error(errc::invalid_argument, "not a regular file").with_path(path.string());
  ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
  return fd;
}

result<std::uint64_t> file_size(int fd, const std::filesystem::path& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return sys_error("cannot stat", path, errno);
  return static_cast<std::uint64_t>(st.st_size);
}

result<void> pread_exact(int fd, std::span<std::byte> buf, std::uint64_t offset,
                         const std::filesystem::path& path) {
  std::size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("read failed", path, errno).with_range(offset, offset + buf.size());
    }
    if (n == 0)
      return error(errc::io_error, "file ended early (it changed while it was read)")
          .with_path(path.string())
          .with_range(offset, offset + buf.size());
    done += static_cast<std::size_t>(n);
  }
  return {};
}

namespace {

result<std::string> read_whole(int fd, const std::filesystem::path& path, std::size_t max_size, errc too_large) {
  auto size = file_size(fd, path);
  if (!size) return std::move(size).error();
  if (*size > max_size)
    return error(too_large, fmt::format("file is too large ({} bytes, at most {})", *size, max_size))
        .with_path(path.string());
  // Sized once from fstat: no reallocation leaves stray copies (key files are read this way too).
  std::string out(static_cast<std::size_t>(*size), '\0');
  if (auto r = pread_exact(fd, std::as_writable_bytes(std::span(out)), 0, path); !r) return std::move(r).error();
  char extra;
  if (::pread(fd, &extra, 1, static_cast<off_t>(out.size())) != 0)
    return error(errc::io_error, "file changed while it was read").with_path(path.string());
  return out;
}

}  // namespace

result<std::string> read_file(const std::filesystem::path& path, std::size_t max_size, errc too_large) {
  auto fd = open_read(path, /*follow=*/true);
  if (!fd) return std::move(fd).error();
  return read_whole(fd->get(), path, max_size, too_large);
}

result<void> check_owner_only(int fd, std::string_view what, const std::filesystem::path& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return sys_error("cannot stat", path, errno).with_code(errc::key_error);
  if ((st.st_mode & 077) != 0)
    return error(errc::key_error, fmt::format("{} has permissions {:04o}: it must be readable by its owner only "
                                              "(chmod 600)",
                                              what, st.st_mode & 07777))
        .with_path(path.string());
  return {};
}

result<std::string> read_owner_only(const std::filesystem::path& path, std::string_view what, std::size_t max_size) {
  auto fd = open_read(path, /*follow=*/true);
  if (!fd) return std::move(fd).error().with_code(errc::key_error);
  if (auto r = check_owner_only(fd->get(), what, path); !r) return std::move(r).error();
  auto text = read_whole(fd->get(), path, max_size, errc::key_error);
  if (!text) return std::move(text).error().with_code(errc::key_error);
  return text;
}

result<void> write_all(int fd, std::string_view data, const std::filesystem::path& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("write failed", path, errno);
    }
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return {};
}

result<void> write_new_file(const std::filesystem::path& file, std::string_view content, unsigned mode) {
  int fd_raw = ::open(file.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, static_cast<mode_t>(mode));
  if (fd_raw < 0) {
    if (errno == EEXIST)
      return error(errc::invalid_argument, "already exists; refusing to overwrite it").with_path(file.string());
    return sys_error("cannot create", file, errno);
  }
  unique_fd fd(fd_raw);
  auto r = write_all(fd.get(), content, file);
  if (r && ::fchmod(fd.get(), static_cast<mode_t>(mode)) != 0) r = sys_error("cannot chmod", file, errno);
  if (r && ::fsync(fd.get()) != 0) r = sys_error("cannot fsync", file, errno);
  if (!r) ::unlink(file.c_str());
  return r;
}

result<void> replace_file(const std::filesystem::path& file, std::string_view content, unsigned mode,
                          std::string_view what) {
  auto dir = file.parent_path().empty() ? std::filesystem::path(".") : file.parent_path();
  thread_local std::mt19937_64 rng{std::random_device{}()};
  auto tmp = dir / fmt::format(".{}.{:016x}.tmp", file.filename().string(), rng());
  if (auto r = write_new_file(tmp, content, mode); !r) return r;
  if (::rename(tmp.c_str(), file.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return sys_error(what, file, err);
  }
  return {};
}

}  // namespace drun::detail

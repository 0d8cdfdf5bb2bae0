// POSIX file helpers: an owning descriptor, exact positional reads, bounded whole-file reads.
#pragma once

#include <drun/error.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace drun::detail {

class unique_fd {
 public:
  unique_fd() = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  ~unique_fd() { reset(); }
  unique_fd(unique_fd&& o) noexcept : fd_(o.release()) {}
  unique_fd& operator=(unique_fd&& o) noexcept { if (this != &o) { reset(); fd_ = o.release(); } return *this; }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  int release() noexcept { int f = fd_; fd_ = -1; return f; }
  void reset() noexcept;

 private:
  int fd_ = -1;
};

// An error for a failed system call on `path`: not_found for ENOENT, io_error otherwise.
error sys_error(std::string_view what, const std::filesystem::path& path, int err);

// Opens a regular file for reading, without following a final symlink unless follow is set.
// Anything but a regular file (a FIFO, a device, a directory) is refused without blocking.
result<unique_fd> open_read(const std::filesystem::path& path, bool follow = false);

result<std::uint64_t> file_size(int fd, const std::filesystem::path& path);

// Reads exactly buf.size() bytes at offset; a short read (the file shrank) is an io_error.
result<void> pread_exact(int fd, std::span<std::byte> buf, std::uint64_t offset,
                         const std::filesystem::path& path);

// Reads a whole regular file, refusing one larger than max_size with `too_large` ("too large"
// in the message): a bundle that is too big is malformed, a key file that is too big is misuse.
result<std::string> read_file(const std::filesystem::path& path, std::size_t max_size,
                              errc too_large = errc::invalid_argument);

// Secrets on disk (keys, credentials, tokens) are for their owner only: a file that group or
// others may read is refused (key_error), naming what it is and how to fix it.
result<void> check_owner_only(int fd, std::string_view what, const std::filesystem::path& path);
// A small secret file whole: opened following symlinks (a Kubernetes Secret mount is one), checked
// as above on the file actually opened, read once. Every failure is a key_error.
result<std::string> read_owner_only(const std::filesystem::path& path, std::string_view what, std::size_t max_size);

// Writes all of data; retries short writes and EINTR.
result<void> write_all(int fd, std::string_view data, const std::filesystem::path& path);

// Creates `file` exclusively (never overwrites, never follows a symlink) with `mode`, writes
// content and fsyncs; removes the file again on failure.
result<void> write_new_file(const std::filesystem::path& file, std::string_view content, unsigned mode);

// Replaces `file` atomically (a new file beside it, fsynced, renamed over it): a reader sees the
// old content or the new, never a part. `what` starts the error message.
result<void> replace_file(const std::filesystem::path& file, std::string_view content, unsigned mode,
                          std::string_view what);

}  // namespace drun::detail

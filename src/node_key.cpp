// Node keys and their sources. Every buffer that holds key text or key bytes is guarded memory.
#include <drun/node_key.hpp>

#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/secret.hpp"
#include "store/node_key_data.hpp"

#include <fmt/format.h>
#include <sodium.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

namespace drun {

struct node_key::impl {
  detail::secret_buffer bytes{node_key::size};
};

node_key::node_key(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
node_key::~node_key() = default;
node_key::node_key(node_key&&) noexcept = default;
node_key& node_key::operator=(node_key&&) noexcept = default;

std::span<const std::byte> detail::node_key_access::bytes(const node_key& k) { return k.impl_->bytes.span(); }

node_key node_key::generate() {
  auto p = std::make_unique<impl>();
  randombytes_buf(p->bytes.data(), size);
  return node_key(std::move(p));
}

result<node_key> node_key::from_text(std::string_view text) {
  auto is_space = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
  while (!text.empty() && is_space(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_space(text.back())) text.remove_suffix(1);
  auto p = std::make_unique<impl>();
  if (text.size() == 2 * size) {
    // sodium_hex2bin is constant time and writes straight into guarded memory.
    std::size_t len = 0;
    if (sodium_hex2bin(p->bytes.uchar(), size, text.data(), text.size(), nullptr, &len, nullptr) == 0 && len == size)
      return node_key(std::move(p));
  } else if (text.size() == 44) {
    detail::secret_buffer decoded(33);
    auto len = detail::base64_decode_into(text, decoded.span());
    if (len && *len == size) {
      std::copy_n(decoded.data(), size, p->bytes.data());
      return node_key(std::move(p));
    }
  }
  return error(errc::key_error, "a node key is 32 bytes written as 64 hex characters or as base64");
}

namespace {

// Reads at most `max` bytes from fd into guarded memory; returns the length.
result<std::size_t> read_secret(int fd, detail::secret_buffer& buf, const std::string& what) {
  std::size_t len = 0;
  for (;;) {
    if (len == buf.size()) return error(errc::key_error, fmt::format("{} holds more than a node key", what));
    ssize_t n = ::read(fd, buf.data() + len, buf.size() - len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return error(errc::key_error, fmt::format("cannot read {}", what)).with_errno(errno);
    }
    if (n == 0) return len;
    len += static_cast<std::size_t>(n);
  }
}

result<node_key> from_file(const std::string& path) {
  auto fd = detail::open_read(path, /*follow=*/true);  // a Kubernetes Secret mount is a symlink
  // Any failure to read the key is a configuration error, whatever the errno.
  if (!fd) return std::move(fd).error().with_code(errc::key_error).with_operation("node key");
  if (auto r = detail::check_owner_only(fd->get(), "node key file", path); !r) return std::move(r).error();
  detail::secret_buffer text(256);
  auto len = read_secret(fd->get(), text, "the node key file");
  if (!len) return std::move(len).error().with_path(path);
  auto key = node_key::from_text(text.view(*len));
  if (!key) return std::move(key).error().with_path(path);
  return key;
}

result<node_key> from_env(const std::string& name) {
  const char* value = std::getenv(name.c_str());
  if (!value) return error(errc::key_error, fmt::format("environment variable {} is not set", name));
  auto key = node_key::from_text(value);
  if (!key) return error(errc::key_error, fmt::format("environment variable {}: {}", name, key.error().detail()));
  return key;
}

result<node_key> from_command(const std::string& command) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return error(errc::key_error, "cannot create a pipe").with_errno(errno);
  detail::unique_fd read_end(fds[0]), write_end(fds[1]);
  pid_t pid = ::fork();
  if (pid < 0) return error(errc::key_error, "cannot fork").with_errno(errno);
  if (pid == 0) {
    ::dup2(write_end.get(), STDOUT_FILENO);
    ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  write_end.reset();
  detail::secret_buffer text(256);
  auto len = read_secret(read_end.get(), text, "the key command's output");
  read_end.reset();
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  // The command itself is not echoed: it may carry a token on its command line.
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return error(errc::key_error, WIFEXITED(status) ? fmt::format("the key command exited with status {}", WEXITSTATUS(status))
                                                    : std::string("the key command was killed by a signal"));
  if (!len) return std::move(len).error();
  auto key = node_key::from_text(text.view(*len));
  if (!key) return error(errc::key_error, "the key command's output: " + key.error().detail());
  return key;
}

}  // namespace

result<node_key> node_key::from_source(std::string_view spec) {
  auto colon = spec.find(':');
  std::string kind(spec.substr(0, colon)), rest(colon == std::string_view::npos ? "" : spec.substr(colon + 1));
  if (colon == std::string_view::npos || rest.empty())
    return error(errc::key_error, "a key source is file:PATH, env:NAME or cmd:COMMAND");
  if (kind == "file") return from_file(rest);
  if (kind == "env") return from_env(rest);
  if (kind == "cmd") return from_command(rest);
  return error(errc::key_error, fmt::format("unknown key source \"{}\" (file:, env: or cmd:)", kind));
}

result<void> node_key::save(const std::filesystem::path& file) const {
  detail::secret_buffer text(2 * size + 2);
  sodium_bin2hex(reinterpret_cast<char*>(text.data()), 2 * size + 1, impl_->bytes.uchar(), size);
  text.data()[2 * size] = std::byte{'\n'};
  return detail::write_new_file(file, text.view(2 * size + 1), 0600);
}

}  // namespace drun

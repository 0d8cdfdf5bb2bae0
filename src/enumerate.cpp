// Walking a model exactly as OMS v1.0 says: top-level default ignores, exact user ignore paths
// with their subtree, symlink policy, refusal of special files and unsafe names, OMS order.
#include <drun/manifest.hpp>

#include "detail/file.hpp"
#include "manifest_data.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unordered_set>

namespace drun {
namespace {

bool valid_utf8(std::string_view s) noexcept {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    std::size_t len;
    std::uint32_t cp;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return false;
    if (i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = cp << 6 | (cc & 0x3F);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
      return false;
    i += len;
  }
  return true;
}

const char* file_kind(mode_t m) noexcept {
  if (S_ISFIFO(m)) return "a named pipe";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m) || S_ISBLK(m)) return "a device";
  return "not a regular file";
}

struct walker {
  const model_policy& policy;
  std::unordered_set<std::string> ignored;
  std::vector<model_file> out;

  result<void> walk(const std::filesystem::path& dir, const std::string& rel) {
    DIR* d = ::opendir(dir.c_str());
    if (!d) return detail::sys_error("cannot open directory", dir, errno);
    std::vector<std::string> names;
    errno = 0;
    while (dirent* e = ::readdir(d)) {
      std::string_view n = e->d_name;
      if (n != "." && n != "..") names.emplace_back(n);
    }
    int err = errno;
    ::closedir(d);
    if (err != 0) return detail::sys_error("cannot read directory", dir, err);

    for (const auto& name : names) {
      std::string child_rel = rel.empty() ? name : rel + "/" + name;
      if (ignored.count(child_rel)) continue;
      if (!is_safe_relative_path(child_rel))
        return error(errc::unsafe_entry, "unsafe path (not a valid UTF-8 name without control characters)")
            .with_path(child_rel);
      auto child = dir / name;
      struct stat st {};
      if (::lstat(child.c_str(), &st) != 0) return detail::sys_error("cannot stat", child, errno);
      if (S_ISLNK(st.st_mode)) {
        if (!policy.allow_symlinks)
          return error(errc::unsafe_entry, "is a symlink, and symlinks are not allowed").with_path(child_rel);
        if (::stat(child.c_str(), &st) != 0)
          return error(errc::unsafe_entry, "is a dangling symlink").with_path(child_rel).with_errno(errno);
        if (S_ISDIR(st.st_mode))
          return error(errc::unsafe_entry, "is a symlink to a directory, which is not supported")
              .with_path(child_rel);
      }
      if (S_ISDIR(st.st_mode)) {
        if (auto r = walk(child, child_rel); !r) return r;
      } else if (S_ISREG(st.st_mode)) {
        out.push_back({child_rel, child, static_cast<std::uint64_t>(st.st_size), st.st_dev, st.st_ino});
      } else {
        return error(errc::unsafe_entry, fmt::format("is {}", file_kind(st.st_mode))).with_path(child_rel);
      }
    }
    return {};
  }
};

}  // namespace

const std::vector<std::string>& default_ignore_paths() {
  static const std::vector<std::string> paths{".git", ".gitattributes", ".github", ".gitignore"};
  return paths;
}

bool is_safe_relative_path(std::string_view path) noexcept {
  if (path.empty() || path.front() == '/' || path.back() == '/') return false;
  for (char c : path)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return false;
  if (!valid_utf8(path)) return false;
  std::size_t start = 0;
  while (start <= path.size()) {
    auto slash = path.find('/', start);
    auto seg = path.substr(start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
    if (seg.empty() || seg == "." || seg == "..") return false;
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  return true;
}

result<std::vector<model_file>> enumerate_model(const std::filesystem::path& model,
                                                const model_policy& policy) {
  for (const auto& p : policy.ignore_paths)
    if (!is_safe_relative_path(p))
      return error(errc::invalid_argument, fmt::format("ignore path \"{}\" is not a relative path inside the model", p));
  struct stat st {};
  if (::lstat(model.c_str(), &st) != 0) return detail::sys_error("cannot stat", model, errno);
  if (S_ISLNK(st.st_mode)) {
    if (!policy.allow_symlinks)
      return error(errc::unsafe_entry, "is a symlink, and symlinks are not allowed").with_path(model.string());
    if (::stat(model.c_str(), &st) != 0) return detail::sys_error("cannot stat", model, errno);
  }
  if (S_ISREG(st.st_mode))
    return std::vector<model_file>{{".", model, static_cast<std::uint64_t>(st.st_size), st.st_dev, st.st_ino}};
  if (!S_ISDIR(st.st_mode))
    return error(errc::unsafe_entry, fmt::format("is {}", file_kind(st.st_mode))).with_path(model.string());

  walker w{policy, {}, {}};
  w.ignored.insert(default_ignore_paths().begin(), default_ignore_paths().end());
  w.ignored.insert(policy.ignore_paths.begin(), policy.ignore_paths.end());
  if (auto r = w.walk(model, ""); !r) return std::move(r).error();
  std::sort(w.out.begin(), w.out.end(),
            [](const model_file& a, const model_file& b) { return detail::oms_name_less(a.name, b.name); });
  return std::move(w.out);
}

std::filesystem::path default_signature_path(const std::filesystem::path& model) {
  std::error_code ec;
  if (std::filesystem::is_directory(model, ec)) return model / "model.sig";
  auto p = model;
  p += ".sig";
  return p;
}

std::optional<std::string> signature_inside(const std::filesystem::path& model, const std::filesystem::path& signature) {
  std::error_code ec;
  auto root = std::filesystem::weakly_canonical(model, ec);
  if (ec) return std::nullopt;
  auto s = std::filesystem::weakly_canonical(signature, ec);
  if (ec) return std::nullopt;
  auto rel = s.lexically_relative(root);
  if (rel.empty() || *rel.begin() == ".." || rel == ".") return std::nullopt;
  return rel.generic_string();
}

}  // namespace drun

// Origins: HTTP(S) (one Range request per piece over fetch/http.hpp's pooled client), S3, hubs
// by name (hf://), OCI registries (oci://, src/oci/), and file:// for local copies.
#include <drun/source.hpp>

#include <drun/manifest.hpp>

#include "detail/file.hpp"
#include "fetch/http.hpp"
#include "oci/registry.hpp"

#include <fmt/format.h>
#include <sodium.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <vector>

namespace drun {
namespace {

class file_source final : public source {
 public:
  explicit file_source(std::string url, std::filesystem::path root) : url_(std::move(url)), root_(std::move(root)) {}
  const std::string& name() const noexcept override { return url_; }
  result<void> fetch(const piece_request& piece, std::span<std::byte> out, const std::atomic<bool>*) override {
    auto path = piece.file == "." ? root_ : root_ / std::string(piece.file);
    auto fd = detail::open_read(path, /*follow=*/true);
    if (!fd) return std::move(fd).error();
    return detail::pread_exact(fd->get(), out, piece.range.begin, path);
  }

 private:
  std::string url_;
  std::filesystem::path root_;
};

// hf://ORG/NAME[@REVISION][/PATH]: a Hugging Face-style hub by name. The base URL is
// ENDPOINT/ORG/NAME/resolve/REVISION (ENDPOINT from $HF_ENDPOINT, a mirror or a private hub;
// else https://huggingface.co; REVISION main unless given), and the token ($HF_TOKEN, else the
// file $HF_TOKEN_PATH or ~/.cache/huggingface/token, owner-only) goes to the hub's origin only:
// never to the CDN its resolve/ URLs redirect to.
struct hub_url {
  std::string base;  // ENDPOINT/ORG/NAME/resolve/REVISION
  std::string path;  // what follows NAME[@REVISION]/, percent-encoded
  std::string endpoint;
};

std::string env_or(const char* name, std::string fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

result<hub_url> parse_hub(std::string_view url) {
  auto bad = [&](std::string why) {
    return error(errc::invalid_argument, fmt::format("\"{}\" is not an hf://ORG/NAME[@REVISION] reference: {}", url, why));
  };
  auto rest = url.substr(5);
  auto name_ok = [](std::string_view s, bool slash) {
    if (s.empty() || s.size() > 128 || s.front() == '.' || s.front() == '-') return false;
    for (char ch : s)
      if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' && ch != '.' && !(slash && ch == '/'))
        return false;
    return s.find("..") == std::string_view::npos;
  };
  auto org_end = rest.find('/');
  if (org_end == std::string_view::npos) return bad("no ORG/NAME");
  auto org = rest.substr(0, org_end);
  rest = rest.substr(org_end + 1);
  auto name_end = rest.find_first_of("@/");
  auto name = rest.substr(0, name_end);
  std::string revision = "main";
  rest = name_end == std::string_view::npos ? std::string_view() : rest.substr(name_end);
  if (!rest.empty() && rest.front() == '@') {
    auto rev_end = rest.find('/');
    revision = std::string(rest.substr(1, rev_end == std::string_view::npos ? rev_end : rev_end - 1));
    rest = rev_end == std::string_view::npos ? std::string_view() : rest.substr(rev_end);
    if (!name_ok(revision, false)) return bad("the revision is not [A-Za-z0-9._-]");
  }
  if (!name_ok(org, false) || !name_ok(name, false)) return bad("ORG and NAME are [A-Za-z0-9._-]");
  hub_url h;
  h.endpoint = env_or("HF_ENDPOINT", "https://huggingface.co");
  while (!h.endpoint.empty() && h.endpoint.back() == '/') h.endpoint.pop_back();
  if (http::origin_of(h.endpoint).empty())
    return error(errc::invalid_argument, fmt::format("HF_ENDPOINT \"{}\" is not an http(s) URL", h.endpoint));
  h.base = fmt::format("{}/{}/{}/resolve/{}", h.endpoint, org, name, revision);
  if (!rest.empty()) {
    auto path = std::string(rest.substr(1));
    if (!is_safe_relative_path(path)) return bad("the path is not a safe relative path");
    h.path = http::url_path(path);
  }
  return h;
}

// The hub's options: its token (if any) as the only credentials, scoped to the hub's origin.
result<source_options> hub_options(const hub_url& h, source_options o) {
  for (auto& line : o.headers) sodium_memzero(line.data(), line.size());
  o.headers.clear();
  o.credentials_origin = h.endpoint;
  std::string token = env_or("HF_TOKEN", "");
  if (token.empty()) {
    const char* home = std::getenv("HOME");
    std::string file = env_or("HF_TOKEN_PATH", home ? std::string(home) + "/.cache/huggingface/token" : std::string());
    std::error_code ec;
    if (!file.empty() && std::filesystem::exists(file, ec)) {
      auto text = detail::read_owner_only(file, "hub token file", 4096);
      if (!text) return std::move(text).error();
      token = text->substr(0, text->find_first_of("\r\n"));
      sodium_memzero(text->data(), text->size());
    }
  }
  if (token.find_first_of("\r\n") != std::string::npos) return error(errc::key_error, "the hub token holds a line break");
  if (!token.empty()) o.headers.push_back("Authorization: Bearer " + token);
  sodium_memzero(token.data(), token.size());
  return o;
}

}  // namespace

std::string url_origin(std::string_view url) {
  http::global_init();
  return http::origin_of(std::string(url));
}

result<std::unique_ptr<source>> make_source(std::string_view url, const source_options& options) {
  if (auto r = http::check_options(options); !r) return std::move(r).error();
  if (url.rfind("file://", 0) == 0) return std::unique_ptr<source>(new file_source(std::string(url), std::string(url.substr(7))));
  if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0) {
    http::global_init();
    return std::unique_ptr<source>(new http::origin_source(std::string(url), options));
  }
  if (url.rfind("oci://", 0) == 0) {
    http::global_init();
    return oci::make_source(url, options);
  }
  if (url.rfind("hf://", 0) == 0) {
    http::global_init();
    auto hub = parse_hub(url);
    if (!hub) return std::move(hub).error();
    if (!hub->path.empty()) return error(errc::invalid_argument, fmt::format("\"{}\": a hub origin names a repository, not a file", url));
    auto o = hub_options(*hub, options);
    if (!o) return std::move(o).error();
    return std::unique_ptr<source>(new http::origin_source(hub->base, *o));
  }
  if (url.rfind("s3://", 0) == 0) {
    auto env = [](const char* name) -> std::string {
      const char* v = std::getenv(name);
      return v ? v : "";
    };
    std::string region = env("AWS_REGION");
    if (region.empty()) region = env("AWS_DEFAULT_REGION");
    if (region.empty()) region = "us-east-1";
    std::string endpoint = options.s3_endpoint.empty() ? env("AWS_ENDPOINT_URL") : options.s3_endpoint;
    if (endpoint.empty()) endpoint = "https://s3." + region + ".amazonaws.com";
    while (!endpoint.empty() && endpoint.back() == '/') endpoint.pop_back();
    auto key_id = env("AWS_ACCESS_KEY_ID"), secret = env("AWS_SECRET_ACCESS_KEY");
    if (key_id.empty() || secret.empty())
      return error(errc::key_error, "s3:// needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment");
    http::global_init();
    auto src = std::make_unique<http::origin_source>(endpoint + "/" + std::string(url.substr(5)), options);
    src->client().sign_for_s3(region, key_id, secret, std::getenv("AWS_SESSION_TOKEN"));
    sodium_memzero(secret.data(), secret.size());
    return std::unique_ptr<source>(std::move(src));
  }
  return error(errc::invalid_argument,
               fmt::format("\"{}\" is not an http://, https://, s3://, oci://, hf:// or file:// origin", url));
}

result<std::string> fetch_document(std::string_view url, std::size_t max_size, const source_options& options) {
  if (auto r = http::check_options(options); !r) return std::move(r).error();
  http::global_init();
  if (url.rfind("oci://", 0) == 0) return oci::fetch_bundle(url, max_size, options);
  if (url.rfind("hf://", 0) == 0) {
    auto hub = parse_hub(url);
    if (!hub) return std::move(hub).error();
    if (hub->path.empty()) return error(errc::invalid_argument, fmt::format("\"{}\" names no file (hf://ORG/NAME[@REVISION]/model.sig)", url));
    auto o = hub_options(*hub, options);
    if (!o) return std::move(o).error();
    std::string u = hub->base + "/" + hub->path;
    http::client client(u, *o);
    return http::get_document(client, u, max_size, "bundle");
  }
  if (url.rfind("http://", 0) != 0 && url.rfind("https://", 0) != 0)
    return error(errc::invalid_argument, fmt::format("\"{}\" is not an http://, https://, oci:// or hf:// URL", url));
  std::string u(url);
  http::client client(u, options);
  return http::get_document(client, u, max_size, "bundle");
}

bool is_remote_document(std::string_view url) noexcept {
  for (std::string_view scheme : {"http://", "https://", "oci://", "hf://"})
    if (url.rfind(scheme, 0) == 0) return true;
  return false;
}

}  // namespace drun

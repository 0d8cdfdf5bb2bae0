// Origins: HTTP(S) through libcurl (one Range request per piece, a pool of connection caches so
// connections stay open), and file:// for local copies.
#include <drun/source.hpp>

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
               fmt::format("\"{}\" is not an http://, https://, s3://, oci:// or file:// origin", url));
}

result<std::string> fetch_document(std::string_view url, std::size_t max_size, const source_options& options) {
  if (auto r = http::check_options(options); !r) return std::move(r).error();
  http::global_init();
  if (url.rfind("oci://", 0) == 0) return oci::fetch_bundle(url, max_size, options);
  if (url.rfind("http://", 0) != 0 && url.rfind("https://", 0) != 0)
    return error(errc::invalid_argument, fmt::format("\"{}\" is not an http://, https:// or oci:// URL", url));
  std::string u(url);
  http::client client(u, options);
  return http::get_document(client, u, max_size, "bundle");
}

bool is_remote_document(std::string_view url) noexcept {
  for (std::string_view scheme : {"http://", "https://", "oci://"})
    if (url.rfind(scheme, 0) == 0) return true;
  return false;
}

}  // namespace drun

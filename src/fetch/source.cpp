// Origins: HTTP(S) through libcurl (one Range request per piece, a pool of reusable handles so
// connections stay open), and file:// for local copies.
#include <drun/source.hpp>

#include "detail/file.hpp"

#include <curl/curl.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace drun {
namespace {

void curl_global() {
  static const bool ready = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  (void)ready;
}

struct easy_deleter {
  void operator()(CURL* c) const noexcept { curl_easy_cleanup(c); }
};
using easy_ptr = std::unique_ptr<CURL, easy_deleter>;

// Percent-encodes each path segment of a manifest name for a URL.
std::string url_path(CURL* c, const std::string& name) {
  std::string out;
  std::size_t start = 0;
  for (;;) {
    auto slash = name.find('/', start);
    auto seg = name.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    char* esc = curl_easy_escape(c, seg.c_str(), static_cast<int>(seg.size()));
    out += esc ? esc : "";
    curl_free(esc);
    if (slash == std::string::npos) return out;
    out += '/';
    start = slash + 1;
  }
}

// Every transfer's settings: verification on unless the caller asked, loudly, for it to be off;
// TLS 1.3 unless stepped down to 1.2; only http(s) redirects; stalls abandoned.
void configure_easy(CURL* c, const source_options& o) {
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 5L);
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, o.insecure ? 0L : 1L);
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, o.insecure ? 0L : 2L);
  curl_easy_setopt(c, CURLOPT_SSLVERSION, o.allow_tls12 ? CURL_SSLVERSION_TLSv1_2 : CURL_SSLVERSION_TLSv1_3);
  if (!o.ca_file.empty()) curl_easy_setopt(c, CURLOPT_CAINFO, o.ca_file.c_str());
  if (!o.proxy.empty()) curl_easy_setopt(c, CURLOPT_PROXY, o.proxy.c_str());
  curl_easy_setopt(c, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2TLS);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, static_cast<long>(o.connect_timeout.count()));
  // A stalled transfer: under 1 byte/s for stall_timeout seconds.
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, static_cast<long>(o.stall_timeout.count()));
  curl_easy_setopt(c, CURLOPT_USERAGENT, "drun/0.1");
}

// scheme://host:port of a URL (default ports filled in), "" when it does not parse.
std::string origin_of(const std::string& url) {
  CURLU* u = curl_url();
  std::string out;
  if (u && curl_url_set(u, CURLUPART_URL, url.c_str(), 0) == CURLUE_OK) {
    char *scheme = nullptr, *host = nullptr, *port = nullptr;
    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
    curl_url_get(u, CURLUPART_HOST, &host, 0);
    curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT);
    if (scheme && host && port) out = fmt::format("{}://{}:{}", scheme, host, port);
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
  }
  curl_url_cleanup(u);
  return out;
}

bool same_origin(const std::string& a, const std::string& b) {
  auto oa = origin_of(a);
  return !oa.empty() && oa == origin_of(b);
}

// One transfer's state: the body goes straight into the caller's buffer, and never past it.
struct transfer {
  std::span<std::byte> out;
  std::size_t received = 0;
  bool overflow = false;
  std::string content_range;

  static std::size_t on_body(char* data, std::size_t size, std::size_t n, void* self) {
    auto* t = static_cast<transfer*>(self);
    std::size_t len = size * n;
    if (t->received + len > t->out.size()) {
      t->overflow = true;
      return 0;  // aborts the transfer
    }
    std::memcpy(t->out.data() + t->received, data, len);
    t->received += len;
    return len;
  }
  static std::size_t on_header(char* data, std::size_t size, std::size_t n, void* self) {
    auto* t = static_cast<transfer*>(self);
    std::string_view line(data, size * n);
    constexpr std::string_view key = "content-range:";
    if (line.size() > key.size()) {
      std::string lower(line.substr(0, key.size()));
      for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (lower == key) {
        auto v = line.substr(key.size());
        while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
        while (!v.empty() && (v.back() == '\r' || v.back() == '\n' || v.back() == ' ')) v.remove_suffix(1);
        t->content_range = std::string(v);
      }
    }
    return size * n;
  }
};

class http_source final : public source {
 public:
  http_source(std::string base, source_options options) : base_(std::move(base)), options_(std::move(options)) {
    while (base_.size() > 1 && base_.back() == '/') base_.pop_back();
    for (const auto& l : options_.headers) headers_ = curl_slist_append(headers_, l.c_str());
  }
  const std::string& name() const noexcept override { return base_; }

  result<void> fetch(const std::string& file, byte_range range, std::span<std::byte> out) override {
    auto handle = take();
    if (!handle) return error(errc::io_error, "cannot create a curl handle");
    CURL* c = handle.get();
    auto fail = [&](std::string why) {
      return error(errc::io_error, fmt::format("{}: {}", base_, why)).with_path(file).with_range(range.begin, range.end);
    };
    std::string first = file == "." ? base_ : base_ + "/" + url_path(c, file);
    // A hub answers with a redirect to a CDN: the target is reused for the next ranges of the file.
    std::string url = first;
    bool cached = false;
    {
      std::lock_guard lock(mutex_);
      if (auto it = redirects_.find(file); it != redirects_.end()) url = it->second, cached = true;
    }
    std::string range_header = fmt::format("{}-{}", range.begin, range.end - 1);
    transfer t{out, 0, false, {}};
    long status = 0;
    // Redirects are followed here, not by curl, so that credentials (any header the user gave)
    // go to the origin they were meant for and never to another host or port.
    for (int hop = 0;; ++hop) {
      if (hop > 5) return fail("too many redirects");
      t = transfer{out, 0, false, {}};
      curl_easy_reset(c);
      configure_easy(c, options_);
      curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
      curl_easy_setopt(c, CURLOPT_URL, url.c_str());
      curl_easy_setopt(c, CURLOPT_RANGE, range_header.c_str());
      curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &transfer::on_body);
      curl_easy_setopt(c, CURLOPT_WRITEDATA, &t);
      curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &transfer::on_header);
      curl_easy_setopt(c, CURLOPT_HEADERDATA, &t);
      if (same_origin(url, base_)) {
        if (headers_) curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers_);
        if (!sigv4_.empty()) {
          curl_easy_setopt(c, CURLOPT_AWS_SIGV4, sigv4_.c_str());
          curl_easy_setopt(c, CURLOPT_USERPWD, credentials_.c_str());
        }
      }
      char errbuf[CURL_ERROR_SIZE] = {};
      curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
      CURLcode rc = curl_easy_perform(c);
      curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
      if (t.overflow) return fail("the server sent more bytes than the range asked for (does it ignore Range?)");
      if (rc != CURLE_OK) {
        if (cached) forget(file);
        return fail(fmt::format("{} ({})", curl_easy_strerror(rc), errbuf));
      }
      if (status == 301 || status == 302 || status == 303 || status == 307 || status == 308) {
        char* location = nullptr;
        curl_easy_getinfo(c, CURLINFO_REDIRECT_URL, &location);
        if (!location || (std::strncmp(location, "http://", 7) != 0 && std::strncmp(location, "https://", 8) != 0))
          return fail("a redirect without an http(s) Location");
        url = location;
        continue;
      }
      break;
    }
    give(std::move(handle));
    if (url != first && !cached) {
      std::lock_guard lock(mutex_);
      redirects_[file] = url;
    }
    // A cached redirect target that misbehaves is forgotten: the next try asks the origin again.
    auto bad = [&](std::string why) {
      if (cached) forget(file);
      return fail(std::move(why));
    };
    if (status == 404) {
      if (cached) forget(file);
      return error(errc::not_found, fmt::format("{}: HTTP 404", base_)).with_path(file);
    }
    // 206 with the exact Content-Range asked for; 200 only when the range is a whole file.
    if (status == 206) {
      auto expected = fmt::format("bytes {}-{}/", range.begin, range.end - 1);
      if (t.content_range.rfind(expected, 0) != 0)
        return bad(fmt::format("Content-Range \"{}\" does not match the range asked for", t.content_range));
    } else if (!(status == 200 && range.begin == 0)) {
      return bad(fmt::format("HTTP {}", status));
    }
    if (t.received != out.size()) return bad(fmt::format("the body has {} bytes, the range {}", t.received, out.size()));
    return {};
  }

  ~http_source() override {
    curl_slist_free_all(headers_);
    std::fill(credentials_.begin(), credentials_.end(), '\0');
  }

  // Signs every request to this origin with AWS SigV4 (curl's own implementation).
  void sign_for_s3(std::string region, std::string key_id, std::string secret, const char* session_token) {
    sigv4_ = "aws:amz:" + region + ":s3";
    credentials_ = key_id + ":" + secret;
    std::fill(secret.begin(), secret.end(), '\0');
    if (session_token) headers_ = curl_slist_append(headers_, (std::string("x-amz-security-token: ") + session_token).c_str());
  }

 private:
  easy_ptr take() {
    {
      std::lock_guard lock(mutex_);
      if (!pool_.empty()) {
        auto h = std::move(pool_.back());
        pool_.pop_back();
        return h;
      }
    }
    return easy_ptr(curl_easy_init());
  }
  // Only handles whose transfer succeeded come back: a failed one may hold a broken connection.
  void give(easy_ptr h) {
    std::lock_guard lock(mutex_);
    pool_.push_back(std::move(h));
  }
  void forget(const std::string& file) {
    std::lock_guard lock(mutex_);
    redirects_.erase(file);
  }

  std::string base_;
  source_options options_;
  std::mutex mutex_;
  std::vector<easy_ptr> pool_;
  std::map<std::string, std::string> redirects_;  // file -> where its origin sent us
  curl_slist* headers_ = nullptr;
  std::string sigv4_, credentials_;
};

class file_source final : public source {
 public:
  explicit file_source(std::string url, std::filesystem::path root) : url_(std::move(url)), root_(std::move(root)) {}
  const std::string& name() const noexcept override { return url_; }
  result<void> fetch(const std::string& file, byte_range range, std::span<std::byte> out) override {
    auto path = file == "." ? root_ : root_ / file;
    auto fd = detail::open_read(path, /*follow=*/true);
    if (!fd) return std::move(fd).error();
    return detail::pread_exact(fd->get(), out, range.begin, path);
  }

 private:
  std::string url_;
  std::filesystem::path root_;
};

}  // namespace

result<std::unique_ptr<source>> make_source(std::string_view url, const source_options& options) {
  if (url.rfind("file://", 0) == 0) return std::unique_ptr<source>(new file_source(std::string(url), std::string(url.substr(7))));
  if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0) {
    curl_global();
    return std::unique_ptr<source>(new http_source(std::string(url), options));
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
    curl_global();
    auto src = std::make_unique<http_source>(endpoint + "/" + std::string(url.substr(5)), options);
    src->sign_for_s3(region, key_id, secret, std::getenv("AWS_SESSION_TOKEN"));
    std::fill(secret.begin(), secret.end(), '\0');
    return std::unique_ptr<source>(std::move(src));
  }
  return error(errc::invalid_argument, fmt::format("\"{}\" is not an http://, https://, s3:// or file:// origin", url));
}

result<std::string> fetch_document(std::string_view url, std::size_t max_size, const source_options& options) {
  if (url.rfind("http://", 0) != 0 && url.rfind("https://", 0) != 0)
    return error(errc::invalid_argument, fmt::format("\"{}\" is not an http:// or https:// URL", url));
  curl_global();
  easy_ptr c(curl_easy_init());
  if (!c) return error(errc::io_error, "cannot create a curl handle");
  std::string body;
  struct sink {
    std::string* body;
    std::size_t max;
    static std::size_t on_body(char* data, std::size_t size, std::size_t n, void* self) {
      auto* s = static_cast<sink*>(self);
      if (s->body->size() + size * n > s->max) return 0;
      s->body->append(data, size * n);
      return size * n;
    }
  } s{&body, max_size};
  std::string u(url);
  configure_easy(c.get(), options);
  curl_easy_setopt(c.get(), CURLOPT_URL, u.c_str());
  curl_easy_setopt(c.get(), CURLOPT_WRITEFUNCTION, &sink::on_body);
  curl_easy_setopt(c.get(), CURLOPT_WRITEDATA, &s);
  CURLcode rc = curl_easy_perform(c.get());
  long status = 0;
  curl_easy_getinfo(c.get(), CURLINFO_RESPONSE_CODE, &status);
  if (rc == CURLE_WRITE_ERROR && body.size() >= max_size)
    return error(errc::malformed_bundle, fmt::format("{}: the bundle is too large (more than {} bytes)", url, max_size));
  if (rc != CURLE_OK) return error(errc::io_error, fmt::format("{}: {}", url, curl_easy_strerror(rc)));
  if (status != 200) return error(status == 404 ? errc::not_found : errc::io_error, fmt::format("{}: HTTP {}", url, status));
  return body;
}

}  // namespace drun

// Origins: HTTP(S) through libcurl (one Range request per piece, a pool of connection caches so
// connections stay open), and file:// for local copies.
#include <drun/source.hpp>

#include "detail/file.hpp"
#include "peer/tls.hpp"

#include <curl/curl.h>
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

void curl_global() {
  static const bool ready = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  (void)ready;
}

struct easy_deleter {
  void operator()(CURL* c) const noexcept { curl_easy_cleanup(c); }
};
using easy_ptr = std::unique_ptr<CURL, easy_deleter>;

struct share_deleter {
  void operator()(CURLSH* s) const noexcept { curl_share_cleanup(s); }
};
using share_ptr = std::unique_ptr<CURLSH, share_deleter>;

// Where a pooled exchange keeps what outlives one transfer: its open connections, TLS sessions
// and resolved names. Each transfer gets a fresh easy handle attached to one of these, never a
// reused handle: libcurl 7.88 (bookworm's) keeps a pointer to the previous transfer's last header
// after freeing it, and an answer whose first header line is a folded continuation then writes
// through it (curl issue 11101, fixed in 8.1.0; our fuzzer found it from a hostile origin). A
// share is used by one thread at a time (the pool hands it out), which is what libcurl supports
// for a shared connection cache, so it needs no lock callbacks.
share_ptr make_share() {
  share_ptr s(curl_share_init());
  if (!s) return s;
  for (auto data : {CURL_LOCK_DATA_CONNECT, CURL_LOCK_DATA_SSL_SESSION, CURL_LOCK_DATA_DNS})
    if (curl_share_setopt(s.get(), CURLSHOPT_SHARE, data) != CURLSHE_OK) return {};
  return s;
}

// Percent-encodes each path segment of a manifest name for a URL (RFC 3986 unreserved bytes stay).
std::string url_path(const std::string& name) {
  std::string out;
  for (char ch : name) {
    auto u = static_cast<unsigned char>(ch);
    if (std::isalnum(u) || ch == '-' || ch == '.' || ch == '_' || ch == '~' || ch == '/') out += ch;
    else out += fmt::format("%{:02X}", u);
  }
  return out;
}

// Every transfer's settings: verification on unless the caller asked, loudly, for it to be off;
// TLS 1.3 unless stepped down to 1.2 (for the proxy too); only http(s); stalls abandoned.
// Redirects are not followed by curl: http_client follows them itself.
void configure_easy(CURL* c, const source_options& o) {
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  long verify = o.insecure ? 0L : 1L, tls = o.allow_tls12 ? CURL_SSLVERSION_TLSv1_2 : CURL_SSLVERSION_TLSv1_3;
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, verify);
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, verify * 2);
  curl_easy_setopt(c, CURLOPT_SSLVERSION, tls);
  curl_easy_setopt(c, CURLOPT_PROXY_SSL_VERIFYPEER, verify);
  curl_easy_setopt(c, CURLOPT_PROXY_SSL_VERIFYHOST, verify * 2);
  curl_easy_setopt(c, CURLOPT_PROXY_SSLVERSION, tls);
  if (!o.ca_file.empty()) {
    curl_easy_setopt(c, CURLOPT_CAINFO, o.ca_file.c_str());
    curl_easy_setopt(c, CURLOPT_PROXY_CAINFO, o.ca_file.c_str());
  }
  if (!o.proxy.empty()) curl_easy_setopt(c, CURLOPT_PROXY, o.proxy.c_str());
  if (!o.proxy_credentials.empty()) curl_easy_setopt(c, CURLOPT_PROXYUSERPWD, o.proxy_credentials.c_str());
  // "host!": an address to bind, never an interface name or a host name to resolve.
  if (!o.local_address.empty()) curl_easy_setopt(c, CURLOPT_INTERFACE, ("host!" + o.local_address).c_str());
  if (!o.client_cert_file.empty()) {
    // An empty passphrase: OpenSSL never prompts on a terminal for a key that turned encrypted
    // after check_options loaded it.
    for (auto [cert, cert_type, key, key_type, pass] :
         {std::array{CURLOPT_SSLCERT, CURLOPT_SSLCERTTYPE, CURLOPT_SSLKEY, CURLOPT_SSLKEYTYPE, CURLOPT_KEYPASSWD},
          std::array{CURLOPT_PROXY_SSLCERT, CURLOPT_PROXY_SSLCERTTYPE, CURLOPT_PROXY_SSLKEY, CURLOPT_PROXY_SSLKEYTYPE,
                     CURLOPT_PROXY_KEYPASSWD}}) {
      curl_easy_setopt(c, cert, o.client_cert_file.c_str());
      curl_easy_setopt(c, cert_type, "PEM");
      curl_easy_setopt(c, key, o.client_key_file.c_str());
      curl_easy_setopt(c, key_type, "PEM");
      curl_easy_setopt(c, pass, "");
    }
  }
  curl_easy_setopt(c, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2TLS);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, static_cast<long>(o.connect_timeout.count()));
  // A stalled transfer: under 1 byte/s for stall_timeout seconds.
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, static_cast<long>(o.stall_timeout.count()));
  curl_easy_setopt(c, CURLOPT_USERAGENT, "drun/0.1");
}

// scheme://host:port of an http(s) URL (lower-cased, default ports filled in), "" otherwise. The
// same parser as the transfers' own (libcurl's), so what is compared is where requests go.
std::string origin_of(const std::string& url) {
  CURLU* u = curl_url();
  std::string out;
  if (u && curl_url_set(u, CURLUPART_URL, url.c_str(), 0) == CURLUE_OK) {
    char *scheme = nullptr, *host = nullptr, *port = nullptr;
    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
    curl_url_get(u, CURLUPART_HOST, &host, 0);
    curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT);
    if (scheme && host && port) {
      out = fmt::format("{}://{}:{}", scheme, host, port);
      for (auto& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (out.rfind("http://", 0) != 0 && out.rfind("https://", 0) != 0) out.clear();
    }
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
  }
  curl_url_cleanup(u);
  return out;
}

struct slist_deleter {
  void operator()(curl_slist* l) const noexcept { curl_slist_free_all(l); }
};
using slist_ptr = std::unique_ptr<curl_slist, slist_deleter>;

// What can be judged before any request. Headers scoped to another origin than the URL's own
// must name a real http(s) origin: one that does not parse would send them nowhere without a
// word, or let a typo pass for a scope. A client certificate must load and match its key here,
// not fail every handshake later as an origin's refusal.
result<void> check_options(const source_options& o) {
  if (!o.headers.empty() && !o.credentials_origin.empty() && origin_of(o.credentials_origin).empty())
    return error(errc::invalid_argument,
                 fmt::format("the credentials origin \"{}\" is not an http(s) URL", o.credentials_origin));
  if (auto r = peer::check_local_address(o.local_address); !r) return r;
  if (!o.client_cert_file.empty() || !o.client_key_file.empty()) {
    if (auto r = peer::check_identity(o.client_cert_file, o.client_key_file); !r)
      return std::move(r).error().with_operation("origin client certificate");
  }
  return {};
}

// One transfer's state: a 2xx body goes to the caller's sink, which refuses what it cannot hold;
// the body of any other answer (an error page, a redirect) is read and dropped, up to a bound.
struct transfer {
  std::function<bool(const char*, std::size_t)> sink;
  CURL* handle = nullptr;
  bool refused = false;
  std::size_t dropped = 0;
  std::string content_range;
  std::string bad_status;  // a status line that does not parse, printable, for the message

  static constexpr std::size_t max_dropped = 1 << 20;

  static std::size_t on_body(char* data, std::size_t size, std::size_t n, void* self) {
    auto* t = static_cast<transfer*>(self);
    long status = 0;
    curl_easy_getinfo(t->handle, CURLINFO_RESPONSE_CODE, &status);
    if (status < 200 || status > 299) {
      t->dropped += size * n;
      return t->dropped > max_dropped ? 0 : size * n;
    }
    if (!t->sink(data, size * n)) {
      t->refused = true;
      return 0;  // aborts the transfer
    }
    return size * n;
  }
  static std::size_t on_header(char* data, std::size_t size, std::size_t n, void* self) {
    auto* t = static_cast<transfer*>(self);
    std::string_view line(data, size * n);
    if (is_status_line(line) && !well_formed_status(line)) {
      for (char ch : line.substr(0, 80)) t->bad_status += std::isprint(static_cast<unsigned char>(ch)) ? ch : '?';
      return 0;  // aborts the transfer
    }
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
  // A line no header can start with ('/' and ' ' are not in a field name): libcurl passes each
  // response's status line to the header callback first.
  static bool is_status_line(std::string_view line) {
    if (line.size() < 5) return false;
    std::string head(line.substr(0, 5));
    for (auto& ch : head) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    return head == "HTTP/" || head == "HTTP ";
  }
  // HTTP/D[.D] SP DDD, then the end, a reason or the line's end. libcurl reads a line that starts
  // with "HTTP/" and does not parse as "HTTP/1.0 200" (for NCSA httpd 1.5): drun does not.
  static bool well_formed_status(std::string_view l) {
    auto digit = [&](std::size_t i) { return i < l.size() && l[i] >= '0' && l[i] <= '9'; };
    if (l.substr(0, 5) != "HTTP/" || !digit(5)) return false;
    std::size_t at = 6;
    if (at < l.size() && l[at] == '.') {
      if (!digit(at + 1)) return false;
      at += 2;
    }
    if (at >= l.size() || l[at] != ' ' || !digit(at + 1) || !digit(at + 2) || !digit(at + 3)) return false;
    at += 4;
    return at == l.size() || l[at] == ' ' || l[at] == '\r' || l[at] == '\n';
  }
  static int on_progress(void* cancel, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
    return static_cast<const std::atomic<bool>*>(cancel)->load() ? 1 : 0;
  }
};

struct response {
  long status = 0;
  std::string url;            // where the answer came from, after redirects
  std::string content_range;
};

// GETs over a pool of connection caches (each keeps its connections open), following
// redirects itself so that credentials go only to the origin they were meant for and never to
// another scheme, host or port: the caller's headers to the credentials origin, SigV4 (and its
// session token) to the URL's own.
class http_client {
 public:
  http_client(const std::string& url, source_options options)
      : origin_(origin_of(url)),
        headers_origin_(origin_of(options.credentials_origin.empty() ? url : options.credentials_origin)),
        options_(std::move(options)) {}
  ~http_client() {
    for (auto& h : options_.headers) sodium_memzero(h.data(), h.size());
    sodium_memzero(session_token_.data(), session_token_.size());
    sodium_memzero(credentials_.data(), credentials_.size());
    sodium_memzero(options_.proxy_credentials.data(), options_.proxy_credentials.size());
  }
  http_client(const http_client&) = delete;
  http_client& operator=(const http_client&) = delete;

  // Signs every request to the origin with AWS SigV4 (curl's own implementation).
  void sign_for_s3(const std::string& region, const std::string& key_id, const std::string& secret,
                   const char* session_token) {
    sigv4_ = "aws:amz:" + region + ":s3";
    credentials_ = key_id + ":" + secret;
    if (session_token) session_token_ = std::string("x-amz-security-token: ") + session_token;
  }

  // A failure here is a transport failure (io_error, or cancelled); the caller judges the status.
  result<response> get(std::string url, const std::string& range, transfer& t, const std::atomic<bool>* cancel) {
    auto share = take();
    if (!share) return error(errc::io_error, "cannot create a curl share handle");
    for (int hop = 0;; ++hop) {
      // The URL a redirect led to may carry a presigned signature in its query: not in messages.
      if (hop > 5) return error(errc::io_error, fmt::format("{}: too many redirects", url.substr(0, url.find('?'))));
      t.refused = false;
      t.dropped = 0;
      t.bad_status.clear();
      t.content_range.clear();
      // What the handle points to during the transfer outlives it: declared first, freed last.
      slist_ptr headers;
      char errbuf[CURL_ERROR_SIZE] = {};
      easy_ptr handle(curl_easy_init());
      if (!handle) return error(errc::io_error, "cannot create a curl handle");
      CURL* c = handle.get();
      t.handle = c;
      curl_easy_setopt(c, CURLOPT_SHARE, share.get());
      configure_easy(c, options_);
      curl_easy_setopt(c, CURLOPT_URL, url.c_str());
      if (!range.empty()) curl_easy_setopt(c, CURLOPT_RANGE, range.c_str());
      curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &transfer::on_body);
      curl_easy_setopt(c, CURLOPT_WRITEDATA, &t);
      curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &transfer::on_header);
      curl_easy_setopt(c, CURLOPT_HEADERDATA, &t);
      if (cancel) {
        curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, &transfer::on_progress);
        curl_easy_setopt(c, CURLOPT_XFERINFODATA, const_cast<std::atomic<bool>*>(cancel));
      }
      // This hop's headers, for the origin it goes to.
      auto to = origin_of(url);
      bool signed_s3 = !sigv4_.empty() && !origin_.empty() && to == origin_;
      auto add = [&](const std::string& line) {
        if (curl_slist* l = curl_slist_append(headers.get(), line.c_str())) {
          (void)headers.release();  // curl_slist_append returned the same list, grown
          headers.reset(l);
        }
      };
      if (!headers_origin_.empty() && to == headers_origin_)
        for (const auto& l : options_.headers) add(l);
      if (signed_s3 && !session_token_.empty()) add(session_token_);
      if (headers) curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
      if (signed_s3) {
        curl_easy_setopt(c, CURLOPT_AWS_SIGV4, sigv4_.c_str());
        curl_easy_setopt(c, CURLOPT_USERPWD, credentials_.c_str());
      }
      curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
      CURLcode rc = curl_easy_perform(c);
      response r;
      r.url = url;
      curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
      if (rc == CURLE_ABORTED_BY_CALLBACK) return error(errc::cancelled, "the transfer was cancelled");
      if (!t.bad_status.empty())
        return error(errc::io_error, fmt::format("the answer's status line does not parse: \"{}\"", t.bad_status));
      if (t.refused) return error(errc::io_error, "refused");  // the caller's sink says why
      if (t.dropped > transfer::max_dropped) return r;         // the status says what went wrong
      // libcurl's header store refuses a line without a name or a folded line with nothing to
      // continue, and says only "bad argument".
      if (rc == CURLE_BAD_FUNCTION_ARGUMENT)
        return error(errc::io_error, "the answer has a header line that does not parse (no name, or a folded "
                                     "continuation of nothing)");
      if (rc == CURLE_INTERFACE_FAILED)
        return error(errc::io_error, fmt::format("cannot dial from {} ({})", options_.local_address, errbuf));
      if (rc != CURLE_OK) return error(errc::io_error, fmt::format("{} ({})", curl_easy_strerror(rc), errbuf));
      if (r.status == 301 || r.status == 302 || r.status == 303 || r.status == 307 || r.status == 308) {
        char* location = nullptr;
        curl_easy_getinfo(c, CURLINFO_REDIRECT_URL, &location);
        if (!location || (std::strncmp(location, "http://", 7) != 0 && std::strncmp(location, "https://", 8) != 0))
          return error(errc::io_error, "a redirect without an http(s) Location");
        url = location;
        continue;
      }
      r.content_range = t.content_range;
      give(std::move(share));  // only after a complete exchange: a failed one may hold a broken connection
      return r;
    }
  }

 private:
  share_ptr take() {
    {
      std::lock_guard lock(mutex_);
      if (!pool_.empty()) {
        auto h = std::move(pool_.back());
        pool_.pop_back();
        return h;
      }
    }
    return make_share();
  }
  void give(share_ptr h) {
    std::lock_guard lock(mutex_);
    pool_.push_back(std::move(h));
  }

  std::string origin_;          // the URL's own: SigV4 goes here
  std::string headers_origin_;  // options_.headers go here only
  source_options options_;
  std::mutex mutex_;
  std::vector<share_ptr> pool_;
  std::string sigv4_, credentials_, session_token_;
};

class http_source final : public source {
 public:
  http_source(std::string base, source_options options)
      : base_(std::move(base)), client_(base_, std::move(options)) {
    while (base_.size() > 1 && base_.back() == '/') base_.pop_back();
  }
  const std::string& name() const noexcept override { return base_; }
  http_client& client() { return client_; }

  result<void> fetch(const piece_request& piece, std::span<std::byte> out, const std::atomic<bool>* cancel) override {
    const std::string file(piece.file);
    const byte_range range = piece.range;
    auto fail = [&](std::string why) {
      return error(errc::io_error, fmt::format("{}: {}", base_, why)).with_path(file).with_range(range.begin, range.end);
    };
    std::string first = file == "." ? base_ : base_ + "/" + url_path(file);
    // A hub answers with a redirect to a CDN: the target is reused for the next ranges of the file.
    std::string url = first;
    bool cached = false;
    {
      std::lock_guard lock(mutex_);
      if (auto it = redirects_.find(file); it != redirects_.end()) url = it->second, cached = true;
    }
    // A cached redirect target that misbehaves is forgotten: the next try asks the origin again.
    auto bad = [&](std::string why) {
      if (cached) forget(file);
      return fail(std::move(why));
    };
    std::size_t received = 0;
    transfer t;
    t.sink = [&](const char* data, std::size_t len) {
      if (len > out.size() - received) return false;  // never past the caller's buffer
      std::memcpy(out.data() + received, data, len);
      received += len;
      return true;
    };
    auto got = client_.get(url, fmt::format("{}-{}", range.begin, range.end - 1), t, cancel);
    if (!got) {
      if (got.error().code() == errc::cancelled) return std::move(got).error();
      if (t.refused) return bad("the server sent more bytes than the range asked for (does it ignore Range?)");
      return bad(got.error().detail());
    }
    if (got->url != first && !cached) {
      std::lock_guard lock(mutex_);
      redirects_[file] = got->url;
    }
    if (got->status == 404) {
      if (cached) forget(file);
      return error(errc::not_found, fmt::format("{}: HTTP 404", base_)).with_path(file);
    }
    // 206 with the exact Content-Range asked for; 200 only when the range is a whole file.
    if (got->status == 206) {
      auto expected = fmt::format("bytes {}-{}/", range.begin, range.end - 1);
      if (got->content_range.rfind(expected, 0) != 0)
        return bad(fmt::format("Content-Range \"{}\" does not match the range asked for", got->content_range));
    } else if (!(got->status == 200 && range.begin == 0)) {
      return bad(fmt::format("HTTP {}", got->status));
    }
    if (received != out.size()) return bad(fmt::format("the body has {} bytes, the range {}", received, out.size()));
    return {};
  }

 private:
  void forget(const std::string& file) {
    std::lock_guard lock(mutex_);
    redirects_.erase(file);
  }

  std::string base_;
  http_client client_;
  std::mutex mutex_;
  std::map<std::string, std::string> redirects_;  // file -> where its origin sent us
};

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
  curl_global();
  return origin_of(std::string(url));
}

result<std::unique_ptr<source>> make_source(std::string_view url, const source_options& options) {
  if (auto r = check_options(options); !r) return std::move(r).error();
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
    src->client().sign_for_s3(region, key_id, secret, std::getenv("AWS_SESSION_TOKEN"));
    sodium_memzero(secret.data(), secret.size());
    return std::unique_ptr<source>(std::move(src));
  }
  return error(errc::invalid_argument, fmt::format("\"{}\" is not an http://, https://, s3:// or file:// origin", url));
}

result<std::string> fetch_document(std::string_view url, std::size_t max_size, const source_options& options) {
  if (url.rfind("http://", 0) != 0 && url.rfind("https://", 0) != 0)
    return error(errc::invalid_argument, fmt::format("\"{}\" is not an http:// or https:// URL", url));
  if (auto r = check_options(options); !r) return std::move(r).error();
  curl_global();
  std::string u(url), body;
  http_client client(u, options);
  transfer t;
  t.sink = [&](const char* data, std::size_t len) {
    if (len > max_size - body.size()) return false;
    body.append(data, len);
    return true;
  };
  auto got = client.get(u, "", t, nullptr);
  if (!got && t.refused)
    return error(errc::malformed_bundle, fmt::format("{}: the bundle is too large (more than {} bytes)", url, max_size));
  if (!got) return std::move(got).error().with_path(u);
  if (got->status != 200)
    return error(got->status == 404 ? errc::not_found : errc::io_error, fmt::format("{}: HTTP {}", url, got->status));
  return body;
}

}  // namespace drun

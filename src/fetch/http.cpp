// The HTTP(S) exchange every origin shares: libcurl under drun's rules (see http.hpp).
#include "fetch/http.hpp"

#include "peer/tls.hpp"

#include <curl/curl.h>
#include <fmt/format.h>
#include <sodium.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>

namespace drun::http {
namespace {

struct easy_deleter {
  void operator()(CURL* c) const noexcept { curl_easy_cleanup(c); }
};
using easy_ptr = std::unique_ptr<CURL, easy_deleter>;

struct curlsh_deleter {
  void operator()(CURLSH* s) const noexcept { curl_share_cleanup(s); }
};
using curlsh_ptr = std::unique_ptr<CURLSH, curlsh_deleter>;

// Where a pooled exchange keeps what outlives one transfer: its open connections, TLS sessions
// and resolved names. Each transfer gets a fresh easy handle attached to one of these, never a
// reused handle: libcurl 7.88 (bookworm's) keeps a pointer to the previous transfer's last header
// after freeing it, and an answer whose first header line is a folded continuation then writes
// through it (curl issue 11101, fixed in 8.1.0; our fuzzer found it from a hostile origin). A
// share is used by one thread at a time (the pool hands it out), which is what libcurl supports
// for a shared connection cache, so it needs no lock callbacks.
curlsh_ptr make_share() {
  curlsh_ptr s(curl_share_init());
  if (!s) return s;
  for (auto data : {CURL_LOCK_DATA_CONNECT, CURL_LOCK_DATA_SSL_SESSION, CURL_LOCK_DATA_DNS})
    if (curl_share_setopt(s.get(), CURLSHOPT_SHARE, data) != CURLSHE_OK) return {};
  return s;
}

// Every transfer's settings: verification on unless the caller asked, loudly, for it to be off;
// TLS 1.3 unless stepped down to 1.2 (for the proxy too); only http(s); stalls abandoned.
// Redirects are not followed by curl: client::send follows them itself.
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
  // HTTP/1.1 even where the server offers HTTP/2: every piece in flight has a connection of its
  // own, so h2's multiplexing buys nothing, while its framing costs (nginx sends 8 KiB DATA
  // frames; Go's h2 server, the registry's, spends more CPU per byte than its HTTP/1.1). Fetching
  // 2 GiB from nginx over TLS took 4.9-6.2 s over HTTP/1.1 against 5.6-6.5 s over h2, in three
  // paired runs (AMD EPYC, 2 cores, 2026-12-08).
  curl_easy_setopt(c, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_1_1);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, static_cast<long>(o.connect_timeout.count()));
  // A stalled transfer: under 1 byte/s for stall_timeout seconds.
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, static_cast<long>(o.stall_timeout.count()));
  curl_easy_setopt(c, CURLOPT_USERAGENT, "drun/0.1");
}

struct slist_deleter {
  void operator()(curl_slist* l) const noexcept { curl_slist_free_all(l); }
};
using slist_ptr = std::unique_ptr<curl_slist, slist_deleter>;

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return out;
}

// libcurl's callbacks, on a transfer.
struct callbacks {
  static std::size_t on_body(char* data, std::size_t size, std::size_t n, void* self) {
    auto* t = static_cast<transfer*>(self);
    long status = 0;
    curl_easy_getinfo(static_cast<CURL*>(t->handle), CURLINFO_RESPONSE_CODE, &status);
    if (status < 200 || status > 299) {
      t->dropped += size * n;
      return t->dropped > transfer::max_dropped ? 0 : size * n;
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
    t->keep_header(line);
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

}  // namespace

void global_init() {
  static const bool ready = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  (void)ready;
}

void transfer::reset_hop() {
  refused = false;
  dropped = 0;
  bad_status.clear();
  headers.clear();
  header_bytes = 0;
}

void transfer::keep_header(std::string_view line) {
  if (callbacks::is_status_line(line)) {  // a new response (after a 100 Continue, say)
    headers.clear();
    header_bytes = 0;
    return;
  }
  auto colon = line.find(':');
  if (colon == std::string_view::npos || colon == 0) return;
  auto v = line.substr(colon + 1);
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() && (v.back() == '\r' || v.back() == '\n' || v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
  header_bytes += line.size();
  if (header_bytes > max_headers) return;  // what a hostile server adds past the bound is not kept
  headers.emplace_back(lower(line.substr(0, colon)), std::string(v));
}

const std::string* response::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (k == name) return &v;
  return nullptr;
}

std::string url_path(const std::string& name) {

  std::string out;
  for (char ch : name) {
    auto u = static_cast<unsigned char>(ch);
    if (std::isalnum(u) || ch == '-' || ch == '.' || ch == '_' || ch == '~' || ch == '/') out += ch;
    else out += fmt::format("%{:02X}", u);
  }
  return out;
}


// The same parser as the transfers' own (libcurl's), so what is compared is where requests go.
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


std::string resolve_url(const std::string& base, const std::string& location) {
  CURLU* u = curl_url();
  std::string out;
  if (u && curl_url_set(u, CURLUPART_URL, base.c_str(), 0) == CURLUE_OK &&
      curl_url_set(u, CURLUPART_URL, location.c_str(), 0) == CURLUE_OK) {
    char* full = nullptr;
    if (curl_url_get(u, CURLUPART_URL, &full, 0) == CURLUE_OK && full) out = full;
    curl_free(full);
  }
  curl_url_cleanup(u);
  return out;
}

// Headers scoped to another origin than the URL's own must name a real http(s) origin: one that
// does not parse would send them nowhere without a word, or let a typo pass for a scope. A client
// certificate must load and match its key here, not fail every handshake later as an origin's
// refusal.
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

struct client::share {
  curlsh_ptr handle;
};
void client::share_deleter::operator()(share* s) const noexcept { delete s; }

client::client(const std::string& url, source_options options)
    : origin_(origin_of(url)),
      headers_origin_(origin_of(options.credentials_origin.empty() ? url : options.credentials_origin)),
      options_(std::move(options)) {}

client::~client() {
  for (auto& h : options_.headers) sodium_memzero(h.data(), h.size());
  for (auto* s : {&session_token_, &credentials_, &authorization_, &options_.proxy_credentials,
                  &options_.registry_credentials})
    sodium_memzero(s->data(), s->size());
}

void client::sign_for_s3(const std::string& region, const std::string& key_id, const std::string& secret,
                         const char* session_token) {
  sigv4_ = "aws:amz:" + region + ":s3";
  credentials_ = key_id + ":" + secret;
  if (session_token) session_token_ = std::string("x-amz-security-token: ") + session_token;
}

void client::set_authorization(std::string line) {
  std::lock_guard lock(mutex_);
  sodium_memzero(authorization_.data(), authorization_.size());
  authorization_ = std::move(line);
  sodium_memzero(line.data(), line.size());
}

std::string client::authorization() {
  std::lock_guard lock(mutex_);
  return authorization_;
}

result<response> client::send(std::string url, const request& req, transfer& t, const std::atomic<bool>* cancel) {
  auto sh = take();
  if (!sh) return error(errc::io_error, "cannot create a curl share handle");
  const bool follows = req.method == "GET" || req.method == "HEAD";
  bool asked_again = false;
  for (int hop = 0;; ++hop) {
    // The URL a redirect led to may carry a presigned signature in its query: not in messages.
    if (hop > 6) return error(errc::io_error, fmt::format("{}: too many redirects", url.substr(0, url.find('?'))));
    t.reset_hop();
    // What the handle points to during the transfer outlives it: declared first, freed last.
    slist_ptr headers;
    std::string auth = authorization();
    char errbuf[CURL_ERROR_SIZE] = {};
    easy_ptr handle(curl_easy_init());
    if (!handle) return error(errc::io_error, "cannot create a curl handle");
    CURL* c = handle.get();
    t.handle = c;
    curl_easy_setopt(c, CURLOPT_SHARE, sh->handle.get());
    configure_easy(c, options_);
    curl_easy_setopt(c, CURLOPT_URL, url.c_str());
    if (!req.range.empty()) curl_easy_setopt(c, CURLOPT_RANGE, req.range.c_str());
    if (req.method == "HEAD") {
      curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    } else if (req.method != "GET") {
      curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, req.method.c_str());
      curl_easy_setopt(c, CURLOPT_POSTFIELDS, req.body.empty() ? "" : reinterpret_cast<const char*>(req.body.data()));
      curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(req.body.size()));
    }
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &callbacks::on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &t);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &callbacks::on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &t);
    if (cancel) {
      curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
      curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, &callbacks::on_progress);
      curl_easy_setopt(c, CURLOPT_XFERINFODATA, const_cast<std::atomic<bool>*>(cancel));
    }
    // This hop's headers, for the origin it goes to.
    auto to = origin_of(url);
    const bool own = !origin_.empty() && to == origin_;
    const bool signed_s3 = !sigv4_.empty() && own;
    auto add = [&](const std::string& line) {
      if (curl_slist* l = curl_slist_append(headers.get(), line.c_str())) {
        (void)headers.release();  // curl_slist_append returned the same list, grown
        headers.reset(l);
      }
    };
    if (!headers_origin_.empty() && to == headers_origin_)
      for (const auto& l : options_.headers) add(l);
    if (own && !auth.empty()) add(auth);
    for (const auto& l : req.headers) add(l);
    if (req.method != "GET" && req.method != "HEAD") add("Expect:");  // no 100-continue round trip
    if (signed_s3 && !session_token_.empty()) add(session_token_);
    if (headers) curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
    if (signed_s3) {
      curl_easy_setopt(c, CURLOPT_AWS_SIGV4, sigv4_.c_str());
      curl_easy_setopt(c, CURLOPT_USERPWD, credentials_.c_str());
    }
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
    CURLcode rc = curl_easy_perform(c);
    sodium_memzero(auth.data(), auth.size());
    response r;
    r.url = url;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
    if (rc == CURLE_ABORTED_BY_CALLBACK) return error(errc::cancelled, "the transfer was cancelled");
    if (!t.bad_status.empty())
      return error(errc::io_error, fmt::format("the answer's status line does not parse: \"{}\"", t.bad_status));
    if (t.refused) return error(errc::io_error, "refused");  // the caller's sink says why
    r.headers = std::move(t.headers);
    if (t.dropped > transfer::max_dropped) return r;  // the status says what went wrong
    // libcurl's header store refuses a line without a name or a folded line with nothing to
    // continue, and says only "bad argument".
    if (rc == CURLE_BAD_FUNCTION_ARGUMENT)
      return error(errc::io_error, "the answer has a header line that does not parse (no name, or a folded "
                                   "continuation of nothing)");
    if (rc == CURLE_INTERFACE_FAILED)
      return error(errc::io_error, fmt::format("cannot dial from {} ({})", options_.local_address, errbuf));
    if (rc != CURLE_OK) return error(errc::io_error, fmt::format("{} ({})", curl_easy_strerror(rc), errbuf));
    if (follows && (r.status == 301 || r.status == 302 || r.status == 303 || r.status == 307 || r.status == 308)) {
      char* location = nullptr;
      curl_easy_getinfo(c, CURLINFO_REDIRECT_URL, &location);
      if (!location || (std::strncmp(location, "http://", 7) != 0 && std::strncmp(location, "https://", 8) != 0))
        return error(errc::io_error, "a redirect without an http(s) Location");
      url = location;
      continue;
    }
    // The origin wants (other) credentials: the owner of this client may find them, once.
    if (r.status == 401 && own && on_unauthorized && !asked_again) {
      asked_again = true;
      auto again = on_unauthorized(r);
      if (!again) return std::move(again).error();
      if (*again) {
        --hop;
        continue;
      }
    }
    give(std::move(sh));  // only after a complete exchange: a failed one may hold a broken connection
    return r;
  }
}

client::share_ptr client::take() {
  {
    std::lock_guard lock(mutex_);
    if (!pool_.empty()) {
      auto h = std::move(pool_.back());
      pool_.pop_back();
      return h;
    }
  }
  auto handle = make_share();
  if (!handle) return {};
  return share_ptr(new share{std::move(handle)});
}

void client::give(share_ptr h) {
  std::lock_guard lock(mutex_);
  pool_.push_back(std::move(h));
}

result<std::string> get_document(client& c, const std::string& url, std::size_t max_size, std::string_view what,
                                 std::vector<std::string> headers, response* answer) {
  std::string body;
  transfer t;
  t.sink = [&](const char* data, std::size_t len) {
    if (len > max_size - body.size()) return false;
    body.append(data, len);
    return true;
  };
  request req;
  req.headers = std::move(headers);
  auto shown = url.substr(0, url.find('?'));
  auto got = c.send(url, req, t, nullptr);
  if (!got && t.refused)
    return error(errc::malformed_bundle, fmt::format("{}: the {} is too large (more than {} bytes)", shown, what, max_size));
  if (!got) return std::move(got).error().with_path(shown);
  if (got->status != 200) {
    errc code = got->status == 404 ? errc::not_found
                : got->status == 401 || got->status == 403 ? errc::permission_denied
                                                           : errc::io_error;
    return error(code, fmt::format("{}: HTTP {}", shown, got->status));
  }
  if (answer) *answer = std::move(*got);
  return body;
}

result<void> get_range(client& c, const std::string& url, const std::string& name, const std::string& file,
                       byte_range range, std::span<std::byte> out, const std::atomic<bool>* cancel,
                       std::string* final_url) {
  auto fail = [&](std::string why) {
    return error(errc::io_error, fmt::format("{}: {}", name, why)).with_path(file).with_range(range.begin, range.end);
  };
  std::size_t received = 0;
  transfer t;
  t.sink = [&](const char* data, std::size_t len) {
    if (len > out.size() - received) return false;  // never past the caller's buffer
    std::memcpy(out.data() + received, data, len);
    received += len;
    return true;
  };
  auto got = c.get(url, fmt::format("{}-{}", range.begin, range.end - 1), t, cancel);
  if (!got) {
    if (got.error().code() == errc::cancelled || got.error().code() == errc::permission_denied)
      return std::move(got).error().with_path(file);
    if (t.refused) return fail("the server sent more bytes than the range asked for (does it ignore Range?)");
    return fail(got.error().detail());
  }
  if (final_url) *final_url = got->url;
  if (got->status == 404) return error(errc::not_found, fmt::format("{}: HTTP 404", name)).with_path(file);
  // 206 with the exact Content-Range asked for; 200 only when the range is a whole file.
  if (got->status == 206) {
    auto expected = fmt::format("bytes {}-{}/", range.begin, range.end - 1);
    const std::string* content_range = got->header("content-range");
    if (!content_range || content_range->rfind(expected, 0) != 0)
      return fail(fmt::format("Content-Range \"{}\" does not match the range asked for",
                              content_range ? *content_range : std::string()));
  } else if (!(got->status == 200 && range.begin == 0)) {
    return fail(fmt::format("HTTP {}", got->status));
  }
  if (received != out.size()) return fail(fmt::format("the body has {} bytes, the range {}", received, out.size()));
  return {};
}

origin_source::origin_source(std::string base, source_options options)
    : base_(std::move(base)), client_(base_, std::move(options)) {
  while (base_.size() > 1 && base_.back() == '/') base_.pop_back();
}

result<std::string> origin_source::url_of(const piece_request& piece, const std::atomic<bool>*) {
  const std::string file(piece.file);
  return file == "." ? base_ : base_ + "/" + url_path(file);
}

result<void> origin_source::fetch(const piece_request& piece, std::span<std::byte> out,
                                  const std::atomic<bool>* cancel) {
  const std::string file(piece.file);
  auto first = url_of(piece, cancel);
  if (!first) return std::move(first).error().with_path(file);
  std::string url = *first;
  bool cached = false;
  {
    std::lock_guard lock(mutex_);
    if (auto it = redirects_.find(file); it != redirects_.end()) url = it->second, cached = true;
  }
  std::string came_from;
  auto got = get_range(client(), url, name(), file, piece.range, out, cancel, &came_from);
  std::lock_guard lock(mutex_);
  if (!got && cached && got.error().code() != errc::cancelled) redirects_.erase(file);
  else if (!cached && !came_from.empty() && came_from != *first) redirects_[file] = came_from;
  return got;
}

}  // namespace drun::http

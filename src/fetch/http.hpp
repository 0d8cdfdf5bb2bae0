// The HTTP(S) exchange every origin shares (plain URLs, S3, OCI registries, bundles): libcurl
// under drun's rules. Verification on, TLS 1.3 minimum, redirects followed here so that
// credentials reach only the origin they are for, hostile answers (bad status lines, folded
// headers, oversized bodies) refused with a cause.
#pragma once

#include <drun/error.hpp>
#include <drun/source.hpp>

#include <atomic>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace drun::http {

void global_init();

// scheme://host:port of an http(s) URL (lower-cased, default ports filled in), "" otherwise.
std::string origin_of(const std::string& url);
// A Location (absolute, or relative to base) made absolute; "" when it does not parse.
std::string resolve_url(const std::string& base, const std::string& location);
// Percent-encodes each path segment of a manifest name for a URL (RFC 3986 unreserved bytes stay).
std::string url_path(const std::string& name);
// What can be judged about options before any request (see source_options).
result<void> check_options(const source_options& o);

// One transfer's state: a 2xx body goes to the caller's sink, which refuses what it cannot hold;
// the body of any other answer (an error page, a redirect) is read and dropped, up to a bound.
struct transfer {
  std::function<bool(const char*, std::size_t)> sink;
  void* handle = nullptr;  // the CURL* of the hop in progress
  bool refused = false;
  std::size_t dropped = 0;
  std::string bad_status;  // a status line that does not parse, printable, for the message
  // The last hop's headers: names lower-cased, values trimmed, at most max_headers bytes.
  std::vector<std::pair<std::string, std::string>> headers;
  std::size_t header_bytes = 0;

  static constexpr std::size_t max_dropped = 1 << 20;
  static constexpr std::size_t max_headers = 64 << 10;

  void reset_hop();
  void keep_header(std::string_view line);
};

struct request {
  std::string method = "GET";  // GET, HEAD, POST, PUT, PATCH, DELETE
  std::string range;           // "first-last", GET only
  std::vector<std::string> headers;  // for this request only ("Accept: ...", "Content-Type: ...")
  std::span<const std::byte> body;   // sent with POST, PUT and PATCH
};

struct response {
  long status = 0;
  std::string url;  // where the answer came from, after redirects
  std::vector<std::pair<std::string, std::string>> headers;
  // The first value of a header (name lower-case), or nullptr.
  const std::string* header(std::string_view name) const;
};

// Requests over a pool of connection caches (each keeps its connections open), following
// redirects of GET and HEAD itself so that credentials go only to the origin they were meant for
// and never to another scheme, host or port: the caller's headers to the credentials origin,
// SigV4 (and its session token) and an Authorization set here to the URL's own.
class client {
 public:
  client(const std::string& url, source_options options);
  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  // Signs every request to the origin with AWS SigV4 (curl's own implementation).
  void sign_for_s3(const std::string& region, const std::string& key_id, const std::string& secret,
                   const char* session_token);
  // An "Authorization: ..." line for every request to the URL's own origin from now on (a
  // registry's token); empty removes it. Never logged; zeroed when replaced.
  void set_authorization(std::string line);
  // Called when the URL's own origin answers 401: it may set_authorization and return true, and
  // the request is sent once more (once per call of send). Its error ends the request.
  std::function<result<bool>(const response&)> on_unauthorized;

  // A failure here is a transport failure (io_error, or cancelled) or on_unauthorized's; the
  // caller judges the status.
  result<response> send(std::string url, const request& req, transfer& t, const std::atomic<bool>* cancel);
  result<response> get(std::string url, const std::string& range, transfer& t, const std::atomic<bool>* cancel) {
    request req;
    req.range = range;
    return send(std::move(url), req, t, cancel);
  }
  const std::string& origin() const noexcept { return origin_; }

 private:
  struct share;
  struct share_deleter {
    void operator()(share* s) const noexcept;
  };
  using share_ptr = std::unique_ptr<share, share_deleter>;
  share_ptr take();
  void give(share_ptr h);
  std::string authorization();

  std::string origin_;          // the URL's own: SigV4 and set_authorization's line go here
  std::string headers_origin_;  // options_.headers go here only
  source_options options_;
  std::mutex mutex_;
  std::vector<share_ptr> pool_;
  std::string sigv4_, credentials_, session_token_, authorization_;
};

// GETs a small document whole into a string, refusing more than max_size bytes (malformed_bundle
// names `what`). Errors: not_found (404), io_error, permission_denied (401, 403).
result<std::string> get_document(client& c, const std::string& url, std::size_t max_size, std::string_view what,
                                 std::vector<std::string> headers = {}, response* answer = nullptr);

// GETs one byte range of url into out (exactly out.size() bytes): 206 with the exact
// Content-Range, or 200 when the range starts at 0 and is the whole body; a body longer than
// asked (a server that ignores Range) is refused as it arrives. Errors name `name` and the file:
// not_found (404), permission_denied (401, 403), io_error, cancelled. *final_url is where the
// bytes came from (after redirects).
result<void> get_range(client& c, const std::string& url, const std::string& name, const std::string& file,
                       byte_range range, std::span<std::byte> out, const std::atomic<bool>* cancel,
                       std::string* final_url);

// An origin over HTTP(S): one Range GET per piece. A server that redirects (a hub to its CDN) is
// asked once per file; the target is reused for the file's next ranges and forgotten when it
// misbehaves. Subclasses say where a piece's file is (url_of).
class origin_source : public source {
 public:
  origin_source(std::string base, source_options options);
  const std::string& name() const noexcept override { return base_; }
  // The client its pieces go through (a registry's carries its token).
  virtual http::client& client() { return client_; }
  result<void> fetch(const piece_request& piece, std::span<std::byte> out, const std::atomic<bool>* cancel) override;

 protected:
  // Where a piece's file is: BASE/NAME, or BASE itself for a single-file model.
  virtual result<std::string> url_of(const piece_request& piece, const std::atomic<bool>* cancel);

  std::string base_;
  http::client client_;

 private:
  std::mutex mutex_;
  std::map<std::string, std::string> redirects_;  // file -> where its origin sent us
};

}  // namespace drun::http

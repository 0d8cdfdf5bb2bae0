// `drun push`: a signed model into an OCI registry as an artifact (see registry.hpp).
#include <drun/registry.hpp>

#include "detail/file.hpp"
#include "detail/json.hpp"
#include "oci/registry.hpp"

#include <drun/hash.hpp>
#include <drun/verify.hpp>

#include <fmt/format.h>

#include <charconv>
#include <vector>

namespace drun {
namespace {

using detail::json;

struct blob_file {
  std::string title;  // the layer's title: the manifest name of the file, or model.sig
  std::filesystem::path path;
  std::string media_type;
  std::uint64_t size = 0;
  std::string digest;
  std::string inline_bytes;  // small blobs kept in memory (the config, the bundle)
  bool in_memory = false;
};

class pusher {
 public:
  pusher(oci::reference ref, const push_options& o)
      : ref_(std::move(ref)), chunk_size_(o.chunk_size), progress_(o.progress), reg_(ref_, o.source, "pull,push") {}

  result<void> digest_of(blob_file& b) {
    hasher h(hash_algorithm::sha256);
    if (b.in_memory) {
      h.update(as_bytes(b.inline_bytes));
    } else {
      auto fd = detail::open_read(b.path);
      if (!fd) return std::move(fd).error();
      auto size = detail::file_size(fd->get(), b.path);
      if (!size) return std::move(size).error();
      if (*size != b.size)
        return error(errc::model_mismatch, fmt::format("the file has {} bytes, the bundle signs {}", *size, b.size))
            .with_path(b.path);
      std::vector<std::byte> buf(1 << 20);
      for (std::uint64_t at = 0; at < b.size;) {
        auto n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), b.size - at));
        if (auto r = detail::pread_exact(fd->get(), {buf.data(), n}, at, b.path); !r) return r;
        h.update({buf.data(), n});
        at += n;
      }
    }
    b.digest = "sha256:" + h.finish().hex();
    return {};
  }

  // HEAD first: a blob the registry has (this repository's, by digest) is not sent again.
  result<void> upload(const blob_file& b) {
    auto url = ref_.base() + "/blobs/" + b.digest;
    http::request head;
    head.method = "HEAD";
    http::transfer t;
    auto got = reg_.client().send(url, head, t, nullptr);
    if (!got) return std::move(got).error().with_path(b.title);
    if (got->status == 200) {
      ++report_.blobs_skipped;
      done(b.size);
      return {};
    }
    if (got->status != 404) return status_error(*got, "HEAD of the blob", b.title);
    auto location = start_upload(b.title);
    if (!location) return std::move(location).error();
    std::string at_url = *location;
    std::uint64_t sent = 0;
    std::vector<std::byte> chunk;
    detail::unique_fd fd;
    if (!b.in_memory) {
      auto opened = detail::open_read(b.path);
      if (!opened) return std::move(opened).error();
      fd = std::move(opened).value();
    }
    unsigned failures = 0;
    while (sent < b.size) {
      auto n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk_size_, b.size - sent));
      std::span<const std::byte> body;
      if (b.in_memory) {
        body = as_bytes(std::string_view(b.inline_bytes).substr(static_cast<std::size_t>(sent), n));
      } else {
        chunk.resize(n);
        if (auto r = detail::pread_exact(fd.get(), chunk, sent, b.path); !r) return r;
        body = chunk;
      }
      http::request patch;
      patch.method = "PATCH";
      patch.body = body;
      patch.headers = {"Content-Type: application/octet-stream",
                       fmt::format("Content-Range: {}-{}", sent, sent + n - 1)};
      http::transfer pt;
      auto answer = reg_.client().send(at_url, patch, pt, nullptr);
      if (answer && answer->status == 202) {
        if (auto next = location_of(*answer, at_url); !next.empty()) at_url = next;
        sent += n;
        report_.bytes_uploaded += n;
        done(n);
        continue;
      }
      // A chunk that failed: ask the registry where the upload stands and go on from there.
      if (answer && (answer->status == 401 || answer->status == 403)) return status_error(*answer, "upload", b.title);
      if (++failures > 3) {
        if (!answer) return std::move(answer).error().with_path(b.title);
        return status_error(*answer, "a chunk of the upload", b.title);
      }
      auto stands = upload_status(at_url);
      if (stands) {
        at_url = stands->first;
        sent = stands->second;
      } else if (stands.error().code() == errc::not_found || stands.error().code() == errc::io_error) {
        // The registry no longer knows this upload (or the state its Location carried): start
        // it again from the first byte.
        auto fresh = start_upload(b.title);
        if (!fresh) return std::move(fresh).error();
        at_url = *fresh;
        sent = 0;
      } else {
        return std::move(stands).error().with_path(b.title);
      }
      ++report_.resumed;
    }
    http::request put;
    put.method = "PUT";
    put.headers = {"Content-Type: application/octet-stream"};
    http::transfer ft;
    auto close = reg_.client().send(at_url + (at_url.find('?') == std::string::npos ? "?" : "&") + "digest=" + b.digest,
                                    put, ft, nullptr);
    if (!close) return std::move(close).error().with_path(b.title);
    if (close->status != 201) return status_error(*close, "the end of the upload", b.title);
    ++report_.blobs_uploaded;
    return {};
  }

  result<std::string> put_manifest(const std::string& body) {
    http::request put;
    put.method = "PUT";
    put.body = as_bytes(body);
    put.headers = {fmt::format("Content-Type: {}", oci::manifest_type)};
    http::transfer t;
    auto got = reg_.client().send(ref_.base() + "/manifests/" + ref_.ref(), put, t, nullptr);
    if (!got) return std::move(got).error();
    if (got->status != 201) return status_error(*got, "PUT of the manifest", ref_.ref());
    return "sha256:" + hash(hash_algorithm::sha256, as_bytes(body)).hex();
  }

  push_report& report() { return report_; }

 private:
  void done(std::uint64_t n) {
    progressed_ += n;
    if (progress_) progress_(progressed_, total);
  }

  std::string location_of(const http::response& r, const std::string& base) {
    const std::string* l = r.header("location");
    return l ? http::resolve_url(base, *l) : std::string();
  }

  result<std::string> start_upload(const std::string& title) {
    http::request post;
    post.method = "POST";
    http::transfer t;
    auto url = ref_.base() + "/blobs/uploads/";
    auto got = reg_.client().send(url, post, t, nullptr);
    if (!got) return std::move(got).error().with_path(title);
    if (got->status != 202) return status_error(*got, "the start of an upload", title);
    auto location = location_of(*got, url);
    if (location.empty() || http::origin_of(location) != reg_.client().origin())
      return error(errc::io_error, fmt::format("{}: the registry started an upload without a Location on itself",
                                               ref_.registry))
          .with_path(title);
    return location;
  }

  // GET on the upload: 204 with "Range: 0-LAST" (nothing yet: no Range, or 0-0 on some).
  result<std::pair<std::string, std::uint64_t>> upload_status(const std::string& url) {
    http::transfer t;
    auto got = reg_.client().get(url, "", t, nullptr);
    if (!got) return std::move(got).error();
    if (got->status != 204) return status_error(*got, "the upload's status", url.substr(0, url.find('?')));
    std::uint64_t next = 0;
    if (const std::string* range = got->header("range")) {
      // "0-LAST", or "bytes=0-LAST" from some registries; anything else is not an answer.
      auto dash = range->find('-');
      std::uint64_t last = 0;
      const char* end = range->data() + range->size();
      auto [p, ec] = dash == std::string::npos ? std::from_chars(end, end, last)
                                               : std::from_chars(range->data() + dash + 1, end, last);
      if (dash == std::string::npos || ec != std::errc() || p != end)
        return error(errc::io_error, fmt::format("{}: the upload's Range \"{}\" does not parse", ref_.text(),
                                                 range->substr(0, 80)));
      next = last + 1;
    }
    auto location = location_of(*got, url);
    return std::pair{location.empty() ? url : location, next};
  }

  error status_error(const http::response& r, std::string_view what, const std::string& path) {
    errc code = r.status == 401 || r.status == 403 ? errc::permission_denied
                : r.status == 404                  ? errc::not_found
                                                   : errc::io_error;
    return error(code, fmt::format("{}: {} answered HTTP {}", ref_.text(), what, r.status)).with_path(path);
  }

 public:
  std::uint64_t total = 0;

 private:
  oci::reference ref_;
  std::size_t chunk_size_;
  progress_callback progress_;
  oci::registry reg_;
  push_report report_;
  std::uint64_t progressed_ = 0;
};

}  // namespace

result<push_report> push_model(const std::filesystem::path& model, std::string_view url, const push_options& options) {
  auto ref = oci::parse_reference(url);
  if (!ref) return std::move(ref).error();
  if (options.chunk_size == 0) return error(errc::invalid_argument, "the chunk size must be positive");
  std::error_code ec;
  auto sig = options.signature.empty() ? default_signature_path(model) : options.signature;
  const bool have_sig = std::filesystem::exists(sig, ec);
  if (!options.signature.empty() && !have_sig) return error(errc::not_found, "no bundle here").with_path(sig);

  std::vector<blob_file> blobs;
  std::string bundle_type(oci::bundle_type);
  if (have_sig) {
    auto text = read_bundle_file(sig);
    if (!text) return std::move(text).error();
    auto summary = inspect_bundle(*text);
    if (!summary) return std::move(summary).error().with_path(sig);
    auto doc = detail::parse_json_strict(*text, "bundle");
    if (doc && doc->is_object())
      if (const json* mt = detail::optional_field(*doc, "mediaType");
          mt && mt->is_string() && mt->get<std::string>().rfind("application/vnd.dev.sigstore.bundle", 0) == 0)
        bundle_type = mt->get<std::string>();
    for (const auto& f : summary->files) {
      blob_file b{f.name, f.name == "." ? model : model / f.name, "application/octet-stream", 0, {}, {}, false};
      auto st = std::filesystem::status(b.path, ec);
      if (ec || !std::filesystem::is_regular_file(st))
        return error(errc::model_mismatch, "the bundle signs a file that is not in the model").with_path(b.path);
      b.size = std::filesystem::file_size(b.path, ec);
      if (f.size && *f.size != b.size)
        return error(errc::model_mismatch, fmt::format("the file has {} bytes, the bundle signs {}", b.size, *f.size))
            .with_path(b.path);
      blobs.push_back(std::move(b));
    }
    blob_file s{"model.sig", sig, bundle_type, text->size(), {}, std::move(text).value(), true};
    blobs.push_back(std::move(s));
  } else {
    auto files = enumerate_model(model, {});
    if (!files) return std::move(files).error();
    for (auto& f : *files)
      blobs.push_back(blob_file{f.name, f.path, "application/octet-stream", f.size, {}, {}, false});
  }
  blob_file config{"", {}, std::string(oci::empty_config_type), 2, {}, "{}", true};

  pusher p(*ref, options);
  for (const auto& b : blobs) p.total += b.size;
  for (auto* b : {&config}) {
    if (auto r = p.digest_of(*b); !r) return std::move(r).error();
  }
  json layers = json::array();
  for (auto& b : blobs) {
    if (auto r = p.digest_of(b); !r) return std::move(r).error();
    layers.push_back({{"mediaType", b.media_type},
                      {"digest", b.digest},
                      {"size", b.size},
                      {"annotations", {{std::string(oci::title_annotation), b.title}}}});
  }
  if (auto r = p.upload(config); !r) return std::move(r).error();
  for (const auto& b : blobs)
    if (auto r = p.upload(b); !r) return std::move(r).error();
  json manifest = {{"schemaVersion", 2},
                   {"mediaType", oci::manifest_type},
                   {"artifactType", model_artifact_type},
                   {"config", {{"mediaType", config.media_type}, {"digest", config.digest}, {"size", config.size}}},
                   {"layers", std::move(layers)}};
  auto digest = p.put_manifest(manifest.dump());
  if (!digest) return std::move(digest).error();
  auto report = p.report();
  report.manifest_digest = *digest;
  ref->tag.clear();
  ref->digest = *digest;
  report.reference = ref->text();
  return report;
}

}  // namespace drun

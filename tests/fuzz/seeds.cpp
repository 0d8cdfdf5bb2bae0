// Writes the harnesses' seed corpora with drun's own code: real bundles, statements, frames,
// tokens, key sets, policies, audit logs. Run by make-corpus.sh, whose output is what
// tests/fuzz/corpus holds; a seed is valid input, so the fuzzers start past the first checks.
//   drun_fuzz_seeds OUT_DIR
#include "fuzz.hpp"
#include "manifest_data.hpp"
#include "peer/wire.hpp"
#include "transport/rdma.hpp"

#include <drun/audit.hpp>
#include <drun/keys.hpp>
#include <drun/manifest.hpp>
#include <drun/sign.hpp>
#include <drun/token.hpp>
#include <drun/verify.hpp>

#include <fmt/format.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

namespace fs = std::filesystem;

namespace {

fs::path out;

void seed(const std::string& target, const std::string& name, std::string_view bytes) {
  fs::create_directories(out / target);
  std::ofstream(out / target / name, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
// A seed whose first byte picks the harness's parser.
void seed(const std::string& target, const std::string& name, char mode, std::string_view bytes) {
  seed(target, name, std::string(1, mode) + std::string(bytes));
}
std::string str(std::span<const std::byte> b) { return {reinterpret_cast<const char*>(b.data()), b.size()}; }

template <class T>
T take(drun::result<T> r, const char* what) {
  if (!r) {
    std::cerr << "drun_fuzz_seeds: " << what << ": " << r.error().message() << "\n";
    std::exit(1);
  }
  return std::move(*r);
}

void write(const fs::path& file, std::string_view text) {
  std::ofstream(file, std::ios::binary).write(text.data(), static_cast<std::streamsize>(text.size()));
}

void models(const drun::private_key& key, const fs::path& scratch) {
  auto model = scratch / "model";
  fs::create_directories(model / "sub");
  write(model / "config.json", R"({"layers": 2})");
  write(model / "sub" / "weights.bin", std::string(10000, 'w'));
  int n = 0;
  for (auto method : {drun::serialization_method::shards, drun::serialization_method::files})
    for (auto alg : {drun::hash_algorithm::sha256, drun::hash_algorithm::blake3}) {
      drun::manifest_options o;
      o.method = method;
      o.hash = alg;
      o.piece_size = 4096;
      auto m = take(drun::build_manifest(model, o), "build_manifest");
      auto name = fmt::format("{}-{}", method == drun::serialization_method::shards ? "shards" : "files", to_string(alg));
      seed("statement", name, drun::detail::statement_json(drun::detail::manifest_access::data(m)));
      auto bundle = take(drun::sign_manifest(m, key), "sign_manifest");
      seed("bundle", name, bundle);
      if (n++ == 0) seed("json", "bundle", bundle);
    }
  seed("json", "small", R"({"a": [1, -2.5e3, true, null, "\u00e9"], "b": {"c": {}}})");
  seed("json", "deep", std::string(64, '[') + std::string(64, ']'));
}

void keys(const drun::private_key& key) {
  seed("keys", "public-ed25519", '\0', fuzz::test_public_pem);
  seed("keys", "private-ed25519", '\1', fuzz::test_private_pem);
  auto ec = take(drun::private_key::generate(drun::key_type::ecdsa_p256), "generate");
  seed("keys", "public-p256", '\0', ec.public_key().pem());
  (void)key;
  seed("keys", "node-hex", '\2', std::string(64, 'a') + "\n");
  seed("keys", "node-base64", '\2', "  q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=  ");
}

std::string written(const drun::peer::writer& w) { return str(w.view()); }

void wire() {
  namespace peer = drun::peer;
  std::string token = "header.payload.signature";
  std::string tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  auto hello = [&](std::uint16_t version, std::string_view t, std::string_view trace) {
    peer::writer w;
    peer::encode(w, peer::hello{version, drun::as_bytes(t), drun::as_bytes(trace)});
    return written(w);
  };
  seed("wire_server", "hello-v2", '\1', hello(2, token, tp));
  seed("wire_server", "hello-v2-plain", '\1', hello(2, "", ""));
  seed("wire_server", "hello-v1", '\1', hello(1, token, ""));
  std::array<std::byte, 32> id{};
  for (std::size_t i = 0; i < id.size(); ++i) id[i] = static_cast<std::byte>(i * 7);
  for (auto [type, pick] : {std::pair{peer::frame::get_bundle, '\0'}, {peer::frame::get_have, '\1'}, {peer::frame::get_piece, '\2'}}) {
    peer::writer w;
    peer::encode(w, peer::request{type, id, 1, 2});
    seed("wire_server", fmt::format("request-{}", static_cast<int>(type)), '\2', std::string(1, pick) + written(w));
  }
  seed("wire_server", "header-hello", '\0', std::string("\x01\x00\x00\x00\x40", 5));
  seed("wire_server", "header-piece", '\0', std::string("\x04\x00\x00\x00\x28", 5));
  drun::rdma::endpoint_address a;
  a.lid = 7;
  a.mtu = 5;
  a.qps = {{0x11, 0x22}, {0x33, 0x44}};
  a.slots_addr = 0x7f0000000000;
  a.rkey = 99;
  a.slot_size = 1 << 20;
  a.slot_count = 16;
  seed("wire_server", "rdma-setup", '\3', str(drun::rdma::encode(a, true)));
  seed("wire_client", "rdma-ready", '\4', str(drun::rdma::encode(a, false)));

  peer::writer w;
  peer::encode(w, peer::welcome{2, peer::feature_rdma});
  seed("wire_client", "welcome", '\0', written(w));
  peer::writer l;
  peer::encode_answer_length(l, 4 << 20);
  seed("wire_client", "answer", '\1', written(l));
  peer::writer e;
  peer::encode(e, peer::error_frame{4, "denied: no rule grants this artifact"});
  seed("wire_client", "error", '\2', written(e));
  peer::writer h;
  peer::encode_holdings(h, {true, false, true, true, false, false, true, true, true, false, true});
  seed("wire_client", "holdings", '\3', written(h));
}

void safetensors() {
  auto one = [](std::uint64_t data_size, std::string_view json) {
    std::string s;
    for (int i = 0; i < 8; ++i) s += static_cast<char>((data_size >> (8 * i)) & 0xff);
    return s + std::string(json);
  };
  seed("safetensors", "two", one(24, R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"U8","shape":[8],"data_offsets":[16,24]}})"));
  seed("safetensors", "empty-tensor", one(0, R"({"z":{"dtype":"BF16","shape":[0,3],"data_offsets":[0,0]}})"));
}

void tokens(const drun::private_key& key) {
  drun::token_request r;
  r.subject = "fuzz-job";
  r.audience = "drun-fuzz";
  r.artifacts = {"*"};
  r.now = std::chrono::system_clock::time_point(std::chrono::seconds(fuzz::test_time));
  seed("token", "bearer", '\0', take(drun::issue_token(key, r), "issue_token"));
  r.certificate_thumbprint = std::string(43, 'A');
  seed("token", "bound", '\0', take(drun::issue_token(key, r), "issue_token"));
  seed("token", "jwks", '\1', take(drun::jwks_for(key.public_key()), "jwks_for"));
}

void policies() {
  seed("policy", "roles", R"({
  "combine": "union",
  "roles": {
    "reader": { "artifacts": ["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] },
    "team": { "publishers": [ { "public_key": "publisher.pub" } ] },
    "admin": { "all": true }
  },
  "bindings": [
    { "certificate": { "subject": "CN=node-1,O=ml" }, "roles": ["reader"] },
    { "certificate": { "uri_prefix": "spiffe://ml.example/" }, "roles": ["team"] },
    { "certificate": { "dns": "node-1.ml.example" }, "roles": ["reader"] },
    { "token": { "subject": "fuzz-job", "claims": { "team": "ml" } }, "roles": ["admin"] }
  ]
})");
}

void origin() {
  std::string body(64, '\0');
  for (std::size_t i = 0; i < body.size(); ++i) body[i] = static_cast<char>('A' + i % 26);
  seed("origin_http", "partial", '\0',
       "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-31/64\r\nContent-Length: 32\r\n\r\n" + body.substr(0, 32));
  seed("origin_http", "partial-second", '\1',
       "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes 32-63/64\r\nContent-Length: 32\r\n\r\n" + body.substr(32));
  seed("origin_http", "whole", '\0', "HTTP/1.1 200 OK\r\nContent-Length: 32\r\n\r\n" + body.substr(0, 32));
  seed("origin_http", "redirect", '\0',
       "HTTP/1.1 302 Found\r\nLocation: http://cdn.test/blob?sig=x\r\nContent-Length: 0\r\n\r\n\n--next--\n"
       "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-31/64\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" +
           body.substr(0, 32) + "\r\n0\r\n\r\n");
  seed("origin_http", "missing", '\0', "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here\n");
  seed("origin_http", "document", '\2', "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
}

void audit(const fs::path& scratch) {
  auto key_file = scratch / "audit.key";
  write(key_file, fuzz::test_private_pem);
  ::chmod(key_file.c_str(), 0600);
  auto key = std::make_shared<const drun::private_key>(take(drun::private_key::load(key_file), "load"));
  auto file = scratch / "audit.log";
  {
    auto log = take(drun::audit_log::open({file, key, 2}), "audit_log::open");
    for (int i = 0; i < 5; ++i)
      if (!log->append("peer.granted", {{"caller", "CN=node-1,O=ml"}, {"artifact", std::string(64, 'a')}, {"n", i}}))
        std::exit(1);
  }
  std::ifstream in(file, std::ios::binary);
  seed("audit", "log", std::string(std::istreambuf_iterator<char>(in), {}));
}

void small() {
  seed("small_parsers", "scrape", '\0', "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9400\r\nAccept: */*\r\n\r\n");
  seed("small_parsers", "scrape-head", '\0', "HEAD /metrics?x=1 HTTP/1.0\r\n\r\n");
  seed("small_parsers", "traceparent", '\1', "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  seed("small_parsers", "traceparent-later", '\1', "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: drun_fuzz_seeds OUT_DIR\n";
    return 2;
  }
  fuzz::quiet();
  out = argv[1];
  auto scratch = fs::temp_directory_path() / fmt::format("drun-fuzz-seeds-{}", ::getpid());
  fs::create_directories(scratch);
  auto key_file = scratch / "test.key";
  write(key_file, fuzz::test_private_pem);
  ::chmod(key_file.c_str(), 0600);
  auto key = take(drun::private_key::load(key_file), "load the test key");
  models(key, scratch);
  keys(key);
  wire();
  safetensors();
  tokens(key);
  policies();
  origin();
  audit(scratch);
  small();
  fs::remove_all(scratch);
  return 0;
}

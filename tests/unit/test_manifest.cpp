// Enumeration, parallel hashing and the OMS statement (written and parsed).
#include <drun/manifest.hpp>

#include "manifest_data.hpp"
#include "support.hpp"

#include <nlohmann/json.hpp>

#include <atomic>
#include <sys/stat.h>
#include <unistd.h>

using namespace drun;
using test::temp_dir;
using test::write_file;

namespace {
std::vector<std::string> names(const std::vector<model_file>& files) {
  std::vector<std::string> out;
  for (const auto& f : files) out.push_back(f.name);
  return out;
}
}  // namespace

TEST_CASE("safe relative paths") {
  CHECK(is_safe_relative_path("a"));
  CHECK(is_safe_relative_path("dir/sub/file.bin"));
  CHECK(is_safe_relative_path("weights:v1.bin"));
  CHECK(is_safe_relative_path("\xc3\xa9t\xc3\xa9"));  // "été"
  for (const char* bad : {"", "/etc/passwd", "../x", "a/../b", "a/./b", ".", "a//b", "a/", "x\ny",
                          "\xff", "\xc0\xaf", "a/..", "\xed\xa0\x80"})
    CHECK_MESSAGE(!is_safe_relative_path(bad), bad);
}

TEST_CASE("enumeration follows OMS: order, default and user ignores") {
  temp_dir d;
  for (const char* f : {"b.bin", "a.b", "a/z", "a/b/c", ".git/config", ".gitignore", "sub/.git/keep",
                        "skip/me", "skipped.txt", "keep/skip/me"})
    write_file(d / f, f);
  auto files = enumerate_model(d.path(), {{"skip", "skipped.txt"}, false});
  REQUIRE(files);
  // Component-wise order: "a/..." sorts before "a.b"; nested .git is not a top-level ignore.
  CHECK(names(*files) == std::vector<std::string>{"a/b/c", "a/z", "a.b", "b.bin", "keep/skip/me", "sub/.git/keep"});
  CHECK((*files)[3].size == 5);
}

TEST_CASE("enumeration refuses symlinks, special files and unsafe names") {
  temp_dir d;
  write_file(d / "m/real.bin", "data");
  REQUIRE(::symlink("real.bin", (d / "m/link.bin").c_str()) == 0);
  auto r = enumerate_model(d / "m", {});
  CHECK(test::error_of(r).code() == errc::unsafe_entry);
  CHECK(r.error().message() == "link.bin: is a symlink, and symlinks are not allowed");

  auto allowed = enumerate_model(d / "m", {{}, true});
  REQUIRE(allowed);
  CHECK(names(*allowed) == std::vector<std::string>{"link.bin", "real.bin"});

  REQUIRE(::symlink(".", (d / "m/loop").c_str()) == 0);
  auto loop = enumerate_model(d / "m", {{}, true});
  CHECK(test::error_of(loop).message().find("symlink to a directory") != std::string::npos);

  write_file(d / "p/ok", "x");
  REQUIRE(::mkfifo((d / "p/fifo").c_str(), 0600) == 0);
  auto fifo = enumerate_model(d / "p", {});
  CHECK(test::error_of(fifo).message() == "fifo: is a named pipe");

  write_file(d / "u/bad\nname", "x");
  CHECK(test::error_of(enumerate_model(d / "u", {})).message().find("unsafe path") != std::string::npos);

  CHECK(test::error_of(enumerate_model(d / "missing", {})).code() == errc::not_found);
  CHECK(test::error_of(enumerate_model(d / "p", {{"../x"}, false})).code() == errc::invalid_argument);
}

TEST_CASE("a single file is its own model, named '.'") {
  temp_dir d;
  write_file(d / "model.safetensors", "abc");
  auto files = enumerate_model(d / "model.safetensors", {});
  REQUIRE(files);
  REQUIRE(files->size() == 1);
  CHECK((*files)[0].name == ".");
  CHECK((*files)[0].size == 3);
}

TEST_CASE("shards manifest: piece digests, statement, parse round trip") {
  temp_dir d;
  auto big = test::pattern(10000, 7);
  write_file(d / "m/big.bin", big);
  write_file(d / "m/empty", "");
  write_file(d / "m/x/small", "small");
  manifest_options opts;
  opts.piece_size = 4096;
  opts.threads = 3;
  std::atomic<std::uint64_t> progressed{0};
  opts.progress = [&](std::uint64_t done, std::uint64_t total) {
    CHECK(total == 10005);
    progressed = std::max<std::uint64_t>(progressed, done);
  };
  auto m = build_manifest(d / "m", opts);
  REQUIRE(m);
  CHECK(progressed == 10005);
  CHECK(m->resource_count() == 4);  // 3 pieces of big.bin, 1 of x/small, none for the empty file
  auto st = nlohmann::json::parse(m->statement_json());
  CHECK(st["_type"] == "https://in-toto.io/Statement/v1");
  CHECK(st["predicateType"] == "https://model_signing/signature/v1.0");
  CHECK(st["subject"][0]["name"] == "m");
  CHECK(st["predicate"]["serialization"]["shard_size"] == 4096);
  const auto& res = st["predicate"]["resources"];
  CHECK(res[0]["name"] == "big.bin:0:4096");
  CHECK(res[2]["name"] == "big.bin:8192:10000");
  CHECK(res[2]["algorithm"] == "sha256-sharded-4096");
  CHECK(res[2]["digest"] == hash(hash_algorithm::sha256, as_bytes(std::string_view(big).substr(8192))).hex());
  CHECK(res[3]["name"] == "x/small:0:5");

  auto parsed = detail::parse_statement(m->statement_json());
  REQUIRE(parsed);
  CHECK(parsed->resources.size() == 4);
  CHECK(parsed->resources[2].range == byte_range{8192, 10000});
  CHECK(detail::statement_json(*parsed) == m->statement_json());

  // The same digests whatever the thread count.
  opts.threads = 1;
  opts.progress = {};
  auto m1 = build_manifest(d / "m", opts);
  REQUIRE(m1);
  CHECK(m1->statement_json() == m->statement_json());
}

TEST_CASE("files manifest with blake2b") {
  temp_dir d;
  write_file(d / "m/a", "hello");
  manifest_options opts;
  opts.method = serialization_method::files;
  opts.hash = hash_algorithm::blake2b;
  auto m = build_manifest(d / "m", opts);
  REQUIRE(m);
  auto st = nlohmann::json::parse(m->statement_json());
  CHECK(st["predicate"]["resources"][0]["name"] == "a");
  CHECK(st["predicate"]["resources"][0]["algorithm"] == "blake2b");
  CHECK(st["predicate"]["resources"][0]["digest"] == hash(hash_algorithm::blake2b, as_bytes("hello")).hex());
  CHECK_FALSE(st["predicate"]["serialization"].contains("shard_size"));
}

TEST_CASE("a model without data is refused") {
  temp_dir d;
  std::filesystem::create_directories(d / "empty");
  CHECK(test::error_of(build_manifest(d / "empty", {})).message().find("no files to sign") != std::string::npos);
  write_file(d / "zero/f", "");
  CHECK(test::error_of(build_manifest(d / "zero", {})).code() == errc::invalid_argument);
  manifest_options bad;
  bad.piece_size = 5000;
  write_file(d / "one/f", "x");
  CHECK(test::error_of(build_manifest(d / "one", bad)).message().find("power of two") != std::string::npos);
}

namespace {
// A valid statement to mutate.
nlohmann::json sample_statement() {
  temp_dir d;
  write_file(d / "m/w.bin", test::pattern(9000));
  write_file(d / "m/cfg.json", "{}");
  manifest_options opts;
  opts.piece_size = 4096;
  auto m = build_manifest(d / "m", opts);
  REQUIRE(m);
  return nlohmann::json::parse(m->statement_json());
}
std::string fix_root(nlohmann::json st) {
  detail::manifest_data tmp;
  std::vector<detail::resource> res;
  hasher h(hash_algorithm::sha256);
  for (auto& r : st["predicate"]["resources"]) {
    std::string hex = r["digest"];
    for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
      auto b = static_cast<std::byte>(std::stoi(hex.substr(i, 2), nullptr, 16));
      h.update(std::span(&b, 1));
    }
  }
  st["subject"][0]["digest"]["sha256"] = h.finish().hex();
  return st.dump();
}
std::string parse_error(const nlohmann::json& st, bool refix = true) {
  auto r = detail::parse_statement(refix ? fix_root(st) : st.dump());
  REQUIRE_FALSE(r);
  return r.error().message();
}
}  // namespace

TEST_CASE("statement parsing accepts producer variants") {
  auto st = sample_statement();
  CHECK(detail::parse_statement(st.dump(4)));  // indentation does not matter
  st["predicate"]["serialization"]["shard_size"] = 4096.0;
  CHECK(detail::parse_statement(st.dump()));   // integral float
  for (auto& r : st["predicate"]["resources"]) r["algorithm"] = "sha256";
  CHECK(detail::parse_statement(st.dump()));   // the spec's plain algorithm name
  st["predicate"]["unknown"] = 1;
  CHECK(detail::parse_statement(st.dump()));   // unknown predicate fields are ignored
}

TEST_CASE("statement parsing refuses what a hostile signer could write") {
  auto base = sample_statement();
  auto with = [&](auto mutate) { auto st = base; mutate(st); return st; };
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"][0]["name"] = "../../etc/passwd:0:2"; }))
            .find("unsafe path") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"][0]["name"] = "/abs:0:2"; }))
            .find("unsafe path") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"][2]["name"] = "w.bin:4096:8000"; }))
            .find("do not cover") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"][1] = s["predicate"]["resources"][0]; }))
            .find("listed twice") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"][0]["name"] = "cfg.json:0:02"; }))
            .find("invalid byte range") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"] = nlohmann::json::array(); }))
            .find("no files") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["serialization"]["hash_type"] = "sha512"; }))
            .find("\"sha512\" is not supported") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["serialization"]["shard_size"] = 4096.5; }))
            .find("not a positive integer") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"][0]["digest"] = "abcd"; }))
            .find("hex digits") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"][0]["algorithm"] = "md5"; }))
            .find("does not match hash_type") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["subject"].push_back(s["subject"][0]); }))
            .find("exactly one") != std::string::npos);
  CHECK(parse_error(with([](auto& s) { s["predicate"]["resources"][0]["digest"] = std::string(64, 'a'); }), false)
            .find("subject digest does not match") != std::string::npos);
}

TEST_CASE("hashing refuses a file replaced or resized after it was listed") {
  temp_dir d;
  write_file(d / "m/a.bin", test::pattern(5000));
  write_file(d / "m/b.bin", test::pattern(5000, 2));
  auto files = enumerate_model(d / "m", {});
  REQUIRE(files);
  std::vector<detail::hash_task> tasks{{0, {0, 5000}}, {1, {0, 5000}}};
  REQUIRE(detail::hash_ranges(*files, tasks, hash_algorithm::sha256, 2, false, {}));

  write_file(d / "m/a.bin", test::pattern(5001));  // same inode, new size
  auto grown = detail::hash_ranges(*files, tasks, hash_algorithm::sha256, 1, false, {});
  CHECK(test::error_of(grown).message() == "a.bin: changed size while the model was read (5000 bytes when listed, 5001 now)");

  write_file(d / "replacement", test::pattern(5000, 2));
  std::filesystem::rename(d / "replacement", d / "m/b.bin");  // same size, another file
  auto swapped = detail::hash_ranges(*files, {{1, {0, 5000}}}, hash_algorithm::sha256, 1, false, {});
  CHECK(test::error_of(swapped).message() == "b.bin: was replaced after the model was listed");
  CHECK(swapped.error().code() == errc::unsafe_entry);
}

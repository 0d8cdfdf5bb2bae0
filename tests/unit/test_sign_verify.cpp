// Sign and verify end to end through the library, and every negative path of verification.
#include <drun/log.hpp>
#include <drun/sign.hpp>
#include <drun/verify.hpp>

#include "detail/encoding.hpp"
#include "support.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <mutex>

using namespace drun;
using test::temp_dir;
using test::write_file;

namespace {

struct fixture {
  temp_dir d;
  std::string big = test::pattern(20000, 3);
  fixture() {
    write_file(d / "m/big.bin", big);
    write_file(d / "m/config.json", R"({"layers": 2})");
    write_file(d / "m/sub/tok.txt", "tokens");
  }
  std::filesystem::path model() const { return d / "m"; }
  std::string sign(const private_key& k, serialization_method method = serialization_method::shards) const {
    manifest_options opts;
    opts.method = method;
    opts.piece_size = 4096;
    auto m = build_manifest(model(), opts);
    REQUIRE(m);
    auto b = sign_manifest(*m, k);
    REQUIRE(b);
    return *b;
  }
};

std::string reencode_payload(const std::string& bundle, const std::function<void(nlohmann::json&)>& edit) {
  auto b = nlohmann::json::parse(bundle);
  auto payload = detail::base64_decode(b["dsseEnvelope"]["payload"].get<std::string>());
  auto st = nlohmann::json::parse(*payload);
  edit(st);
  b["dsseEnvelope"]["payload"] = detail::base64_encode(as_bytes(st.dump()));
  return b.dump();
}

}  // namespace

TEST_CASE("PAE is DSSE v1") {
  CHECK(pre_authentication_encoding("http://example.com/HelloWorld", as_bytes("hello world")) ==
        "DSSEv1 29 http://example.com/HelloWorld 11 hello world");
}

TEST_CASE("sign then verify, every key type and both methods") {
  fixture f;
  for (auto t : {key_type::ed25519, key_type::ecdsa_p256, key_type::ecdsa_p384, key_type::ecdsa_p521}) {
    for (auto method : {serialization_method::shards, serialization_method::files}) {
      CAPTURE(to_string(t));
      CAPTURE(to_string(method));
      auto k = private_key::generate(t);
      REQUIRE(k);
      auto bundle = f.sign(*k, method);
      auto b = nlohmann::json::parse(bundle);
      CHECK(b["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json");
      CHECK(b["verificationMaterial"]["publicKey"]["hint"] == k->public_key().hint());
      auto vm = verify_bundle(bundle, trust_store::from_public_key(k->public_key()));
      REQUIRE(vm);
      CHECK(vm->files().size() == 3);
      CHECK(vm->method() == method);
      CHECK(vm->artifact_id().size() == 64);
      CHECK(verify_model(*vm, f.model()));
    }
  }
}

TEST_CASE("verification failures name what failed") {
  fixture f;
  auto k = private_key::generate(key_type::ecdsa_p256);
  REQUIRE(k);
  auto trust = trust_store::from_public_key(k->public_key());
  auto bundle = f.sign(*k);
  auto vm = verify_bundle(bundle, trust);
  REQUIRE(vm);

  SUBCASE("a flipped byte names the file and piece range") {
    auto changed = f.big;
    changed[5000] ^= 1;
    write_file(f.d / "m/big.bin", changed);
    auto r = verify_model(*vm, f.model());
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::digest_mismatch);
    CHECK(r.error().message() == "big.bin bytes [4096, 8192): sha256 digest mismatch");
  }
  SUBCASE("missing, extra, renamed and resized files") {
    std::filesystem::rename(f.d / "m/sub/tok.txt", f.d / "m/sub/tok2.txt");
    write_file(f.d / "m/big.bin", f.big + "x");
    auto r = verify_model(*vm, f.model());
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::model_mismatch);
    auto msg = r.error().message();
    CHECK(msg.find("sub/tok.txt: missing from the model") != std::string::npos);
    CHECK(msg.find("sub/tok2.txt: not in the manifest") != std::string::npos);
    CHECK(msg.find("big.bin: size differs (signed 20000 bytes, found 20001)") != std::string::npos);
  }
  SUBCASE("unsigned files pass only when asked") {
    write_file(f.d / "m/extra", "x");
    CHECK_FALSE(verify_model(*vm, f.model()));
    verify_options o;
    o.ignore_unsigned_files = true;
    CHECK(verify_model(*vm, f.model(), o));
    verify_options ign;
    ign.ignore_paths = {"extra"};
    CHECK(verify_model(*vm, f.model(), ign));
  }
  SUBCASE("a symlink in the model is a mismatch") {
    std::filesystem::remove(f.d / "m/config.json");
    std::filesystem::create_symlink("big.bin", f.d / "m/config.json");
    auto r = verify_model(*vm, f.model());
    CHECK(test::error_of(r).code() == errc::model_mismatch);
    CHECK(r.error().message().find("config.json: is a symlink") != std::string::npos);
  }
  SUBCASE("wrong key, other curve, modified payload, hint mismatch") {
    auto other = private_key::generate(key_type::ecdsa_p384);
    REQUIRE(other);
    auto r = verify_bundle(bundle, trust_store::from_public_key(other->public_key()));
    CHECK(test::error_of(r).code() == errc::signature_invalid);
    CHECK(r.error().message().find("hint") != std::string::npos);

    auto no_hint = nlohmann::json::parse(bundle);
    no_hint["verificationMaterial"]["publicKey"].erase("hint");
    auto r2 = verify_bundle(no_hint.dump(), trust_store::from_public_key(other->public_key()));
    CHECK(test::error_of(r2).message().find("signature does not verify") != std::string::npos);

    auto modified = reencode_payload(bundle, [](auto& st) { st["predicate"]["resources"][0]["digest"] = std::string(64, '0'); });
    auto r3 = verify_bundle(modified, trust);
    CHECK(test::error_of(r3).code() == errc::signature_invalid);
  }
  SUBCASE("malformed bundles") {
    CHECK(test::error_of(verify_bundle(bundle.substr(0, bundle.size() / 2), trust)).message().find("not valid JSON") !=
          std::string::npos);
    auto b = nlohmann::json::parse(bundle);
    b["dsseEnvelope"]["payload"] = "!!!";
    CHECK(test::error_of(verify_bundle(b.dump(), trust)).message().find("not valid base64") != std::string::npos);
    auto two = nlohmann::json::parse(bundle);
    two["dsseEnvelope"]["signatures"].push_back(two["dsseEnvelope"]["signatures"][0]);
    CHECK(test::error_of(verify_bundle(two.dump(), trust)).message().find("exactly one") != std::string::npos);
    std::string huge(max_bundle_size + 1, ' ');
    CHECK(test::error_of(verify_bundle(huge, trust)).message().find("too large") != std::string::npos);
    auto roots_only = trust_store::from_public_key(k->public_key());
    auto keyless = nlohmann::json::parse(bundle);
    keyless["verificationMaterial"].erase("publicKey");
    keyless["verificationMaterial"]["certificate"] = {{"rawBytes", "AAAA"}};
    auto refused = test::error_of(verify_bundle(keyless.dump(), roots_only));
    CHECK(refused.code() == errc::untrusted_certificate);
    CHECK(refused.message().find("Sigstore trusted root") != std::string::npos);
  }
}

TEST_CASE("check_piece: the per-piece check for fetchers") {
  fixture f;
  auto k = private_key::generate(key_type::ed25519);
  REQUIRE(k);
  auto vm = verify_bundle(f.sign(*k), trust_store::from_public_key(k->public_key()));
  REQUIRE(vm);
  REQUIRE(vm->files()[0].name == "big.bin");
  REQUIRE(vm->files()[0].size == 20000u);
  REQUIRE(vm->pieces().size() == 7);  // 5 of big.bin, config.json, sub/tok.txt
  auto text = as_bytes(std::string_view(f.big).substr(4096, 4096));
  const std::vector<std::byte> piece(text.begin(), text.end());
  auto bytes = piece;

  auto swapped = vm->check_piece(2, std::move(bytes));  // right bytes, wrong place
  CHECK(test::error_of(swapped).message() == "big.bin bytes [8192, 12288): sha256 digest mismatch");
  CHECK(bytes == piece);  // a failed check leaves the caller's bytes alone
  std::vector<std::byte> short_piece(piece.begin(), piece.begin() + 100);
  CHECK(test::error_of(vm->check_piece(1, std::move(short_piece))).message().find("piece has 100 bytes") !=
        std::string::npos);
  CHECK(test::error_of(vm->check_piece(99, std::move(bytes))).code() == errc::invalid_argument);

  const auto* where = bytes.data();
  auto ok = vm->check_piece(1, std::move(bytes));
  REQUIRE(ok);
  CHECK(ok->range() == byte_range{4096, 8192});
  CHECK(ok->artifact_id() == vm->artifact_id());
  // The piece owns the very buffer it checked, not a copy the caller could still change.
  CHECK(ok->bytes().data() == where);
  CHECK(bytes.empty());
  auto back = std::move(*ok).release();
  CHECK(back.data() == where);
  CHECK(ok->bytes().empty());
}

TEST_CASE("verify_model: an empty file a shards manifest does not cover is unsigned") {
  // Security review, finding 6: shards cannot sign an empty file, and verify used to let any
  // empty file through, so an empty adapter_config.json planted in a model passed.
  fixture f;
  auto k = private_key::generate(key_type::ed25519);
  REQUIRE(k);
  auto trust = trust_store::from_public_key(k->public_key());
  auto shards = verify_bundle(f.sign(*k), trust);
  REQUIRE(shards);
  write_file(f.d / "m/adapter_config.json", "");
  auto refused = verify_model(*shards, f.model());
  CHECK(test::error_of(refused).code() == errc::model_mismatch);
  CHECK(refused.error().message().find("adapter_config.json: an empty file not in the manifest") != std::string::npos);

  std::mutex m;
  std::vector<std::string> logged;
  set_log_sink([&](log_level level, std::string_view msg) {
    std::lock_guard lock(m);
    if (level == log_level::warning) logged.emplace_back(msg);
  });
  verify_options allow;
  allow.allow_unsigned_empty_files = true;
  CHECK(verify_model(*shards, f.model(), allow));
  set_log_sink({});
  REQUIRE(logged.size() == 1);
  CHECK(logged[0].find("accepted 1 unsigned empty file") != std::string::npos);
  CHECK(logged[0].find("adapter_config.json") != std::string::npos);

  // Only empty files: a byte in it makes it an unsigned file like any other.
  write_file(f.d / "m/adapter_config.json", "{}");
  CHECK(test::error_of(verify_model(*shards, f.model(), allow)).message().find("adapter_config.json: not in the "
                                                                             "manifest (unsigned file)") !=
        std::string::npos);

  // A files manifest lists empty files: one missing from it was added after signing, flag or not.
  std::filesystem::remove(f.d / "m/adapter_config.json");
  auto files = verify_bundle(f.sign(*k, serialization_method::files), trust);
  REQUIRE(files);
  write_file(f.d / "m/adapter_config.json", "");
  CHECK(test::error_of(verify_model(*files, f.model(), allow)).code() == errc::model_mismatch);
}

TEST_CASE("verify_bundle: a hostile bundle is refused at its first problem, in time bounded by the limit") {
  // Past the 4096-value limit, nlohmann's parser used to read on, rescanning the kept parent for
  // every discarded child: 25 s of CPU for 32 MiB of "[{},{},...]". Now the parse stops there.
  auto k = private_key::generate(key_type::ed25519);
  REQUIRE(k);
  auto trust = trust_store::from_public_key(k->public_key());
  std::string head = R"({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "x": [)";
  std::string hostile = head;
  for (std::size_t n = (max_bundle_size - head.size() - 8) / 3; n > 0; --n) hostile += "{},";
  hostile += "{}]}";
  REQUIRE(hostile.size() <= max_bundle_size);
  auto start = std::chrono::steady_clock::now();
  auto r = verify_bundle(hostile, trust);
  auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(test::error_of(r).message().find("more than 4096 values") != std::string::npos);
  CHECK(secs < 5.0);
}

// The encrypted store through the library: sealing primitives, node keys, put/read/reader,
// tamper detection, resume, remove/GC locks, scrub and rotation.
#include <drun/sign.hpp>
#include <drun/store.hpp>

#include "detail/encoding.hpp"
#include "manifest_data.hpp"
#include "store/fault.hpp"
#include "store/seal.hpp"
#include "store/sqlite.hpp"
#include "support.hpp"

#include <functional>
#include <set>
#include <thread>
#include <sys/file.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

using namespace drun;
using test::temp_dir;
using test::write_file;

namespace {

std::vector<std::byte> unhex(std::string_view h) { return *detail::hex_decode(h); }

node_key key_from_hex(char c) { return std::move(node_key::from_text(std::string(64, c))).value(); }

struct signed_model {
  temp_dir d;
  std::string big = test::pattern(300000, 9);
  std::string bundle;
  std::optional<verified_manifest> vm;
  explicit signed_model(std::string_view extra = "") {
    write_file(d / "m/big.bin", big);
    write_file(d / "m/sub/small.txt", std::string("small file") + std::string(extra));
    vm.emplace(test::sign_and_verify(d / "m", 65536, &bundle));
  }
  std::filesystem::path model() const { return d / "m"; }
};

std::vector<std::string> all_files(const std::filesystem::path& root) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(root))
    if (e.is_regular_file()) out.push_back(e.path().string());
  return out;
}

}  // namespace

TEST_CASE("HKDF-SHA256 known answer (RFC 5869 test case 1)") {
  auto ikm = unhex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
  auto salt = unhex("000102030405060708090a0b0c");
  auto info = unhex("f0f1f2f3f4f5f6f7f8f9");
  std::array<std::byte, 42> okm{};
  REQUIRE(store_detail::hkdf_sha256(ikm, salt, std::string_view(reinterpret_cast<const char*>(info.data()), info.size()), okm));
  CHECK(detail::hex_encode(okm) ==
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
}

TEST_CASE("GCM binds every part of a piece's address") {
  auto nk = key_from_hex('a');
  std::array<std::byte, 16> store_id{};
  std::array<std::byte, 32> artifact{};
  artifact[0] = std::byte{1};
  auto dk = store_detail::data_key::derive(nk, store_id, artifact);
  REQUIRE(dk);
  store_detail::piece_address where{artifact, 2, 7, 1, 42, store_detail::random_nonce()};
  auto plain = test::pattern(100000);
  std::vector<std::byte> sealed(plain.size());
  store_detail::gcm seal(store_detail::gcm::mode::seal, *dk, where);
  seal.update(as_bytes(plain), sealed);
  auto tag = seal.seal_tag();
  CHECK(std::string(reinterpret_cast<const char*>(sealed.data()), 64) != plain.substr(0, 64));

  auto opens = [&](const store_detail::data_key& key, store_detail::piece_address at, std::vector<std::byte> data) {
    store_detail::gcm open(store_detail::gcm::mode::open, key, at);
    open.update(data, data);
    return open.open_check(tag) && std::equal(data.begin(), data.end(), as_bytes(plain).begin());
  };
  CHECK(opens(*dk, where, sealed));
  for (auto mutate : std::vector<std::function<void(store_detail::piece_address&)>>{
           [](auto& a) { a.file = 3; }, [](auto& a) { a.piece = 8; }, [](auto& a) { a.key_version = 2; },
           [](auto& a) { a.generation = 41; }, [](auto& a) { a.artifact[5] = std::byte{9}; },
           [](auto& a) { a.nonce[11] ^= std::byte{1}; }}) {
    auto at = where;
    mutate(at);
    CHECK_FALSE(opens(*dk, at, sealed));
  }
  auto flipped = sealed;
  flipped[5000] ^= std::byte{1};
  CHECK_FALSE(opens(*dk, where, flipped));
  auto other = store_detail::data_key::derive(key_from_hex('b'), store_id, artifact);
  REQUIRE(other);
  CHECK_FALSE(opens(*other, where, sealed));
  store_id[0] = std::byte{1};  // another store under the same node key: another data key
  auto other_store = store_detail::data_key::derive(nk, store_id, artifact);
  REQUIRE(other_store);
  CHECK_FALSE(opens(*other_store, where, sealed));
}

TEST_CASE("node keys: text forms and sources") {
  std::string hex(64, '0');
  hex[63] = '1';
  CHECK(node_key::from_text(hex + "\n"));
  CHECK(node_key::from_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE=\n"));  // base64 of 32 bytes
  CHECK(test::error_of(node_key::from_text(std::string(62, 'a'))).code() == errc::key_error);
  CHECK(test::error_of(node_key::from_text(std::string(63, 'a') + "z")).code() == errc::key_error);
  CHECK_FALSE(node_key::from_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="));  // 31 bytes

  temp_dir d;
  REQUIRE(node_key::generate().save(d / "k"));
  struct stat st {};
  REQUIRE(::stat((d / "k").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(test::read_text(d / "k").size() == 65);
  CHECK(node_key::from_source("file:" + (d / "k").string()));
  CHECK(test::error_of(node_key::generate().save(d / "k")).message().find("refusing to overwrite") != std::string::npos);
  ::chmod((d / "k").c_str(), 0640);
  CHECK(test::error_of(node_key::from_source("file:" + (d / "k").string())).message().find("permissions 0640") !=
        std::string::npos);
  ::setenv("DRUN_TEST_NODE_KEY", hex.c_str(), 1);
  CHECK(node_key::from_source("env:DRUN_TEST_NODE_KEY"));
  ::unsetenv("DRUN_TEST_NODE_KEY");
  CHECK(test::error_of(node_key::from_source("env:DRUN_TEST_NODE_KEY")).message().find("not set") != std::string::npos);
  CHECK(node_key::from_source("cmd:echo " + hex));
  CHECK(test::error_of(node_key::from_source("cmd:exit 3")).message().find("status 3") != std::string::npos);
  CHECK(test::error_of(node_key::from_source("vault:x")).code() == errc::key_error);
}

TEST_CASE("store: put, read, reader, resume; nothing plaintext at rest") {
  signed_model sm;
  temp_dir sd;
  auto s = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(s);
  auto report = import_model(*s, *sm.vm, sm.bundle, sm.model(), 2);
  REQUIRE(report);
  CHECK(report->stored == sm.vm->pieces().size());
  auto again = import_model(*s, *sm.vm, sm.bundle, sm.model(), 2);
  REQUIRE(again);
  CHECK(again->stored == 0);
  CHECK(again->already_stored == sm.vm->pieces().size());

  // Random access across piece boundaries, decrypted straight into the caller's buffer.
  auto reader = s->open_artifact(sm.vm->artifact_id());
  REQUIRE(reader);
  REQUIRE(reader->files()[0].name == "big.bin");
  std::vector<std::byte> out(100000);
  REQUIRE(reader->read(0, 60000, out));
  CHECK(std::equal(out.begin(), out.end(), as_bytes(sm.big).begin() + 60000));
  CHECK(test::error_of(reader->read(0, 250000, out)).code() == errc::invalid_argument);

  // No 32-byte window of the model appears anywhere in the store directory.
  for (const auto& f : all_files(sd / "store")) {
    auto text = test::read_text(f);
    for (std::size_t off : {0u, 70000u, 299000u - 32u}) CHECK(text.find(sm.big.substr(off, 32)) == std::string::npos);
  }

  temp_dir out_dir;
  REQUIRE(s->materialize(sm.vm->artifact_id(), out_dir / "x"));
  CHECK(test::read_text(out_dir / "x/big.bin") == sm.big);
  CHECK(test::read_text(out_dir / "x/sub/small.txt") == "small file");
  CHECK(test::error_of(s->materialize(sm.vm->artifact_id(), out_dir / "x")).code() == errc::invalid_argument);
}

TEST_CASE("store: tampering on disk is caught by the tag, dropped, reported, and repaired") {
  signed_model sm;
  temp_dir sd;
  auto s = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  auto data = sd / "store/artifacts" / sm.vm->artifact_id() / "data/0";
  {
    // Copy piece 0's ciphertext over piece 1's place: right bytes, wrong address.
    auto text = test::read_text(data);
    text.replace(65536, 65536, text.substr(0, 65536));
    std::ofstream(data, std::ios::binary) << text;
  }
  std::vector<std::byte> buf(65536);
  auto r = s->read_piece(sm.vm->artifact_id(), 1, buf);
  CHECK(test::error_of(r).code() == errc::digest_mismatch);
  CHECK(r.error().message().find("big.bin bytes [65536, 131072): piece 1 failed its authentication tag") == 0);
  CHECK(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));  // wiped
  auto stored = s->stored_pieces(sm.vm->artifact_id());
  REQUIRE(stored);
  CHECK_FALSE((*stored)[1]);
  CHECK((*stored)[0]);
  auto repaired = import_model(*s, *sm.vm, sm.bundle, sm.model());
  REQUIRE(repaired);
  CHECK(repaired->stored == 1);
  auto clean = s->scrub();
  REQUIRE(clean);
  CHECK(clean->empty());
}

TEST_CASE("store: a piece from another artifact does not open") {
  signed_model a, b("!");  // same layout, different content
  temp_dir sd;
  auto s = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(import_model(*s, *a.vm, a.bundle, a.model()));
  REQUIRE(import_model(*s, *b.vm, b.bundle, b.model()));
  auto dir = sd / "store/artifacts";
  std::filesystem::copy_file(dir / a.vm->artifact_id() / "data/0", dir / b.vm->artifact_id() / "data/0",
                             std::filesystem::copy_options::overwrite_existing);
  auto failures = s->scrub(b.vm->artifact_id());
  REQUIRE(failures);
  CHECK(failures->size() == 5);  // every piece of big.bin
  CHECK((*failures)[0].file == "big.bin");
}

TEST_CASE("store: keys, pins, remove, gc and readers") {
  signed_model a, b("!");
  temp_dir sd;
  {
    auto s = store::open(sd / "store", key_from_hex('c'));
    REQUIRE(s);
    REQUIRE(import_model(*s, *a.vm, a.bundle, a.model()));
    REQUIRE(import_model(*s, *b.vm, b.bundle, b.model()));
  }
  auto wrong = store::open(sd / "store", key_from_hex('d'));
  CHECK(test::error_of(wrong).message().find("wrong key") != std::string::npos);

  auto s = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(s->set_pinned(a.vm->artifact_id(), true));
  {
    auto reader = s->open_artifact(b.vm->artifact_id());  // b is being read: gc keeps it
    REQUIRE(reader);
    // The reader's lock is per open file description, so a second store object in this process
    // stands for another process.
    auto other = store::open(sd / "store", key_from_hex('c'));
    REQUIRE(other);
    gc_options ttl;
    ttl.ttl = std::chrono::seconds(-10);
    auto report = other->gc(ttl);
    REQUIRE(report);
    CHECK(report->removed.empty());
    CHECK(report->in_use == std::vector<std::string>{b.vm->artifact_id()});
  }
  gc_options marks;
  marks.high_bytes = 1;
  marks.low_bytes = 0;
  auto report = s->gc(marks);
  REQUIRE(report);
  CHECK(report->removed == std::vector<std::string>{b.vm->artifact_id()});
  CHECK_FALSE(std::filesystem::exists(sd / "store/artifacts" / b.vm->artifact_id()));
  auto left = s->list();
  REQUIRE(left);
  REQUIRE(left->size() == 1);
  CHECK(left->front().pinned);
  CHECK(s->resolve(a.vm->artifact_id().substr(0, 8)).value() == a.vm->artifact_id());
  CHECK(test::error_of(s->resolve("abc")).code() == errc::invalid_argument);
  REQUIRE(s->remove(a.vm->artifact_id()));
  CHECK(s->list()->empty());
}

TEST_CASE("store: key rotation re-seals every piece; the old key is retired") {
  signed_model sm;
  temp_dir sd;
  {
    auto s = store::open(sd / "store", key_from_hex('c'));
    REQUIRE(s);
    REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  }
  auto before = test::read_text(sd / "store/artifacts" / sm.vm->artifact_id() / "data/0");
  REQUIRE(store::rotate_key(sd / "store", key_from_hex('c'), key_from_hex('e')));
  CHECK(test::read_text(sd / "store/artifacts" / sm.vm->artifact_id() / "data/0") != before);
  CHECK(test::error_of(store::open(sd / "store", key_from_hex('c'))).message().find("retired") != std::string::npos);
  auto s = store::open(sd / "store", key_from_hex('e'));
  REQUIRE(s);
  auto d = s->show(sm.vm->artifact_id());
  REQUIRE(d);
  CHECK(d->key_versions == std::vector<std::uint32_t>{2});
  auto failures = s->scrub();
  REQUIRE(failures);
  CHECK(failures->empty());
}

TEST_CASE("store: files manifests are refused") {
  temp_dir d;
  write_file(d / "m/a", "hello");
  manifest_options opts;
  opts.method = serialization_method::files;
  auto m = build_manifest(d / "m", opts);
  REQUIRE(m);
  auto k = private_key::generate(key_type::ed25519);
  REQUIRE(k);
  auto bundle = std::move(sign_manifest(*m, *k)).value();
  auto vm = verify_bundle(bundle, trust_store::from_public_key(k->public_key()));
  REQUIRE(vm);
  auto s = store::open(d / "store", key_from_hex('c'));
  REQUIRE(s);
  CHECK(test::error_of(s->add_artifact(*vm, bundle)).message().find("shards") != std::string::npos);
}

TEST_CASE("store: a process still holding a rotated-out key drops nothing") {
  signed_model sm;
  temp_dir sd;
  auto stale = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(stale);
  REQUIRE(import_model(*stale, *sm.vm, sm.bundle, sm.model()));
  REQUIRE(store::rotate_key(sd / "store", key_from_hex('c'), key_from_hex('e')));
  std::vector<std::byte> buf(65536);
  auto r = stale->read_piece(sm.vm->artifact_id(), 1, buf);
  CHECK(test::error_of(r).code() == errc::key_error);
  CHECK(r.error().message().find("rotated since it was opened") != std::string::npos);
  auto failures = stale->scrub();
  CHECK(test::error_of(failures).code() == errc::key_error);
  auto fresh = store::open(sd / "store", key_from_hex('e'));
  REQUIRE(fresh);
  auto all = fresh->list();
  REQUIRE(all);
  CHECK(all->front().stored_pieces == all->front().pieces);  // nothing was dropped
  // A retired key cannot come back through another rotation.
  auto back = store::rotate_key(sd / "store", key_from_hex('e'), key_from_hex('c'));
  CHECK(test::error_of(back).message().find("retired") != std::string::npos);
}

TEST_CASE("store: a truncated or deleted data file is named, dropped and repaired") {
  signed_model sm;
  temp_dir sd;
  auto s = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  auto data = sd / "store/artifacts" / sm.vm->artifact_id() / "data";
  std::filesystem::resize_file(data / "0", 100000);  // big.bin keeps piece 0 only
  std::filesystem::remove(data / "1");                // sub/small.txt is gone
  auto failures = s->scrub();
  REQUIRE(failures);
  REQUIRE(failures->size() == 5);  // pieces 1..4 of big.bin, and small.txt
  CHECK((*failures)[0].file == "big.bin");
  CHECK((*failures)[0].reason.find("truncated") != std::string::npos);
  CHECK(failures->back().file == "sub/small.txt");
  CHECK(failures->back().reason.find("lost its data file") != std::string::npos);
  auto repaired = import_model(*s, *sm.vm, sm.bundle, sm.model());
  REQUIRE(repaired);
  CHECK(repaired->stored == 5);
  CHECK(s->scrub()->empty());
  temp_dir out;
  REQUIRE(s->materialize(sm.vm->artifact_id(), out / "x"));
  CHECK(test::read_text(out / "x/big.bin") == sm.big);
}

TEST_CASE("store: a data file truncated under an open reader is named, dropped and repaired under it") {
  signed_model sm;
  temp_dir sd;
  auto s = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  auto reader = s->open_artifact(sm.vm->artifact_id());
  REQUIRE(reader);
  std::vector<std::byte> head(1000), tail(1000, std::byte{0x5a});
  REQUIRE(reader->read(0, 0, head));
  // Another process cuts big.bin's data file to its first piece while the reader is open.
  std::filesystem::resize_file(sd / "store/artifacts" / sm.vm->artifact_id() / "data/0", 100000);
  auto cut = reader->read(0, 250000, tail);
  REQUIRE_FALSE(cut);
  CHECK(cut.error().code() == errc::model_mismatch);
  CHECK(cut.error().message().find("truncated data file") != std::string::npos);
  CHECK(cut.error().message().find("big.bin") != std::string::npos);
  CHECK(std::all_of(tail.begin(), tail.end(), [](std::byte b) { return b == std::byte{0}; }));  // wiped
  REQUIRE(reader->read(0, 0, head));  // the piece the cut left whole still reads
  CHECK(std::string(reinterpret_cast<const char*>(head.data()), head.size()) == sm.big.substr(0, 1000));
  CHECK(s->missing(*sm.vm)->indices == std::vector<std::size_t>{3});  // dropped: the next fetch brings it
  // The import repairs it while the reader stays open, and the reader then reads it.
  auto repaired = import_model(*s, *sm.vm, sm.bundle, sm.model());
  REQUIRE(repaired);
  REQUIRE(reader->read(0, 250000, tail));
  CHECK(std::string(reinterpret_cast<const char*>(tail.data()), tail.size()) == sm.big.substr(250000, 1000));
  CHECK(s->scrub()->size() == 3);  // pieces 1, 2 and 4 lay past the cut too: the scrub finds and drops them
  REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  CHECK(s->scrub()->empty());
}

namespace {

// The nonce of every stored piece of an artifact, as the store would use it to open the piece
// (random, or derived for pieces sealed before random nonces), in hex.
std::vector<std::string> sealed_nonces(const std::filesystem::path& store_dir, const std::string& artifact) {
  auto db = store_detail::database::open(store_dir / "index.sqlite");
  REQUIRE(db);
  auto st = db->prepare("SELECT nonce, key_version, generation FROM pieces WHERE artifact = ? AND state = 2");
  REQUIRE(st);
  st->bind(1, artifact);
  std::vector<std::string> out;
  REQUIRE(st->each([&] {
    auto nonce = st->is_null(0) ? store_detail::legacy_nonce(static_cast<std::uint32_t>(st->int64(1)),
                                                             static_cast<std::uint64_t>(st->int64(2)))
                                : store_detail::nonce_bytes{};
    if (!st->is_null(0)) std::copy(st->blob(0).begin(), st->blob(0).end(), nonce.begin());
    out.push_back(detail::hex_encode(nonce));
  }));
  return out;
}

void copy_index(const std::filesystem::path& from, const std::filesystem::path& to) {
  for (const char* suffix : {"", "-wal", "-shm"}) {
    std::filesystem::path f = from.string() + suffix, t = to.string() + suffix;
    std::error_code ec;
    std::filesystem::remove(t, ec);
    if (std::filesystem::exists(f)) std::filesystem::copy_file(f, t);
  }
}

}  // namespace

TEST_CASE("store: an index rolled back to an older copy never repeats a nonce") {
  // A node image, a backup restore or a lost -wal file rolls the index back: the generation
  // counter starts over, and with counter-derived nonces the next writes would reuse (data key,
  // nonce) pairs for other pieces' plaintext.
  signed_model sm;
  temp_dir sd;
  auto dir = sd / "store";
  {
    auto s = store::open(dir, key_from_hex('c'));
    REQUIRE(s);
    REQUIRE(s->add_artifact(*sm.vm, sm.bundle));
  }
  copy_index(dir / "index.sqlite", sd / "old.sqlite");
  std::vector<std::string> before;
  {
    auto s = store::open(dir, key_from_hex('c'));
    REQUIRE(s);
    REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model(), 1));
  }
  before = sealed_nonces(dir, sm.vm->artifact_id());
  REQUIRE(before.size() == sm.vm->pieces().size());
  copy_index(sd / "old.sqlite", dir / "index.sqlite");
  {
    auto s = store::open(dir, key_from_hex('c'));
    REQUIRE(s);
    CHECK(s->missing(*sm.vm)->indices.size() == sm.vm->pieces().size());  // the rollback forgot them
    // Written in another order this time, so a repeated counter would pair a nonce with new bytes.
    for (std::size_t i = sm.vm->pieces().size(); i-- > 0;) {
      const auto& r = *sm.vm->pieces()[i].range;
      auto bytes = sm.vm->pieces()[i].file == 0 ? sm.big.substr(r.begin, r.size()) : std::string("small file");
      auto v = sm.vm->check_piece(i, std::vector<std::byte>(as_bytes(bytes).begin(), as_bytes(bytes).end()));
      REQUIRE(v);
      REQUIRE(s->put_piece(*sm.vm, *v));
    }
  }
  auto after = sealed_nonces(dir, sm.vm->artifact_id());
  REQUIRE(after.size() == before.size());
  std::set<std::string> nonces;
  for (const auto* set : {&before, &after})
    for (const auto& nonce : *set) CHECK_MESSAGE(nonces.insert(nonce).second, "nonce used twice: " << nonce);
}

TEST_CASE("store: a damaged record of the node key is proven by a stored piece and rewritten") {
  signed_model sm;
  temp_dir sd;
  auto dir = sd / "store";
  auto damage_key_record = [&] {
    auto db = store_detail::database::open(dir / "index.sqlite");
    REQUIRE(db);
    // One hex digit changed, as a flipped bit would: it still reads as a fingerprint.
    REQUIRE(db->exec("UPDATE key_versions SET fingerprint = "
                     "(CASE substr(fingerprint, 1, 1) WHEN '0' THEN '1' ELSE '0' END) || substr(fingerprint, 2)"));
  };
  {
    auto s = store::open(dir, key_from_hex('c'));
    REQUIRE(s);
    REQUIRE(s->add_artifact(*sm.vm, sm.bundle));
  }
  damage_key_record();
  // Nothing stored yet: nothing proves the key, so the store fails closed.
  auto unproven = store::open(dir, key_from_hex('c'));
  REQUIRE_FALSE(unproven);
  CHECK(unproven.error().code() == errc::key_error);
  {
    auto db = store_detail::database::open(dir / "index.sqlite");
    REQUIRE(db);
    REQUIRE(db->exec("DELETE FROM key_versions"));  // start over: the next open records the key
  }
  {
    auto s = store::open(dir, key_from_hex('c'));
    REQUIRE(s);
    REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  }
  damage_key_record();
  auto other = store::open(dir, key_from_hex('d'));  // another key opens no piece: still refused
  REQUIRE_FALSE(other);
  CHECK(other.error().message().find("wrong key") != std::string::npos);
  auto s = store::open(dir, key_from_hex('c'));  // the store's key opens one: the record is rewritten
  REQUIRE(s);
  CHECK(s->scrub()->empty());
  temp_dir out;
  REQUIRE(s->materialize(sm.vm->artifact_id(), out / "x"));
  CHECK(test::read_text(out / "x/big.bin") == sm.big);
  CHECK_FALSE(store::open(dir, key_from_hex('d')));  // and another key is refused by the record again
}

TEST_CASE("store: a damaged hash type of an artifact is named by the scrub and rewritten") {
  // Every piece row is read with it, so a flipped bit there once failed every later import with
  // "store index is damaged (hash type)" while the scrub found nothing (test_store.py's flips).
  signed_model sm;
  temp_dir sd;
  auto dir = sd / "store";
  auto s = store::open(dir, key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  {
    auto db = store_detail::database::open(dir / "index.sqlite");
    REQUIRE(db);
    REQUIRE(db->exec("UPDATE artifacts SET hash_type = 'sha2w6'"));
  }
  auto refused = s->open_artifact(sm.vm->artifact_id());
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message().find("hash type") != std::string::npos);
  auto found = s->scrub();
  REQUIRE(found);
  REQUIRE(found->size() == 1);
  CHECK((*found)[0].reason.find("hash type was damaged") != std::string::npos);
  CHECK(s->scrub()->empty());
  temp_dir out;
  REQUIRE(s->materialize(sm.vm->artifact_id(), out / "x"));  // its pieces were kept: they verify as signed
  CHECK(test::read_text(out / "x/big.bin") == sm.big);
}

TEST_CASE("store: a piece forged with a valid tag is never returned") {
  // What an attacker who learnt a data key (from a nonce reuse, or the node key) could write:
  // other bytes, sealed properly under the piece's address. The tag verifies; the signed digest
  // does not, and every read that returns plaintext checks it.
  signed_model sm;
  temp_dir sd;
  auto dir = sd / "store";
  auto s = store::open(dir, key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  const auto& id = sm.vm->artifact_id();
  auto forge = [&] {
    auto db = store_detail::database::open(dir / "index.sqlite");
    REQUIRE(db);
    auto meta = db->prepare("SELECT value FROM meta WHERE key = 'store_id'");
    REQUIRE(meta);
    REQUIRE(*meta->step());
    std::vector<std::byte> store_id(meta->blob(0).begin(), meta->blob(0).end());
    auto raw = *detail::hex_decode(id);
    auto dk = store_detail::data_key::derive(key_from_hex('c'), store_id, raw);
    REQUIRE(dk);
    store_detail::piece_address where{};
    std::copy(raw.begin(), raw.end(), where.artifact.begin());
    where.file = 0;
    where.piece = 1;
    where.key_version = 1;
    where.generation = 999999;
    where.nonce = store_detail::random_nonce();
    auto evil = std::string(65536, 'X');
    std::vector<std::byte> sealed(evil.size());
    store_detail::gcm seal(store_detail::gcm::mode::seal, *dk, where);
    seal.update(as_bytes(evil), sealed);
    auto tag = seal.seal_tag();
    auto data = dir / "artifacts" / id / "data/0";
    auto text = test::read_text(data);
    text.replace(65536, 65536, std::string(reinterpret_cast<const char*>(sealed.data()), sealed.size()));
    std::ofstream(data, std::ios::binary) << text;
    auto up = db->prepare("UPDATE pieces SET tag = ?, nonce = ?, generation = ?, state = 2 WHERE artifact = ? AND idx = 1");
    REQUIRE(up);
    up->bind_blob(1, tag).bind_blob(2, where.nonce).bind(3, 999999).bind(4, id);
    REQUIRE(up->run());
  };
  auto refused = [](const auto& r) {
    CHECK(test::error_of(r).code() == errc::digest_mismatch);
    CHECK(r.error().message().find("does not match its signed sha256 digest although its tag verified") !=
          std::string::npos);
  };
  forge();
  // The peer server's path checks the tag only (its receivers check every digest): the forgery
  // opens there, which is what shows the tag alone would not have caught it.
  std::vector<std::byte> buf(65536);
  REQUIRE(s->read_piece(id, 1, buf, read_check::tag_only));
  CHECK(buf[0] == std::byte{'X'});
  refused(s->read_piece(id, 1, buf));
  CHECK(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));
  CHECK_FALSE((*s->stored_pieces(id))[1]);  // dropped: the next import or fetch replaces it

  forge();
  auto reader = s->open_artifact(id);
  REQUIRE(reader);
  std::vector<std::byte> out(1000);
  refused(reader->read(0, 70000, out));

  forge();
  temp_dir out_dir;
  refused(s->materialize(id, out_dir / "x"));
  CHECK_FALSE(std::filesystem::exists(out_dir / "x/big.bin"));

  forge();
  auto failures = s->scrub();
  REQUIRE(failures);
  REQUIRE(failures->size() == 1);
  CHECK((*failures)[0].reason.find("although its tag verified") != std::string::npos);
  REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  REQUIRE(s->materialize(id, out_dir / "y"));
  CHECK(test::read_text(out_dir / "y/big.bin") == sm.big);
}

TEST_CASE("store: a store another user can write to is refused") {
  signed_model sm;
  temp_dir sd;
  auto dir = sd / "store";
  std::filesystem::create_directory(dir);
  ::chmod(dir.c_str(), 0777);
  auto open = store::open(dir, key_from_hex('c'));
  CHECK(test::error_of(open).code() == errc::invalid_argument);
  CHECK(open.error().message().find("writable by group or others (mode 0777)") != std::string::npos);
  ::chmod(dir.c_str(), 0750);  // readable by the group is the operator's choice: ciphertext only
  {
    auto s = store::open(dir, key_from_hex('c'));
    REQUIRE(s);
    REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  }
  auto adir = dir / "artifacts" / sm.vm->artifact_id();
  ::chmod((dir / "artifacts").c_str(), 0777);
  CHECK(test::error_of(store::open(dir, key_from_hex('c'))).message().find("artifacts") != std::string::npos);
  ::chmod((dir / "artifacts").c_str(), 0700);
  if (::geteuid() != 0) {
    MESSAGE("not root: the tests of files and directories owned by another user are skipped");
    return;
  }
  // Owned by another user (nobody): refused whatever the mode.
  REQUIRE(::chown(dir.c_str(), 65534, 65534) == 0);
  auto foreign = store::open(dir, key_from_hex('c'));
  CHECK(test::error_of(foreign).code() == errc::invalid_argument);
  CHECK(foreign.error().message().find("owned by uid 65534") != std::string::npos);
  REQUIRE(::chown(dir.c_str(), 0, 0) == 0);
  // A data file planted or swapped by another user is not read.
  auto data = adir / "data/0";
  REQUIRE(::chown(data.c_str(), 65534, 65534) == 0);
  auto s = store::open(dir, key_from_hex('c'));
  REQUIRE(s);
  std::vector<std::byte> buf(65536);
  auto r = s->read_piece(sm.vm->artifact_id(), 0, buf);
  CHECK(test::error_of(r).code() == errc::invalid_argument);
  CHECK(r.error().message().find("data/0") != std::string::npos);
}

TEST_CASE("store: a verified piece is stored only as the piece it was verified for") {
  signed_model a, b("!");  // the same layout: piece 1 of each has the same range
  temp_dir sd;
  auto s = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(s->add_artifact(*a.vm, a.bundle));
  REQUIRE(s->add_artifact(*b.vm, b.bundle));
  auto bytes = a.big.substr(65536, 65536);
  auto v = a.vm->check_piece(1, std::vector<std::byte>(as_bytes(bytes).begin(), as_bytes(bytes).end()));
  REQUIRE(v);
  auto wrong = s->put_piece(*b.vm, *v);
  CHECK(test::error_of(wrong).code() == errc::invalid_argument);
  CHECK(wrong.error().message().find("was verified for artifact " + a.vm->artifact_id().substr(0, 12)) !=
        std::string::npos);
  CHECK_FALSE((*s->stored_pieces(b.vm->artifact_id()))[1]);
  REQUIRE(s->put_piece(*a.vm, *v));
  CHECK((*s->stored_pieces(a.vm->artifact_id()))[1]);
}

TEST_CASE("store: shards larger than the store takes are refused with a clear error") {
  // One GCM message per piece can be at most 64 GiB, and fetchers hold a piece in memory: a
  // manifest's shard size is the publisher's word, so it is bounded before anything is reserved.
  temp_dir d;
  write_file(d / "m/w.bin", "tiny");
  manifest_options opts;
  opts.piece_size = 4096;
  auto built = build_manifest(d / "m", opts);
  REQUIRE(built);
  // drun sign stops at 1 GiB; another signer need not: an 8 GiB shard size, signed.
  auto data = std::make_unique<detail::manifest_data>(detail::manifest_access::data(*built));
  data->shard_size = max_stored_piece_size * 2;
  auto k = private_key::generate(key_type::ed25519);
  REQUIRE(k);
  auto bundle = sign_manifest(detail::manifest_access::make(std::move(data)), *k);
  REQUIRE(bundle);
  auto vm = verify_bundle(*bundle, trust_store::from_public_key(k->public_key()));
  REQUIRE(vm);
  REQUIRE(vm->shard_size() == max_stored_piece_size * 2);
  auto s = store::open(d / "store", key_from_hex('c'));
  REQUIRE(s);
  auto r = s->add_artifact(*vm, *bundle);
  CHECK(test::error_of(r).code() == errc::invalid_argument);
  CHECK(r.error().message().find("shards of at most 4294967296 bytes (4 GiB)") != std::string::npos);
  CHECK(s->list()->empty());
}

TEST_CASE("store: export is private by default, rolls back a failed move, and clears stale staging") {
  signed_model sm;
  temp_dir sd;
  auto s = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(s);
  REQUIRE(import_model(*s, *sm.vm, sm.bundle, sm.model()));
  const auto& id = sm.vm->artifact_id();
  auto mode_of = [](const std::filesystem::path& p) {
    struct stat st {};
    REQUIRE(::stat(p.c_str(), &st) == 0);
    return st.st_mode & 07777;
  };
  temp_dir out;
  REQUIRE(s->materialize(id, out / "private"));
  CHECK(mode_of(out / "private") == 0700);
  CHECK(mode_of(out / "private/big.bin") == 0600);
  CHECK(mode_of(out / "private/sub") == 0700);
  CHECK(mode_of(out / "private/sub/small.txt") == 0600);
  auto old = ::umask(022);
  REQUIRE(s->materialize(id, out / "shared", export_modes::umask));
  ::umask(old);
  CHECK(mode_of(out / "shared/big.bin") == 0644);
  CHECK(mode_of(out / "shared/sub") == 0755);

  // The second top-level entry (sub/) fails to move: big.bin, already moved, goes back, and dest
  // is left empty, staging and all.
  std::filesystem::create_directory(out / "rollback");
  store_detail::fail_export_rename_after = 1;
  auto failed = s->materialize(id, out / "rollback");
  store_detail::fail_export_rename_after = -1;
  CHECK(test::error_of(failed).message().find("cannot move into place") != std::string::npos);
  CHECK(std::filesystem::is_empty(out / "rollback"));

  // A killed export leaves its staging directory (unchecked plaintext): the next one removes it.
  test::write_file(out / "again/.drun-export-0123456789ab/big.bin", "half-written, unchecked");
  REQUIRE(s->materialize(id, out / "again"));
  CHECK_FALSE(std::filesystem::exists(out / "again/.drun-export-0123456789ab"));
  CHECK(test::read_text(out / "again/big.bin") == sm.big);
  // Anything else there is the user's, and the export refuses to mix with it.
  test::write_file(out / "theirs/notes.txt", "mine");
  CHECK(test::error_of(s->materialize(id, out / "theirs")).code() == errc::invalid_argument);
}

namespace {

verified_piece piece_of(const signed_model& sm, std::size_t i) {
  auto r = *sm.vm->pieces()[i].range;
  auto bytes = as_bytes(sm.big).subspan(r.begin, r.size());
  return std::move(sm.vm->check_piece(i, std::vector<std::byte>(bytes.begin(), bytes.end()))).value();
}

bool stored(store& s, const verified_manifest& m, std::size_t i) {
  auto held = s.stored_pieces(m.artifact_id());
  return held && i < held->size() && (*held)[i];
}

// Polls for up to 5 s.
bool eventually(const std::function<bool()>& f) {
  for (int k = 0; k < 500; ++k) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

constexpr commit_limits never{std::uint64_t{1} << 40, 1000000, std::chrono::hours(1)};

// A store under sd holding sm's artifact registered, no piece stored.
result<store> registered_store(const temp_dir& sd, const signed_model& sm) {
  auto s = store::open(sd / "store", key_from_hex('c'));
  if (s)
    if (auto r = s->add_artifact(*sm.vm, sm.bundle); !r) return std::move(r).error();
  return s;
}

}  // namespace

TEST_CASE("store: a batch marks pieces stored at its commit, and keeps other writers of them waiting until then") {
  signed_model sm;
  temp_dir sd;
  auto s = registered_store(sd, sm);
  REQUIRE(s);
  auto batch = s->begin_batch(*sm.vm, never);
  REQUIRE(batch);
  CHECK(*batch->put(piece_of(sm, 0)) == true);
  CHECK(*batch->put(piece_of(sm, 0)) == false);  // already in this batch
  CHECK_FALSE(stored(*s, *sm.vm, 0));             // written, not yet durable: not stored

  // Another writer of the same piece (its own descriptors, as another process has) waits for the
  // batch, then finds the piece stored and writes nothing.
  auto other = store::open(sd / "store", key_from_hex('c'));
  REQUIRE(other);
  std::atomic<bool> done{false};
  result<bool> other_put = false;
  std::thread t([&] {
    other_put = other->put_piece(*sm.vm, piece_of(sm, 0));
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK_FALSE(done.load());
  auto n = batch->commit();
  t.join();
  REQUIRE(n);
  CHECK(*n == 1);
  REQUIRE(other_put);
  CHECK(*other_put == false);
  CHECK(stored(*s, *sm.vm, 0));
  std::vector<std::byte> out(sm.vm->pieces()[0].range->size());
  REQUIRE(s->read_piece(sm.vm->artifact_id(), 0, out));
  CHECK(std::equal(out.begin(), out.end(), as_bytes(sm.big).begin()));
  CHECK(*batch->put(piece_of(sm, 0)) == false);  // stored now
}

TEST_CASE("store: a batch commits on its own when a bound is reached, and on destruction") {
  signed_model sm;
  temp_dir sd;
  auto s = registered_store(sd, sm);
  REQUIRE(s);
  {
    auto by_count = s->begin_batch(*sm.vm, {std::uint64_t{1} << 40, 2, std::chrono::hours(1)});
    REQUIRE(by_count);
    REQUIRE(by_count->put(piece_of(sm, 0)));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CHECK_FALSE(stored(*s, *sm.vm, 0));
    REQUIRE(by_count->put(piece_of(sm, 1)));
    CHECK(eventually([&] { return stored(*s, *sm.vm, 0) && stored(*s, *sm.vm, 1); }));
  }
  {
    auto by_time = s->begin_batch(*sm.vm, {std::uint64_t{1} << 40, 1000, std::chrono::milliseconds(50)});
    REQUIRE(by_time);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // its thread is asleep, with nothing to do
    REQUIRE(by_time->put(piece_of(sm, 2)));
    CHECK(eventually([&] { return stored(*s, *sm.vm, 2); }));
  }
  {
    auto dropped = s->begin_batch(*sm.vm, never);
    REQUIRE(dropped);
    REQUIRE(dropped->put(piece_of(sm, 3)));
    CHECK_FALSE(stored(*s, *sm.vm, 3));
  }
  CHECK(stored(*s, *sm.vm, 3));
}

TEST_CASE("store: a batch refuses streamed bytes that do not match, and a failed commit marks nothing") {
  signed_model sm;
  temp_dir sd;
  auto s = registered_store(sd, sm);
  REQUIRE(s);
  auto batch = s->begin_batch(*sm.vm, never);
  REQUIRE(batch);
  auto zeros = [](std::span<std::byte> chunk, std::uint64_t) -> result<void> {
    std::fill(chunk.begin(), chunk.end(), std::byte{0});
    return {};
  };
  CHECK(test::error_of(batch->put_streamed(1, zeros)).code() == errc::digest_mismatch);
  // The claim and the range lock went with the failure: the right bytes go in.
  CHECK(*batch->put(piece_of(sm, 1)) == true);
  REQUIRE(batch->commit());
  CHECK(stored(*s, *sm.vm, 1));

  REQUIRE(batch->put(piece_of(sm, 2)));
  store_detail::fail_next_commit_sync = true;
  auto failed = batch->commit();
  CHECK(test::error_of(failed).code() == errc::io_error);
  CHECK(test::error_of(failed).message().find("cannot sync") != std::string::npos);
  CHECK_FALSE(stored(*s, *sm.vm, 2));
  // The failure sticks to the batch; a new one stores the piece.
  CHECK(test::error_of(batch->put(piece_of(sm, 3))).code() == errc::io_error);
  auto next = s->begin_batch(*sm.vm, never);
  REQUIRE(next);
  CHECK(*next->put(piece_of(sm, 2)) == true);
  REQUIRE(next->commit());
  CHECK(stored(*s, *sm.vm, 2));
}

// The audit log (audit.hpp): the chain, checkpoints, torn lines, and hostile files.
#include <drun/audit.hpp>
#include <drun/keys.hpp>

#include "support.hpp"

#include <doctest/doctest.h>

#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

using namespace drun;
using drun::test::temp_dir;

namespace {

std::shared_ptr<const private_key> ed25519() {
  auto k = private_key::generate(key_type::ed25519);
  REQUIRE(k);
  return std::make_shared<const private_key>(std::move(*k));
}

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
void spit(const std::filesystem::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

}  // namespace

TEST_CASE("audit: records chain, checkpoints verify, and a closed log takes no more") {
  temp_dir d;
  auto key = ed25519();
  auto log = audit_log::open({d / "a.log", key, 4});
  REQUIRE(log);
  for (int i = 0; i < 10; ++i) REQUIRE((*log)->append("test", {{"i", i}, {"who", "me"}}));
  REQUIRE((*log)->close());
  CHECK(!(*log)->append("late", {}));
  auto rep = audit_verify(d / "a.log", key->public_key());
  REQUIRE(rep);
  CHECK(rep->records == 13);  // 10 records; checkpoints at seq 5, 9 and 13 (after seq 4, 8 and 12)
  CHECK(rep->checkpoints == 3);
  CHECK(rep->unsealed == 0);
  CHECK(rep->torn_lines.empty());
  CHECK(!rep->torn_tail);
  auto other = ed25519();
  auto forged = audit_verify(d / "a.log", other->public_key());
  REQUIRE(!forged);
  CHECK(forged.error().code() == errc::signature_invalid);
  CHECK(forged.error().message().find("checkpoint") != std::string::npos);
}

TEST_CASE("audit: torn lines are stepped over by the next writer and reported, not refused") {
  temp_dir d;
  auto key = ed25519();
  {
    auto log = audit_log::open({d / "a.log", key, 100});
    REQUIRE(log);
    REQUIRE((*log)->append("one", {}));
  }
  auto text = slurp(d / "a.log");
  // Two writers killed in a row: the second one's leading newline ended the first one's line.
  spit(d / "a.log", text + "{\"seq\":3,\"time\":\"20\n{\"seq\":3,\"ti");
  auto rep = audit_verify(d / "a.log", key->public_key());
  REQUIRE(rep);
  CHECK(rep->torn_tail);
  CHECK(rep->torn_lines == std::vector<std::uint64_t>{3, 4});
  {
    auto log = audit_log::open({d / "a.log", key, 100});
    REQUIRE(log);
    REQUIRE((*log)->append("two", {}));
  }
  rep = audit_verify(d / "a.log", key->public_key());
  REQUIRE(rep);
  CHECK(!rep->torn_tail);
  CHECK(rep->torn_lines == std::vector<std::uint64_t>{3, 4});
  CHECK(rep->records == 4);  // one, its checkpoint, two, its checkpoint
  // A file that is nothing but a torn line: the chain starts after it.
  spit(d / "b.log", "{\"seq\":1,\"ti");
  {
    auto log = audit_log::open({d / "b.log", key, 100});
    REQUIRE(log);
    REQUIRE((*log)->append("first", {}));
  }
  rep = audit_verify(d / "b.log", key->public_key());
  REQUIRE(rep);
  CHECK(rep->torn_lines == std::vector<std::uint64_t>{1});
}

TEST_CASE("audit: hostile files are refused with the line, and never crash the verifier") {
  temp_dir d;
  auto key = ed25519();
  auto pub = key->public_key();
  auto refused = [&](const std::string& content, const std::string& fragment) {
    spit(d / "h.log", content);
    std::filesystem::remove(d / "h.log.head");
    auto r = audit_verify(d / "h.log", pub);
    REQUIRE_MESSAGE(!r, content.substr(0, 80));
    CHECK(r.error().code() == errc::signature_invalid);
    CHECK_MESSAGE(r.error().message().find(fragment) != std::string::npos, r.error().message());
  };
  refused("not json\n", "line 1");
  refused(std::string(70000, '{') + "\n", "longer than any record");
  refused(std::string(70000, 'x'), "longer than any record");
  refused("{\"seq\":1,\"time\":\"t\",\"prev\":\"" + std::string(64, '1') +
              "\",\"event\":\"e\",\"data\":{}}\n",
          "record 1 does not start the chain");
  refused("{\"seq\":2,\"time\":\"t\",\"prev\":\"" + std::string(64, '0') + "\",\"event\":\"e\",\"data\":{}}\n",
          "record 2 where record 1");
  refused("{\"seq\":1,\"time\":\"t\",\"prev\":\"" + std::string(64, '0') +
              "\",\"event\":\"checkpoint\",\"data\":{\"records\":0}}\n",
          "without a signature");
  refused("{\"seq\":1,\"time\":\"t\",\"prev\":\"" + std::string(64, '0') +
              "\",\"event\":\"checkpoint\",\"data\":{\"records\":0},\"signature\":\"!!\"}\n",
          "not base64");
  refused("{\"seq\":1,\"time\":\"t\",\"prev\":\"" + std::string(64, '0') +
              "\",\"after_torn\":2,\"event\":\"e\",\"data\":{}}\n",
          "torn");
  // Random bytes: an error or a report, never a crash (ASan runs this).
  std::mt19937 rng(5);
  for (int i = 0; i < 200; ++i) {
    std::string junk(rng() % 300, '\0');
    for (auto& ch : junk) ch = static_cast<char>(rng() % 4 == 0 ? '\n' : rng() % 256);
    spit(d / "r.log", junk);
    (void)audit_verify(d / "r.log", pub);
  }
  // A head file that is not a checkpoint, or names one the log lacks.
  {
    auto log = audit_log::open({d / "c.log", key, 100});
    REQUIRE(log);
    REQUIRE((*log)->append("x", {}));
  }
  auto head = slurp(d / "c.log.head");
  spit(d / "c.log.head", "junk\n");
  CHECK(!audit_verify(d / "c.log", pub));
  spit(d / "c.log.head", head);
  CHECK(audit_verify(d / "c.log", pub));
  spit(d / "c.log", "");
  auto cut = audit_verify(d / "c.log", pub);
  REQUIRE(!cut);
  CHECK(cut.error().message().find("truncated") != std::string::npos);
}

TEST_CASE("audit: options are checked") {
  temp_dir d;
  auto ec = private_key::generate(key_type::ecdsa_p256);
  REQUIRE(ec);
  auto r = audit_log::open({d / "a.log", std::make_shared<const private_key>(std::move(*ec)), 64});
  REQUIRE(!r);
  CHECK(r.error().code() == errc::key_error);
  CHECK(audit_log::open({d / "a.log", nullptr, 0}).error().code() == errc::invalid_argument);
  std::filesystem::create_directories(d / "dir");
  CHECK(!audit_log::open({d / "dir", nullptr, 64}));
  // Without a key: a chain, no checkpoints; it verifies as a chain.
  auto log = audit_log::open({d / "n.log", nullptr, 64});
  REQUIRE(log);
  REQUIRE((*log)->append("x", {{"k", "v"}}));
  REQUIRE((*log)->close());
  auto rep = audit_verify(d / "n.log", ed25519()->public_key());
  REQUIRE(rep);
  CHECK(rep->checkpoints == 0);
  CHECK(rep->unsealed == 1);
}

TEST_CASE("audit: reserved names, non-finite numbers, a record without its newline, short torn tails") {
  temp_dir d;
  auto key = ed25519();
  auto pub = key->public_key();
  {
    auto log = audit_log::open({d / "a.log", key, 100});
    REQUIRE(log);
    CHECK((*log)->append("checkpoint", {}).error().code() == errc::invalid_argument);
    REQUIRE((*log)->append("x", {{"ratio", std::numeric_limits<double>::quiet_NaN()}, {"n", 1.5}}));
  }
  auto text = slurp(d / "a.log");
  CHECK(text.find("\"ratio\":\"nan\"") != std::string::npos);
  CHECK(text.find("\"n\":1.5") != std::string::npos);
  REQUIRE(audit_verify(d / "a.log", pub));
  // The last record lost its newline (a crash between the bytes and the newline, or an edit): it
  // is still the last record, and the next writer starts a new line after it.
  REQUIRE(text.back() == '\n');
  spit(d / "a.log", text.substr(0, text.size() - 1));
  auto rep = audit_verify(d / "a.log", pub);
  REQUIRE(rep);
  CHECK(rep->records == 2);
  CHECK(!rep->torn_tail);
  {
    auto log = audit_log::open({d / "a.log", key, 100});
    REQUIRE(log);
    REQUIRE((*log)->append("y", {}));
  }
  rep = audit_verify(d / "a.log", pub);
  REQUIRE(rep);
  CHECK(rep->records == 4);
  CHECK(rep->torn_lines.empty());
  // A tail of one byte, or of zeros (blocks a power cut left unwritten), is torn, not tampering,
  // and the log stays writable.
  for (const std::string& tail : {std::string("{"), std::string(37, '\0')}) {
    spit(d / "a.log", slurp(d / "a.log") + tail);
    rep = audit_verify(d / "a.log", pub);
    REQUIRE(rep);
    CHECK(rep->torn_tail);
    auto log = audit_log::open({d / "a.log", key, 100});
    REQUIRE(log);
    REQUIRE((*log)->append("after", {}));
    REQUIRE((*log)->close());
    rep = audit_verify(d / "a.log", pub);
    REQUIRE(rep);
    CHECK(!rep->torn_tail);
  }
  // Checkpoints and no head file: the end of the log cannot be vouched for.
  std::filesystem::remove(d / "a.log.head");
  auto r = audit_verify(d / "a.log", pub);
  REQUIRE(!r);
  CHECK(r.error().message().find("head file") != std::string::npos);
}

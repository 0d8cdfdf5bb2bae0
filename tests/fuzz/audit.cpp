// Audit logs as `drun audit verify` reads them: a file anyone with write access to the disk may
// have edited. Contract: verifying is deterministic and its counts add up; and in a log that
// verifies, changing any byte of the records up to the last checkpoint is detected (that is
// what a checkpoint promises).
#include "fuzz.hpp"

#include <drun/audit.hpp>
#include <drun/keys.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <vector>

namespace {

std::filesystem::path scratch;
std::optional<drun::public_key> key;

drun::result<drun::audit_report> verify(std::string_view text) {
  auto file = scratch / "audit.log";
  std::ofstream(file, std::ios::binary | std::ios::trunc).write(text.data(), static_cast<std::streamsize>(text.size()));
  return drun::audit_verify(file, *key);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  scratch = fuzz::scratch_dir("audit");
  auto k = drun::public_key::from_pem(fuzz::test_public_pem);
  if (!k) std::abort();
  key.emplace(std::move(*k));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto text = fuzz::text(data, size);
  auto a = verify(text);
  auto b = verify(text);
  FUZZ_REQUIRE(a.has_value() == b.has_value());
  if (!a) {
    FUZZ_REQUIRE(a.error().detail() == b.error().detail());
    return 0;
  }
  FUZZ_REQUIRE(a->checkpoints <= a->records && a->last_checkpoint <= a->records);
  FUZZ_REQUIRE(a->unsealed <= a->records);
  if (a->last_checkpoint == 0) return 0;
  // The sealed records: every record line up to and including the last checkpoint's. Torn lines
  // (a writer killed mid-append) are not records: the chain steps over them by design. Nor is the
  // file's last line, which a crash may always have torn (the .head file covers that case).
  std::uint64_t last_line = a->records - a->unsealed;
  for (auto t : a->torn_lines)
    if (t <= last_line) ++last_line;
  std::vector<std::pair<std::size_t, std::size_t>> records;  // [begin, end) with the newline
  std::size_t begin = 0;
  for (std::uint64_t line = 1; line <= last_line && begin < text.size(); ++line) {
    auto nl = text.find('\n', begin);
    std::size_t end = nl == std::string_view::npos ? text.size() : nl + 1;
    if (end < text.size() && std::find(a->torn_lines.begin(), a->torn_lines.end(), line) == a->torn_lines.end())
      records.emplace_back(begin, end);
    begin = end;
  }
  if (records.empty()) return 0;
  auto [from, to] = records[size % records.size()];
  std::string edited(text);
  std::size_t at = from + (size * 7919) % (to - from);
  edited[at] = static_cast<char>(edited[at] ^ 0x01);
  auto c = verify(edited);
  FUZZ_REQUIRE(!c.has_value());
  return 0;
}

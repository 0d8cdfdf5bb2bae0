// The piece plan.
#include <drun/piece.hpp>

#include "support.hpp"

using namespace drun;

constexpr std::uint64_t MiB = 1 << 20, GiB = std::uint64_t{1} << 30;

TEST_CASE("next_power_of_two") {
  CHECK(next_power_of_two(0) == 1);
  CHECK(next_power_of_two(1) == 1);
  CHECK(next_power_of_two(3) == 4);
  CHECK(next_power_of_two(4096) == 4096);
  CHECK(next_power_of_two(4097) == 8192);
  CHECK(next_power_of_two(UINT64_MAX) == std::uint64_t{1} << 63);
}

TEST_CASE("default piece size: about 500 pieces, clamped to [4 MiB, 64 MiB]") {
  CHECK(default_piece_size(0) == 4 * MiB);
  CHECK(default_piece_size(100 * MiB) == 4 * MiB);
  CHECK(default_piece_size(2 * GiB) == 8 * MiB);         // 2 GiB / 500 = 4.29 MB -> 8 MiB
  CHECK(default_piece_size(4000 * MiB) == 8 * MiB);      // 8.0 MiB exactly
  CHECK(default_piece_size(4001 * MiB) == 16 * MiB);
  CHECK(default_piece_size(100 * GiB) == 64 * MiB);      // 205 MiB would be too big
}

TEST_CASE("piece ranges tile the file") {
  CHECK(piece_ranges(0, 4).empty());
  CHECK(piece_count(0, 4) == 0);
  auto r = piece_ranges(10, 4);
  REQUIRE(r.size() == 3);
  CHECK(r[0] == byte_range{0, 4});
  CHECK(r[1] == byte_range{4, 8});
  CHECK(r[2] == byte_range{8, 10});
  CHECK(piece_count(8, 4) == 2);
  CHECK(piece_ranges(8, 4).back() == byte_range{4, 8});
}

TEST_CASE("piece size overrides") {
  CHECK(valid_piece_size(4096));
  CHECK(valid_piece_size(64 * MiB));
  CHECK_FALSE(valid_piece_size(0));
  CHECK_FALSE(valid_piece_size(2048));
  CHECK_FALSE(valid_piece_size(5 * MiB));
  CHECK_FALSE(valid_piece_size(2 * GiB));
}

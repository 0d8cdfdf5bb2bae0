// Piece plan: how an artifact is cut into pieces, the unit that is hashed, signed, fetched and
// stored. A piece is a byte range [begin, end) of one file.
#pragma once

#include <drun/config.hpp>

#include <cstdint>
#include <vector>

namespace drun {

inline constexpr std::uint64_t min_piece_size = std::uint64_t{4} << 20;   // 4 MiB
inline constexpr std::uint64_t max_piece_size = std::uint64_t{64} << 20;  // 64 MiB
// Smallest size accepted as an explicit override (tests and tiny artifacts use small pieces).
inline constexpr std::uint64_t min_override_piece_size = 4096;

struct byte_range {
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::uint64_t size() const noexcept { return end - begin; }
  friend bool operator==(const byte_range&, const byte_range&) = default;
};

// Smallest power of two >= n (1 for n == 0); saturates at 2^63.
DRUN_API std::uint64_t next_power_of_two(std::uint64_t n) noexcept;

// The default piece size for an artifact of `artifact_size` bytes: about 500 pieces,
// next_power_of_two(size / 500) clamped to [4 MiB, 64 MiB].
DRUN_API std::uint64_t default_piece_size(std::uint64_t artifact_size) noexcept;

// True for an acceptable override: a power of two in [4 KiB, 1 GiB].
DRUN_API bool valid_piece_size(std::uint64_t piece_size) noexcept;

// Number of pieces of a file (0 for an empty file). piece_size must be > 0.
DRUN_API std::uint64_t piece_count(std::uint64_t file_size, std::uint64_t piece_size) noexcept;

// The consecutive ranges covering a file, the last one shorter; none for an empty file.
DRUN_API std::vector<byte_range> piece_ranges(std::uint64_t file_size, std::uint64_t piece_size);

}  // namespace drun

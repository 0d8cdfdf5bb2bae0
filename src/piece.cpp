// The piece plan.
#include <drun/piece.hpp>

#include <algorithm>
#include <bit>

namespace drun {

std::uint64_t next_power_of_two(std::uint64_t n) noexcept {
  if (n <= 1) return 1;
  if (n > (std::uint64_t{1} << 63)) return std::uint64_t{1} << 63;
  return std::bit_ceil(n);
}

std::uint64_t default_piece_size(std::uint64_t artifact_size) noexcept {
  return std::clamp(next_power_of_two(artifact_size / 500), min_piece_size, max_piece_size);
}

bool valid_piece_size(std::uint64_t piece_size) noexcept {
  return std::has_single_bit(piece_size) && piece_size >= min_override_piece_size &&
         piece_size <= (std::uint64_t{1} << 30);
}

std::uint64_t piece_count(std::uint64_t file_size, std::uint64_t piece_size) noexcept {
  return file_size / piece_size + (file_size % piece_size != 0);
}

std::vector<byte_range> piece_ranges(std::uint64_t file_size, std::uint64_t piece_size) {
  std::vector<byte_range> out;
  out.reserve(piece_count(file_size, piece_size));
  for (std::uint64_t b = 0; b < file_size; b += piece_size)
    out.push_back({b, std::min(file_size, b + piece_size)});
  return out;
}

}  // namespace drun

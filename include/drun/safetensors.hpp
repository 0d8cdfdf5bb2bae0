// Safetensors files read straight out of the encrypted store: the header is parsed strictly (a
// hostile header is an error, never a crash or an out-of-bounds read), and tensor bytes are
// decrypted directly into the caller's memory, so plaintext weights never touch the disk.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section that
// follows the header) plus an optional "__metadata__" object of strings.
#pragma once

#include <drun/config.hpp>
#include <drun/error.hpp>
#include <drun/store.hpp>

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace drun {

// Headers larger than this are refused before they are read (real ones are kilobytes to a few MiB).
inline constexpr std::uint64_t max_safetensors_header = std::uint64_t{100} << 20;

enum class tensor_dtype { boolean, u8, i8, u16, i16, f16, bf16, u32, i32, f32, u64, i64, f64 };

DRUN_API std::string_view to_string(tensor_dtype t) noexcept;  // "BOOL", "U8", ..., "F64"
DRUN_API std::size_t dtype_size(tensor_dtype t) noexcept;      // bytes per element

struct tensor_info {
  std::string name;
  tensor_dtype dtype = tensor_dtype::u8;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;  // within the data section
};

struct safetensors_header {
  std::uint64_t header_size = 0;     // N
  std::uint64_t data_offset = 0;     // 8 + N: where the data section starts in the file
  std::uint64_t data_size = 0;       // file size - data_offset
  std::vector<tensor_info> tensors;  // in data order (by begin)
  std::map<std::string, std::string> metadata;
};

// Parses and checks a header against the file's size. Checks: N <= max_safetensors_header and
// 8 + N <= file_size; strict JSON (duplicate keys refused); known dtypes; shape entries are
// non-negative integers whose product times the dtype size, without overflow, equals end - begin;
// every tensor lies inside the data section; tensors do not overlap and tile the data section
// from 0 to its end without gaps; "__metadata__" holds strings only; no other non-object entry.
// `header_json` is the N bytes after the length prefix. Errors: malformed_bundle naming the tensor
// and what is wrong; invalid_argument when header_json.size() != header_size.
DRUN_API result<safetensors_header> parse_safetensors_header(std::uint64_t header_size, std::string_view header_json,
                                                             std::uint64_t file_size);

// Reads and checks the header of file `file_index` of a stored artifact (decrypting only the
// pieces it spans). The length prefix is bounded before the header is allocated, so a hostile
// length costs nothing. Errors: those of parse_safetensors_header (with the file's name), the
// reader's, and invalid_argument when there is no file `file_index`.
DRUN_API result<safetensors_header> read_safetensors_header(const artifact_reader& reader, std::size_t file_index);

// Decrypts the whole data section of file `file_index` into out (exactly header.data_size bytes);
// every piece is authenticated before the call returns, and on failure out is wiped (see
// artifact_reader::read). Tensor t is then out.subspan(t.begin, t.end - t.begin). Errors: the
// reader's, and invalid_argument when there is no file `file_index`, out has the wrong size, or
// header was not read from this file (its sizes do not add up to the file's).
DRUN_API result<void> read_safetensors_data(const artifact_reader& reader, std::size_t file_index,
                                            const safetensors_header& header, std::span<std::byte> out);

}  // namespace drun

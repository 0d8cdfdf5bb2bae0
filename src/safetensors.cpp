// Safetensors headers parsed strictly and data sections decrypted in place. The header is the
// attacker's input: every count is bounded before anything is allocated, every multiplication is
// overflow-checked, and the tensors must tile the data section exactly, so a loader that trusts
// tensor_info never reads outside the bytes it was given.
#include <drun/safetensors.hpp>

#include "detail/json.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <utility>

namespace drun {
namespace {

using detail::json;

struct dtype_entry {
  tensor_dtype dtype;
  std::string_view name;
  std::size_t size;
};

// Indexed by tensor_dtype; the names are the safetensors spellings.
constexpr std::array<dtype_entry, 13> dtypes{{
    {tensor_dtype::boolean, "BOOL", 1},
    {tensor_dtype::u8, "U8", 1},
    {tensor_dtype::i8, "I8", 1},
    {tensor_dtype::u16, "U16", 2},
    {tensor_dtype::i16, "I16", 2},
    {tensor_dtype::f16, "F16", 2},
    {tensor_dtype::bf16, "BF16", 2},
    {tensor_dtype::u32, "U32", 4},
    {tensor_dtype::i32, "I32", 4},
    {tensor_dtype::f32, "F32", 4},
    {tensor_dtype::u64, "U64", 8},
    {tensor_dtype::i64, "I64", 8},
    {tensor_dtype::f64, "F64", 8},
}};

constexpr std::size_t prefix_size = 8;  // the little-endian header length

error bad_header(std::string detail) {
  return error(errc::malformed_bundle, "safetensors header: " + std::move(detail));
}

// A name or value from the file, made safe to print: printable ASCII, bounded, quoted.
std::string printable(std::string_view s) {
  std::string out = "\"";
  for (char c : s.substr(0, 80)) out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  out += s.size() > 80 ? "...\"" : "\"";
  return out;
}

// The size checks that must pass before the header's bytes are read (or even allocated).
result<void> check_header_size(std::uint64_t header_size, std::uint64_t file_size) {
  if (header_size > max_safetensors_header)
    return bad_header(fmt::format("length {} exceeds the limit of {} bytes", header_size, max_safetensors_header));
  if (file_size < prefix_size || header_size > file_size - prefix_size)
    return bad_header(fmt::format("length {} runs past the end of the file ({} bytes)", header_size, file_size));
  return {};
}

// "an object", "a string", ...: for messages that say what was found instead.
std::string a_type(const json& j) {
  std::string_view name = j.type_name();
  return (name == "object" || name == "array" ? "an " : name == "null" ? "" : "a ") + std::string(name);
}

// Only non-negative JSON integers: nlohmann stores those as number_unsigned (negatives are
// number_integer, and integers too large for 64 bits become floats, so both are refused).
bool is_unsigned(const json& j) { return j.type() == json::value_t::number_unsigned; }

result<tensor_info> parse_tensor(const std::string& name, const json& entry, std::uint64_t data_size) {
  const std::string who = "tensor " + printable(name);
  if (!entry.is_object()) return bad_header(fmt::format("{} is {}, not an object", who, a_type(entry)));
  for (const auto& [key, value] : entry.items())
    if (key != "dtype" && key != "shape" && key != "data_offsets")
      return bad_header(fmt::format("{} has unknown field {}", who, printable(key)));

  tensor_info t;
  t.name = name;

  auto dtype = detail::require_field(entry, "dtype", json::value_t::string, who);
  if (!dtype) return bad_header(dtype.error().detail());
  const auto& dtype_name = (*dtype)->get_ref<const std::string&>();
  auto known = std::find_if(dtypes.begin(), dtypes.end(), [&](const dtype_entry& d) { return d.name == dtype_name; });
  if (known == dtypes.end()) return bad_header(fmt::format("{} has unknown dtype {}", who, printable(dtype_name)));
  t.dtype = known->dtype;

  auto shape = detail::require_field(entry, "shape", json::value_t::array, who);
  if (!shape) return bad_header(shape.error().detail());
  // Every byte count below is checked for overflow: a shape like [2^32, 2^32, 16] must not wrap
  // around to a small number that happens to match the offsets.
  std::uint64_t bytes = known->size;
  for (std::size_t i = 0; i < (*shape)->size(); ++i) {
    const auto& dim = (**shape)[i];
    if (!is_unsigned(dim))
      return bad_header(fmt::format("{} shape[{}] is not a non-negative integer ({})", who, i, printable(dim.dump())));
    auto n = dim.get<std::uint64_t>();
    t.shape.push_back(n);
    if (__builtin_mul_overflow(bytes, n, &bytes))
      return bad_header(fmt::format("{} shape {} overflows a 64-bit byte count", who, printable((*shape)->dump())));
  }

  auto offsets = detail::require_field(entry, "data_offsets", json::value_t::array, who);
  if (!offsets) return bad_header(offsets.error().detail());
  const auto& o = **offsets;
  if (o.size() != 2 || !is_unsigned(o[0]) || !is_unsigned(o[1]))
    return bad_header(fmt::format("{} data_offsets is not two non-negative integers ({})", who, printable(o.dump())));
  t.begin = o[0].get<std::uint64_t>();
  t.end = o[1].get<std::uint64_t>();
  if (t.begin > t.end) return bad_header(fmt::format("{} begins at {} after it ends at {}", who, t.begin, t.end));
  if (t.end > data_size)
    return bad_header(fmt::format("{} ends past the file (at {} of a {}-byte data section)", who, t.end, data_size));
  if (t.end - t.begin != bytes)
    return bad_header(
        fmt::format("{} has {} bytes by dtype and shape but data_offsets span {}", who, bytes, t.end - t.begin));
  return t;
}

result<void> check_file_index(const artifact_reader& reader, std::size_t file_index) {
  if (file_index >= reader.files().size())
    return error(errc::invalid_argument,
                 fmt::format("no file {} in an artifact of {} files", file_index, reader.files().size()));
  return {};
}

}  // namespace

std::string_view to_string(tensor_dtype t) noexcept { return dtypes[static_cast<std::size_t>(t)].name; }

std::size_t dtype_size(tensor_dtype t) noexcept { return dtypes[static_cast<std::size_t>(t)].size; }

result<safetensors_header> parse_safetensors_header(std::uint64_t header_size, std::string_view header_json,
                                                    std::uint64_t file_size) {
  if (auto r = check_header_size(header_size, file_size); !r) return std::move(r).error();
  if (header_json.size() != header_size)
    return error(errc::invalid_argument,
                 fmt::format("safetensors header: {} bytes given for a length of {}", header_json.size(), header_size));
  safetensors_header h;
  h.header_size = header_size;
  h.data_offset = prefix_size + header_size;
  h.data_size = file_size - h.data_offset;

  auto doc = detail::parse_json_strict(header_json, "safetensors header");
  if (!doc) return std::move(doc).error();
  if (!doc->is_object()) return bad_header(fmt::format("is {}, not a JSON object", a_type(*doc)));

  for (const auto& [name, entry] : doc->items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return bad_header(fmt::format("__metadata__ is {}, not an object", a_type(entry)));
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          return bad_header(fmt::format("__metadata__ {} is {}, not a string", printable(key), a_type(value)));
        h.metadata.emplace(key, value.get<std::string>());
      }
      continue;
    }
    if (name.empty()) return bad_header("a tensor has an empty name");
    auto t = parse_tensor(name, entry, h.data_size);
    if (!t) return std::move(t).error();
    h.tensors.push_back(std::move(t).value());
  }

  // Sorting by (begin, end) puts a zero-size tensor at a boundary before the tensor that starts
  // there, so it is not mistaken for an overlap.
  std::sort(h.tensors.begin(), h.tensors.end(), [](const tensor_info& a, const tensor_info& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  // Exact tiling: no byte of the data section belongs to two tensors, and none to no tensor (a gap
  // or a tail could smuggle data past a loader that only looks at tensors).
  std::uint64_t next = 0;
  const tensor_info* previous = nullptr;
  for (const auto& t : h.tensors) {
    if (t.begin < next)
      return bad_header(fmt::format("tensor {} overlaps {}", printable(t.name), printable(previous->name)));
    if (t.begin > next)
      return bad_header(fmt::format("gap before tensor {} (bytes [{}, {}) of the data section belong to no tensor)",
                                    printable(t.name), next, t.begin));
    next = t.end;
    previous = &t;
  }
  if (next != h.data_size)
    return bad_header(fmt::format("data section has {} bytes after the last tensor", h.data_size - next));
  return h;
}

result<safetensors_header> read_safetensors_header(const artifact_reader& reader, std::size_t file_index) {
  if (auto r = check_file_index(reader, file_index); !r) return std::move(r).error();
  const auto& file = reader.files()[file_index];
  if (file.size < prefix_size)
    return bad_header(fmt::format("file of {} bytes is too short for the length prefix", file.size))
        .with_path(file.name);

  std::array<std::byte, prefix_size> prefix{};
  if (auto r = reader.read(file_index, 0, prefix); !r) return std::move(r).error();
  std::uint64_t header_size = 0;
  for (std::size_t i = 0; i < prefix_size; ++i)
    header_size |= std::uint64_t{std::to_integer<std::uint8_t>(prefix[i])} << (8 * i);
  // Bounded before allocating: a hostile length must not become a huge allocation.
  if (auto r = check_header_size(header_size, file.size); !r) return std::move(r).error().with_path(file.name);

  std::string text(static_cast<std::size_t>(header_size), '\0');
  if (auto r = reader.read(file_index, prefix_size, std::as_writable_bytes(std::span(text))); !r)
    return std::move(r).error();
  auto h = parse_safetensors_header(header_size, text, file.size);
  if (!h) return std::move(h).error().with_path(file.name);
  return h;
}

result<void> read_safetensors_data(const artifact_reader& reader, std::size_t file_index,
                                   const safetensors_header& header, std::span<std::byte> out) {
  if (auto r = check_file_index(reader, file_index); !r) return r;
  const auto& file = reader.files()[file_index];
  // A header parsed from another file would read the wrong bytes (or fail deep in the reader).
  if (header.data_offset > file.size || header.data_size != file.size - header.data_offset)
    return error(errc::invalid_argument,
                 fmt::format("safetensors header describes a {}-byte file, not this one ({} bytes)",
                             header.data_offset + header.data_size, file.size))
        .with_path(file.name);
  if (out.size() != header.data_size)
    return error(errc::invalid_argument,
                 fmt::format("buffer of {} bytes for a {}-byte data section", out.size(), header.data_size))
        .with_path(file.name);
  return reader.read(file_index, header.data_offset, out);
}

}  // namespace drun

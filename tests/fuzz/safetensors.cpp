// safetensors headers, which decide where every tensor's bytes are read from. The input is the
// data section's size (8 bytes, little-endian, as the format writes its own length) and then the
// header JSON. Contract: an accepted header's tensors tile the data section exactly, each as long
// as its shape and dtype say, with unique names; a size prefix that lies is refused.
#include "fuzz.hpp"

#include <drun/safetensors.hpp>

#include <cstring>
#include <set>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 8) return 0;
  std::uint64_t data_size = 0;
  for (int i = 7; i >= 0; --i) data_size = (data_size << 8) | data[i];
  data_size %= std::uint64_t{1} << 40;
  auto json = fuzz::text(data + 8, size - 8);
  const std::uint64_t n = json.size(), file_size = 8 + n + data_size;
  auto h = drun::parse_safetensors_header(n, json, file_size);
  FUZZ_REQUIRE(!drun::parse_safetensors_header(n + 1, json, file_size + 1));
  if (!h) {
    FUZZ_REQUIRE(h.error().code() == drun::errc::malformed_bundle);
    return 0;
  }
  FUZZ_REQUIRE(h->header_size == n && h->data_offset == 8 + n && h->data_size == data_size);
  std::uint64_t at = 0;
  std::set<std::string> names;
  for (const auto& t : h->tensors) {
    FUZZ_REQUIRE(t.begin == at && t.end >= t.begin);
    std::uint64_t elements = 1;
    for (auto d : t.shape) elements *= d;  // no overflow: the parser checked the product
    FUZZ_REQUIRE(elements * drun::dtype_size(t.dtype) == t.end - t.begin);
    FUZZ_REQUIRE(names.insert(t.name).second && t.name != "__metadata__");
    at = t.end;
  }
  FUZZ_REQUIRE(at == data_size);
  return 0;
}

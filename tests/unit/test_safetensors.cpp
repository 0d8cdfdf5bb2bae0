// Safetensors headers: a well-formed file parsed exactly, every hostile header refused with a
// message that names what is wrong, and headers and tensor data read straight out of a store.
#include <drun/safetensors.hpp>
#include <drun/sign.hpp>
#include <drun/store.hpp>

#include "support.hpp"

#include <algorithm>
#include <cstring>
#include <optional>

using namespace drun;
using test::temp_dir;
using test::write_file;

namespace {

// A safetensors file: the 8-byte little-endian length, the header, the data section.
std::string safetensors_file(std::string_view header, std::string_view data, std::optional<std::uint64_t> length = {}) {
  std::uint64_t n = length.value_or(header.size());
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += header;
  out += data;
  return out;
}

result<safetensors_header> parse(std::string_view header, std::uint64_t data_size) {
  return parse_safetensors_header(header.size(), header, 8 + header.size() + data_size);
}

// The hostile cases: each must fail as malformed_bundle with `fragment` in the message.
void check_refused(std::string_view header, std::uint64_t data_size, std::string_view fragment) {
  CAPTURE(header);
  auto r = parse(header, data_size);
  CHECK(test::error_of(r).code() == errc::malformed_bundle);
  CHECK_MESSAGE(r.error().message().find(fragment) != std::string::npos, r.error().message());
}

node_key store_key() { return std::move(node_key::from_text(std::string(64, 'c'))).value(); }

// A model directory signed and imported into a fresh store, as a publisher and a node would.
struct stored_model {
  temp_dir d;
  std::string bundle;
  std::optional<verified_manifest> vm;
  std::optional<store> s;
  explicit stored_model(const std::vector<std::pair<std::string, std::string>>& files) {
    for (const auto& [name, content] : files) write_file(d / ("m/" + name), content);
    // Small pieces: headers and tensors straddle piece boundaries.
    vm.emplace(test::sign_and_verify(d / "m", 4096, &bundle));
    auto opened = store::open(d / "store", store_key());
    REQUIRE(opened);
    s.emplace(std::move(opened).value());
    auto report = import_model(*s, *vm, bundle, d / "m", 1);
    REQUIRE(report);
    REQUIRE(report->failed == 0);
  }
  artifact_reader reader() {
    auto r = s->open_artifact(vm->artifact_id());
    REQUIRE(r);
    return std::move(r).value();
  }
};

std::size_t file_index(const artifact_reader& reader, std::string_view name) {
  const auto& files = reader.files();
  auto it = std::find_if(files.begin(), files.end(), [&](const stored_file& f) { return f.name == name; });
  REQUIRE(it != files.end());
  return static_cast<std::size_t>(it - files.begin());
}

}  // namespace

TEST_CASE("safetensors: dtype names and sizes") {
  const std::vector<std::pair<std::string, std::size_t>> expected{
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"U16", 2}, {"I16", 2}, {"F16", 2}, {"BF16", 2},
      {"U32", 4},  {"I32", 4}, {"F32", 4}, {"U64", 8}, {"I64", 8}, {"F64", 8}};
  for (const auto& [name, size] : expected) {
    CAPTURE(name);
    // Every name parses to the dtype that prints back as that name, with its element size.
    auto h =
        parse(R"({"t":{"dtype":")" + name + R"(","shape":[3],"data_offsets":[0,)" + std::to_string(3 * size) + "]}}",
              3 * size);
    REQUIRE(h);
    CHECK(to_string(h->tensors[0].dtype) == name);
    CHECK(dtype_size(h->tensors[0].dtype) == size);
  }
}

TEST_CASE("safetensors: a well-formed header is parsed exactly") {
  // Keys deliberately out of data order, and padded with spaces as writers do for alignment.
  std::string header = R"({"__metadata__":{"format":"pt","note":"ünïcode"},)"
                       R"("ids":{"dtype":"U16","shape":[4],"data_offsets":[40,48]},)"
                       R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                       R"("mask":{"dtype":"BOOL","shape":[2],"data_offsets":[38,40]},)"
                       R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]},)"
                       R"("empty":{"dtype":"I64","shape":[0,5],"data_offsets":[38,38]},)"
                       R"("scale":{"dtype":"F64","shape":[],"data_offsets":[30,38]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  auto h = parse(header, 48);
  REQUIRE(h);
  CHECK(h->header_size == header.size());
  CHECK(h->data_offset == 8 + header.size());
  CHECK(h->data_size == 48);
  CHECK(h->metadata == std::map<std::string, std::string>{{"format", "pt"}, {"note", "ünïcode"}});

  REQUIRE(h->tensors.size() == 6);
  std::vector<std::string> order;
  for (const auto& t : h->tensors) order.push_back(t.name);
  // Data order; the zero-size tensor at 38 comes before the one that starts there.
  CHECK(order == std::vector<std::string>{"w", "b", "scale", "empty", "mask", "ids"});

  const auto& w = h->tensors[0];
  CHECK(w.dtype == tensor_dtype::f32);
  CHECK(w.shape == std::vector<std::uint64_t>{2, 3});
  CHECK((w.begin == 0 && w.end == 24));
  CHECK(h->tensors[1].dtype == tensor_dtype::bf16);
  const auto& scale = h->tensors[2];  // a scalar: shape [] holds one element
  CHECK(scale.dtype == tensor_dtype::f64);
  CHECK(scale.shape.empty());
  CHECK(scale.end - scale.begin == 8);
  const auto& empty = h->tensors[3];
  CHECK(empty.dtype == tensor_dtype::i64);
  CHECK(empty.shape == std::vector<std::uint64_t>{0, 5});
  CHECK((empty.begin == 38 && empty.end == 38));
  CHECK(h->tensors[4].dtype == tensor_dtype::boolean);
  CHECK(h->tensors[5].dtype == tensor_dtype::u16);
}

TEST_CASE("safetensors: edge cases that are well-formed") {
  // No tensors and no data.
  auto none = parse("{}", 0);
  REQUIRE(none);
  CHECK(none->tensors.empty());
  // Metadata only.
  auto meta = parse(R"({"__metadata__":{}})", 0);
  REQUIRE(meta);
  CHECK(meta->metadata.empty());
  // Zero-size tensors at the start, sharing an offset, and at the very end of the data section.
  auto zeros = parse(R"({"z1":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                     R"("z2":{"dtype":"U8","shape":[3,0,7],"data_offsets":[0,0]},)"
                     R"("a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                     R"("z3":{"dtype":"F16","shape":[0],"data_offsets":[4,4]}})",
                     4);
  REQUIRE(zeros);
  std::vector<std::string> order;
  for (const auto& t : zeros->tensors) order.push_back(t.name);
  CHECK(order == std::vector<std::string>{"z1", "z2", "a", "z3"});
  // A dimension of 2^64 - 1 is fine when another is 0: the byte count is 0.
  CHECK(parse(R"({"z":{"dtype":"U8","shape":[0,18446744073709551615],"data_offsets":[0,0]}})", 0));
}

TEST_CASE("safetensors: hostile lengths are refused before anything is read") {
  // N larger than the file.
  auto past = parse_safetensors_header(1000, "{}", 100);
  CHECK(test::error_of(past).code() == errc::malformed_bundle);
  CHECK(past.error().message().find("length 1000 runs past the end of the file (100 bytes)") != std::string::npos);
  // A file too short for the length prefix.
  CHECK(test::error_of(parse_safetensors_header(0, "", 7)).code() == errc::malformed_bundle);
  // N over the limit, even in a file large enough to hold it.
  auto huge = parse_safetensors_header(max_safetensors_header + 1, "", std::uint64_t{1} << 40);
  CHECK(test::error_of(huge).code() == errc::malformed_bundle);
  CHECK(huge.error().message().find("exceeds the limit") != std::string::npos);
  auto wrapped = parse_safetensors_header(~std::uint64_t{0}, "", ~std::uint64_t{0});
  CHECK(test::error_of(wrapped).code() == errc::malformed_bundle);
  // A caller handing text that is not the N bytes it claims is a misuse, not a hostile file.
  CHECK(test::error_of(parse_safetensors_header(5, "{}", 100)).code() == errc::invalid_argument);
}

TEST_CASE("safetensors: hostile headers are refused, naming what is wrong") {
  // Not JSON, or not strict JSON.
  check_refused(R"({"w":{"dtype":"F32")", 0, "safetensors header is not valid JSON");
  check_refused(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                2, "duplicate key \"w\"");
  check_refused("[]", 0, "is an array, not a JSON object");
  check_refused("", 0, "not valid JSON");
  check_refused(std::string(100, '[') + std::string(100, ']'), 0, "nested deeper");

  // Entries.
  check_refused(R"({"w":"F32"})", 0, "tensor \"w\" is a string, not an object");
  check_refused(R"({"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1, "empty name");
  check_refused(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"offset":0}})", 1,
                "tensor \"w\" has unknown field \"offset\"");
  check_refused(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", 1, "tensor \"w\" has no \"dtype\"");
  check_refused(R"({"w":{"dtype":"U8","data_offsets":[0,1]}})", 1, "tensor \"w\" has no \"shape\"");
  check_refused(R"({"w":{"dtype":"U8","shape":[1]}})", 1, "tensor \"w\" has no \"data_offsets\"");

  // dtype.
  check_refused(R"({"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", 1,
                "tensor \"w\" has unknown dtype \"F8_E4M3\"");
  check_refused(R"({"w":{"dtype":"float32","shape":[1],"data_offsets":[0,4]}})", 4,
                "tensor \"w\" has unknown dtype \"float32\"");
  check_refused(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4, "unknown dtype \"f32\"");
  check_refused(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", 4, "tensor \"w\".dtype has the wrong type");

  // shape.
  check_refused(R"({"w":{"dtype":"U8","shape":[2,-1],"data_offsets":[0,0]}})", 0,
                "tensor \"w\" shape[1] is not a non-negative integer (\"-1\")");
  check_refused(R"({"w":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}})", 2,
                "shape[0] is not a non-negative integer");
  check_refused(R"({"w":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}})", 2,
                "shape[0] is not a non-negative integer");
  check_refused(R"({"w":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,0]}})", 0,
                "shape[0] is not a non-negative integer");
  check_refused(R"({"w":{"dtype":"U8","shape":2,"data_offsets":[0,2]}})", 2, "tensor \"w\".shape has the wrong type");
  // 2^32 * 2^32 * 16 wraps to 0 in 64 bits: it must not pass as a zero-size tensor.
  check_refused(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}})", 0,
                "tensor \"w\" shape \"[4294967296,4294967296,16]\" overflows");
  // The element size is part of the product: 2^62 F32 elements are 2^64 bytes.
  check_refused(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0, "overflows");

  // data_offsets.
  check_refused(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4,
                "tensor \"w\" has 8 bytes by dtype and shape but data_offsets span 4");
  check_refused(R"({"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", 4,
                "tensor \"w\" ends past the file (at 8 of a 4-byte data section)");
  check_refused(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[8,4]}})", 8,
                "tensor \"w\" begins at 8 after it ends at 4");
  check_refused(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4,8]}})", 8,
                "tensor \"w\" data_offsets is not two non-negative integers");
  check_refused(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[-4,0]}})", 8, "data_offsets is not two non-negative");
  check_refused(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4.0]}})", 4,
                "data_offsets is not two non-negative");

  // Tiling.
  check_refused(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                R"("b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}})",
                12, "tensor \"b\" overlaps \"a\"");
  check_refused(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                R"("b":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})",
                8, "overlaps");
  // A zero-size tensor inside another one is an overlap too.
  check_refused(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                R"("z":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}})",
                8, "tensor \"z\" overlaps \"a\"");
  check_refused(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                R"("b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}})",
                12, "gap before tensor \"b\"");
  check_refused(R"({"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", 8, "gap before tensor \"b\"");
  check_refused(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 6,
                "data section has 2 bytes after the last tensor");
  check_refused("{}", 3, "data section has 3 bytes after the last tensor");

  // Metadata.
  check_refused(R"({"__metadata__":{"format":"pt","epochs":3}})", 0,
                "__metadata__ \"epochs\" is a number, not a string");
  check_refused(R"({"__metadata__":{"nested":{"a":"b"}}})", 0, "__metadata__ \"nested\" is an object, not a string");
  check_refused(R"({"__metadata__":["pt"]})", 0, "__metadata__ is an array, not an object");

  // Names from the file are printed bounded and without control characters.
  std::string long_name(5000, 'x');
  auto r = parse(R"({")" + long_name + R"(\n":"oops"})", 0);
  CHECK(test::error_of(r).code() == errc::malformed_bundle);
  CHECK(r.error().message().size() < 200);
  CHECK(r.error().message().find('\n') == std::string::npos);
}

TEST_CASE("safetensors: header and tensors read out of the store match the file") {
  std::string header = R"({"__metadata__":{"format":"pt","padding":")" + std::string(5000, 'p') +
                       R"("},)"
                       R"("a":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]},)"
                       R"("b":{"dtype":"BF16","shape":[50,100],"data_offsets":[4000,14000]},)"
                       R"("c":{"dtype":"U8","shape":[],"data_offsets":[14000,14001]},)"
                       R"("d":{"dtype":"I32","shape":[7,0],"data_offsets":[14001,14001]},)"
                       R"("e":{"dtype":"U8","shape":[5999],"data_offsets":[14001,20000]}})";
  const std::string data = test::pattern(20000, 5);
  const std::string file = safetensors_file(header, data);
  stored_model sm({{"model.safetensors", file}, {"config.json", R"({"hidden_size": 1000})"}});
  auto reader = sm.reader();
  auto index = file_index(reader, "model.safetensors");

  auto h = read_safetensors_header(reader, index);
  REQUIRE(h);
  CHECK(h->header_size == header.size());
  CHECK(h->data_offset == 8 + header.size());
  CHECK(h->data_size == data.size());
  CHECK(h->metadata.at("format") == "pt");
  REQUIRE(h->tensors.size() == 5);
  CHECK(h->tensors[1].name == "b");
  CHECK(h->tensors[1].shape == std::vector<std::uint64_t>{50, 100});

  std::vector<std::byte> out(h->data_size);
  REQUIRE(read_safetensors_data(reader, index, *h, out));
  CHECK(std::memcmp(out.data(), data.data(), data.size()) == 0);
  for (const auto& t : h->tensors) {
    CAPTURE(t.name);
    auto bytes = std::span<const std::byte>(out).subspan(t.begin, t.end - t.begin);
    CHECK(std::memcmp(bytes.data(), file.data() + h->data_offset + t.begin, bytes.size()) == 0);
  }

  // Misuse: wrong buffer size, a header from another file, no such file.
  std::vector<std::byte> small(h->data_size - 1);
  CHECK(test::error_of(read_safetensors_data(reader, index, *h, small)).code() == errc::invalid_argument);
  auto other = *h;
  other.data_size -= 1;
  std::vector<std::byte> other_out(other.data_size);
  CHECK(test::error_of(read_safetensors_data(reader, index, other, other_out)).code() == errc::invalid_argument);
  CHECK(test::error_of(read_safetensors_data(reader, 7, *h, out)).code() == errc::invalid_argument);
  CHECK(test::error_of(read_safetensors_header(reader, 7)).code() == errc::invalid_argument);

  // A file that is not safetensors at all: its first 8 bytes make an absurd length.
  auto config = read_safetensors_header(reader, file_index(reader, "config.json"));
  CHECK(test::error_of(config).code() == errc::malformed_bundle);
  CHECK(config.error().message().find("config.json: safetensors header: length") == 0);
}

TEST_CASE("safetensors: a hostile file is stored like any bytes, but its header is refused cleanly") {
  const std::string overlapping = R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}})";
  stored_model sm({
      {"overlap.safetensors", safetensors_file(overlapping, test::pattern(12))},
      // A length of 2^62: refused before any allocation is attempted.
      {"huge.safetensors", safetensors_file("{}", "", std::uint64_t{1} << 62)},
      // A length that runs past the end of the file, but under the limit.
      {"past.safetensors", safetensors_file("{}", "", 4096)},
      {"short.safetensors", "abc"},
      {"trailing.safetensors", safetensors_file("{}", "junk")},
  });
  auto reader = sm.reader();
  auto refused = [&](std::string_view name, std::string_view fragment) {
    CAPTURE(name);
    auto h = read_safetensors_header(reader, file_index(reader, name));
    CHECK(test::error_of(h).code() == errc::malformed_bundle);
    CHECK_MESSAGE(h.error().message().find(fragment) != std::string::npos, h.error().message());
    CHECK(h.error().path() == name);
  };
  refused("overlap.safetensors", "tensor \"b\" overlaps \"a\"");
  refused("huge.safetensors", "exceeds the limit");
  refused("past.safetensors", "length 4096 runs past the end of the file (10 bytes)");
  refused("short.safetensors", "too short for the length prefix");
  refused("trailing.safetensors", "data section has 4 bytes after the last tensor");
}

// Building manifests (parallel piece hashing) and the OMS v1.0 in-toto statement, both written
// and parsed. Parsing validates everything a signer controls before any of it is used.
#include <drun/manifest.hpp>

#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/json.hpp"
#include "detail/thread_pool.hpp"
#include "manifest_data.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <fcntl.h>
#include <map>
#include <mutex>
#include <sys/stat.h>
#include <unordered_set>

namespace drun {

std::string_view to_string(serialization_method m) noexcept {
  return m == serialization_method::files ? "files" : "shards";
}

namespace detail {
namespace {

constexpr std::size_t read_chunk = std::size_t{1} << 18;  // per-thread, L2-sized: bounds memory

error bad_statement(std::string detail) { return error(errc::malformed_bundle, std::move(detail)); }

std::optional<std::uint64_t> parse_decimal(std::string_view s) {
  std::uint64_t v = 0;
  if (s.empty() || (s.size() > 1 && s[0] == '0')) return std::nullopt;  // canonical form only
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

}  // namespace

bool oms_name_less(std::string_view a, std::string_view b) noexcept {
  // Compare component by component: "a/b" sorts before "a.b" because "a" < "a.b".
  for (;;) {
    auto sa = a.find('/'), sb = b.find('/');
    auto ca = a.substr(0, sa), cb = b.substr(0, sb);
    if (ca != cb) return ca < cb;
    if (sa == std::string_view::npos || sb == std::string_view::npos)
      return sa == std::string_view::npos && sb != std::string_view::npos;
    a.remove_prefix(sa + 1);
    b.remove_prefix(sb + 1);
  }
}

digest root_digest(const std::vector<resource>& resources) {
  hasher h(hash_algorithm::sha256);
  for (const auto& r : resources) h.update(r.value.bytes());
  return h.finish();
}

std::string statement_json(const manifest_data& m) {
  using ojson = nlohmann::ordered_json;
  ojson serialization{{"method", std::string(to_string(m.method))},
                      {"hash_type", std::string(to_string(m.hash))},
                      {"allow_symlinks", m.allow_symlinks},
                      {"ignore_paths", m.ignore_paths}};
  if (m.method == serialization_method::shards) serialization["shard_size"] = m.shard_size;
  // The model_signing reference names shard algorithms "<hash>-sharded-<size>".
  std::string algorithm = m.method == serialization_method::shards
                              ? fmt::format("{}-sharded-{}", to_string(m.hash), m.shard_size)
                              : std::string(to_string(m.hash));
  ojson resources = ojson::array();
  for (const auto& r : m.resources)
    resources.push_back({{"name", r.name}, {"algorithm", algorithm}, {"digest", r.value.hex()}});
  ojson statement{{"_type", statement_type},
                  {"subject", ojson::array({{{"name", m.subject_name},
                                             {"digest", {{"sha256", root_digest(m.resources).hex()}}}}})},
                  {"predicateType", predicate_type},
                  {"predicate", {{"serialization", serialization}, {"resources", resources}}}};
  return statement.dump();
}

result<manifest_data> parse_statement(std::string_view payload) {
  auto doc = parse_json_strict(payload, "statement");
  if (!doc) return std::move(doc).error();
  const json& st = *doc;
  using vt = json::value_t;
  if (!st.is_object()) return bad_statement("statement is not a JSON object");

  auto type = require_field(st, "_type", vt::string, "statement");
  if (!type) return std::move(type).error();
  if ((*type)->get<std::string>() != statement_type)
    return bad_statement(fmt::format("statement _type is \"{}\", not an in-toto Statement v1",
                                     (*type)->get<std::string>()));
  auto ptype = require_field(st, "predicateType", vt::string, "statement");
  if (!ptype) return std::move(ptype).error();
  if ((*ptype)->get<std::string>() != predicate_type)
    return error(errc::unsupported, fmt::format("predicateType \"{}\" is not OMS v1.0 ({})",
                                                (*ptype)->get<std::string>(), predicate_type));

  auto subjects = require_field(st, "subject", vt::array, "statement");
  if (!subjects) return std::move(subjects).error();
  if ((*subjects)->size() != 1)
    return bad_statement(fmt::format("statement has {} subjects; OMS requires exactly one", (*subjects)->size()));
  const json& subject = (**subjects)[0];
  if (!subject.is_object()) return bad_statement("statement.subject[0] is not an object");
  auto sname = require_field(subject, "name", vt::string, "subject");
  if (!sname) return std::move(sname).error();
  auto sdigest = require_field(subject, "digest", vt::object, "subject");
  if (!sdigest) return std::move(sdigest).error();
  auto sroot = require_field(**sdigest, "sha256", vt::string, "subject.digest");
  if (!sroot) return std::move(sroot).error();

  auto predicate = require_field(st, "predicate", vt::object, "statement");
  if (!predicate) return std::move(predicate).error();
  auto ser = require_field(**predicate, "serialization", vt::object, "predicate");
  if (!ser) return std::move(ser).error();

  manifest_data m;
  m.subject_name = (*sname)->get<std::string>();

  auto method = require_field(**ser, "method", vt::string, "serialization");
  if (!method) return std::move(method).error();
  auto method_name = (*method)->get<std::string>();
  if (method_name == "files") m.method = serialization_method::files;
  else if (method_name == "shards") m.method = serialization_method::shards;
  else return error(errc::unsupported, fmt::format("serialization method \"{}\" is not supported", method_name));

  auto hash_type = require_field(**ser, "hash_type", vt::string, "serialization");
  if (!hash_type) return std::move(hash_type).error();
  auto alg = parse_hash_algorithm((*hash_type)->get<std::string>());
  if (!alg)
    return error(errc::unsupported,
                 fmt::format("hash_type \"{}\" is not supported (sha256, blake2b and blake3 are)", (*hash_type)->get<std::string>()));
  m.hash = *alg;

  if (const json* sym = optional_field(**ser, "allow_symlinks")) {
    if (!sym->is_boolean()) return bad_statement("serialization.allow_symlinks is not a boolean");
    m.allow_symlinks = sym->get<bool>();
  }
  if (const json* ign = optional_field(**ser, "ignore_paths")) {
    if (!ign->is_array()) return bad_statement("serialization.ignore_paths is not an array");
    for (const auto& p : *ign) {
      if (!p.is_string() || !is_safe_relative_path(p.get<std::string>()))
        return bad_statement(fmt::format("serialization.ignore_paths holds an unsafe path: {}", p.dump()));
      m.ignore_paths.push_back(p.get<std::string>());
    }
  }
  if (m.method == serialization_method::shards) {
    const json* ss = optional_field(**ser, "shard_size");
    if (!ss || !ss->is_number()) return bad_statement("serialization.shard_size is missing or not a number");
    if (ss->is_number_float()) {
      // Some producers write 1000000000.0; accept only integral values that fit exactly.
      double d = ss->get<double>();
      if (!(d >= 1 && d <= 9007199254740992.0) || std::floor(d) != d)
        return bad_statement(fmt::format("serialization.shard_size {} is not a positive integer", ss->dump()));
      m.shard_size = static_cast<std::uint64_t>(d);
    } else if (ss->is_number_unsigned() || ss->get<std::int64_t>() > 0) {
      m.shard_size = ss->get<std::uint64_t>();
    }
    if (m.shard_size == 0) return bad_statement("serialization.shard_size is not a positive integer");
  }

  auto resources = require_field(**predicate, "resources", vt::array, "predicate");
  if (!resources) return std::move(resources).error();
  if ((*resources)->empty()) return bad_statement("manifest lists no files (an empty model is refused)");

  const std::string plain_alg(to_string(m.hash));
  const std::string sharded_alg = fmt::format("{}-sharded-{}", plain_alg, m.shard_size);
  const std::size_t hex_len = digest_size(m.hash) * 2;
  std::unordered_set<std::string> seen;
  m.resources.reserve((*resources)->size());
  for (std::size_t i = 0; i < (*resources)->size(); ++i) {
    const json& r = (**resources)[i];
    std::string where = fmt::format("predicate.resources[{}]", i);
    if (!r.is_object()) return bad_statement(where + " is not an object");
    auto name = require_field(r, "name", vt::string, where);
    if (!name) return std::move(name).error();
    auto ralg = require_field(r, "algorithm", vt::string, where);
    if (!ralg) return std::move(ralg).error();
    auto rdig = require_field(r, "digest", vt::string, where);
    if (!rdig) return std::move(rdig).error();

    resource res;
    res.name = (*name)->get<std::string>();
    const auto& alg_name = (*ralg)->get_ref<const std::string&>();
    if (alg_name != plain_alg && !(m.method == serialization_method::shards && alg_name == sharded_alg))
      return bad_statement(fmt::format("{} algorithm \"{}\" does not match hash_type {}", where, alg_name, plain_alg));
    const auto& hex = (*rdig)->get_ref<const std::string&>();
    auto raw = hex.size() == hex_len ? hex_decode(hex) : std::nullopt;
    if (!raw) return bad_statement(fmt::format("{} digest is not {} hex digits", where, hex_len));
    res.value = digest(m.hash, *raw);

    if (m.method == serialization_method::shards) {
      // Parse "path:start:end" from the right: paths may contain ':'.
      auto c2 = res.name.rfind(':');
      auto c1 = c2 == std::string::npos || c2 == 0 ? std::string::npos : res.name.rfind(':', c2 - 1);
      if (c1 == std::string::npos)
        return bad_statement(fmt::format("{} name \"{}\" is not path:start:end", where, res.name));
      auto start = parse_decimal(std::string_view(res.name).substr(c1 + 1, c2 - c1 - 1));
      auto end = parse_decimal(std::string_view(res.name).substr(c2 + 1));
      if (!start || !end || *start >= *end || *start % m.shard_size != 0 || *end - *start > m.shard_size)
        return bad_statement(fmt::format("{} name \"{}\" has an invalid byte range for shard size {}", where,
                                         res.name, m.shard_size));
      res.file = res.name.substr(0, c1);
      res.range = byte_range{*start, *end};
    } else {
      res.file = res.name;
    }
    if (res.file != "." && !is_safe_relative_path(res.file))
      return bad_statement(fmt::format("{} name \"{}\" is an unsafe path (absolute, '..', or not normalized)",
                                       where, res.name));
    if (!seen.insert(res.name).second)
      return bad_statement(fmt::format("{} name \"{}\" is listed twice", where, res.name));
    m.resources.push_back(std::move(res));
  }

  // "." stands for the whole single-file model; it cannot sit beside other files.
  bool has_dot = std::any_of(m.resources.begin(), m.resources.end(), [](const resource& r) { return r.file == "."; });
  if (has_dot && std::any_of(m.resources.begin(), m.resources.end(), [](const resource& r) { return r.file != "."; }))
    return bad_statement("manifest mixes the single-file name \".\" with other files");

  if (m.method == serialization_method::shards) {
    // Every file's shards must tile [0, size) exactly: full shards, then at most one shorter one.
    std::map<std::string, std::vector<byte_range>> by_file;
    for (const auto& r : m.resources) by_file[r.file].push_back(*r.range);
    for (auto& [file, ranges] : by_file) {
      std::sort(ranges.begin(), ranges.end(), [](auto& a, auto& b) { return a.begin < b.begin; });
      for (std::size_t k = 0; k < ranges.size(); ++k) {
        bool last = k + 1 == ranges.size();
        if (ranges[k].begin != k * m.shard_size || (!last && ranges[k].size() != m.shard_size))
          return bad_statement(fmt::format("shards of \"{}\" do not cover the file contiguously", file));
      }
    }
  }

  auto root = hex_decode((*sroot)->get<std::string>());
  if (!root || !digest_equal(*root, root_digest(m.resources).bytes()))
    return bad_statement("subject digest does not match the listed resources");
  return m;
}

result<std::vector<digest>> hash_ranges(const std::vector<model_file>& files,
                                        const std::vector<hash_task>& tasks, hash_algorithm alg,
                                        unsigned threads, bool follow_symlinks,
                                        const progress_callback& progress) {
  std::vector<digest> out(tasks.size());
  unsigned workers = worker_count(threads, tasks.size());
  std::vector<std::vector<std::byte>> buffers(workers);
  std::uint64_t total = 0;
  for (const auto& t : tasks) total += t.range.size();
  std::atomic<std::uint64_t> done{0};
  std::mutex failure_mutex;
  std::optional<error> failure;

  parallel_for(tasks.size(), workers, [&](std::size_t i, unsigned w) {
    const hash_task& t = tasks[i];
    const model_file& f = files[t.file];
    auto fail = [&](error e) {
      std::lock_guard lock(failure_mutex);
      if (!failure) failure = std::move(e);
      return false;
    };
    // O_NONBLOCK: a file swapped for a FIFO after enumeration must not hang the hasher.
    int fd_raw = ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | (follow_symlinks ? 0 : O_NOFOLLOW));
    if (fd_raw < 0) return fail(sys_error("cannot open", f.path, errno).with_path(f.name));
    unique_fd fd(fd_raw);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode))
      return fail(error(errc::unsafe_entry, "is no longer a regular file").with_path(f.name));
    if (f.inode != 0 && (st.st_ino != f.inode || st.st_dev != f.device))
      return fail(error(errc::unsafe_entry, "was replaced after the model was listed").with_path(f.name));
    if (static_cast<std::uint64_t>(st.st_size) != f.size)
      return fail(error(errc::unsafe_entry, fmt::format("changed size while the model was read ({} bytes when "
                                                        "listed, {} now)", f.size, st.st_size))
                      .with_path(f.name));
    ::posix_fadvise(fd.get(), static_cast<off_t>(t.range.begin), static_cast<off_t>(t.range.size()),
                    POSIX_FADV_SEQUENTIAL);
    auto& buf = buffers[w];
    if (buf.empty()) buf.resize(read_chunk);
    hasher h(alg);
    for (std::uint64_t off = t.range.begin; off < t.range.end;) {
      std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(read_chunk, t.range.end - off));
      if (auto r = pread_exact(fd.get(), std::span(buf.data(), n), off, f.path); !r)
        return fail(std::move(r).error().with_path(f.name));
      h.update(std::span(buf.data(), n));
      off += n;
      std::uint64_t now = done.fetch_add(n, std::memory_order_relaxed) + n;
      if (progress) progress(now, total);
    }
    out[i] = h.finish();
    return true;
  });
  if (failure) return std::move(*failure);
  return out;
}

}  // namespace detail

manifest::manifest(std::unique_ptr<detail::manifest_data> data) : data_(std::move(data)) {}
manifest::~manifest() = default;
manifest::manifest(manifest&&) noexcept = default;
manifest& manifest::operator=(manifest&&) noexcept = default;
serialization_method manifest::method() const noexcept { return data_->method; }
hash_algorithm manifest::hash_type() const noexcept { return data_->hash; }
std::uint64_t manifest::shard_size() const noexcept { return data_->shard_size; }
std::size_t manifest::resource_count() const noexcept { return data_->resources.size(); }
std::uint64_t manifest::total_bytes() const noexcept { return data_->total_bytes; }
const std::vector<std::string>& manifest::unsigned_empty_files() const noexcept { return data_->unsigned_empty_files; }
std::string manifest::statement_json() const { return detail::statement_json(*data_); }

result<manifest> build_manifest(const std::filesystem::path& model, const manifest_options& options) {
  if (options.piece_size != 0 && !valid_piece_size(options.piece_size))
    return error(errc::invalid_argument,
                 fmt::format("piece size {} is not a power of two between 4 KiB and 1 GiB", options.piece_size));
  auto files = enumerate_model(model, options.policy);
  if (!files) return std::move(files).error();
  if (files->empty())
    return error(errc::invalid_argument, "the model has no files to sign").with_path(model.string());

  auto m = std::make_unique<detail::manifest_data>();
  auto name = model.filename().empty() ? model.parent_path().filename() : model.filename();
  m->subject_name = name.string();
  m->method = options.method;
  m->hash = options.hash;
  m->allow_symlinks = options.policy.allow_symlinks;
  m->ignore_paths = default_ignore_paths();
  for (const auto& p : options.policy.ignore_paths)
    if (std::find(m->ignore_paths.begin(), m->ignore_paths.end(), p) == m->ignore_paths.end())
      m->ignore_paths.push_back(p);
  for (const auto& f : *files) m->total_bytes += f.size;
  m->shard_size = options.method == serialization_method::shards
                      ? (options.piece_size ? options.piece_size : default_piece_size(m->total_bytes))
                      : 0;

  std::vector<detail::hash_task> tasks;
  for (std::size_t i = 0; i < files->size(); ++i) {
    const auto& f = (*files)[i];
    if (options.method == serialization_method::files) {
      tasks.push_back({i, {0, f.size}});
    } else {
      for (auto r : piece_ranges(f.size, m->shard_size)) tasks.push_back({i, r});
      if (f.size == 0) m->unsigned_empty_files.push_back(f.name);
    }
  }
  auto digests = detail::hash_ranges(*files, tasks, options.hash, options.threads,
                                     options.policy.allow_symlinks, options.progress);
  if (!digests) return std::move(digests).error();
  for (std::size_t k = 0; k < tasks.size(); ++k) {
    const auto& f = (*files)[tasks[k].file];
    detail::resource r;
    r.file = f.name;
    if (options.method == serialization_method::shards) {
      r.range = tasks[k].range;
      r.name = fmt::format("{}:{}:{}", f.name, r.range->begin, r.range->end);
    } else {
      r.name = f.name;
    }
    r.value = (*digests)[k];
    m->resources.push_back(std::move(r));
  }
  if (m->resources.empty())
    return error(errc::invalid_argument, "the model has no data to sign (every file is empty)").with_path(model.string());
  return detail::manifest_access::make(std::move(m));
}

}  // namespace drun

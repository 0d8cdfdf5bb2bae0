// The audit log (audit.hpp): a hash chain of JSON lines with signed checkpoints.
//
// A record is one line: {"seq":N,"time":...,"prev":"<SHA-256 hex of the previous record's line>",
// ["after_torn":K,] "event":...,"host":...,"pid":...,["trace_id":...,] "data":{...}}. The first
// record's prev is 64 zeros. A checkpoint is a record with event "checkpoint", data {"records":
// N-1,"key":<the audit key's hint>}, and a last field "signature": Ed25519 over the line as it
// reads without that field (the same bytes up to `,"signature":`, then `}`).
#include <drun/audit.hpp>

#include "detail/audit.hpp"
#include "detail/encoding.hpp"
#include "detail/file.hpp"
#include "detail/log.hpp"
#include "key_data.hpp"
#include "metrics/registry.hpp"

#include <drun/hash.hpp>
#include <drun/trace.hpp>

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <map>
#include <mutex>
#include <utility>

namespace drun {
namespace {

using nlohmann::ordered_json;

constexpr std::size_t max_line = std::size_t{64} << 10;   // a record longer than this is refused
constexpr std::size_t tail_window = std::size_t{1} << 20;  // how far back a writer looks for the last record
const std::string genesis(64, '0');
constexpr std::string_view signature_field = ",\"signature\":\"";

std::string line_hash(std::string_view line) { return hash(hash_algorithm::sha256, as_bytes(line)).hex(); }

std::string head_file(const std::filesystem::path& file) { return file.string() + ".head"; }

// What a line says, if it is a record.
struct record {
  std::uint64_t seq = 0;
  std::string prev, event;
  std::uint64_t after_torn = 0;
  ordered_json data;
};

std::optional<record> parse_record(std::string_view line) {
  if (line.size() > max_line) return std::nullopt;
  auto j = ordered_json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  auto seq = j.find("seq"), prev = j.find("prev"), event = j.find("event"), data = j.find("data");
  if (seq == j.end() || !seq->is_number_unsigned() || prev == j.end() || !prev->is_string() || event == j.end() ||
      !event->is_string() || data == j.end() || !data->is_object())
    return std::nullopt;
  record r;
  r.seq = seq->get<std::uint64_t>();
  r.prev = prev->get<std::string>();
  r.event = event->get<std::string>();
  if (auto t = j.find("after_torn"); t != j.end()) {
    if (!t->is_number_unsigned() || t->get<std::uint64_t>() == 0) return std::nullopt;
    r.after_torn = t->get<std::uint64_t>();
  }
  r.data = *data;
  if (r.seq == 0 || r.prev.size() != 64) return std::nullopt;
  return r;
}

// A torn line is what a killed writer (or a power cut) left: a prefix of a record that never
// ended, however short, or the zeros a file system shows for blocks it had not written yet.
bool looks_torn(std::string_view line) {
  constexpr std::string_view start = "{\"seq\":";
  if (line.starts_with(start) || start.starts_with(line)) return true;
  return line.find_first_not_of('\0') == std::string_view::npos;
}

// Checks a checkpoint's signature; an error message when it does not hold.
std::optional<std::string> checkpoint_problem(std::string_view line, const record& r, const public_key& key) {
  auto at = line.rfind(signature_field);
  if (at == std::string_view::npos || line.size() < at + signature_field.size() + 2 || line.substr(line.size() - 2) != "\"}")
    return "a checkpoint without a signature";
  auto sig = detail::base64_decode(line.substr(at + signature_field.size(), line.size() - 2 - at - signature_field.size()));
  if (!sig) return "a checkpoint whose signature is not base64";
  std::string signed_text = std::string(line.substr(0, at)) + "}";
  if (!detail::key_access::verify(key, as_bytes(signed_text), as_bytes(*sig)))
    return "a checkpoint whose signature does not verify with the audit public key (forged, edited, or signed by another key)";
  auto count = r.data.find("records");
  if (count == r.data.end() || !count->is_number_unsigned() || count->get<std::uint64_t>() != r.seq - 1)
    return "a checkpoint whose record count does not match its place in the chain";
  return std::nullopt;
}

struct file_lock {  // flock(LOCK_EX) for the scope: one appender at a time across processes
  int fd;
  explicit file_lock(int f) : fd(f) {
    while (::flock(fd, LOCK_EX) != 0 && errno == EINTR) {}
  }
  ~file_lock() { ::flock(fd, LOCK_UN); }
};

}  // namespace

struct audit_log::impl {
  audit_options o;
  detail::unique_fd fd;
  std::mutex mutex;
  bool closed = false;
  std::uint64_t since_checkpoint = 0;  // records this writer appended since its last checkpoint
  // The end of the file as this writer left it: valid while the file's size is still `size`.
  struct tail {
    std::uint64_t size = 0, seq = 0, torn = 0;
    std::string head = genesis;
    bool ends_in_newline = true, last_is_checkpoint = false;
  };
  std::optional<tail> cached;
  std::optional<std::pair<std::uint64_t, std::string>> written_checkpoint;  // seq and head, to log

  // Says, once no lock is held (a slow stderr must not stall every writer), that a checkpoint
  // was written.
  void log_checkpoint(std::optional<std::pair<std::uint64_t, std::string>> c) const {
    if (c)
      detail::log(log_level::info, "audit checkpoint",
                  {{"audit.file", o.file.string()}, {"audit.seq", c->first}, {"audit.head", c->second}});
  }

  result<tail> read_tail(std::uint64_t size) {
    if (cached && cached->size == size) return *cached;
    tail t;
    t.size = size;
    if (size == 0) return t;
    std::uint64_t from = size > tail_window ? size - tail_window : 0;
    std::string buf(size - from, '\0');
    if (auto r = detail::pread_exact(fd.get(), as_writable_bytes(std::span(buf)), from, o.file); !r) return std::move(r).error();
    t.ends_in_newline = buf.back() == '\n';
    // Lines from the end: the fragment after the last newline, then whole lines back to a record.
    std::size_t end = buf.size();
    if (!t.ends_in_newline) {
      auto nl = buf.rfind('\n');
      std::string_view last(buf.data() + (nl == std::string::npos ? 0 : nl + 1),
                            buf.size() - (nl == std::string::npos ? 0 : nl + 1));
      // A whole record that lost only its newline is the last record; the next one starts a line.
      if (auto r = (nl != std::string::npos || from == 0) ? parse_record(last) : std::nullopt) {
        t.seq = r->seq;
        t.head = line_hash(last);
        t.last_is_checkpoint = r->event == "checkpoint";
        return t;
      }
      t.torn = 1;
      end = nl == std::string::npos ? 0 : nl;
      if (nl == std::string::npos && from == 0) return t;  // a file that is one torn line
    } else {
      end = buf.size() - 1;
    }
    while (true) {
      auto nl = end == 0 ? std::string::npos : buf.rfind('\n', end - 1);
      std::size_t begin = nl == std::string::npos ? 0 : nl + 1;
      if (nl == std::string::npos && from != 0)
        return error(errc::io_error, "cannot find the last record of the audit log in its last MiB: it is not an "
                                     "audit log, or it was damaged (drun audit verify says where)")
            .with_path(o.file);
      std::string_view line(buf.data() + begin, end - begin);
      if (auto r = parse_record(line)) {
        t.seq = r->seq;
        t.head = line_hash(line);
        t.last_is_checkpoint = r->event == "checkpoint";
        return t;
      }
      if (!looks_torn(line))
        return error(errc::io_error, "the audit log ends in a line that is not a record: it is not an audit log, or "
                                     "it was damaged (drun audit verify says where)")
            .with_path(o.file);
      t.torn++;
      if (begin == 0) return t;  // torn lines only: the chain starts after them
      end = begin - 1;
    }
  }

  // Writes one record; for a checkpoint (whose data, the record count, is known only under the
  // lock), signs it and keeps its copy in FILE.head.
  result<void> write(std::string_view event, ordered_json data, bool checkpoint) {
    file_lock lock(fd.get());
    auto size = detail::file_size(fd.get(), o.file);
    if (!size) return std::move(size).error();
    auto t = read_tail(*size);
    if (!t) return std::move(t).error();
    if (checkpoint && t->last_is_checkpoint && t->torn == 0) return {};  // nothing new to cover
    if (checkpoint) data = {{"records", t->seq}, {"key", o.key->public_key().hint()}};
    ordered_json j;
    j["seq"] = t->seq + 1;
    j["time"] = detail::utc_timestamp(3);
    j["prev"] = t->head;
    if (t->torn) j["after_torn"] = t->torn;
    j["event"] = std::string(event);
    char host[256] = {};
    if (::gethostname(host, sizeof host - 1) != 0) host[0] = 0;
    j["host"] = host;
    j["pid"] = static_cast<long>(::getpid());
    if (auto* tc = detail::current_trace()) j["trace_id"] = tc->trace_id_hex();
    j["data"] = std::move(data);
    std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (checkpoint) {
      auto sig = detail::key_access::sign(*o.key, as_bytes(line));
      if (!sig) return std::move(sig).error();
      line.pop_back();  // the closing brace: the signature is the last field
      line += std::string(signature_field) + detail::base64_encode(as_bytes(*sig)) + "\"}";
    }
    if (line.size() > max_line)
      return error(errc::invalid_argument, fmt::format("an audit record of {} bytes is longer than {}", line.size(), max_line));
    std::string out = (t->ends_in_newline ? "" : "\n") + line + "\n";
    // One write() of the whole line (O_APPEND): a kill leaves a prefix of it, never a mixture.
    if (auto r = detail::write_all(fd.get(), out, o.file); !r) return r;
    cached = tail{*size + out.size(), t->seq + 1, 0, line_hash(line), true, checkpoint};
    metrics::global().audit_records.add();
    if (!checkpoint) return {};
    if (::fdatasync(fd.get()) != 0) return detail::sys_error("cannot sync the audit log", o.file, errno);
    if (auto r = detail::replace_file(head_file(o.file), line + "\n", 0640, "cannot write the audit log's head"); !r) return r;
    written_checkpoint = std::pair{t->seq + 1, t->head};  // logged by the caller, outside the locks
    return {};
  }
};

audit_log::audit_log(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
audit_log::~audit_log() { (void)close(); }
const std::filesystem::path& audit_log::file() const noexcept { return impl_->o.file; }

result<std::shared_ptr<audit_log>> audit_log::open(audit_options options) {
  if (options.checkpoint_every == 0) return error(errc::invalid_argument, "checkpoint_every must be at least 1");
  if (options.key && options.key->type() != key_type::ed25519)
    return error(errc::key_error, fmt::format("the audit key is {}; checkpoints are signed with Ed25519 (drun keygen "
                                              "--type ed25519)", to_string(options.key->type())));
  // Read and write: a writer reads the end of the log to continue the chain.
  int fd = ::open(options.file.c_str(), O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
  if (fd < 0) return detail::sys_error("cannot open the audit log", options.file, errno);
  detail::unique_fd f(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    return error(errc::invalid_argument, "the audit log is not a regular file").with_path(options.file);
  auto p = std::make_unique<impl>();
  p->o = std::move(options);
  p->fd = std::move(f);
  return std::shared_ptr<audit_log>(new audit_log(std::move(p)));
}

result<void> audit_log::append(std::string_view event, std::span<const log_attribute> fields) {
  if (event == "checkpoint" || event.empty())
    return error(errc::invalid_argument, fmt::format("\"{}\" is not an event name for a record", event));
  ordered_json data = ordered_json::object();
  for (const auto& f : fields) {
    auto v = f.number ? ordered_json::parse(f.value, nullptr, false) : ordered_json(f.value);
    data[std::string(f.key)] = v.is_discarded() ? ordered_json(f.value) : std::move(v);
  }
  std::optional<std::pair<std::uint64_t, std::string>> logged;
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->closed) return error(errc::invalid_argument, "the audit log is closed").with_path(impl_->o.file);
    if (auto r = impl_->write(event, std::move(data), false); !r) return r;
    impl_->since_checkpoint++;
    if (impl_->o.key && impl_->cached && impl_->cached->seq % impl_->o.checkpoint_every == 0) {
      if (auto r = impl_->write("checkpoint", {}, true); !r) return r;
      impl_->since_checkpoint = 0;
    }
    logged = std::exchange(impl_->written_checkpoint, std::nullopt);
  }
  impl_->log_checkpoint(std::move(logged));
  return {};
}

result<void> audit_log::checkpoint() {
  std::optional<std::pair<std::uint64_t, std::string>> logged;
  {
    std::lock_guard lock(impl_->mutex);
    if (!impl_->o.key || impl_->closed) return {};
    if (auto r = impl_->write("checkpoint", {}, true); !r) return r;
    impl_->since_checkpoint = 0;
    logged = std::exchange(impl_->written_checkpoint, std::nullopt);
  }
  impl_->log_checkpoint(std::move(logged));
  return {};
}

result<void> audit_log::close() {
  if (!impl_) return {};
  bool pending;
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->closed) return {};
    pending = impl_->since_checkpoint > 0;
  }
  result<void> r;
  if (pending) r = checkpoint();
  std::lock_guard lock(impl_->mutex);
  impl_->closed = true;
  return r;
}

// ---- the library's log -----------------------------------------------------------------------

namespace {

std::mutex& current_mutex() {
  static std::mutex m;
  return m;
}
std::shared_ptr<audit_log>& current() {
  static std::shared_ptr<audit_log> log;
  return log;
}
std::atomic<bool> any{false};

}  // namespace

void set_audit_log(std::shared_ptr<audit_log> log) {
  std::lock_guard lock(current_mutex());
  any.store(log != nullptr);
  current() = std::move(log);
}

std::shared_ptr<audit_log> current_audit_log() {
  std::lock_guard lock(current_mutex());
  return current();
}

namespace detail {

bool auditing() noexcept { return any.load(std::memory_order_relaxed); }

void audit(std::string_view event, std::initializer_list<log_attribute> fields) {
  if (!auditing()) return;
  auto log = current_audit_log();
  if (!log) return;
  if (auto r = log->append(event, fields); !r) {
    metrics::global().audit_write_failures.add();
    detail::log(log_level::error, fmt::format("cannot write the audit record for {}: {}", event, r.error().message()));
  }
}

}  // namespace detail

// ---- verification ----------------------------------------------------------------------------

result<audit_report> audit_verify(const std::filesystem::path& file, const public_key& key) {
  auto fd = detail::open_read(file);
  if (!fd) return std::move(fd).error();
  auto tamper = [&](std::uint64_t line, const std::string& why) {
    return error(errc::signature_invalid, fmt::format("audit log line {}: {}", line, why)).with_path(file);
  };
  audit_report rep;
  std::uint64_t line_no = 0, expected = 1, prev_line = 0;
  std::string prev = genesis;
  std::vector<std::uint64_t> pending_torn;
  std::map<std::uint64_t, std::string> checkpoint_hashes;

  auto take_line = [&](std::string_view line) -> result<void> {
    ++line_no;
    auto r = parse_record(line);
    if (!r) {
      if (line.size() > max_line || !looks_torn(line))
        return tamper(line_no, "not an audit record (edited, or not written by drun)");
      pending_torn.push_back(line_no);
      return {};
    }
    if (r->after_torn != pending_torn.size()) {
      if (pending_torn.empty())
        return tamper(line_no, fmt::format("record {} says it follows {} torn lines, and none is there", r->seq, r->after_torn));
      return tamper(pending_torn.front(), "not a complete record, and the record after it does not step over it (edited?)");
    }
    rep.torn_lines.insert(rep.torn_lines.end(), pending_torn.begin(), pending_torn.end());
    pending_torn.clear();
    if (r->seq != expected)
      return tamper(line_no, fmt::format("record {} where record {} was expected: a record was deleted, inserted or "
                                         "moved", r->seq, expected));
    if (r->prev != prev) {
      if (r->seq == 1) return tamper(line_no, "record 1 does not start the chain (records before it were removed)");
      return tamper(prev_line, fmt::format("record {} was edited: record {} on line {} holds another hash for it",
                                           r->seq - 1, r->seq, line_no));
    }
    if (r->event == "checkpoint") {
      if (auto why = checkpoint_problem(line, *r, key)) return tamper(line_no, fmt::format("record {} is {}", r->seq, *why));
      rep.checkpoints++;
      rep.last_checkpoint = r->seq;
      rep.unsealed = 0;
      checkpoint_hashes[r->seq] = line_hash(line);
    } else {
      rep.unsealed++;
    }
    rep.records++;
    prev = line_hash(line);
    prev_line = line_no;
    expected = r->seq + 1;
    return {};
  };

  std::string carry;
  std::vector<char> buf(std::size_t{1} << 16);
  while (true) {
    ssize_t n = ::read(fd->get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return detail::sys_error("cannot read the audit log", file, errno);
    if (n == 0) break;
    std::string_view chunk(buf.data(), static_cast<std::size_t>(n));
    while (!chunk.empty()) {
      auto nl = chunk.find('\n');
      if (nl == std::string_view::npos) {
        carry.append(chunk);
        if (carry.size() > max_line + 1) return tamper(line_no + 1, "a line longer than any record");
        break;
      }
      carry.append(chunk.substr(0, nl));
      chunk.remove_prefix(nl + 1);
      if (carry.size() > max_line + 1) return tamper(line_no + 1, "a line longer than any record");
      if (auto r = take_line(carry); !r) return std::move(r).error();
      carry.clear();
    }
  }
  if (!carry.empty()) {
    if (parse_record(carry)) {
      // A whole record that lost only its newline (the next writer adds one): a record.
      if (auto r = take_line(carry); !r) return std::move(r).error();
    } else {
      rep.torn_tail = true;
      rep.torn_lines.push_back(line_no + 1);
    }
  }
  rep.torn_lines.insert(rep.torn_lines.end(), pending_torn.begin(), pending_torn.end());
  std::sort(rep.torn_lines.begin(), rep.torn_lines.end());
  if (!pending_torn.empty()) rep.torn_tail = true;

  // The copy of the latest checkpoint: the log must still hold it.
  auto head = detail::read_file(head_file(file), max_line + 2);
  if (!head && head.error().code() != errc::not_found) return std::move(head).error();
  if (!head && rep.checkpoints > 0)
    return error(errc::signature_invalid,
                 fmt::format("the audit log has checkpoints but its head file {} is missing: records cut off the end "
                             "would not show", head_file(file)))
        .with_path(file);
  if (head) {
    std::string_view h = *head;
    if (!h.empty() && h.back() == '\n') h.remove_suffix(1);
    auto r = parse_record(h);
    if (!r || r->event != "checkpoint")
      return error(errc::signature_invalid, "the audit log's head file is not a checkpoint").with_path(head_file(file));
    if (auto why = checkpoint_problem(h, *r, key))
      return error(errc::signature_invalid, fmt::format("the audit log's head file holds {}", *why)).with_path(head_file(file));
    auto it = checkpoint_hashes.find(r->seq);
    if (it == checkpoint_hashes.end())
      return error(errc::signature_invalid,
                   fmt::format("the audit log was truncated: its latest checkpoint (record {}, kept in {}) is not in "
                               "it; it ends at record {}", r->seq, head_file(file), expected - 1))
          .with_path(file);
    if (it->second != line_hash(h))
      return error(errc::signature_invalid,
                   fmt::format("record {} is not the checkpoint kept in {}: the log was rewritten", r->seq, head_file(file)))
          .with_path(file);
  }
  return rep;
}

}  // namespace drun

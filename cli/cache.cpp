// `drun cache ...`: the node's encrypted piece store from the command line.
#include "common.hpp"

#include <nlohmann/json.hpp>

#include <ctime>

namespace drun::cli {
namespace {

using ojson = nlohmann::ordered_json;

// --store DIR --key-source SPEC: the node key first (a bad key touches nothing), then the store.
drun::result<drun::store> open_store(const parsed_args& args) {
  auto dir = args.get("store");
  if (!dir) throw usage_error{"--store DIR is required"};
  auto source = args.get("key-source");
  if (!source) throw usage_error{"--key-source file:PATH|env:NAME|cmd:COMMAND is required"};
  auto key = drun::node_key::from_source(*source);
  if (!key) return std::move(key).error();
  return drun::store::open(*dir, std::move(key).value());
}

std::string artifact_arg(drun::store& s, const std::string& prefix) {
  auto id = s.resolve(prefix);
  if (!id) throw usage_error{id.error().message()};
  return *id;
}

std::string when(std::int64_t t) {
  char buf[32];
  std::time_t tt = t;
  std::tm tm{};
  gmtime_r(&tt, &tm);
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &tm);
  return buf;
}

const std::vector<option_spec> store_opts = {{"store", true}, {"key-source", true}, {"metrics-file", true}};

std::vector<option_spec> with_store(std::vector<option_spec> more) {
  more.insert(more.end(), store_opts.begin(), store_opts.end());
  return more;
}

int cache_keygen(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, {{"out", true}});
  auto out = args.get("out");
  if (!out || !args.positional.empty()) throw usage_error{"usage: drun cache keygen --out FILE"};
  if (auto r = drun::node_key::generate().save(*out); !r) return fail("cache keygen", r.error());
  fmt::print("wrote a new node key to {} (mode 0600)\n", *out);
  return exit_ok;
}

int cache_import(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3,
                         with_store(with_trust_options({{"signature", true}, {"threads", true}})));
  std::filesystem::path model = one_positional(args, "model PATH");
  std::filesystem::path sig = args.get("signature").value_or(default_signature(model).string());
  unsigned threads = parse_threads(args);
  auto trust = trust_from_args(args);
  if (!trust) return fail("cache import", trust.error());
  auto text = drun::read_bundle_file(sig);
  if (!text) return fail("cache import", text.error());
  auto vm = drun::verify_bundle(*text, *trust);
  if (!vm) return fail("cache import", std::move(vm).error().with_path(sig.string()));
  auto o = open_store(args);
  if (!o) return fail("cache import", o.error());
  progress_line progress("importing");
  auto report = drun::import_model(*o, *vm, *text, model, threads, progress.callback());
  if (!report) return fail("cache import", report.error());
  fmt::print("imported {}: {} pieces sealed ({} already stored)\n", vm->artifact_id(), report->stored,
             report->already_stored);
  return exit_ok;
}

int cache_export(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, with_store({{"umask-modes", false}}));
  if (args.positional.size() != 2)
    throw usage_error{"usage: drun cache export ARTIFACT DEST --store DIR --key-source SPEC [--umask-modes]"};
  auto o = open_store(args);
  if (!o) return fail("cache export", o.error());
  auto id = artifact_arg(*o, args.positional[0]);
  auto modes = args.has("umask-modes") ? drun::export_modes::umask : drun::export_modes::owner_only;
  if (auto r = o->materialize(id, args.positional[1], modes); !r) return fail("cache export", r.error());
  fmt::print("exported {} to {}\n", id, args.positional[1]);
  return exit_ok;
}

int cache_ls(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, with_store({{"json", false}}));
  auto o = open_store(args);
  if (!o) return fail("cache ls", o.error());
  auto all = o->list();
  if (!all) return fail("cache ls", all.error());
  if (args.has("json")) {
    ojson out = ojson::array();
    for (const auto& a : *all)
      out.push_back({{"id", a.id}, {"subject", a.subject}, {"bytes", a.bytes}, {"pieces", a.pieces},
                     {"stored_pieces", a.stored_pieces}, {"pinned", a.pinned}, {"last_access", a.last_access}});
    fmt::print("{}\n", out.dump(2));
    return exit_ok;
  }
  for (const auto& a : *all)
    fmt::print("{}  {:>12}  {:>6}/{:<6} {}  {}{}\n", a.id.substr(0, 16), a.bytes, a.stored_pieces, a.pieces,
               when(a.last_access), a.subject, a.pinned ? "  [pinned]" : "");
  return exit_ok;
}

int cache_show(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, with_store({{"json", false}}));
  auto o = open_store(args);
  if (!o) return fail("cache show", o.error());
  auto id = artifact_arg(*o, one_positional(args, "ARTIFACT"));
  auto d = o->show(id);
  if (!d) return fail("cache show", d.error());
  if (args.has("json")) {
    ojson files = ojson::array();
    for (const auto& f : d->files)
      files.push_back({{"name", f.name}, {"size", f.size}, {"pieces", f.pieces}, {"stored_pieces", f.stored_pieces}});
    ojson out{{"id", d->summary.id}, {"subject", d->summary.subject}, {"bytes", d->summary.bytes},
              {"piece_size", d->piece_size}, {"pieces", d->summary.pieces},
              {"stored_pieces", d->summary.stored_pieces}, {"pinned", d->summary.pinned},
              {"last_access", d->summary.last_access},
              {"key_version", d->key_versions.empty() ? 0u : d->key_versions.back()},
              {"key_versions", d->key_versions}, {"files", files}};
    fmt::print("{}\n", out.dump(2));
    return exit_ok;
  }
  fmt::print("artifact:    {}\nsubject:     {}\nsize:        {} bytes in {} pieces of {} bytes ({} stored)\n"
             "pinned:      {}\nlast access: {} UTC\n",
             d->summary.id, d->summary.subject, d->summary.bytes, d->summary.pieces, d->piece_size,
             d->summary.stored_pieces, d->summary.pinned ? "yes" : "no", when(d->summary.last_access));
  for (const auto& f : d->files) fmt::print("  {:>14}  {:>6}/{:<6} {}\n", f.size, f.stored_pieces, f.pieces, f.name);
  return exit_ok;
}

int cache_verify(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, with_store({{"reset-index", false}}));
  if (args.positional.size() > 1)
    throw usage_error{"usage: drun cache verify [ARTIFACT] [--reset-index] --store DIR --key-source SPEC"};
  // An index damaged past what the scrub rebuilds is reported as model_mismatch, by the open or by
  // the scrub (piece failures are findings, not errors); --reset-index then sets it aside.
  auto damaged = [&](const drun::error& e) {
    if (e.code() != drun::errc::model_mismatch) return fail("cache verify", e);
    if (!args.has("reset-index")) {
      auto status = fail("cache verify", e);
      diag(drun::log_level::error, "cache verify",
           "the index cannot be rebuilt: `drun cache verify --reset-index` sets it aside and starts the store empty "
           "(what it held is fetched or imported again)");
      return status;
    }
    diag(drun::log_level::error, "cache verify", e.message());
    auto aside = drun::store::set_aside_index(*args.get("store"));
    if (!aside) return fail("cache verify", aside.error());
    diag(drun::log_level::warning, "cache verify",
         fmt::format("the damaged index was set aside as {}; the store starts empty: import or fetch again",
                     aside->string()));
    return exit_integrity;
  };
  auto o = open_store(args);
  if (!o) return damaged(o.error());
  std::optional<std::string> id;
  if (!args.positional.empty()) id = artifact_arg(*o, args.positional[0]);
  auto failures = o->scrub(id);
  if (!failures) {
    o = drun::error(drun::errc::cancelled, "closed");  // the index is closed before it is moved
    return damaged(failures.error());
  }
  for (const auto& f : *failures)
    diag(drun::log_level::error, "cache verify",
         f.artifact.empty() ? f.reason
         : f.file.empty()   ? fmt::format("{}: {}", f.artifact.substr(0, 16), f.reason)
                            : fmt::format("{} {} bytes [{}, {}): {}", f.artifact.substr(0, 16), f.file,
                                          f.range.begin, f.range.end, f.reason));
  if (!failures->empty()) {
    diag(drun::log_level::error, "cache verify",
         fmt::format("{} problems found; what they damaged was dropped: import or fetch again to repair",
                     failures->size()));
    return exit_integrity;
  }
  // Pieces that were never stored, or dropped earlier, are not failures; say so all the same.
  auto all = o->list();
  if (!all) return fail("cache verify", all.error());
  for (const auto& a : *all)
    if ((!id || a.id == *id) && a.stored_pieces < a.pieces)
      fmt::print("{} ({}): {} of {} pieces stored; import or fetch it to complete\n", a.id.substr(0, 16), a.subject,
                 a.stored_pieces, a.pieces);
  fmt::print("every stored piece authenticated and matched its signed digest\n");
  return exit_ok;
}

int cache_gc(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, with_store({{"ttl", true}, {"high", true}, {"low", true}}));
  drun::gc_options opts;
  if (auto t = args.get("ttl")) opts.ttl = std::chrono::seconds(parse_size(*t, "--ttl"));
  if (args.has("high") != args.has("low")) throw usage_error{"--high and --low go together"};
  if (auto h = args.get("high")) {
    opts.high_bytes = parse_size(*h, "--high");
    opts.low_bytes = parse_size(*args.get("low"), "--low");
    if (opts.low_bytes > *opts.high_bytes) throw usage_error{"--low must not exceed --high"};
  }
  if (!opts.ttl && !opts.high_bytes) throw usage_error{"give --ttl SECONDS and/or --high BYTES --low BYTES"};
  auto o = open_store(args);
  if (!o) return fail("cache gc", o.error());
  auto report = o->gc(opts);
  if (!report) return fail("cache gc", report.error());
  for (const auto& id : report->removed) fmt::print("removed {}\n", id);
  for (const auto& id : report->in_use) fmt::print("kept {} (in use by another process)\n", id);
  fmt::print("freed {} bytes\n", report->bytes_freed);
  return exit_ok;
}

int cache_rm(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, with_store({}));
  if (args.positional.empty()) throw usage_error{"usage: drun cache rm ARTIFACT... --store DIR --key-source SPEC"};
  auto o = open_store(args);
  if (!o) return fail("cache rm", o.error());
  for (const auto& p : args.positional) {
    auto id = artifact_arg(*o, p);
    if (auto r = o->remove(id); !r) return fail("cache rm", r.error());
    fmt::print("removed {}\n", id);
  }
  return exit_ok;
}

int cache_pin(int argc, char** argv, bool pin) {
  auto args = parse_args(argc, argv, 3, with_store({}));
  auto o = open_store(args);
  if (!o) return fail(pin ? "cache pin" : "cache unpin", o.error());
  auto id = artifact_arg(*o, one_positional(args, "ARTIFACT"));
  if (auto r = o->set_pinned(id, pin); !r) return fail(pin ? "cache pin" : "cache unpin", r.error());
  fmt::print("{} {}\n", pin ? "pinned" : "unpinned", id);
  return exit_ok;
}

int cache_rotate(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, with_store({{"new-key-source", true}}));
  auto dir = args.get("store");
  auto old_source = args.get("key-source");
  auto new_source = args.get("new-key-source");
  if (!dir || !old_source || !new_source || !args.positional.empty())
    throw usage_error{"usage: drun cache rotate-key --store DIR --key-source OLD --new-key-source NEW"};
  auto old_key = drun::node_key::from_source(*old_source);
  if (!old_key) return fail("cache rotate-key", old_key.error());
  auto new_key = drun::node_key::from_source(*new_source);
  if (!new_key) return fail("cache rotate-key", new_key.error());
  if (auto r = drun::store::rotate_key(*dir, *old_key, *new_key); !r) return fail("cache rotate-key", r.error());
  fmt::print("every piece is now sealed under the new key; the old key no longer opens {}\n", *dir);
  return exit_ok;
}

}  // namespace

int cmd_cache(int argc, char** argv) {
  std::string sub = argc > 2 ? argv[2] : "";
  if (sub == "keygen") return cache_keygen(argc, argv);
  if (sub == "import") return cache_import(argc, argv);
  if (sub == "export") return cache_export(argc, argv);
  if (sub == "ls") return cache_ls(argc, argv);
  if (sub == "show") return cache_show(argc, argv);
  if (sub == "verify") return cache_verify(argc, argv);
  if (sub == "gc") return cache_gc(argc, argv);
  if (sub == "rm") return cache_rm(argc, argv);
  if (sub == "pin") return cache_pin(argc, argv, true);
  if (sub == "unpin") return cache_pin(argc, argv, false);
  if (sub == "rotate-key") return cache_rotate(argc, argv);
  throw usage_error{fmt::format("unknown cache command \"{}\" (keygen, import, export, ls, show, verify, gc, rm, pin, "
                                "unpin, rotate-key)", sub)};
}

}  // namespace drun::cli

// Shared pieces of the drun command-line tool: option parsing, exit statuses, progress line.
#pragma once

#include <drun/drun.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace drun::cli {

inline constexpr int exit_ok = 0, exit_integrity = 1, exit_usage = 2, exit_io = 3, exit_denied = 4,
                     exit_cancelled = 130;  // 128 + SIGINT, as a shell reports an interrupted command

struct usage_error {
  std::string message;
};

// A diagnostic on stderr: "drun COMMAND: message", or, under --log-format json, a line of the
// library's JSON log (so one stream carries both). Warnings and errors are written at the
// default level; a warning that an insecure option is on is written at every level.
inline void diag(drun::log_level level, std::string_view command, std::string_view message) {
  auto settings = drun::logging_settings();
  if (settings.format == drun::log_format::json) {
    level = std::max(level, drun::log_level::warning);
    // "WARNING: --insecure ..." and the like pass whatever --log-level says.
    bool always = message.starts_with("WARNING:") && !drun::log_enabled(level);
    if (always) drun::configure_logging({level, settings.format, settings.service_name});
    drun::emit_log(level, message, {{"command", std::string(command)}});
    if (always) drun::configure_logging(settings);
    return;
  }
  fmt::print(stderr, "drun {}: {}\n", command, message);
}

// A small option parser: --name VALUE, --name=VALUE, flags, repeatable options, positionals.
struct option_spec {
  std::string name;
  bool takes_value;
  bool repeatable = false;
};

struct parsed_args {
  std::vector<std::string> positional;
  std::map<std::string, std::vector<std::string>> values;
  bool has(const std::string& n) const { return values.count(n) != 0; }
  std::optional<std::string> get(const std::string& n) const {
    auto it = values.find(n);
    if (it == values.end()) return std::nullopt;
    return it->second.back();
  }
  std::vector<std::string> all(const std::string& n) const {
    auto it = values.find(n);
    return it == values.end() ? std::vector<std::string>{} : it->second;
  }
};

// Where --metrics-file asked the figures to go (set by parse_args for the commands that take it).
inline std::optional<std::string>& metrics_file_request() {
  static std::optional<std::string> file;
  return file;
}

inline parsed_args parse_args(int argc, char** argv, int first, const std::vector<option_spec>& specs) {
  parsed_args out;
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") {
      for (++i; i < argc; ++i) out.positional.emplace_back(argv[i]);
      break;
    }
    if (a.rfind("--", 0) != 0 || a.size() == 2) {
      if (a.size() > 1 && a[0] == '-') throw usage_error{fmt::format("unknown option {}", a)};
      out.positional.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    auto spec = std::find_if(specs.begin(), specs.end(), [&](const option_spec& s) { return s.name == name; });
    if (spec == specs.end()) throw usage_error{fmt::format("unknown option --{}", name)};
    if (spec->takes_value && !inline_value) {
      if (i + 1 >= argc) throw usage_error{fmt::format("--{} needs a value", name)};
      value = argv[++i];
    } else if (!spec->takes_value && inline_value) {
      throw usage_error{fmt::format("--{} takes no value", name)};
    }
    if (!spec->repeatable && out.has(name)) throw usage_error{fmt::format("--{} given twice", name)};
    out.values[name].push_back(value);
  }
  if (auto f = out.get("metrics-file")) {
    if (f->empty()) throw usage_error{"--metrics-file needs a file name"};
    metrics_file_request() = *f;
  }
  return out;
}

// --metrics-file FILE (fetch, the cache commands): the process's metrics are written there when
// the command has ended, whatever its result (a failed fetch is a figure too), atomically, for
// node_exporter's textfile collector. Failing to write it fails a command that had succeeded.
inline int write_requested_metrics(std::string_view command, int status) {
  const auto& file = metrics_file_request();
  if (!file) return status;
  if (auto r = drun::write_metrics_file(*file); !r) {
    diag(drun::log_level::error, command, fmt::format("--metrics-file: {}", r.error().message()));
    return status == exit_ok ? exit_io : status;
  }
  return status;
}

inline std::uint64_t parse_size(const std::string& text, const char* what) {
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  std::string_view suffix(p, static_cast<std::size_t>(text.data() + text.size() - p));
  unsigned shift = 0;
  if (suffix == "" ) shift = 0;
  else if (suffix == "K" || suffix == "KiB" || suffix == "k") shift = 10;
  else if (suffix == "M" || suffix == "MiB" || suffix == "m") shift = 20;
  else if (suffix == "G" || suffix == "GiB" || suffix == "g") shift = 30;
  else throw usage_error{fmt::format("{} \"{}\" is not a number of bytes", what, text)};
  if (ec != std::errc() || p == text.data() || (shift && v > (UINT64_MAX >> shift)))
    throw usage_error{fmt::format("{} \"{}\" is not a number of bytes", what, text)};
  return v << shift;
}

inline unsigned parse_threads(const parsed_args& args) {
  auto t = args.get("threads");
  if (!t) return 0;
  auto v = parse_size(*t, "--threads");
  if (v == 0 || v > 1024) throw usage_error{"--threads must be between 1 and 1024"};
  return static_cast<unsigned>(v);
}

// RDMA for peers: --rdma [--rdma-device DEV] [--rdma-port N] [--rdma-gid-index N] [--rdma-qps N].
inline std::vector<option_spec> with_rdma_options(std::vector<option_spec> specs) {
  for (const char* name : {"rdma-device", "rdma-port", "rdma-gid-index", "rdma-qps"}) specs.push_back({name, true});
  specs.push_back({"rdma", false});
  return specs;
}

// Says, every time RDMA is asked for, what it gives up: the fabric sees the bytes.
inline drun::rdma_options rdma_from_args(const parsed_args& args, const char* command) {
  drun::rdma_options o;
  o.enabled = args.has("rdma");
  for (const char* name : {"rdma-device", "rdma-port", "rdma-gid-index", "rdma-qps"})
    if (!o.enabled && args.has(name)) throw usage_error{fmt::format("--{} needs --rdma", name)};
  if (!o.enabled) return o;
  if (auto d = args.get("rdma-device")) o.device = *d;
  if (auto p = args.get("rdma-port")) {
    auto v = parse_size(*p, "--rdma-port");
    if (v < 1 || v > 255) throw usage_error{"--rdma-port must be between 1 and 255"};
    o.port = static_cast<unsigned>(v);
  }
  if (auto g = args.get("rdma-gid-index")) {
    auto v = parse_size(*g, "--rdma-gid-index");
    if (v > 255) throw usage_error{"--rdma-gid-index must be between 0 and 255"};
    o.gid_index = static_cast<int>(v);
  }
  if (auto q = args.get("rdma-qps")) {
    auto v = parse_size(*q, "--rdma-qps");
    if (v < 1 || v > 16) throw usage_error{"--rdma-qps must be between 1 and 16"};
    o.queue_pairs = static_cast<unsigned>(v);
  }
  diag(drun::log_level::warning, command,
       "WARNING: --rdma: piece bytes cross the RDMA fabric unencrypted (each is still verified on arrival); use it "
       "only inside a fabric you trust");
  return o;
}

inline int exit_status(drun::errc c) {
  switch (c) {
    case drun::errc::invalid_argument:
    case drun::errc::key_error:
    case drun::errc::unsafe_entry: return exit_usage;
    case drun::errc::io_error:
    case drun::errc::busy:
    case drun::errc::not_found: return exit_io;  // includes network and source failures
    case drun::errc::permission_denied: return exit_denied;
    case drun::errc::cancelled: return exit_cancelled;
    default: return exit_integrity;
  }
}

inline int fail(std::string_view command, const drun::error& e) {
  diag(drun::log_level::error, command, e.message());
  return exit_status(e.code());
}

// A file holding a secret (headers, credentials): refused when its group or others may read it.
inline drun::result<std::string> read_secret_file(const std::string& path, const char* what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return drun::error(drun::errc::key_error, fmt::format("cannot read the {}", what)).with_path(path).with_errno(errno);
  if ((st.st_mode & 077) != 0)
    return drun::error(drun::errc::key_error, fmt::format("{} has permissions {:04o}: it must be readable by its owner "
                                                          "only",
                                                          what, st.st_mode & 07777))
        .with_path(path);
  auto text = drun::read_bundle_file(path);
  if (!text) return std::move(text).error().with_code(drun::errc::key_error);
  return text;
}

// How this node talks to origins and registries, for fetch and push: --ca-cert, --tls-min,
// --insecure (which warns on every run), --origin-cert/--origin-key, --local-address, and the
// registry credentials (oci://): --registry-auth FILE (a Docker config.json or containers
// auth.json, owner-only), else $REGISTRY_AUTH_FILE as skopeo and podman read it; or
// DRUN_REGISTRY_CREDENTIALS=user:password in the environment, which comes first.
template <class Args>
drun::result<void> origin_options_from_args(const Args& args, drun::source_options& so, const char* command) {
  so.ca_file = args.get("ca-cert").value_or("");
  if (auto t = args.get("tls-min")) {
    if (*t == "1.2") so.allow_tls12 = true;
    else if (*t != "1.3") throw usage_error{"--tls-min must be 1.2 or 1.3"};
  }
  so.insecure = args.has("insecure");
  if (so.insecure)
    diag(drun::log_level::warning, command,
         fmt::format("WARNING: --insecure: TLS certificates are NOT verified for this {}", command));
  if (args.has("origin-cert") != args.has("origin-key")) throw usage_error{"give --origin-cert and --origin-key together"};
  so.client_cert_file = args.get("origin-cert").value_or("");
  so.client_key_file = args.get("origin-key").value_or("");
  so.local_address = args.get("local-address").value_or("");
  if (auto f = args.get("registry-auth")) so.registry_auth_file = *f;
  else if (const char* env = std::getenv("REGISTRY_AUTH_FILE"); env && *env) so.registry_auth_file = env;
  if (!so.registry_auth_file.empty()) {
    auto text = read_secret_file(so.registry_auth_file, "registry auth file");  // refused early, not at the first 401
    if (!text) return std::move(text).error();
    std::fill(text->begin(), text->end(), '\0');
  }
  if (const char* env = std::getenv("DRUN_REGISTRY_CREDENTIALS"); env && *env) {
    so.registry_credentials = env;
    if (so.registry_credentials.find(':') == std::string::npos)
      return drun::error(drun::errc::key_error, "DRUN_REGISTRY_CREDENTIALS must read user:password");
  }
  return {};
}

// A progress line on stderr, only when stderr is a terminal and the work has run for a second.
class progress_line {
 public:
  // DRUN_PROGRESS_DELAY_MS overrides the one-second delay (tests use 0 to see the line).
  explicit progress_line(const char* verb) : verb_(verb), enabled_(::isatty(2) == 1) {
    if (const char* d = std::getenv("DRUN_PROGRESS_DELAY_MS")) delay_ = std::chrono::milliseconds(std::atoll(d));
  }
  ~progress_line() {
    if (shown_) fmt::print(stderr, "\r\033[K");
  }
  drun::progress_callback callback() {
    if (!enabled_) return {};
    return [this](std::uint64_t done, std::uint64_t total) {
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      draw(done, total, fmt::format("{:.0f} MiB/s", static_cast<double>(done) / 1048576.0 / secs));
    };
  }
  // A fetch's line also counts pieces and says how long is left at the rate so far.
  drun::fetch_progress_callback fetch_callback() {
    if (!enabled_) return {};
    return [this](const drun::fetch_progress& p) {
      std::string eta = "--:--";
      if (p.seconds_left > 0 && p.seconds_left < 360000) {
        auto s = static_cast<unsigned>(p.seconds_left + 0.5);
        eta = s >= 3600 ? fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60) : fmt::format("{}:{:02}", s / 60, s % 60);
      }
      draw(p.bytes_done, p.bytes_total, fmt::format("{:.0f} MiB/s  {}/{} pieces  {} left", p.bytes_per_second / 1048576.0,
                                                    p.pieces_done, p.pieces_total, eta));
    };
  }

 private:
  void draw(std::uint64_t done, std::uint64_t total, const std::string& tail) {
    auto now = std::chrono::steady_clock::now();
    std::unique_lock lock(mutex_, std::try_to_lock);
    if (!lock || now - start_ < delay_ || now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    shown_ = true;
    fmt::print(stderr, "\r\033[K{}: {:3.0f}%  {:.0f} / {:.0f} MiB  {}", verb_,
               total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 100.0,
               static_cast<double>(done) / 1048576.0, static_cast<double>(total) / 1048576.0, tail);
  }

  const char* verb_;
  bool enabled_;
  std::chrono::milliseconds delay_{1000};
  bool shown_ = false;
  std::mutex mutex_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), last_{};
};

using drun::signature_inside;

inline std::filesystem::path default_signature(const std::filesystem::path& model) {
  return drun::default_signature_path(model);
}

inline std::string one_positional(const parsed_args& args, const char* what) {
  if (args.positional.size() != 1)
    throw usage_error{fmt::format("expected exactly one {} (got {})", what, args.positional.size())};
  return args.positional[0];
}

// The options that name a trust store, for every command that verifies a bundle.
inline std::vector<option_spec> with_trust_options(std::vector<option_spec> specs) {
  for (const char* n : {"public-key", "ca-bundle", "certificate-time", "trusted-root", "identity", "identity-provider"})
    specs.push_back({n, true});
  return specs;
}

// The trust store named by --public-key PEM, --ca-bundle PEM [--certificate-time now|not-before],
// or --trusted-root JSON --identity ID --identity-provider URL (Sigstore keyless).
inline drun::result<drun::trust_store> trust_from_args(const parsed_args& args) {
  int given = args.has("public-key") + args.has("ca-bundle") + args.has("trusted-root");
  if (given != 1)
    throw usage_error{"give exactly one of --public-key PEM, --ca-bundle PEM and --trusted-root JSON (with --identity "
                      "and --identity-provider)"};
  if (args.has("trusted-root")) {
    // A keyless bundle says who signed it; accepting "whoever" would accept anyone with an e-mail.
    if (!args.has("identity") || !args.has("identity-provider"))
      throw usage_error{"--trusted-root needs --identity (the signer's e-mail or URI) and --identity-provider (its "
                        "OIDC issuer URL): keyless verification never accepts any identity"};
    if (args.has("certificate-time"))
      throw usage_error{"--certificate-time is for --ca-bundle: keyless bundles are checked at their verified signing "
                        "time"};
    return drun::trust_store::from_sigstore(*args.get("trusted-root"),
                                            {*args.get("identity"), *args.get("identity-provider")});
  }
  if (args.has("identity") || args.has("identity-provider"))
    throw usage_error{"--identity and --identity-provider go with --trusted-root"};
  auto policy = drun::certificate_time_policy::now;
  if (auto t = args.get("certificate-time")) {
    if (*t == "not-before") policy = drun::certificate_time_policy::leaf_not_before;
    else if (*t != "now") throw usage_error{"--certificate-time must be now or not-before"};
  }
  if (auto pk = args.get("public-key")) {
    auto key = drun::public_key::load(*pk);
    if (!key) return std::move(key).error();
    return drun::trust_store::from_public_key(std::move(key).value());
  }
  return drun::trust_store::from_ca_bundle(*args.get("ca-bundle"), policy);
}

// Entry points of `drun cache ...` (cli/cache.cpp) and `drun fetch` (cli/fetch.cpp).
int cmd_cache(int argc, char** argv);
int cmd_fetch(int argc, char** argv);
int cmd_serve(int argc, char** argv);
int cmd_token(int argc, char** argv);  // cli/token.cpp
int cmd_audit(int argc, char** argv);  // cli/audit.cpp
int cmd_push(int argc, char** argv);   // cli/push.cpp

// Options every command takes (logging) or that the commands making security decisions take
// (the audit log); main() takes them out of argv before the command parses the rest.
struct global_options {
  drun::log_settings log;
  drun::audit_options audit;                 // file empty: no audit log
  std::optional<std::string> audit_key;      // --audit-key KEY (Ed25519 PEM)
};
global_options take_global_options(int& argc, char** argv);
drun::result<std::shared_ptr<drun::audit_log>> open_audit_log(global_options& g);

}  // namespace drun::cli

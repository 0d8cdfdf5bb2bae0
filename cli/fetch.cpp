// `drun fetch`: bring a signed model from its origins into the encrypted store, verifying every
// piece, and optionally write the model out (--out) as its pieces verify.
#include "common.hpp"

#include <csignal>

namespace drun::cli {

int cmd_fetch(int argc, char** argv) {
  auto args = parse_args(argc, argv, 2, with_rdma_options(with_trust_options(
                         {{"signature", true}, {"origin", true, true}, {"store", true}, {"key-source", true}, {"out", true}, {"umask-modes", false},
                          {"connections", true}, {"ca-cert", true}, {"tls-min", true}, {"insecure", false},
                          {"proxy", true}, {"attempts", true}, {"header-file", true}, {"bearer-env", true},
                          {"credentials-origin", true},
                          {"limit-rate", true}, {"stall-timeout", true}, {"s3-endpoint", true},
                          {"proxy-auth-file", true}, {"proxy-auth-env", true}, {"peer", true, true},
                          {"peers-dns", true, true}, {"tls-cert", true}, {"tls-key", true}, {"token-file", true},
                          {"artifact", true}, {"swarm-self", true}, {"metrics-file", true},
                          {"traceparent", true}, {"origin-cert", true}, {"origin-key", true},
                          {"local-address", true}, {"registry-auth", true}, {"peer-server-name", true}})));
  if (!args.positional.empty()) throw usage_error{"fetch takes no positional arguments"};
  auto sig = args.get("signature");
  auto origins = args.all("origin");
  auto peers = args.all("peer");
  auto artifact = args.get("artifact");
  if (sig.has_value() == artifact.has_value())
    throw usage_error{"give --signature URL|FILE, or --artifact ID to get the bundle from a peer"};
  if (origins.empty() && peers.empty() && !args.has("peers-dns"))
    throw usage_error{"give at least one --origin URL, --peer HOST:PORT or --peers-dns NAME:PORT"};
  if (!args.has("store") || !args.has("key-source")) throw usage_error{"--store DIR and --key-source SPEC are required"};

  drun::source_options so;
  if (auto r = origin_options_from_args(args, so, "fetch"); !r) return fail("fetch", r.error());
  so.proxy = args.get("proxy").value_or("");
  so.s3_endpoint = args.get("s3-endpoint").value_or("");
  // Credentials never come from the visible command line: a file readable by its owner only, or
  // an environment variable.
  if (auto hf = args.get("header-file")) {
    auto text = read_secret_file(*hf, "header file");
    if (!text) return fail("fetch", text.error());
    std::size_t start = 0;
    while (start < text->size()) {
      auto nl = text->find('\n', start);
      auto line = text->substr(start, nl == std::string::npos ? std::string::npos : nl - start);
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (!line.empty()) {
        if (line.find(':') == std::string::npos)
          return fail("fetch", drun::error(drun::errc::key_error, "a header line has no ':'").with_path(*hf));
        so.headers.push_back(line);
      }
      if (nl == std::string::npos) break;
      start = nl + 1;
    }
  }
  if (so.proxy.find('@') != std::string::npos)
    throw usage_error{"--proxy must not hold credentials (every user can read a command line): use "
                      "--proxy-auth-file or --proxy-auth-env"};
  if (args.has("proxy-auth-file") && args.has("proxy-auth-env"))
    throw usage_error{"give at most one of --proxy-auth-file and --proxy-auth-env"};
  if (auto pf = args.get("proxy-auth-file")) {
    auto text = read_secret_file(*pf, "proxy credentials file");
    if (!text) return fail("fetch", text.error());
    so.proxy_credentials = text->substr(0, text->find_first_of("\r\n"));
  } else if (auto pe = args.get("proxy-auth-env")) {
    const char* v = std::getenv(pe->c_str());
    if (!v || !*v)
      return fail("fetch", drun::error(drun::errc::key_error, fmt::format("environment variable {} is not set", *pe)));
    so.proxy_credentials = v;
  }
  if (!so.proxy_credentials.empty() && so.proxy_credentials.find(':') == std::string::npos)
    return fail("fetch", drun::error(drun::errc::key_error, "proxy credentials must read user:password"));
  if (auto env = args.get("bearer-env")) {
    const char* token = std::getenv(env->c_str());
    if (!token || !*token)
      return fail("fetch", drun::error(drun::errc::key_error, fmt::format("environment variable {} is not set", *env)));
    so.headers.push_back(std::string("Authorization: Bearer ") + token);
  }
  // Credentials are for one origin (scheme, host, port): the one --credentials-origin names, else
  // the first --origin's (else the --signature URL's). Other origins and a bundle host elsewhere
  // never see them: a mirror is another party. The library holds every request to that.
  if (!so.headers.empty()) {
    auto target = args.get("credentials-origin");
    if (!target && !origins.empty()) target = origins.front();
    if (!target && sig) target = *sig;
    auto scope = target ? drun::url_origin(*target) : std::string();
    if (scope.empty())
      throw usage_error{fmt::format("--header-file and --bearer-env credentials are for one http(s) origin{}: give "
                                    "--credentials-origin URL",
                                    target ? fmt::format(", and {} is not one", *target) : std::string())};
    // A scope that no URL of this fetch is on would send the credentials nowhere: a typo.
    bool used = sig && drun::url_origin(*sig) == scope;
    for (const auto& o : origins) used = used || drun::url_origin(o) == scope;
    if (!used)
      throw usage_error{fmt::format("--credentials-origin {} is the origin of no --origin or --signature URL", scope)};
    so.credentials_origin = scope;
  } else if (args.has("credentials-origin")) {
    throw usage_error{"--credentials-origin names where --header-file or --bearer-env credentials go: give one"};
  }
  if (auto t = args.get("stall-timeout")) so.stall_timeout = std::chrono::seconds(parse_size(*t, "--stall-timeout"));
  drun::fetch_options fo;
  // The trace this fetch belongs to: --traceparent, else $TRACEPARENT (as OpenTelemetry's
  // environment carrier has it), else a new one; the whole command is in it (the bundle from a
  // peer included). A malformed flag is an error; a malformed environment value is ignored with a
  // warning, as W3C Trace Context asks of a receiver.
  std::optional<drun::trace_context> trace;
  if (auto tp = args.get("traceparent")) {
    auto parsed = drun::trace_context::parse(*tp);
    if (!parsed) throw usage_error{"--traceparent: " + parsed.error().detail()};
    trace = *parsed;
  } else if (const char* env = std::getenv("TRACEPARENT"); env && *env) {
    if (auto parsed = drun::trace_context::parse(env)) trace = *parsed;
    else diag(drun::log_level::warning, "fetch", "TRACEPARENT is ignored: " + parsed.error().detail());
  }
  drun::trace_scope in_trace(trace ? trace->child() : drun::trace_context::fresh());
  if (auto c = args.get("connections")) {
    auto n = parse_size(*c, "--connections");
    if (n == 0 || n > 256) throw usage_error{"--connections must be between 1 and 256"};
    fo.connections = static_cast<unsigned>(n);
  }

  if (auto a = args.get("attempts")) {
    auto n = parse_size(*a, "--attempts");
    if (n == 0 || n > 100) throw usage_error{"--attempts must be between 1 and 100"};
    fo.attempts_per_piece = static_cast<unsigned>(n);
  }

  if (auto l = args.get("limit-rate")) fo.max_bytes_per_second = std::max<std::uint64_t>(1, parse_size(*l, "--limit-rate"));

  auto trust = trust_from_args(args);
  if (!trust) return fail("fetch", trust.error());

  // Peers first in the list: the session prefers them and falls back to the origins.
  std::vector<std::unique_ptr<drun::source>> sources;
  drun::peer_client_options po;
  po.rdma = rdma_from_args(args, "fetch");
  po.ca_file = so.ca_file;
  po.cert_file = args.get("tls-cert").value_or("");
  po.key_file = args.get("tls-key").value_or("");
  po.local_address = so.local_address;
  po.server_name = args.get("peer-server-name").value_or("");
  if (auto tf = args.get("token-file")) {
    auto text = read_secret_file(*tf, "token file");
    if (!text) return fail("fetch", text.error());
    po.token = text->substr(0, text->find_first_of("\r\n"));
    std::fill(text->begin(), text->end(), '\0');
  }
  for (const auto& name : args.all("peers-dns")) {
    auto addrs = drun::resolve_peers(name);
    if (!addrs) return fail("fetch", addrs.error());
    peers.insert(peers.end(), addrs->begin(), addrs->end());
  }
  // In a swarm (--swarm-self: this node's own serving address, found among the peers as
  // --peers-dns lists every member), the origins' pieces are shared out between the members.
  auto self = args.get("swarm-self");
  std::vector<std::string> members = peers, addresses;
  if (self) members.push_back(*self);
  for (const auto& p : peers) {
    if (self && p == *self) continue;  // not a source of its own
    auto src = drun::make_peer_source(p, po);
    if (!src) return fail("fetch", src.error());
    sources.push_back(std::move(src).value());
    addresses.push_back(p);
  }
  std::size_t peer_count = sources.size();
  for (const auto& o : origins) {
    auto src = drun::make_source(o, so);
    if (!src) return fail("fetch", src.error());
    sources.push_back(std::move(src).value());
  }

  // The bundle first: nothing is downloaded for a model whose signature does not check out.
  drun::result<std::string> text = std::string();
  drun::result<drun::verified_manifest> vm = drun::error(drun::errc::not_found, "no bundle");
  if (artifact) {
    // From the first peer whose copy verifies against our own trust and is this artifact's.
    if (peer_count == 0) throw usage_error{"--artifact needs --peer or --peers-dns"};
    vm = drun::error(drun::errc::not_found, "no peer serves this artifact's bundle");
    for (std::size_t k = 0; k < peer_count && !vm; ++k) {
      auto got = sources[k]->bundle(*artifact);
      if (!got) {
        vm = std::move(got).error();
        continue;
      }
      vm = drun::verify_bundle(*got, *trust);
      if (vm && vm->artifact_id() != *artifact)
        vm = drun::error(drun::errc::signature_invalid,
                         fmt::format("{} sent the bundle of {}, not {}", sources[k]->name(), vm->artifact_id(), *artifact));
      if (!vm) vm = std::move(vm).error().with_path(sources[k]->name());
      else text = std::move(got);
    }
  } else {
    text = drun::is_remote_document(*sig) ? drun::fetch_document(*sig, drun::max_bundle_size, so) : drun::read_bundle_file(*sig);
    if (!text) return fail("fetch", text.error());
    vm = drun::verify_bundle(*text, *trust);
    if (!vm) vm = std::move(vm).error().with_path(*sig);
  }
  if (!vm) return fail("fetch", vm.error());
  auto key = drun::node_key::from_source(*args.get("key-source"));
  if (!key) return fail("fetch", key.error());
  auto st = drun::store::open(*args.get("store"), std::move(key).value());
  if (!st) return fail("fetch", st.error());

  if (self) fo.origin_owners = drun::swarm_origin_owners(members, *self, addresses);
  auto start = std::chrono::steady_clock::now();
  progress_line progress("fetching");
  fo.progress = progress.fetch_callback();
  // Ctrl-C (or SIGTERM) stops the fetch cleanly: transfers are abandoned, stored pieces stay for
  // the next run. A second Ctrl-C kills the process the usual way.
  static std::atomic<bool> interrupted{false};
  struct sigaction sa {};
  sa.sa_handler = [](int) { interrupted.store(true); };
  sa.sa_flags = static_cast<int>(SA_RESETHAND);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  fo.cancel = &interrupted;
  // --out: the fetch writes each verified piece there too, and moves the files into place once
  // every piece is verified.
  if (auto out = args.get("out")) {
    fo.out = *out;
    fo.out_modes = args.has("umask-modes") ? drun::export_modes::umask : drun::export_modes::owner_only;
  }
  auto report = drun::fetch(*st, *vm, *text, sources, fo);
  if (!report) return fail("fetch", report.error());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("fetched {}: {} pieces ({} already stored), {:.1f} MiB in {:.2f} s ({:.0f} MiB/s)\n", vm->artifact_id(),
             report->fetched, report->already_stored, static_cast<double>(report->bytes) / 1048576.0, secs,
             static_cast<double>(report->bytes) / 1048576.0 / std::max(secs, 1e-6));
  for (const auto& t : report->sources)
    fmt::print("  {}: {} pieces, {} rejected, {} errors{}\n", t.source, t.pieces, t.rejected, t.errors,
               t.banned ? " (banned: sent bytes that do not match the signature)"
                        : t.dropped ? " (dropped: kept failing or refused us)" : "");
  return exit_ok;
}

}  // namespace drun::cli

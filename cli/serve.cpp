// `drun serve`: serve the pieces of a store to authorized peers over mutual TLS until SIGINT or
// SIGTERM, then print what was served.
#include "common.hpp"

#include <csignal>
#include <thread>

namespace drun::cli {

int cmd_serve(int argc, char** argv) {
  auto args = parse_args(argc, argv, 2, with_rdma_options(
                         {{"store", true}, {"key-source", true}, {"listen", true}, {"tls-cert", true}, {"tls-key", true},
                          {"client-ca", true}, {"policy", true}, {"jwks", true}, {"audience", true},
                          {"token-issuer", true}, {"require-bound-tokens", false},
                          {"allow-token-only", false}, {"max-connections", true}, {"limit-rate", true},
                          {"requests-per-second", true}, {"idle-timeout", true}, {"metrics-listen", true}}));
  if (!args.positional.empty()) throw usage_error{"serve takes no positional arguments"};
  for (const char* required : {"store", "key-source", "listen", "tls-cert", "tls-key"})
    if (!args.has(required)) throw usage_error{fmt::format("--{} is required", required)};
  drun::peer_server_options o;
  o.rdma = rdma_from_args(args, "serve");
  o.listen = *args.get("listen");
  o.cert_file = *args.get("tls-cert");
  o.key_file = *args.get("tls-key");
  o.client_ca_file = args.get("client-ca").value_or("");
  o.require_client_certificate = !args.has("allow-token-only");
  if (o.require_client_certificate && o.client_ca_file.empty())
    throw usage_error{"--client-ca PEM is required (or --allow-token-only with --jwks)"};
  if (auto a = args.get("audience")) o.audience = *a;
  if (auto i = args.get("token-issuer")) {
    if (i->empty()) throw usage_error{"--token-issuer needs a value"};
    o.token_issuer = *i;
  }
  o.require_bound_tokens = args.has("require-bound-tokens");
  if ((o.require_bound_tokens || !o.token_issuer.empty()) && !args.has("jwks"))
    throw usage_error{"--token-issuer and --require-bound-tokens are about tokens: give --jwks too"};
  if (auto j = args.get("jwks")) {
    auto keys = drun::jwks::load(*j);
    if (!keys) return fail("serve", keys.error());
    o.token_keys = std::make_shared<const drun::jwks>(std::move(keys).value());
  }
  if (auto p = args.get("policy")) {
    auto policy = drun::access_policy::load(*p);
    if (!policy) return fail("serve", policy.error());
    o.policy = std::make_shared<const drun::access_policy>(std::move(policy).value());
  }
  if (auto c = args.get("max-connections")) {
    auto v = parse_size(*c, "--max-connections");
    if (v == 0 || v > 65536) throw usage_error{"--max-connections must be between 1 and 65536"};
    o.max_connections = static_cast<unsigned>(v);
  }
  if (auto l = args.get("limit-rate")) o.max_upload_bytes_per_second = std::max<std::uint64_t>(1, parse_size(*l, "--limit-rate"));
  if (auto r = args.get("requests-per-second")) o.max_requests_per_second = static_cast<double>(std::max<std::uint64_t>(1, parse_size(*r, "--requests-per-second")));
  if (auto m = args.get("metrics-listen")) {
    if (m->empty()) throw usage_error{"--metrics-listen needs [ADDR:]PORT"};
    o.metrics_listen = *m;
  }
  if (auto t = args.get("idle-timeout")) o.idle_timeout = std::chrono::seconds(std::max<std::uint64_t>(1, parse_size(*t, "--idle-timeout")));

  auto key = drun::node_key::from_source(*args.get("key-source"));
  if (!key) return fail("serve", key.error());
  auto st = drun::store::open(*args.get("store"), std::move(key).value());
  if (!st) return fail("serve", st.error());

  // Signals are waited for on this thread (sigwait), so no handler runs inside the server.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  bool has_policy = o.policy != nullptr;
  auto server = drun::peer_server::start(*st, std::move(o));
  if (!server) return fail("serve", server.error());
  fmt::print("serving {} on port {}{}\n", *args.get("store"), server->port(),
             has_policy ? "" : " (no --policy: every caller certified by the client CA may read every artifact)");
  if (server->metrics_port()) fmt::print("metrics on port {} (GET /metrics)\n", server->metrics_port());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&set, &sig);
  server->stop();
  auto s = server->stats();
  fmt::print("stopped: {} connections, {} requests, {} pieces ({:.1f} MiB) served, {} denied, {} handshakes refused, "
             "{} protocol errors, {} busy; {} pieces over RDMA on {} connections\n",
             s.connections, s.requests, s.pieces_served, static_cast<double>(s.bytes_served) / 1048576.0, s.denied,
             s.handshake_failures, s.protocol_errors, s.busy, s.pieces_served_rdma, s.rdma_connections);
  return exit_ok;
}

}  // namespace drun::cli

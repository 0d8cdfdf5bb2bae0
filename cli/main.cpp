// The drun command-line tool: keygen, sign, verify, manifest.
//
// Exit status: 0 success; 1 integrity or authenticity failure; 2 usage or configuration error;
// 3 I/O error. Results go to stdout, diagnostics to stderr; secrets are never printed.
#include "common.hpp"

#include <nlohmann/json.hpp>

namespace {

using namespace drun::cli;

// ---- commands ------------------------------------------------------------------------------

int cmd_keygen(int argc, char** argv) {
  auto args = parse_args(argc, argv, 2, {{"type", true}, {"out", true}});
  if (!args.positional.empty()) throw usage_error{"keygen takes no positional arguments"};
  auto type_name = args.get("type").value_or("ed25519");
  auto type = drun::parse_key_type(type_name);
  if (!type) throw usage_error{fmt::format("unknown key type \"{}\" (ed25519, ecdsa-p256, ecdsa-p384, ecdsa-p521)", type_name)};
  auto out = args.get("out");
  if (!out) throw usage_error{"--out KEY is required"};
  std::filesystem::path key_path(*out), pub_path(*out + ".pub");
  std::error_code ec;
  for (const auto& p : {key_path, pub_path})
    if (std::filesystem::symlink_status(p, ec).type() != std::filesystem::file_type::not_found)
      return fail("keygen", drun::error(drun::errc::invalid_argument, "already exists; refusing to overwrite it")
                                .with_path(p.string()));
  auto key = drun::private_key::generate(*type);
  if (!key) return fail("keygen", key.error());
  if (auto r = key->save(key_path); !r) return fail("keygen", r.error());
  if (auto r = drun::save_public_key(key->public_key(), pub_path); !r) {
    std::filesystem::remove(key_path, ec);  // never leave half a key pair behind
    return fail("keygen", r.error());
  }
  fmt::print("wrote {} private key {} (mode 0600) and public key {}\n", type_name, key_path.string(), pub_path.string());
  return exit_ok;
}

int cmd_sign(int argc, char** argv) {
  auto args = parse_args(argc, argv, 2,
                         {{"key", true}, {"cert", true}, {"chain", true}, {"signature", true}, {"method", true},
                          {"piece-size", true}, {"ignore", true, true}, {"threads", true}, {"hash", true},
                          {"allow-symlinks", false}});
  std::filesystem::path model = one_positional(args, "model PATH");
  auto key_path = args.get("key");
  if (!key_path) throw usage_error{"--key KEY is required"};
  if (args.has("chain") && !args.has("cert")) throw usage_error{"--chain needs --cert"};

  drun::manifest_options opts;
  auto method = args.get("method").value_or("shards");
  if (method == "files") opts.method = drun::serialization_method::files;
  else if (method != "shards") throw usage_error{fmt::format("--method must be shards or files, not \"{}\"", method)};
  if (auto h = args.get("hash")) {
    auto alg = drun::parse_hash_algorithm(*h);
    if (!alg) throw usage_error{fmt::format("--hash must be sha256, blake3 or blake2b, not \"{}\"", *h)};
    opts.hash = *alg;
  }
  if (auto ps = args.get("piece-size")) {
    if (opts.method == drun::serialization_method::files) throw usage_error{"--piece-size applies to --method shards"};
    opts.piece_size = parse_size(*ps, "--piece-size");
    if (!drun::valid_piece_size(opts.piece_size))
      throw usage_error{fmt::format("--piece-size {} is not a power of two between 4 KiB and 1 GiB", *ps)};
  }
  opts.threads = parse_threads(args);
  opts.policy.allow_symlinks = args.has("allow-symlinks");
  opts.policy.ignore_paths = args.all("ignore");
  std::filesystem::path sig = args.get("signature").value_or(default_signature(model).string());
  if (auto rel = signature_inside(model, sig)) opts.policy.ignore_paths.push_back(*rel);

  auto key = drun::private_key::load(*key_path);
  if (!key) return fail("sign", key.error());
  std::optional<drun::certificate_chain> chain;
  if (auto cert = args.get("cert")) {
    auto c = drun::certificate_chain::load(*cert, args.get("chain").value_or(""));
    if (!c) return fail("sign", c.error());
    chain.emplace(std::move(c).value());
  }
  auto start = std::chrono::steady_clock::now();
  progress_line progress("hashing");
  opts.progress = progress.callback();
  auto m = drun::build_manifest(model, opts);
  if (!m) return fail("sign", m.error());
  if (const auto& empty = m->unsigned_empty_files(); !empty.empty()) {
    std::string names;
    for (std::size_t i = 0; i < empty.size() && i < 10; ++i) names += (i ? ", " : "") + empty[i];
    if (empty.size() > 10) names += fmt::format(" and {} more", empty.size() - 10);
    diag(drun::log_level::warning, "sign",
         fmt::format("WARNING: the shards format cannot sign empty files; not covered: {} (verifiers refuse them "
                     "unless given --allow-unsigned-empty-files; sign with --method files to cover them)",
                     names));
  }
  auto bundle = drun::sign_manifest(*m, *key, chain ? &*chain : nullptr);
  if (!bundle) return fail("sign", bundle.error());
  if (auto r = drun::write_file_atomically(sig, *bundle); !r) return fail("sign", r.error());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("signed {} -> {} ({} resources, {}, {}{}, {:.1f} MiB in {:.2f} s)\n", model.string(), sig.string(),
             m->resource_count(), drun::to_string(m->hash_type()), drun::to_string(m->method()),
             m->shard_size() ? fmt::format(" of {} bytes", m->shard_size()) : "",
             static_cast<double>(m->total_bytes()) / 1048576.0, secs);
  return exit_ok;
}

int cmd_verify(int argc, char** argv) {
  auto args = parse_args(argc, argv, 2,
                         with_trust_options({{"signature", true}, {"ignore", true, true},
                                             {"ignore-unsigned-files", false}, {"allow-unsigned-empty-files", false},
                                             {"threads", true}}));
  std::filesystem::path model = one_positional(args, "model PATH");
  std::filesystem::path sig = args.get("signature").value_or(default_signature(model).string());
  auto trust = trust_from_args(args);
  if (!trust) return fail("verify", trust.error());
  drun::verify_options opts;
  opts.ignore_paths = args.all("ignore");
  opts.ignore_unsigned_files = args.has("ignore-unsigned-files");
  opts.allow_unsigned_empty_files = args.has("allow-unsigned-empty-files");
  if (opts.allow_unsigned_empty_files)
    diag(drun::log_level::warning, "verify",
         "WARNING: --allow-unsigned-empty-files: empty files the signature does not cover are accepted");
  opts.threads = parse_threads(args);
  if (auto rel = signature_inside(model, sig)) opts.ignore_paths.push_back(*rel);

  auto text = drun::read_bundle_file(sig);
  if (!text) return fail("verify", text.error());
  auto vm = drun::verify_bundle(*text, *trust);
  if (!vm) return fail("verify", std::move(vm).error().with_path(sig.string()));
  progress_line progress("verifying");
  opts.progress = progress.callback();
  if (auto r = drun::verify_model(*vm, model, opts); !r) return fail("verify", r.error());
  fmt::print("verified {}: {} files, {} pieces match {} (signed by {}{})\n", model.string(), vm->files().size(),
             vm->pieces().size(), sig.string(), vm->signer().method,
             vm->signer().method == "key" ? "" : ": " + vm->signer().subject +
                 (vm->signer().issuer.empty() ? "" : " via " + vm->signer().issuer));
  return exit_ok;
}

int cmd_manifest(int argc, char** argv) {
  auto args = parse_args(argc, argv, 2, {{"json", false}});
  std::filesystem::path sig = one_positional(args, "signature file");
  auto text = drun::read_bundle_file(sig);
  if (!text) return fail("manifest", text.error());
  auto s = drun::inspect_bundle(*text);
  if (!s) return fail("manifest", std::move(s).error().with_path(sig.string()));
  if (args.has("json")) {
    nlohmann::ordered_json files = nlohmann::ordered_json::array();
    for (const auto& f : s->files) {
      nlohmann::ordered_json j{{"name", f.name}, {"pieces", f.piece_count}};
      j["size"] = f.size ? nlohmann::ordered_json(*f.size) : nlohmann::ordered_json(nullptr);
      files.push_back(j);
    }
    nlohmann::ordered_json out{{"verified", false},
                               {"artifact_id", s->artifact_id},
                               {"subject", s->subject_name},
                               {"method", drun::to_string(s->method)},
                               {"hash_type", drun::to_string(s->hash_type)},
                               {"shard_size", s->shard_size},
                               {"signer", {{"method", s->signer.method}, {"key_hint", s->signer.key_hint},
                                           {"subject", s->signer.subject}, {"issuer", s->signer.issuer}}},
                               {"ignore_paths", s->ignore_paths},
                               {"piece_count", s->piece_count},
                               {"files", files}};
    fmt::print("{}\n", out.dump(2));
    return exit_ok;
  }
  fmt::print(stderr, "note: this shows what the bundle claims; its signature was NOT checked (use drun verify)\n");
  fmt::print("artifact id:   {}\nsubject:       {}\n", s->artifact_id, s->subject_name);
  if (s->signer.method == "key")
    fmt::print("signer:        key{}\n", s->signer.key_hint.empty() ? "" : " with hint " + s->signer.key_hint);
  else if (s->signer.method == "sigstore")
    fmt::print("signer:        keyless (Sigstore) {} via {} (unverified)\n", s->signer.subject.empty() ? "?" : s->signer.subject,
               s->signer.issuer.empty() ? "?" : s->signer.issuer);
  else
    fmt::print("signer:        certificate {}\n", s->signer.subject);
  fmt::print("serialization: {}, {}{}\n", drun::to_string(s->method), drun::to_string(s->hash_type),
             s->shard_size ? fmt::format(", pieces of {} bytes", s->shard_size) : "");
  fmt::print("files:         {} ({} pieces)\n", s->files.size(), s->piece_count);
  for (const auto& f : s->files)
    fmt::print("  {:>14}  {:>6}  {}\n", f.size ? std::to_string(*f.size) : "-", f.piece_count, f.name);
  return exit_ok;
}

void print_usage(std::FILE* to) {
  fmt::print(to,
             "usage: drun <command> [options]\n\n"
             "  keygen   --type ed25519|ecdsa-p256|ecdsa-p384|ecdsa-p521 --out KEY\n"
             "  sign     PATH --key KEY [--cert LEAF.pem [--chain CHAIN.pem]] [--signature OUT]\n"
             "           [--method shards|files] [--hash sha256|blake3|blake2b] [--piece-size BYTES]\n"
             "           [--ignore REL]... [--allow-symlinks] [--threads N]\n"
             "  verify   PATH [--signature SIG] TRUST [--ignore REL]... [--ignore-unsigned-files]\n"
             "           [--allow-unsigned-empty-files] [--threads N]\n"
             "           TRUST: --public-key PEM | --ca-bundle PEM [--certificate-time now|not-before]\n"
             "                | --trusted-root JSON --identity ID --identity-provider URL   (Sigstore keyless)\n"
             "  manifest SIG [--json]      what a bundle covers (NOT verified)\n\n"
             "  fetch    (--signature URL|FILE | --artifact ID) TRUST\n"
             "           [--origin URL]... [--peer HOST:PORT]... [--peers-dns NAME:PORT]\n"
             "           --store DIR --key-source SPEC [--out DIR [--umask-modes]] [--connections N] [--ca-cert PEM]\n"
             "           [--tls-cert PEM --tls-key PEM] [--token-file FILE] [--swarm-self ADDR:PORT]\n"
             "           [--peer-server-name NAME]   (peers' certificates name NAME, not their address)\n"
             "           [--tls-min 1.2|1.3] [--proxy URL] [--proxy-auth-file FILE | --proxy-auth-env NAME]\n"
             "           [--header-file FILE] [--bearer-env NAME] [--credentials-origin URL]\n"
             "           [--origin-cert PEM --origin-key PEM]   (mutual TLS toward HTTPS origins and proxies)\n"
             "           [--registry-auth FILE]   (oci:// origins: a Docker config.json; or $REGISTRY_AUTH_FILE,\n"
             "                                     or DRUN_REGISTRY_CREDENTIALS=user:password)\n"
             "           [--local-address IP]   (connections to origins and peers go out from it)\n"
             "           [--limit-rate BYTES/s] [--stall-timeout S] [--attempts N] [--insecure]\n"
             "           [--metrics-file FILE]   (Prometheus text, written when the fetch ends) [--traceparent TP]\n"
             "           [--rdma [--rdma-device DEV] [--rdma-port N] [--rdma-gid-index N] [--rdma-qps N]]\n"
             "  push     MODEL oci://REGISTRY/REPOSITORY:TAG [--signature SIG] [--registry-auth FILE]\n"
             "           [--ca-cert PEM] [--origin-cert PEM --origin-key PEM] [--chunk-size BYTES] [--tls-min 1.2|1.3]\n"
             "                                   prints oci://REGISTRY/REPOSITORY@sha256:... of what it pushed\n"
             "  serve    --store DIR --key-source SPEC --listen ADDR:PORT --tls-cert PEM --tls-key PEM\n"
             "           --client-ca PEM [--policy FILE] [--jwks FILE [--audience A] [--token-issuer I]\n"
             "           [--require-bound-tokens]] [--allow-token-only]\n"
             "           [--max-connections N] [--limit-rate BYTES/s] [--requests-per-second N]\n"
             "           [--metrics-listen [ADDR:]PORT]   (GET /metrics; PORT alone is on 127.0.0.1)\n"
             "           [--rdma [--rdma-device DEV] [--rdma-port N] [--rdma-gid-index N] [--rdma-qps N]]\n"
             "  token issue --key ED25519_KEY --subject S --audience A --artifact ID|'*' [--artifact ...]\n"
             "           (--bind-cert HOLDER_CERT.pem | --unbound) [--ttl 15m] [--issuer I]\n"
             "                                   prints an EdDSA JWT for a peer (bound: usable only with that cert)\n"
             "  token jwks --public-key PEM      prints the JWKS that verifies those tokens\n"
             "  token verify --jwks FILE --audience A [--issuer I] [--cert PEM] [--require-bound]\n"
             "           [--clock-skew 60s] < TOKEN\n"
             "  cache keygen --out FILE    a new node key for an encrypted store\n"
             "  cache import PATH [--signature SIG] TRUST [--threads N]\n"
             "  cache export ARTIFACT DEST [--umask-modes] | ls [--json] | show ARTIFACT [--json] | verify [ARTIFACT] [--reset-index]\n"
             "  cache gc [--ttl SECONDS] [--high BYTES --low BYTES] | rm ARTIFACT... | pin | unpin ARTIFACT\n"
             "  cache rotate-key --new-key-source SPEC\n"
             "        every cache command takes --store DIR --key-source file:PATH|env:NAME|cmd:COMMAND\n"
             "        [--metrics-file FILE]\n\n"
             "  audit verify FILE --public-key PUB [--json]   the chain and the signed checkpoints\n"
             "  audit show FILE [--json] [--artifact ID] [--since TIME|AGE]\n\n"
             "every command takes --log-format text|json and --log-level debug|info|warning|error;\n"
             "verify, fetch, serve and cache take --audit-log FILE [--audit-key ED25519_KEY]\n"
             "[--audit-checkpoint-every N]; fetch takes --traceparent (default: $TRACEPARENT)\n\n"
             "exit status: 0 ok, 1 integrity/authenticity failure, 2 usage/configuration, 3 I/O or network,\n"
             "             4 refused by a peer's policy, 130 interrupted\n");
}

}  // namespace

namespace {

int run(const std::string& command, int argc, char** argv) {
  if (command == "keygen") return cmd_keygen(argc, argv);
  if (command == "sign") return cmd_sign(argc, argv);
  if (command == "verify") return cmd_verify(argc, argv);
  if (command == "manifest") return cmd_manifest(argc, argv);
  if (command == "cache") return drun::cli::write_requested_metrics(command, drun::cli::cmd_cache(argc, argv));
  if (command == "fetch") return drun::cli::write_requested_metrics(command, drun::cli::cmd_fetch(argc, argv));
  if (command == "serve") return drun::cli::cmd_serve(argc, argv);
  if (command == "push") return drun::cli::cmd_push(argc, argv);
  if (command == "token") return drun::cli::cmd_token(argc, argv);
  if (command == "audit") return drun::cli::cmd_audit(argc, argv);
  if (command == "help" || command == "--help" || command == "-h") {
    print_usage(stdout);
    return exit_ok;
  }
  if (command == "version" || command == "--version") {
    fmt::print("drun {}.{}.{}\n", DRUN_VERSION_MAJOR, DRUN_VERSION_MINOR, DRUN_VERSION_PATCH);
    return exit_ok;
  }
  fmt::print(stderr, "drun: unknown command \"{}\"\n", command);
  print_usage(stderr);
  return exit_usage;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(stderr);
    return exit_usage;
  }
  std::string command = argv[1];
  try {
    // Logging and audit options may come before the command too ("drun --log-format json fetch").
    auto g = drun::cli::take_global_options(argc, argv);
    if (argc < 2) {
      print_usage(stderr);
      return exit_usage;
    }
    command = argv[1];
    drun::configure_logging(g.log);
    std::shared_ptr<drun::audit_log> audit;
    if (!g.audit.file.empty()) {
      if (command != "verify" && command != "fetch" && command != "serve" && command != "cache")
        throw drun::cli::usage_error{"--audit-log is for verify, fetch, serve and the cache commands"};
      auto opened = drun::cli::open_audit_log(g);
      if (!opened) return fail(command, opened.error());
      audit = std::move(*opened);
      if (!g.audit.key)
        diag(drun::log_level::warning, command,
             "WARNING: --audit-log without --audit-key: the records chain, but no signed checkpoint shows a rewrite");
      drun::set_audit_log(audit);
    }
    // The closing checkpoint, on every way out (an exception included): a log that ends without
    // one was cut short, or its writer killed.
    struct close_audit {
      std::shared_ptr<drun::audit_log>& log;
      const std::string& command;
      int* status;
      ~close_audit() {
        if (!log) return;
        drun::set_audit_log(nullptr);
        if (auto r = log->close(); !r) {
          diag(drun::log_level::error, command, fmt::format("--audit-log: {}", r.error().message()));
          if (status && *status == exit_ok) *status = exit_io;
        }
      }
    };
    int status = exit_io;
    {
      close_audit closing{audit, command, &status};
      status = run(command, argc, argv);
    }
    return status;
  } catch (const drun::cli::usage_error& e) {
    diag(drun::log_level::error, command, e.message);
    return exit_usage;
  } catch (const std::exception& e) {
    diag(drun::log_level::error, command, fmt::format("internal error: {}", e.what()));
    return exit_io;
  }
}

// `drun token ...`: mint EdDSA tokens for peers (bound to the holder's certificate, or explicitly
// bearer), publish the JWKS that verifies them, and check a token (from stdin, never from the
// command line, where other users can read it in ps).
#include "common.hpp"

#include <fmt/chrono.h>

#include <ctime>
#include <iostream>
#include <iterator>

namespace drun::cli {
namespace {


// "90", "90s", "15m", "2h": a duration in whole seconds.
std::chrono::seconds parse_duration(const std::string& text, const char* what) {
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  std::string_view suffix(p, static_cast<std::size_t>(text.data() + text.size() - p));
  std::uint64_t scale = suffix == "" || suffix == "s" ? 1 : suffix == "m" ? 60 : suffix == "h" ? 3600 : 0;
  if (ec != std::errc() || p == text.data() || scale == 0 || v > 1'000'000'000 / scale)
    throw usage_error{fmt::format("{} \"{}\" is not a duration (e.g. 90s, 15m, 2h)", what, text)};
  return std::chrono::seconds(static_cast<std::int64_t>(v * scale));
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

int token_issue(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3,
                         {{"key", true}, {"subject", true}, {"audience", true}, {"artifact", true, true},
                          {"ttl", true}, {"issuer", true}, {"bind-cert", true}, {"unbound", false}});
  if (!args.positional.empty()) throw usage_error{"token issue takes no positional arguments"};
  auto key_path = args.get("key");
  if (!key_path) throw usage_error{"--key KEY (an Ed25519 private key) is required"};
  drun::token_request req;
  req.subject = args.get("subject").value_or("");
  req.audience = args.get("audience").value_or("");
  if (req.subject.empty()) throw usage_error{"--subject S is required"};
  if (req.audience.empty()) throw usage_error{"--audience A is required"};
  req.artifacts = args.all("artifact");
  // A token always says what it grants; "*" is an explicit choice, never a default.
  if (req.artifacts.empty()) throw usage_error{"give at least one --artifact ID (or --artifact '*' for all)"};
  // Bound or bearer is an explicit choice too: a bearer token can be replayed by every peer it
  // is sent to, and the holder's certificate is what makes it worthless to them.
  auto bind_cert = args.get("bind-cert");
  if (bind_cert.has_value() == args.has("unbound"))
    throw usage_error{"give --bind-cert CERT.pem (the holder's TLS client certificate: the token is usable only "
                      "with it) or --unbound (a bearer token: whoever holds it can use it)"};
  if (auto t = args.get("ttl")) req.ttl = parse_duration(*t, "--ttl");
  if (auto i = args.get("issuer")) req.issuer = *i;
  if (bind_cert) {
    auto thumb = drun::certificate_thumbprint(std::filesystem::path(*bind_cert));
    if (!thumb) return fail("token issue", thumb.error());
    req.certificate_thumbprint = std::move(*thumb);
  }
  auto key = drun::private_key::load(*key_path);
  if (!key) return fail("token issue", key.error());
  auto token = drun::issue_token(*key, req);
  if (!token) return fail("token issue", token.error());
  fmt::print("{}\n", *token);
  return exit_ok;
}

int token_jwks(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3, {{"public-key", true}});
  if (!args.positional.empty()) throw usage_error{"token jwks takes no positional arguments"};
  auto pub_path = args.get("public-key");
  if (!pub_path) throw usage_error{"--public-key PEM is required"};
  auto key = drun::public_key::load(*pub_path);
  if (!key) return fail("token jwks", key.error());
  auto set = drun::jwks_for(*key);
  if (!set) return fail("token jwks", set.error());
  fmt::print("{}", *set);
  return exit_ok;
}

int token_verify(int argc, char** argv) {
  auto args = parse_args(argc, argv, 3,
                         {{"jwks", true}, {"audience", true}, {"clock-skew", true}, {"issuer", true}, {"cert", true},
                          {"require-bound", false}});
  if (!args.positional.empty())
    throw usage_error{"token verify reads the token from stdin; it takes no positional arguments"};
  auto jwks_path = args.get("jwks");
  if (!jwks_path) throw usage_error{"--jwks FILE is required"};
  auto audience = args.get("audience");
  if (!audience || audience->empty()) throw usage_error{"--audience A is required"};
  drun::token_check check;
  check.audience = *audience;
  if (auto s = args.get("clock-skew")) check.clock_skew = parse_duration(*s, "--clock-skew");
  if (auto i = args.get("issuer")) {
    if (i->empty()) throw usage_error{"--issuer needs a value"};
    check.issuer = *i;
  }
  check.require_binding = args.has("require-bound");
  // --cert: the certificate the token would be presented with (a bound token needs it).
  if (auto c = args.get("cert")) {
    auto thumb = drun::certificate_thumbprint(std::filesystem::path(*c));
    if (!thumb) return fail("token verify", thumb.error());
    check.certificate_thumbprint = std::move(*thumb);
  }
  auto keys = drun::jwks::load(*jwks_path);
  if (!keys) return fail("token verify", keys.error());
  // Read a little past the limit so an oversized token is refused by the library, with its reason.
  std::string token;
  char buf[4096];
  while (token.size() <= drun::max_token_size + 2 && std::cin.read(buf, sizeof buf).gcount() > 0)
    token.append(buf, static_cast<std::size_t>(std::cin.gcount()));
  while (!token.empty() && (token.back() == '\n' || token.back() == '\r' || token.back() == ' ')) token.pop_back();
  if (token.empty()) throw usage_error{"no token on stdin"};
  auto claims = drun::verify_token(token, *keys, check);
  if (!claims) return fail("token verify", claims.error());
  fmt::print("subject:   {}\n", claims->subject);
  if (!claims->issuer.empty()) fmt::print("issuer:    {}\n", claims->issuer);
  fmt::print("audience:  {}\n", join(claims->audience));
  fmt::print("expires:   {:%Y-%m-%dT%H:%M:%SZ}\n", fmt::gmtime(std::chrono::system_clock::to_time_t(claims->expires)));
  if (!claims->artifacts.empty()) fmt::print("artifacts: {}\n", join(claims->artifacts));
  fmt::print("bound to:  {}\n", claims->certificate_thumbprint.empty()
                                     ? std::string("nothing (a bearer token)")
                                     : "the certificate with x5t#S256 " + claims->certificate_thumbprint);
  return exit_ok;
}

}  // namespace

int cmd_token(int argc, char** argv) {
  std::string sub = argc > 2 ? argv[2] : "";
  if (sub == "issue") return token_issue(argc, argv);
  if (sub == "jwks") return token_jwks(argc, argv);
  if (sub == "verify") return token_verify(argc, argv);
  throw usage_error{sub.empty() ? "token needs a subcommand: issue, jwks or verify"
                                : fmt::format("unknown token subcommand \"{}\" (issue, jwks, verify)", sub)};
}

}  // namespace drun::cli

// Access policies: every matcher kind, how certificate and token roles combine (intersection by
// default, union on request), the token rules (issuer, binding), publishers by key and by CA
// (with real signed bundles), the token narrowing rule, the no-policy default, and strict parsing.
#include <drun/policy.hpp>
#include <drun/sign.hpp>
#include <drun/verify.hpp>

#include "support.hpp"

#include <nlohmann/json.hpp>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <atomic>
#include <thread>

using namespace drun;
using json = nlohmann::json;
using test::temp_dir;
using test::write_file;

namespace {

const std::string id_x(64, 'a');
const std::string id_y(64, 'b');

struct signed_model {
  std::string bundle;
  std::string id;
};

signed_model sign_model(const std::filesystem::path& dir, const private_key& key, unsigned seed,
                        const certificate_chain* chain = nullptr) {
  write_file(dir / "weights.bin", test::pattern(9000, seed));
  write_file(dir / "config.json", R"({"layers": 2})");
  manifest_options opts;
  opts.piece_size = 4096;
  auto m = build_manifest(dir, opts);
  REQUIRE(m);
  auto b = sign_manifest(*m, key, chain);
  REQUIRE(b);
  auto s = inspect_bundle(*b);
  REQUIRE(s);
  return {*b, s->artifact_id};
}

peer_identity cert_caller(std::string subject, std::vector<std::string> uris = {}, std::vector<std::string> dns = {}) {
  peer_identity who;
  who.has_certificate = true;
  who.subject = std::move(subject);
  who.uris = std::move(uris);
  who.dns = std::move(dns);
  return who;
}

token_claims token(std::string sub, std::map<std::string, std::vector<std::string>> claims = {},
                   std::vector<std::string> artifacts = {}) {
  token_claims t;
  t.subject = sub;
  t.claims = std::move(claims);
  t.claims["sub"] = {sub};
  if (!artifacts.empty()) t.claims["drun_artifacts"] = artifacts;
  t.artifacts = std::move(artifacts);
  return t;
}

peer_identity token_caller(token_claims t) {
  peer_identity who;
  who.token = std::move(t);
  return who;
}

void denied(const result<void>& r, const std::string& who, const std::string& id, const std::string& why = {}) {
  REQUIRE_FALSE(r.has_value());
  CAPTURE(r.error().message());
  CHECK(r.error().code() == errc::permission_denied);
  CHECK(r.error().message().find(who) != std::string::npos);
  CHECK(r.error().message().find(id) != std::string::npos);
  if (!why.empty()) CHECK(r.error().message().find(why) != std::string::npos);
}

// A policy with every matcher kind and role kind; the publisher key lives at keys/publisher.pub.
struct fixture {
  temp_dir d;
  private_key publisher = std::move(private_key::generate(key_type::ed25519)).value();
  private_key stranger = std::move(private_key::generate(key_type::ecdsa_p256)).value();
  signed_model published, foreign;

  fixture() {
    std::filesystem::create_directories(d / "keys");
    REQUIRE(save_public_key(publisher.public_key(), d / "keys/publisher.pub"));
    published = sign_model(d / "m1", publisher, 1);
    foreign = sign_model(d / "m2", stranger, 2);
  }

  // The policy below with `head` (e.g. R"("combine": "union",)") added at its top level.
  std::string text(const std::string& head = "") const {
    std::string t = R"({ HEAD
      "roles": {
        "reader":  { "artifacts": ["ID_X"] },
        "other":   { "artifacts": ["ID_Y"] },
        "team-ml": { "publishers": [ { "public_key": "keys/publisher.pub" } ] },
        "admin":   { "all": true }
      },
      "bindings": [
        { "certificate": { "subject": "CN=node-1,O=ml" },                  "roles": ["reader"] },
        { "certificate": { "uri": "spiffe://cluster/ns/ml/sa/loader" },   "roles": ["team-ml"] },
        { "certificate": { "uri_prefix": "spiffe://cluster/ns/ops/" },     "roles": ["other"] },
        { "certificate": { "dns": "node-2.ml.svc" },                       "roles": ["reader"] },
        { "certificate": { "subject": "CN=both", "dns": "both.svc" },      "roles": ["admin"] },
        { "token": { "subject": "system:serviceaccount:ml:loader",
                     "claims": { "team": "ml" } },                         "roles": ["team-ml"] },
        { "token": { "claims": { "groups": "ops", "level": 3 } },          "roles": ["other"] },
        { "token": { "subject": "root" },                                  "roles": ["admin"] }
      ]
    })";
    t.replace(t.find("HEAD"), 4, head);
    t.replace(t.find("ID_X"), 4, id_x);
    t.replace(t.find("ID_Y"), 4, id_y);
    return t;
  }

  access_policy policy(const std::string& head = "") const {
    auto p = access_policy::parse(text(head), d.path());
    REQUIRE(p);
    return std::move(p).value();
  }
};

}  // namespace

TEST_CASE("certificate matchers: subject, uri, uri_prefix, dns, and all named fields together") {
  fixture f;
  auto p = f.policy();
  auto node1 = cert_caller("CN=node-1,O=ml");
  CHECK(p.authorize(node1, id_x, ""));
  denied(p.authorize(node1, id_y, ""), "CN=node-1,O=ml", id_y, "none of its roles (reader)");
  denied(p.authorize(cert_caller("CN=node-1,O=ml2"), id_x, ""), "CN=node-1,O=ml2", id_x, "no binding");

  auto loader = cert_caller("CN=loader", {"spiffe://cluster/ns/ml/sa/loader"});
  CHECK(p.authorize(loader, f.published.id, f.published.bundle));
  denied(p.authorize(loader, f.foreign.id, f.foreign.bundle), "spiffe://cluster/ns/ml/sa/loader", f.foreign.id);
  denied(p.authorize(cert_caller("CN=x", {"spiffe://cluster/ns/ml/sa/loader2"}), f.published.id, f.published.bundle),
         "spiffe://cluster/ns/ml/sa/loader2", f.published.id, "no binding");

  CHECK(p.authorize(cert_caller("", {"spiffe://cluster/ns/ops/sa/x"}), id_y, ""));
  auto lookalike = cert_caller("", {"spiffe://cluster/ns/opsx/sa/x"});
  denied(p.authorize(lookalike, id_y, ""), "spiffe://cluster/ns/opsx/sa/x", id_y);

  CHECK(p.authorize(cert_caller("CN=n2", {}, {"other.svc", "NODE-2.ml.svc"}), id_x, ""));  // DNS ignores case
  denied(p.authorize(cert_caller("CN=n2", {}, {"node-3.ml.svc"}), id_x, ""), "CN=n2", id_x);

  // A binding naming subject and dns needs both.
  CHECK(p.authorize(cert_caller("CN=both", {}, {"both.svc"}), id_y, ""));
  denied(p.authorize(cert_caller("CN=both"), id_y, ""), "CN=both", id_y);
  denied(p.authorize(cert_caller("CN=other", {}, {"both.svc"}), id_y, ""), "CN=other", id_y);

  // Certificate bindings count only for a certificate the handshake verified.
  auto fake = node1;
  fake.has_certificate = false;
  denied(p.authorize(fake, id_x, ""), "CN=node-1,O=ml", id_x);
}

TEST_CASE("token matchers: subject, claims (arrays, numbers), all fields together") {
  fixture f;
  auto p = f.policy();
  auto loader = token_caller(token("system:serviceaccount:ml:loader", {{"team", {"ml"}}}));
  CHECK(p.authorize(loader, f.published.id, f.published.bundle));
  CHECK(loader.display() == "token:system:serviceaccount:ml:loader");
  // Same subject, wrong claim value; same claim, other subject.
  denied(p.authorize(token_caller(token("system:serviceaccount:ml:loader", {{"team", {"ops"}}})), f.published.id,
                     f.published.bundle),
         "token:system:serviceaccount:ml:loader", f.published.id, "no binding");
  denied(p.authorize(token_caller(token("someone", {{"team", {"ml"}}})), f.published.id, f.published.bundle),
         "token:someone", f.published.id);

  // "groups" is an array in the token: holding "ops" is enough. "level" must be 3 (a number).
  CHECK(p.authorize(token_caller(token("x", {{"groups", {"dev", "ops"}}, {"level", {"3"}}})), id_y, ""));
  denied(p.authorize(token_caller(token("x", {{"groups", {"dev"}}, {"level", {"3"}}})), id_y, ""), "token:x", id_y);
  denied(p.authorize(token_caller(token("x", {{"groups", {"ops"}}})), id_y, ""), "token:x", id_y);

  CHECK(p.authorize(token_caller(token("root")), id_x, ""));
  CHECK(p.authorize(token_caller(token("root")), f.foreign.id, f.foreign.bundle));
  // Token bindings never match a certificate's subject, and the other way round.
  denied(p.authorize(cert_caller("root"), id_x, ""), "root", id_x);
}

TEST_CASE("certificate and token: intersection by default, each must grant the artifact") {
  fixture f;
  auto p = f.policy();
  auto intersection = f.policy(R"("combine": "intersection",)");
  for (const auto* pol : {&p, &intersection}) {
    // node-1's certificate: reader (id_x). The loader's token: team-ml (the publisher's).
    auto who = cert_caller("CN=node-1,O=ml");
    who.token = token("system:serviceaccount:ml:loader", {{"team", {"ml"}}});
    auto r = pol->authorize(who, id_x, "");
    denied(r, "CN=node-1,O=ml", id_x, "none of its token's roles (team-ml) grants this artifact");
    CHECK(r.error().message().find("\"combine\": \"intersection\"") != std::string::npos);
    denied(pol->authorize(who, f.published.id, f.published.bundle), "CN=node-1,O=ml", f.published.id,
           "none of its certificate's roles (reader) grants this artifact");
    // Both grant it: allowed. CN=both is admin; root's token is admin.
    auto both = cert_caller("CN=both", {}, {"both.svc"});
    both.token = token("root");
    CHECK(pol->authorize(both, id_y, ""));
    // A loader certificate and a loader token both grant the publisher's artifact.
    auto loader = cert_caller("CN=l", {"spiffe://cluster/ns/ml/sa/loader"});
    loader.token = token("system:serviceaccount:ml:loader", {{"team", {"ml"}}});
    CHECK(pol->authorize(loader, f.published.id, f.published.bundle));
    denied(pol->authorize(loader, f.foreign.id, f.foreign.bundle), "spiffe://cluster/ns/ml/sa/loader", f.foreign.id,
           "none of its certificate's roles (team-ml)");
    // A token that matches no binding grants nothing, so the pair grants nothing: a token
    // presented with an admin's certificate can only narrow.
    auto admin = cert_caller("CN=both", {}, {"both.svc"});
    admin.token = token("nobody");
    denied(pol->authorize(admin, id_x, ""), "CN=both", id_x, "no binding of the access policy matches its token");
    // A certificate that matches no binding, with an admin token (a replayed one, say): nothing.
    auto stranger = cert_caller("CN=stranger");
    stranger.token = token("root");
    denied(pol->authorize(stranger, id_x, ""), "CN=stranger", id_x,
           "no binding of the access policy matches its certificate");
    auto nobody = cert_caller("CN=stranger");
    nobody.token = token("nobody");
    denied(pol->authorize(nobody, id_x, ""), "CN=stranger", id_x, "no binding of the access policy matches the caller");
    // One credential alone: its own roles.
    CHECK(pol->authorize(cert_caller("CN=node-1,O=ml"), id_x, ""));
    CHECK(pol->authorize(token_caller(token("root")), id_x, ""));
    denied(pol->authorize(token_caller(token("system:serviceaccount:ml:loader", {{"team", {"ml"}}})), id_x, ""),
           "token:system:serviceaccount:ml:loader", id_x, "none of its roles (team-ml)");
  }
}

TEST_CASE("certificate and token: \"combine\": \"union\" adds the roles up, and then wants bound tokens") {
  fixture f;
  auto p = f.policy(R"("combine": "union", "tokens": {"require_binding": false},)");
  auto who = cert_caller("CN=node-1,O=ml");                                // reader: id_x
  who.token = token("system:serviceaccount:ml:loader", {{"team", {"ml"}}});  // team-ml: the publisher's
  CHECK(p.authorize(who, id_x, ""));
  CHECK(p.authorize(who, f.published.id, f.published.bundle));
  auto r = p.authorize(who, id_y, "");
  denied(r, "CN=node-1,O=ml", id_y);
  CHECK(r.error().message().find("none of its roles (reader, team-ml)") != std::string::npos);
  // A certificate that matches nothing still gets the token's roles: what a replayed bearer
  // token would give, which is why union requires bound tokens unless told otherwise.
  auto stranger = cert_caller("CN=stranger");
  stranger.token = token("root");
  CHECK(p.authorize(stranger, id_x, ""));

  auto strict = f.policy(R"("combine": "union",)");
  denied(strict.authorize(stranger, id_x, ""), "CN=stranger", id_x,
         "its token is not bound to a certificate (no cnf \"x5t#S256\"), and the policy requires bound tokens "
         "(\"combine\": \"union\" requires them");
  // Bound to the certificate it comes with: the union applies.
  stranger.certificate_thumbprint = std::string(43, 'S');
  stranger.token->certificate_thumbprint = stranger.certificate_thumbprint;
  CHECK(strict.authorize(stranger, id_x, ""));
  // A certificate alone needs no token rule.
  CHECK(strict.authorize(cert_caller("CN=node-1,O=ml"), id_x, ""));
  denied(f.policy(R"("combine": "union", "tokens": {"require_binding": true},)").authorize(who, id_x, ""),
         "CN=node-1,O=ml", id_x, "requires bound tokens");
}

TEST_CASE("tokens.issuer: the token's iss must be the one the policy names") {
  fixture f;
  auto p = f.policy(R"("tokens": {"issuer": "https://issuer.example"},)");
  auto with_iss = [](std::string iss) {
    auto t = token("root");
    t.issuer = iss;
    if (!iss.empty()) t.claims["iss"] = {iss};
    return token_caller(std::move(t));
  };
  CHECK(p.authorize(with_iss("https://issuer.example"), id_x, ""));
  denied(p.authorize(with_iss("https://evil.example"), id_x, ""), "token:root", id_x,
         "its token's issuer \"https://evil.example\" is not \"https://issuer.example\", the one the policy names");
  denied(p.authorize(with_iss(""), id_x, ""), "token:root", id_x,
         "its token has no issuer (\"iss\"); the policy requires \"https://issuer.example\"");
  // With a certificate too (intersection: admin and admin), the issuer still counts.
  auto both = with_iss("https://evil.example");
  both.has_certificate = true;
  both.subject = "CN=both";
  both.dns = {"both.svc"};
  denied(p.authorize(both, id_x, ""), "CN=both", id_x, "is not \"https://issuer.example\"");
  both.token->issuer = "https://issuer.example";
  CHECK(p.authorize(both, id_x, ""));
  // A certificate caller without a token is not asked for one.
  CHECK(p.authorize(cert_caller("CN=node-1,O=ml"), id_x, ""));
  // Without tokens.issuer, any issuer the key set vouches for.
  CHECK(f.policy().authorize(with_iss("https://evil.example"), id_x, ""));
}

TEST_CASE("tokens.require_binding, and a bound token naming another certificate") {
  fixture f;
  auto p = f.policy(R"("tokens": {"require_binding": true},)");
  auto root = token_caller(token("root"));
  denied(p.authorize(root, id_x, ""), "token:root", id_x, "its token is not bound to a certificate");
  // Bound to the caller's certificate (CN=both, admin): allowed.
  auto bound = cert_caller("CN=both", {}, {"both.svc"});
  bound.certificate_thumbprint = std::string(43, 'A');
  bound.token = token("root");
  bound.token->certificate_thumbprint = std::string(43, 'A');
  CHECK(p.authorize(bound, id_x, ""));
  // Bound to another one: denied by every policy, the no-policy default included.
  auto replayed = bound;
  replayed.certificate_thumbprint = std::string(43, 'B');
  for (const auto& pol : {f.policy(), f.policy(R"("combine": "union",)"), access_policy::authenticated_callers()})
    denied(pol.authorize(replayed, id_x, ""), "CN=both", id_x, "its token is bound to another certificate");
  auto no_cert = token_caller(*bound.token);
  denied(access_policy::authenticated_callers().authorize(no_cert, id_x, ""), "token:root", id_x,
         "bound to another certificate");
  // Intersection's default: unbound tokens are accepted (they can only narrow a certificate).
  CHECK(f.policy().authorize(root, id_x, ""));
}
TEST_CASE("publishers: by public key, the bundle must be the artifact's own, results are cached") {
  fixture f;
  auto p = f.policy();
  auto loader = cert_caller("CN=l", {"spiffe://cluster/ns/ml/sa/loader"});
  CHECK(p.authorize(loader, f.published.id, f.published.bundle));
  // The publisher's bundle offered for another artifact id proves nothing about that artifact.
  denied(p.authorize(loader, id_y, f.published.bundle), "spiffe://cluster/ns/ml/sa/loader", id_y);
  // No bundle yet (an artifact the server does not hold): refused, and not remembered, so the
  // artifact is allowed once its bundle is there.
  auto later = f.policy();
  denied(later.authorize(loader, f.published.id, ""), "spiffe", f.published.id);
  CHECK(later.authorize(loader, f.published.id, f.published.bundle));
  // A bundle that is not one, for an id not checked before.
  denied(p.authorize(loader, std::string(64, 'c'), "not a bundle"), "spiffe", std::string(64, 'c'));
  // Cached per artifact: asking again (even with another text) gives the same answer without verifying.
  CHECK(p.authorize(loader, f.published.id, f.published.bundle));
  CHECK(p.authorize(loader, f.published.id, "ignored: cached"));
  denied(p.authorize(loader, f.foreign.id, f.foreign.bundle), "spiffe", f.foreign.id);

  // Many threads at once against a fresh policy: same answers.
  auto fresh = f.policy();
  std::atomic<int> allowed{0}, refused{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&] {
      for (int k = 0; k < 20; ++k) {
        if (fresh.authorize(loader, f.published.id, f.published.bundle)) ++allowed;
        if (!fresh.authorize(loader, f.foreign.id, f.foreign.bundle)) ++refused;
      }
    });
  for (auto& t : threads) t.join();
  CHECK(allowed == 160);
  CHECK(refused == 160);
}

TEST_CASE("a token's drun_artifacts claim narrows, never widens") {
  fixture f;
  auto p = f.policy();
  // root has admin (everything); its token grants only id_x.
  CHECK(p.authorize(token_caller(token("root", {}, {id_x})), id_x, ""));
  denied(p.authorize(token_caller(token("root", {}, {id_x})), id_y, ""), "token:root", id_y, "drun_artifacts");
  CHECK(p.authorize(token_caller(token("root", {}, {"*"})), id_y, ""));
  CHECK(p.authorize(token_caller(token("root")), id_y, ""));  // no claim: no narrowing
  // A claim that is present but empty narrows to nothing.
  auto empty = token("root");
  empty.claims["drun_artifacts"] = {};
  denied(p.authorize(token_caller(empty), id_y, ""), "token:root", id_y, "drun_artifacts");
  // A token granting id_y does not widen what node-1's certificate (reader: id_x) allows, under
  // union either.
  auto u = f.policy(R"("combine": "union", "tokens": {"require_binding": false},)");
  auto who = cert_caller("CN=node-1,O=ml");
  who.token = token("nobody", {}, {id_y, "*"});
  denied(u.authorize(who, id_y, ""), "CN=node-1,O=ml", id_y, "none of its roles");
  denied(p.authorize(who, id_y, ""), "CN=node-1,O=ml", id_y, "none of its certificate's roles (reader)");
  who.token = token("nobody", {}, {id_x});  // the certificate grants id_x; the token matches no binding
  denied(p.authorize(who, id_x, ""), "CN=node-1,O=ml", id_x, "no binding of the access policy matches its token");
  // And it narrows a certificate caller's roles too.
  auto narrowed = cert_caller("CN=both", {}, {"both.svc"});
  narrowed.token = token("nobody", {}, {id_x});
  CHECK(u.authorize(narrowed, id_x, ""));
  denied(u.authorize(narrowed, id_y, ""), "CN=both", id_y, "drun_artifacts");
  narrowed.token = token("root", {}, {id_x});  // under intersection, a token with roles of its own
  CHECK(p.authorize(narrowed, id_x, ""));
  denied(p.authorize(narrowed, id_y, ""), "CN=both", id_y, "drun_artifacts");
}

TEST_CASE("authenticated_callers: certificates read everything, tokens what they grant") {
  auto p = access_policy::authenticated_callers();
  CHECK(p.authorize(cert_caller("CN=anyone"), id_x, ""));
  CHECK(p.authorize(cert_caller("", {"spiffe://c/x"}), id_y, ""));
  CHECK(p.authorize(token_caller(token("t", {}, {id_x})), id_x, ""));
  denied(p.authorize(token_caller(token("t", {}, {id_x})), id_y, ""), "token:t", id_y, "drun_artifacts");
  CHECK(p.authorize(token_caller(token("t", {}, {"*"})), id_y, ""));
  denied(p.authorize(token_caller(token("t")), id_x, ""), "token:t", id_x, "no drun_artifacts claim");
  denied(p.authorize(peer_identity{}, id_x, ""), "anonymous", id_x, "neither a certificate nor a token");
  auto both = cert_caller("CN=a");
  both.token = token("t", {}, {id_x});
  denied(p.authorize(both, id_y, ""), "CN=a", id_y, "drun_artifacts");
  both.token = token("t");
  CHECK(p.authorize(both, id_y, ""));
  // Something that is not an artifact id is refused, whoever asks.
  denied(p.authorize(cert_caller("CN=a"), "../../etc/passwd", ""), "CN=a", "../../etc/passwd", "not an artifact id");
}

TEST_CASE("peer_identity::display") {
  CHECK(cert_caller("CN=a", {"https://x", "spiffe://c/ns/a"}).display() == "spiffe://c/ns/a");
  CHECK(cert_caller("CN=a", {"https://x"}).display() == "https://x");
  CHECK(cert_caller("CN=a").display() == "CN=a");
  CHECK(cert_caller("", {}, {"n.svc"}).display() == "dns:n.svc");
  auto t = token_caller(token("sa"));
  CHECK(t.display() == "token:sa");
  t.subject = "CN=b";  // a certificate subject wins over the token
  CHECK(t.display() == "CN=b");
  CHECK(peer_identity{}.display() == "anonymous");
}

TEST_CASE("load() reads publisher paths relative to the policy file") {
  fixture f;
  write_file(f.d / "policy.json", f.text());
  auto p = access_policy::load(f.d / "policy.json");
  REQUIRE(p);
  CHECK(p->authorize(cert_caller("", {"spiffe://cluster/ns/ml/sa/loader"}), f.published.id, f.published.bundle));
  CHECK(test::error_of(access_policy::load(f.d / "absent.json")).code() == errc::not_found);
  write_file(f.d / "typo.json", R"({"roles": {}, "bindings": [], "rules": []})");
  auto typo = access_policy::load(f.d / "typo.json");
  CHECK(test::error_of(typo).message().find("typo.json: policy top level: unknown field \"rules\"") !=
        std::string::npos);
  std::filesystem::remove(f.d / "keys/publisher.pub");
  auto no_key = access_policy::load(f.d / "policy.json");
  CHECK(test::error_of(no_key).code() == errc::not_found);
  CHECK(no_key.error().message().find("keys/publisher.pub") != std::string::npos);
  CHECK(no_key.error().message().find("roles.team-ml.publishers[0]") != std::string::npos);
  // From elsewhere, the same relative path does not resolve.
  auto elsewhere = access_policy::parse(f.text(), f.d / "m1");
  CHECK(test::error_of(elsewhere).code() == errc::not_found);
  CHECK(elsewhere.error().message().find("roles.team-ml.publishers[0]") != std::string::npos);
}

TEST_CASE("malformed policies name what is wrong") {
  temp_dir d;
  auto fails = [&](const std::string& text, const std::string& fragment, errc code = errc::malformed_bundle) {
    CAPTURE(text);
    auto p = access_policy::parse(text, d.path());
    REQUIRE_FALSE(p);
    CAPTURE(p.error().message());
    CHECK(p.error().code() == code);
    CHECK(p.error().message().find(fragment) != std::string::npos);
  };
  const std::string roles = R"("roles": {"r": {"all": true}})";
  CHECK(access_policy::parse("{" + roles + R"(, "bindings": []})", d.path()));

  fails("not json", "not valid JSON");
  fails("[]", "not a JSON object");
  fails(R"({"roles": {}})", "bindings");
  fails("{" + roles + R"(, "bindings": [], "binding": []})", "unknown field \"binding\"");
  fails(R"({"roles": {"r": {"all": true, "artefacts": []}}, "bindings": []})", "roles.r: unknown field \"artefacts\"");
  fails(R"({"roles": {"r": {"all": "yes"}}, "bindings": []})", "roles.r.all");
  fails(R"({"roles": {"r": {}}, "bindings": []})", "grants nothing");
  fails(R"({"roles": {"r": {"artifacts": ["ABC"]}}, "bindings": []})", "roles.r.artifacts[0] is not an artifact id");
  fails(R"({"roles": {"r": {"artifacts": [")" + std::string(64, 'A') + R"("]}}, "bindings": []})",
        "not an artifact id");
  fails(R"({"roles": {"r": {"artifacts": [")" + std::string(63, 'a') + R"("]}}, "bindings": []})",
        "not an artifact id");
  fails(R"({"roles": {"r": {"publishers": [{"public_key": "k.pub", "ca_bundle": "ca.pem"}]}}, "bindings": []})",
        "exactly one of \"public_key\", \"ca_bundle\" and \"trusted_root\"");
  fails(R"({"roles": {"r": {"publishers": [{"trusted_root": "root.json"}]}}, "bindings": []})", "identity");
  fails(R"({"roles": {"r": {"publishers": [{"key": "k.pub"}]}}, "bindings": []})", "unknown field \"key\"");
  fails(R"({"roles": {"r": {"publishers": [{"public_key": "absent.pub"}]}}, "bindings": []})", "absent.pub",
        errc::not_found);
  write_file(d / "junk.pub", "not a key");
  fails(R"({"roles": {"r": {"publishers": [{"public_key": "junk.pub"}]}}, "bindings": []})", "junk.pub",
        errc::key_error);
  fails(R"({"roles": {"r": {"publishers": [{"ca_bundle": "junk.pub"}]}}, "bindings": []})", "no PEM certificate",
        errc::key_error);

  auto with_binding = [&](const std::string& b) { return "{" + roles + R"(, "bindings": [)" + b + "]}"; };
  fails(with_binding(R"({"certificate": {"subject": "CN=a"}, "roles": ["nope"]})"),
        "bindings[0] names an undefined role \"nope\"");
  fails(with_binding(R"({"certificate": {}, "roles": ["r"]})"), "bindings[0].certificate names no matcher");
  fails(with_binding(R"({"token": {}, "roles": ["r"]})"), "bindings[0].token names no matcher");
  fails(with_binding(R"({"token": {"claims": {}}, "roles": ["r"]})"), "names no matcher");
  fails(with_binding(R"({"roles": ["r"]})"), "exactly one of \"certificate\" and \"token\"");
  fails(with_binding(R"({"certificate": {"subject": "a"}, "token": {"subject": "b"}, "roles": ["r"]})"),
        "exactly one of");
  fails(with_binding(R"({"certificate": {"subject": "CN=a"}, "roles": []})"), "roles is empty");
  fails(with_binding(R"({"certificate": {"subject": "CN=a"}})"), "roles");
  fails(with_binding(R"({"certificate": {"subjct": "CN=a"}, "roles": ["r"]})"),
        "bindings[0].certificate: unknown field \"subjct\"");
  fails(with_binding(R"({"token": {"subject": "a", "issuer": "b"}, "roles": ["r"]})"), "unknown field \"issuer\"");
  fails(with_binding(R"({"certificate": {"subject": "CN=a"}, "roles": ["r"], "comment": "x"})"),
        "unknown field \"comment\"");
  fails(with_binding(R"({"certificate": {"uri_prefix": "spiffe://c/ns/ml"}, "roles": ["r"]})"),
        "must end with \"/\"");
  fails(with_binding(R"({"certificate": {"subject": ""}, "roles": ["r"]})"), "subject is empty");
  fails(with_binding(R"({"token": {"claims": {"groups": ["a"]}}, "roles": ["r"]})"), "claims.groups must be");
  fails(R"({"roles": {"r": {"all": true}, "r": {"all": true}}, "bindings": []})", "duplicate key");

  // combine and tokens.
  auto top = [&](const std::string& t) { return "{" + t + ", " + roles + R"(, "bindings": []})"; };
  CHECK(access_policy::parse(top(R"("combine": "union")"), d.path()));
  CHECK(access_policy::parse(top(R"("combine": "intersection", "tokens": {})"), d.path()));
  fails(top(R"("combine": "both")"), "combine is \"both\"; \"intersection\" or \"union\" expected");
  fails(top(R"("combine": "Union")"), "\"intersection\" or \"union\" expected");
  fails(top(R"("combine": true)"), "combine");
  fails(top(R"("combine": "")"), "combine is empty");
  fails(top(R"("tokens": [])"), "tokens");
  fails(top(R"("tokens": {"iss": "x"})"), "tokens: unknown field \"iss\"");
  fails(top(R"("tokens": {"issuer": ""})"), "issuer is empty");
  fails(top(R"("tokens": {"issuer": 5})"), "issuer");
  fails(top(R"("tokens": {"require_binding": "yes"})"), "require_binding");
}

// ---- publishers by CA: a real chain made here with OpenSSL ------------------------------------

namespace {

struct x509_deleter {
  void operator()(X509* c) const { X509_free(c); }
};
using x509 = std::unique_ptr<X509, x509_deleter>;
struct pkey_deleter {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using pkey = std::unique_ptr<EVP_PKEY, pkey_deleter>;

void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  REQUIRE(ext);
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

x509 make_cert(EVP_PKEY* subject_key, EVP_PKEY* issuer_key, X509* issuer, const char* cn, bool ca, long serial) {
  x509 c(X509_new());
  X509_set_version(c.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(c.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(c.get()), 86400);
  X509_set_pubkey(c.get(), subject_key);
  X509_NAME_add_entry_by_txt(X509_get_subject_name(c.get()), "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn), -1, -1, 0);
  X509* iss = issuer ? issuer : c.get();
  X509_set_issuer_name(c.get(), X509_get_subject_name(iss));
  add_ext(c.get(), iss, NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
  add_ext(c.get(), iss, NID_key_usage, ca ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature");
  if (!ca) add_ext(c.get(), iss, NID_ext_key_usage, "codeSigning");
  REQUIRE(X509_sign(c.get(), issuer_key, EVP_sha256()) > 0);
  return c;
}

void write_cert(const std::filesystem::path& file, X509* c) {
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(bio, c);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  write_file(file, std::string(data, static_cast<std::size_t>(len)));
  BIO_free(bio);
}

}  // namespace

TEST_CASE("publishers: by CA bundle, with a certificate-method bundle") {
  temp_dir d;
  pkey ca_key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  auto ca = make_cert(ca_key.get(), ca_key.get(), nullptr, "drun test release CA", true, 1);
  write_cert(d / "pki/release-ca.pem", ca.get());

  auto signer = private_key::generate(key_type::ecdsa_p256);
  REQUIRE(signer);
  auto pub_pem = signer->public_key().pem();
  BIO* bio = BIO_new_mem_buf(pub_pem.data(), static_cast<int>(pub_pem.size()));
  pkey signer_pub(PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr));
  BIO_free(bio);
  REQUIRE(signer_pub);
  auto leaf = make_cert(signer_pub.get(), ca_key.get(), ca.get(), "release signer", false, 2);
  write_cert(d / "leaf.pem", leaf.get());
  auto chain = certificate_chain::load(d / "leaf.pem");
  REQUIRE(chain);
  auto released = sign_model(d / "m", *signer, 5, &*chain);
  auto by_key = sign_model(d / "k", *signer, 6);  // same key, key method: no chain to the CA

  auto policy_for = [](const std::string& ca_path) {
    return R"({"roles": {"release": {"publishers": [{"ca_bundle": ")" + ca_path +
           R"("}]}}, "bindings": [{"certificate": {"dns": "node.svc"}, "roles": ["release"]}]})";
  };
  auto text = policy_for("pki/release-ca.pem");
  auto p = access_policy::parse(text, d.path());
  REQUIRE(p);
  auto who = cert_caller("CN=node", {}, {"node.svc"});
  CHECK(p->authorize(who, released.id, released.bundle));
  denied(p->authorize(who, by_key.id, by_key.bundle), "CN=node", by_key.id);

  // Another CA's bundle does not vouch for it.
  pkey other_key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  auto other = make_cert(other_key.get(), other_key.get(), nullptr, "other CA", true, 3);
  write_cert(d / "pki/other-ca.pem", other.get());
  auto text2 = policy_for((d / "pki/other-ca.pem").string());
  auto p2 = access_policy::parse(text2, "/nonexistent");  // an absolute path ignores base_dir
  REQUIRE(p2);
  denied(p2->authorize(who, released.id, released.bundle), "CN=node", released.id);
  ERR_clear_error();
}

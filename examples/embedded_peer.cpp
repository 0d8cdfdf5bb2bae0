// Embedding a peer: what an inference server does to share the models it holds with its
// neighbours, and to get a model from them. This process opens two stores (two "nodes"), serves
// the first over mutual TLS with peer_server (its own threads, stopped when it goes out of
// scope), and fetches an artifact into the second from that peer, by artifact id: the bundle
// comes from the peer too, and is verified against the publisher's key like every piece.
//
//   embedded_peer SEED_STORE LEECH_STORE KEY_SOURCE ARTIFACT_ID PUBLISHER_KEY CA CERT KEY
//   (CERT/KEY serve as both the server's and the client's identity, both issued by CA)
#include <drun/drun.hpp>

#include <cstdio>
#include <string>

namespace {

int fail(const char* what, const drun::error& e) {
  std::fprintf(stderr, "%s: %s\n", what, e.message().c_str());
  return e.code() == drun::errc::permission_denied ? 4 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s SEED_STORE LEECH_STORE KEY_SOURCE ARTIFACT_ID PUBLISHER_KEY CA CERT KEY\n", argv[0]);
    return 2;
  }
  const std::string artifact = argv[4], ca = argv[6], cert = argv[7], key = argv[8];
  auto open = [&](const char* dir) -> drun::result<drun::store> {
    auto k = drun::node_key::from_source(argv[3]);
    if (!k) return std::move(k).error();
    return drun::store::open(dir, std::move(k).value());
  };
  auto seed_store = open(argv[1]);
  if (!seed_store) return fail("seed store", seed_store.error());
  auto leech_store = open(argv[2]);
  if (!leech_store) return fail("leech store", leech_store.error());

  // 1. Serve the seed store: port 0 picks a free one; callers must hold a certificate from CA.
  drun::peer_server_options so;
  so.cert_file = cert;
  so.key_file = key;
  so.client_ca_file = ca;
  auto server = drun::peer_server::start(*seed_store, so);
  if (!server) return fail("serve", server.error());
  std::string address = "127.0.0.1:" + std::to_string(server->port());
  std::printf("seed peer serving on %s\n", address.c_str());

  // 2. The peer as a source: the bundle first, verified against the publisher's key.
  drun::peer_client_options po;
  po.ca_file = ca;
  po.cert_file = cert;
  po.key_file = key;
  auto peer = drun::make_peer_source(address, po);
  if (!peer) return fail("peer", peer.error());
  auto bundle = (*peer)->bundle(artifact);
  if (!bundle) return fail("bundle", bundle.error());
  auto publisher = drun::public_key::load(argv[5]);
  if (!publisher) return fail("publisher key", publisher.error());
  auto manifest = drun::verify_bundle(*bundle, drun::trust_store::from_public_key(*publisher));
  if (!manifest) return fail("bundle from the peer", manifest.error());

  // 3. Every piece from the peer, each checked against the signed digest before it is sealed.
  std::vector<std::unique_ptr<drun::source>> sources;
  sources.push_back(std::move(*peer));
  auto report = drun::fetch(*leech_store, *manifest, *bundle, sources);
  if (!report) return fail("fetch", report.error());
  auto stats = server->stats();
  std::printf("fetched %zu pieces (%.1f MiB) from the embedded peer; it served %llu pieces, denied %llu\n",
              report->fetched, static_cast<double>(report->bytes) / 1048576.0,
              static_cast<unsigned long long>(stats.pieces_served), static_cast<unsigned long long>(stats.denied));
  return 0;
}

// Uses the installed library through its public headers only: no OpenSSL, sodium or JSON headers
// are needed, which is the point of keeping dependencies private.
#include <drun/drun.hpp>

#include <cstdio>
#include <cstring>

int main() {
  auto d = drun::hash(drun::hash_algorithm::sha256, drun::as_bytes("abc"));
  if (d.hex() != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") return 1;
  auto key = drun::private_key::generate(drun::key_type::ed25519);
  if (!key) return 2;
  std::printf("consumer ok: %s, piece size for 2 GiB = %llu\n", d.hex().c_str(),
              static_cast<unsigned long long>(drun::default_piece_size(std::uint64_t{2} << 30)));
  return 0;
}

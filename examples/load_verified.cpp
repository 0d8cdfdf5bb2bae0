// Embedding drun: what an inference server does before it loads a model. Verify the bundle
// against the publisher's key, check the model on disk against it, then read one piece and
// check it on its own, as a fetcher does for every piece it receives.
//
//   load_verified MODEL_DIR SIGNATURE PUBLIC_KEY
#include <drun/drun.hpp>

#include <cstdio>
#include <fstream>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s MODEL_DIR SIGNATURE PUBLIC_KEY\n", argv[0]);
    return 2;
  }
  std::filesystem::path model = argv[1];
  auto key = drun::public_key::load(argv[3]);
  if (!key) return std::fprintf(stderr, "%s\n", key.error().message().c_str()), 2;
  auto bundle = drun::read_bundle_file(argv[2]);
  if (!bundle) return std::fprintf(stderr, "%s\n", bundle.error().message().c_str()), 3;

  // 1. Authenticate the manifest: only this makes a verified_manifest.
  auto manifest = drun::verify_bundle(*bundle, drun::trust_store::from_public_key(*key));
  if (!manifest) return std::fprintf(stderr, "refused: %s\n", manifest.error().message().c_str()), 1;
  std::printf("bundle verified: artifact %.16s..., %zu files, %zu pieces of %llu bytes\n",
              manifest->artifact_id().c_str(), manifest->files().size(), manifest->pieces().size(),
              static_cast<unsigned long long>(manifest->shard_size()));

  // 2. Compare the model on disk, every piece, in parallel.
  if (auto r = drun::verify_model(*manifest, model); !r)
    return std::fprintf(stderr, "refused: %s\n", r.error().message().c_str()), 1;
  std::printf("model verified on disk\n");

  // 3. The per-piece check: read the last piece of the largest file and check it alone.
  std::size_t largest = 0;
  for (std::size_t i = 0; i < manifest->files().size(); ++i)
    if (manifest->files()[i].size.value_or(0) > manifest->files()[largest].size.value_or(0)) largest = i;
  const auto& file = manifest->files()[largest];
  if (!file.size) return 0;  // files mode signs whole files only
  std::size_t index = file.first_piece + file.piece_count - 1;
  auto range = *manifest->pieces()[index].range;
  std::vector<std::byte> buf(range.size());
  std::ifstream in(model / file.name, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(range.begin));
  in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  // The piece takes the buffer: the verified bytes cannot change after the check.
  auto piece = manifest->check_piece(index, std::move(buf));
  if (!piece) return std::fprintf(stderr, "refused: %s\n", piece.error().message().c_str()), 1;
  std::printf("piece %zu (%s bytes [%llu, %llu)) verified on its own\n", piece->index(), file.name.c_str(),
              static_cast<unsigned long long>(range.begin), static_cast<unsigned long long>(range.end));
  return 0;
}

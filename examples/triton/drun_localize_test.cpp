// drun_localize_test REPOSITORY_DIR DESTINATION: what the Triton repository agent does on a model
// load, without Triton. Reads REPOSITORY_DIR/drun.json, localizes the model into DESTINATION and
// prints DESTINATION; on failure prints the error (step, file and cause) and exits 1.
#include "drun_localize.hpp"

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s REPOSITORY_DIR DESTINATION\n", argv[0]);
    return 2;
  }
  auto dest = drun_localize::localize(argv[1], argv[2]);
  if (!dest) {
    std::fprintf(stderr, "drun_localize_test: %s\n", dest.error().message().c_str());
    return 1;
  }
  std::printf("%s\n", dest->c_str());
  return 0;
}

// `drun push`: a signed model into an OCI registry, as an artifact that `drun fetch --origin
// oci://...` (and any OCI client) can pull.
#include "common.hpp"

#include <drun/registry.hpp>

namespace drun::cli {

int cmd_push(int argc, char** argv) {
  auto args = parse_args(argc, argv, 2,
                         {{"signature", true}, {"ca-cert", true}, {"tls-min", true}, {"insecure", false},
                          {"origin-cert", true}, {"origin-key", true}, {"registry-auth", true},
                          {"chunk-size", true}, {"local-address", true}});
  if (args.positional.size() != 2) throw usage_error{"push takes MODEL and oci://REGISTRY/REPOSITORY:TAG"};
  drun::push_options po;
  if (auto r = origin_options_from_args(args, po.source, "push"); !r) return fail("push", r.error());
  if (auto c = args.get("chunk-size")) {
    auto n = parse_size(*c, "--chunk-size");
    if (n < 4096 || n > (1ull << 30)) throw usage_error{"--chunk-size must be between 4096 and 1 GiB"};
    po.chunk_size = static_cast<std::size_t>(n);
  }
  if (auto s = args.get("signature")) po.signature = *s;
  progress_line progress("pushing");
  po.progress = progress.callback();
  auto report = drun::push_model(args.positional[0], args.positional[1], po);
  if (!report) return fail("push", report.error());
  diag(drun::log_level::info, "push",
       fmt::format("{} blobs uploaded ({} bytes, {} resumed chunks), {} already in the registry", report->blobs_uploaded,
                   report->bytes_uploaded, report->resumed, report->blobs_skipped));
  fmt::print("{}\n", report->reference);
  return exit_ok;
}

}  // namespace drun::cli

// drun-bench: see bench_transport.hpp for what it measures and how.
#include "bench_transport.hpp"

#include <fmt/format.h>

#include <cstdio>

int main(int argc, char** argv) {
  using namespace drun::bench;
  try {
    auto o = parse(argc, argv);
    if (o.server) {
      run_server(o);
    } else {
      std::fputs(format(run_client(o), o.gbits, o.json).c_str(), stdout);
    }
    return exit_ok;
  } catch (const failure& f) {
    fmt::print(stderr, "drun-bench: {}\n", f.message);
    return f.status;
  } catch (const usage_error& e) {
    fmt::print(stderr,
               "drun-bench: {}\n"
               "usage: drun-bench tcp|rdma --server [--port P] [--bind ADDR] --cert PEM --key PEM --ca PEM\n"
               "                           [--device DEV] [--ib-port N] [--gid-index N]\n"
               "       drun-bench tcp|rdma --client HOST [--port P] [--size BYTES] [--iters N] [--qps N]\n"
               "                           [--report-gbits] [--json] --cert PEM --key PEM --ca PEM\n"
               "                           [--device DEV] [--ib-port N] [--gid-index N]\n",
               e.message);
    return exit_usage;
  }
}

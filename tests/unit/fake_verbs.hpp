// A fake libibverbs for tests: an in-process fabric behind the same function table that dlopen
// fills. It checks what real hardware checks (QP states, the rkey and bounds of every remote
// write, the lkey of every local buffer, a posted receive for every message) and can be told to
// fail the way hardware fails: a completion error, a QP in the error state, a device removed,
// polls that return fewer completions than are ready, a registration or QP creation refused, a
// peer that stops answering, and a sender that breaks the protocol.
#pragma once

#include "transport/verbs.hpp"

#include <cstdint>
#include <functional>

namespace drun::test {

struct fake_knobs {
  int devices = 1;
  bool port_active = true;
  bool ethernet = false;        // RoCE: a GID is required
  int max_poll = 16;            // completions returned per poll_cq at most (1: partial completions)
  int fail_reg_mr = 0;          // the next N registrations fail (ENOMEM)
  int fail_create_qp = 0;       // the next N QP creations fail
  bool fail_rtr = false;        // modify_qp to RTR fails
  long fail_rtr_after = -1;     // after N more RTR transitions, one fails
  long fail_write_after = -1;   // after N more RDMA writes, one completes with write_error
  ibv_wc_status write_error = IBV_WC_REM_ACCESS_ERR;
  long drop_after = -1;         // after N more writes, writes vanish: no data, no completion
  bool device_removed = false;  // posts return ENODEV, polls -1
  long bad_imm_after = -1;      // after N more writes, one carries a wrong slice number
  long short_write_after = -1;  // after N more writes, one lands a byte short
  long corrupt_after = -1;      // after N more writes, one lands with a byte flipped
  long inflate_credit_after = -1;  // after N more credits, one reports far more than was sent
};

struct fake_counters {
  std::uint64_t reg_mr = 0, dereg_mr = 0, alloc_pd = 0, dealloc_pd = 0;
  std::uint64_t qps_created = 0, qps_destroyed = 0, cqs_created = 0, cqs_destroyed = 0;
  std::uint64_t writes = 0, write_bytes = 0, sends = 0, signalled_writes = 0;
  std::uint64_t cq_overruns = 0;   // completions pushed onto a full CQ (must stay 0)
  std::uint64_t recv_overruns = 0; // receives posted beyond max_recv_wr (must stay 0)
};

// The fabric is process-wide (a verbs table holds plain function pointers).
void set_knobs(const std::function<void(fake_knobs&)>& change);  // under the fabric's lock
fake_counters counters();
void reset_fake();                   // knobs to defaults, counters to 0 (objects stay)
// Moves every QP to the error state: posted receives complete with IBV_WC_WR_FLUSH_ERR.
void fail_all_qps();
// Every object created and not destroyed (0 after a clean teardown).
std::size_t live_objects();

const rdma::verbs_table& fake_verbs();

// Installs the fake for a test's scope and restores dlopen after.
struct fake_verbs_scope {
  fake_verbs_scope();
  ~fake_verbs_scope();
};

}  // namespace drun::test

// The fake verbs fabric (fake_verbs.hpp). Everything happens under one lock, synchronously:
// a write is copied into the remote region as it is posted, and its completions queued.
#include "fake_verbs.hpp"

#include "verbs_objects.hpp"

#include <arpa/inet.h>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>

namespace drun::test {
namespace {

struct fabric {
  std::mutex m;
  fake_knobs knobs;
  fake_counters n;
  fakes::verbs_objects o;
  ibv_device devs[2]{};
  ibv_device* list[3]{};
  bool dropping = false;  // drop_after came: every write vanishes
  fabric() {
    std::strcpy(devs[0].name, "fake0");
    std::strcpy(devs[1].name, "fake1");
  }
};
fabric& f() {
  static fabric fab;
  return fab;
}

// Decrements a countdown knob; true when it reaches its turn.
bool turn(long& k) {
  if (k < 0) return false;
  if (k == 0) {
    k = -1;
    return true;
  }
  --k;
  return false;
}

ibv_device** get_device_list(int* count) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  int n = std::min(fb.knobs.devices, 2);
  for (int i = 0; i < n; ++i) fb.list[i] = &fb.devs[i];
  fb.list[n] = nullptr;
  *count = n;
  return fb.list;
}
void free_device_list(ibv_device**) {}
const char* get_device_name(ibv_device* d) { return d->name; }
ibv_context* open_device(ibv_device* d) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.add_context(d);
}
int close_device(ibv_context* c) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.ctxs.erase(c) ? 0 : EINVAL;
}
int query_port(ibv_context*, std::uint8_t port, ibv_port_attr* a) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (port != 1) return EINVAL;
  std::memset(a, 0, sizeof *a);
  a->state = fb.knobs.port_active ? IBV_PORT_ACTIVE : IBV_PORT_DOWN;
  a->link_layer = fb.knobs.ethernet ? IBV_LINK_LAYER_ETHERNET : IBV_LINK_LAYER_INFINIBAND;
  a->lid = fb.knobs.ethernet ? 0 : 7;
  a->active_mtu = fb.knobs.ethernet ? IBV_MTU_1024 : IBV_MTU_4096;
  a->gid_tbl_len = 4;
  return 0;
}
int query_gid(ibv_context*, std::uint8_t, int index, ibv_gid* gid) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  std::memset(gid, 0, sizeof *gid);
  if (index == 0) {  // link-local
    gid->raw[0] = 0xfe, gid->raw[1] = 0x80, gid->raw[15] = 0x07;
  } else if (index == 2 && fb.knobs.ethernet) {  // RoCE v2, IPv4-mapped 10.0.0.7
    gid->raw[10] = 0xff, gid->raw[11] = 0xff, gid->raw[12] = 10, gid->raw[15] = 7;
  }
  return index < 4 ? 0 : EINVAL;
}
ibv_pd* alloc_pd(ibv_context* c) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.n.alloc_pd++;
  return fb.o.add_pd(c);
}
int dealloc_pd(ibv_pd* pd) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  int rc = fb.o.remove_pd(pd);
  if (rc == 0) fb.n.dealloc_pd++;
  return rc;
}
ibv_mr* reg_mr(ibv_pd* pd, void* addr, std::size_t len, int access) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (fb.knobs.fail_reg_mr > 0) {
    fb.knobs.fail_reg_mr--;
    errno = ENOMEM;
    return nullptr;
  }
  fb.n.reg_mr++;
  return fb.o.add_mr(pd, addr, len, access);
}
int dereg_mr(ibv_mr* mr) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.n.dereg_mr++;
  return fb.o.mrs.erase(mr) ? 0 : EINVAL;
}
ibv_cq* create_cq(ibv_context* c, int entries, void*, ibv_comp_channel*, int) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.n.cqs_created++;
  return fb.o.add_cq(c, entries);
}
int destroy_cq(ibv_cq* cq) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  int rc = fb.o.remove_cq(cq);
  if (rc == 0) fb.n.cqs_destroyed++;
  return rc;
}
ibv_qp* create_qp(ibv_pd* pd, ibv_qp_init_attr* a) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (fb.knobs.fail_create_qp > 0) {
    fb.knobs.fail_create_qp--;
    errno = ENOMEM;
    return nullptr;
  }
  auto* qp = fb.o.add_qp(pd, *a);
  if (qp) fb.n.qps_created++;
  return qp;
}
int destroy_qp(ibv_qp* qp) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.n.qps_destroyed++;
  return fb.o.remove_qp(qp);
}
int modify_qp(ibv_qp* qp, ibv_qp_attr* a, int mask) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.modify(qp, *a, mask, [&](const fakes::qp_state&, const ibv_qp_attr& attr) {
    if (fb.knobs.fail_rtr || turn(fb.knobs.fail_rtr_after)) return EINVAL;
    if (fb.knobs.ethernet && !attr.ah_attr.is_global) return EINVAL;  // RoCE needs a GRH
    return 0;
  });
}

int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto& k = fb.knobs;
  for (; wr; wr = wr->next) {
    *bad = wr;
    if (k.device_removed) return ENODEV;
    auto& q = fb.o.qps.at(qp);
    ibv_wc done{};
    done.wr_id = wr->wr_id;
    done.qp_num = qp->qp_num;
    bool write = wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM;
    if (!write && wr->opcode != IBV_WR_SEND_WITH_IMM) return EINVAL;
    done.opcode = write ? IBV_WC_RDMA_WRITE : IBV_WC_SEND;
    auto complete_with = [&](ibv_wc_status st) {
      done.status = st;
      fb.o.push(qp->send_cq, done);
      if (st != IBV_WC_SUCCESS) fb.o.to_error(q);
    };
    if (q.state == IBV_QPS_ERR) {
      complete_with(IBV_WC_WR_FLUSH_ERR);
      continue;
    }
    if (q.state != IBV_QPS_RTS) return EINVAL;
    std::size_t len = 0;
    for (int i = 0; i < wr->num_sge; ++i) len += wr->sg_list[i].length;
    if (write) {
      fb.n.writes++;
      if (turn(k.drop_after)) fb.dropping = true;
      if (fb.dropping) continue;
      if (turn(k.fail_write_after)) {
        complete_with(k.write_error);
        continue;
      }
    } else {
      fb.n.sends++;
    }
    if (wr->num_sge > 1 || (!write && len != 0)) return EINVAL;  // drop-in for what drun posts
    if (wr->num_sge == 1 &&
        !fb.o.find_mr(wr->sg_list[0].lkey, false, qp->pd, wr->sg_list[0].addr, wr->sg_list[0].length)) {
      complete_with(IBV_WC_LOC_PROT_ERR);
      continue;
    }
    auto dit = fb.o.by_qpn.find(q.dest_qpn);
    if (dit == fb.o.by_qpn.end()) {
      complete_with(IBV_WC_RETRY_EXC_ERR);  // nobody answers at that QPN
      continue;
    }
    auto& d = fb.o.qps.at(dit->second);
    if (d.state != IBV_QPS_RTR && d.state != IBV_QPS_RTS) {
      complete_with(d.state == IBV_QPS_ERR ? IBV_WC_RETRY_EXC_ERR : IBV_WC_REM_INV_REQ_ERR);
      continue;
    }
    if (write) {
      auto* target = fb.o.find_mr(wr->wr.rdma.rkey, true, d.qp->pd, wr->wr.rdma.remote_addr, len);
      if (!target || !(d.access & IBV_ACCESS_REMOTE_WRITE)) {
        complete_with(IBV_WC_REM_ACCESS_ERR);
        fb.o.to_error(d);  // the responder's QP goes to error too
        continue;
      }
    }
    if (d.recvs.empty()) {
      complete_with(IBV_WC_RNR_RETRY_EXC_ERR);
      continue;
    }
    std::uint32_t imm = ntohl(wr->imm_data);
    if (write) {
      if (turn(k.short_write_after)) len -= 1;
      if (turn(k.bad_imm_after)) imm += 1000;
      auto* to = reinterpret_cast<unsigned char*>(wr->wr.rdma.remote_addr);
      std::memcpy(to, reinterpret_cast<const void*>(wr->sg_list[0].addr), len);
      if (turn(k.corrupt_after) && len > 0) to[len / 2] ^= 0x01;
      fb.n.write_bytes += len;
    } else if (turn(k.inflate_credit_after)) {
      imm += 1000000;
    }
    fb.o.receive(d, write ? IBV_WC_RECV_RDMA_WITH_IMM : IBV_WC_RECV, static_cast<std::uint32_t>(len), imm);
    if (wr->send_flags & IBV_SEND_SIGNALED) {
      if (write) fb.n.signalled_writes++;
      complete_with(IBV_WC_SUCCESS);
    }
  }
  *bad = nullptr;
  return 0;
}

int post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (fb.knobs.device_removed) {
    *bad = wr;
    return ENODEV;
  }
  return fb.o.post_recv(qp, wr, bad);
}

int poll_cq(ibv_cq* cq, int n, ibv_wc* wc) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (fb.knobs.device_removed) return -1;
  return fb.o.poll(cq, n, wc, fb.knobs.max_poll);
}

const rdma::verbs_table table{get_device_list, free_device_list, get_device_name, open_device, close_device,
                              query_port,      query_gid,        alloc_pd,        dealloc_pd,  reg_mr,
                              dereg_mr,        create_cq,        destroy_cq,      create_qp,   destroy_qp,
                              modify_qp,       post_send,        post_recv,       poll_cq};

}  // namespace

void set_knobs(const std::function<void(fake_knobs&)>& change) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  change(fb.knobs);
}

fake_counters counters() {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto n = fb.n;
  n.cq_overruns = fb.o.cq_overruns;
  n.recv_overruns = fb.o.recv_overruns;
  return n;
}

void reset_fake() {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.knobs = {};
  fb.n = {};
  fb.o.cq_overruns = fb.o.recv_overruns = 0;
  fb.dropping = false;
}

void fail_all_qps() {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  for (auto& [p, q] : fb.o.qps) fb.o.to_error(q);
}

std::size_t live_objects() {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.ctxs.size() + fb.o.pds.size() + fb.o.mrs.size() + fb.o.cqs.size() + fb.o.qps.size();
}

const rdma::verbs_table& fake_verbs() { return table; }

fake_verbs_scope::fake_verbs_scope() {
  reset_fake();
  rdma::install_verbs_for_testing(&table);
}
fake_verbs_scope::~fake_verbs_scope() {
  rdma::install_verbs_for_testing(nullptr);
  reset_fake();
}

}  // namespace drun::test

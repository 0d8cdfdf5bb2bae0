// The fake verbs fabric (fake_verbs.hpp). Everything happens under one lock, synchronously:
// a write is copied into the remote region as it is posted, and its completions queued.
#include "fake_verbs.hpp"

#include <arpa/inet.h>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>

namespace drun::test {
namespace {

struct cq_state {
  std::unique_ptr<ibv_cq> cq;
  std::deque<ibv_wc> wcs;
};
struct qp_state {
  std::unique_ptr<ibv_qp> qp;
  ibv_qp_state state = IBV_QPS_RESET;
  std::uint32_t dest = 0;
  unsigned access = 0;
  std::deque<std::uint64_t> recvs;
  std::uint32_t max_recv = 0;
};
struct mr_state {
  std::unique_ptr<ibv_mr> mr;
  int access = 0;
};

struct fabric {
  std::mutex m;
  fake_knobs knobs;
  fake_counters n;
  ibv_device devs[2]{};
  ibv_device* list[3]{};
  std::map<ibv_context*, std::unique_ptr<ibv_context>> ctxs;
  std::map<ibv_pd*, std::unique_ptr<ibv_pd>> pds;
  std::map<ibv_mr*, mr_state> mrs;
  std::map<ibv_cq*, cq_state> cqs;
  std::map<ibv_qp*, qp_state> qps;
  std::map<std::uint32_t, ibv_qp*> by_qpn;
  std::uint32_t next_qpn = 0x100, next_key = 0x1000;
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

void push(fabric& fb, ibv_cq* cq, const ibv_wc& wc) {
  auto& c = fb.cqs.at(cq);
  if (static_cast<int>(c.wcs.size()) >= c.cq->cqe) {
    fb.n.cq_overruns++;
    return;
  }
  c.wcs.push_back(wc);
}

void to_error(fabric& fb, qp_state& q) {
  if (q.state == IBV_QPS_ERR) return;
  q.state = IBV_QPS_ERR;
  for (auto id : q.recvs) {
    ibv_wc wc{};
    wc.wr_id = id;
    wc.status = IBV_WC_WR_FLUSH_ERR;
    wc.qp_num = q.qp->qp_num;
    push(fb, q.qp->recv_cq, wc);
  }
  q.recvs.clear();
}

mr_state* find_key(fabric& fb, std::uint32_t key, bool remote, ibv_pd* pd, std::uint64_t addr, std::size_t len) {
  for (auto& [p, m] : fb.mrs) {
    if ((remote ? m.mr->rkey : m.mr->lkey) != key || m.mr->pd != pd) continue;
    auto base = reinterpret_cast<std::uintptr_t>(m.mr->addr);
    if (addr < base || addr + len > base + m.mr->length) return nullptr;
    if (remote && !(m.access & IBV_ACCESS_REMOTE_WRITE)) return nullptr;
    return &m;
  }
  return nullptr;
}

// Keeps a new object in its map and returns the raw pointer the verbs hand out.
template <class T, class Map>
T* keep(Map& map, std::unique_ptr<T> object) {
  auto* raw = object.get();
  map.emplace(raw, std::move(object));
  return raw;
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
  auto c = std::make_unique<ibv_context>();
  c->device = d;
  return keep(fb.ctxs, std::move(c));
}
int close_device(ibv_context* c) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.ctxs.erase(c) ? 0 : EINVAL;
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
  auto p = std::make_unique<ibv_pd>();
  p->context = c;
  fb.n.alloc_pd++;
  return keep(fb.pds, std::move(p));
}
int dealloc_pd(ibv_pd* pd) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  for (auto& [p, m] : fb.mrs)
    if (m.mr->pd == pd) return EBUSY;  // as the kernel does: children first
  for (auto& [p, q] : fb.qps)
    if (q.qp->pd == pd) return EBUSY;
  fb.n.dealloc_pd++;
  return fb.pds.erase(pd) ? 0 : EINVAL;
}
ibv_mr* reg_mr(ibv_pd* pd, void* addr, std::size_t len, int access) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (fb.knobs.fail_reg_mr > 0) {
    fb.knobs.fail_reg_mr--;
    errno = ENOMEM;
    return nullptr;
  }
  auto m = std::make_unique<ibv_mr>();
  m->context = pd->context;
  m->pd = pd;
  m->addr = addr;
  m->length = len;
  m->lkey = fb.next_key++;
  m->rkey = fb.next_key++;
  auto* raw = m.get();
  fb.mrs.emplace(raw, mr_state{std::move(m), access});
  fb.n.reg_mr++;
  return raw;
}
int dereg_mr(ibv_mr* mr) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.n.dereg_mr++;
  return fb.mrs.erase(mr) ? 0 : EINVAL;
}
ibv_cq* create_cq(ibv_context* c, int entries, void*, ibv_comp_channel*, int) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto q = std::make_unique<ibv_cq>();
  q->context = c;
  q->cqe = entries;
  auto* raw = q.get();
  fb.cqs.emplace(raw, cq_state{std::move(q), {}});
  fb.n.cqs_created++;
  return raw;
}
int destroy_cq(ibv_cq* cq) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  for (auto& [p, q] : fb.qps)
    if (q.qp->send_cq == cq || q.qp->recv_cq == cq) return EBUSY;
  fb.n.cqs_destroyed++;
  return fb.cqs.erase(cq) ? 0 : EINVAL;
}
ibv_qp* create_qp(ibv_pd* pd, ibv_qp_init_attr* a) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (fb.knobs.fail_create_qp > 0) {
    fb.knobs.fail_create_qp--;
    errno = ENOMEM;
    return nullptr;
  }
  if (a->qp_type != IBV_QPT_RC || !fb.cqs.count(a->send_cq) || !fb.cqs.count(a->recv_cq)) {
    errno = EINVAL;
    return nullptr;
  }
  auto q = std::make_unique<ibv_qp>();
  q->context = pd->context;
  q->pd = pd;
  q->send_cq = a->send_cq;
  q->recv_cq = a->recv_cq;
  q->qp_num = fb.next_qpn++;
  q->qp_type = IBV_QPT_RC;
  auto* raw = q.get();
  qp_state st;
  st.qp = std::move(q);
  st.max_recv = a->cap.max_recv_wr;
  fb.qps.emplace(raw, std::move(st));
  fb.by_qpn[raw->qp_num] = raw;
  fb.n.qps_created++;
  return raw;
}
int destroy_qp(ibv_qp* qp) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.by_qpn.erase(qp->qp_num);
  fb.n.qps_destroyed++;
  return fb.qps.erase(qp) ? 0 : EINVAL;
}
int modify_qp(ibv_qp* qp, ibv_qp_attr* a, int mask) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto& q = fb.qps.at(qp);
  if (!(mask & IBV_QP_STATE)) return EINVAL;
  switch (a->qp_state) {
    case IBV_QPS_INIT:
      if (q.state != IBV_QPS_RESET || !(mask & IBV_QP_PORT) || a->port_num != 1) return EINVAL;
      q.access = a->qp_access_flags;
      break;
    case IBV_QPS_RTR:
      if (q.state != IBV_QPS_INIT || fb.knobs.fail_rtr) return EINVAL;
      if (!(mask & IBV_QP_AV) || !(mask & IBV_QP_DEST_QPN) || !(mask & IBV_QP_PATH_MTU)) return EINVAL;
      if (fb.knobs.ethernet && !a->ah_attr.is_global) return EINVAL;  // RoCE needs a GRH
      q.dest = a->dest_qp_num;
      break;
    case IBV_QPS_RTS:
      if (q.state != IBV_QPS_RTR || !(mask & IBV_QP_SQ_PSN)) return EINVAL;
      break;
    case IBV_QPS_ERR: to_error(fb, q); return 0;
    default: return EINVAL;
  }
  q.state = a->qp_state;
  qp->state = a->qp_state;
  return 0;
}

int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto& k = fb.knobs;
  for (; wr; wr = wr->next) {
    *bad = wr;
    if (k.device_removed) return ENODEV;
    auto& q = fb.qps.at(qp);
    ibv_wc done{};
    done.wr_id = wr->wr_id;
    done.qp_num = qp->qp_num;
    bool write = wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM;
    if (!write && wr->opcode != IBV_WR_SEND_WITH_IMM) return EINVAL;
    done.opcode = write ? IBV_WC_RDMA_WRITE : IBV_WC_SEND;
    auto complete_with = [&](ibv_wc_status st) {
      done.status = st;
      push(fb, qp->send_cq, done);
      if (st != IBV_WC_SUCCESS) to_error(fb, q);
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
        !find_key(fb, wr->sg_list[0].lkey, false, qp->pd, wr->sg_list[0].addr, wr->sg_list[0].length)) {
      complete_with(IBV_WC_LOC_PROT_ERR);
      continue;
    }
    auto dit = fb.by_qpn.find(q.dest);
    if (dit == fb.by_qpn.end()) {
      complete_with(IBV_WC_RETRY_EXC_ERR);  // nobody answers at that QPN
      continue;
    }
    auto& d = fb.qps.at(dit->second);
    if (d.state != IBV_QPS_RTR && d.state != IBV_QPS_RTS) {
      complete_with(d.state == IBV_QPS_ERR ? IBV_WC_RETRY_EXC_ERR : IBV_WC_REM_INV_REQ_ERR);
      continue;
    }
    if (write) {
      auto* target = find_key(fb, wr->wr.rdma.rkey, true, d.qp->pd, wr->wr.rdma.remote_addr, len);
      if (!target || !(d.access & IBV_ACCESS_REMOTE_WRITE)) {
        complete_with(IBV_WC_REM_ACCESS_ERR);
        to_error(fb, d);  // the responder's QP goes to error too
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
    ibv_wc in{};
    in.wr_id = d.recvs.front();
    d.recvs.pop_front();
    in.status = IBV_WC_SUCCESS;
    in.opcode = write ? IBV_WC_RECV_RDMA_WITH_IMM : IBV_WC_RECV;
    in.byte_len = static_cast<std::uint32_t>(len);
    in.imm_data = htonl(imm);
    in.wc_flags = IBV_WC_WITH_IMM;
    in.qp_num = d.qp->qp_num;
    push(fb, d.qp->recv_cq, in);
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
  for (; wr; wr = wr->next) {
    *bad = wr;
    if (fb.knobs.device_removed) return ENODEV;
    auto& q = fb.qps.at(qp);
    if (q.state == IBV_QPS_RESET) return EINVAL;
    if (q.recvs.size() >= q.max_recv) {
      fb.n.recv_overruns++;
      return ENOMEM;
    }
    if (q.state == IBV_QPS_ERR) {
      ibv_wc wc{};
      wc.wr_id = wr->wr_id;
      wc.status = IBV_WC_WR_FLUSH_ERR;
      push(fb, qp->recv_cq, wc);
      continue;
    }
    q.recvs.push_back(wr->wr_id);
  }
  *bad = nullptr;
  return 0;
}

int poll_cq(ibv_cq* cq, int n, ibv_wc* wc) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (fb.knobs.device_removed) return -1;
  auto& c = fb.cqs.at(cq);
  int got = 0;
  while (got < n && got < fb.knobs.max_poll && !c.wcs.empty()) {
    wc[got++] = c.wcs.front();
    c.wcs.pop_front();
  }
  return got;
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
  return fb.n;
}

void reset_fake() {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.knobs = {};
  fb.n = {};
  fb.dropping = false;
}

void fail_all_qps() {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  for (auto& [p, q] : fb.qps) to_error(fb, q);
}

std::size_t live_objects() {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.ctxs.size() + fb.pds.size() + fb.mrs.size() + fb.cqs.size() + fb.qps.size();
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

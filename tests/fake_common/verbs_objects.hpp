// The verbs objects both fakes keep (tests/unit/fake_verbs.cpp, in-process, and
// tests/fake_provider/fake_ibverbs.cpp, between processes), and the rules hardware enforces on
// them: children before parents, QP state transitions, keys and bounds of registered memory,
// receives posted ahead of messages, completions queued per CQ. Callers hold their own lock.
#pragma once

#include <infiniband/verbs.h>

#include <arpa/inet.h>

#include <cerrno>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>

namespace drun::fakes {

struct mr_state {
  std::unique_ptr<ibv_mr> mr;
  int access = 0;
};
struct cq_state {
  std::unique_ptr<ibv_cq> cq;
  std::deque<ibv_wc> wcs;
};
struct qp_state {
  std::unique_ptr<ibv_qp> qp;
  ibv_qp_state state = IBV_QPS_RESET;
  unsigned access = 0;
  std::uint32_t dest_qpn = 0;
  std::deque<std::uint64_t> recvs;
  std::uint32_t max_recv = 0;
};

struct verbs_objects {
  std::map<ibv_context*, std::unique_ptr<ibv_context>> ctxs;
  std::map<ibv_pd*, std::unique_ptr<ibv_pd>> pds;
  std::map<ibv_mr*, mr_state> mrs;
  std::map<ibv_cq*, cq_state> cqs;
  std::map<ibv_qp*, qp_state> qps;
  std::map<std::uint32_t, ibv_qp*> by_qpn;
  std::uint32_t next_qpn = 0x100, next_key = 0x1000;
  std::uint64_t cq_overruns = 0, recv_overruns = 0;

  ibv_context* add_context(ibv_device* d) {
    auto c = std::make_unique<ibv_context>();
    c->device = d;
    auto* raw = c.get();
    ctxs.emplace(raw, std::move(c));
    return raw;
  }
  ibv_pd* add_pd(ibv_context* c) {
    auto p = std::make_unique<ibv_pd>();
    p->context = c;
    auto* raw = p.get();
    pds.emplace(raw, std::move(p));
    return raw;
  }
  // As the kernel does: a PD with MRs or QPs in it cannot be freed.
  int remove_pd(ibv_pd* pd) {
    for (auto& [p, m] : mrs)
      if (m.mr->pd == pd) return EBUSY;
    for (auto& [p, q] : qps)
      if (q.qp->pd == pd) return EBUSY;
    return pds.erase(pd) ? 0 : EINVAL;
  }
  ibv_mr* add_mr(ibv_pd* pd, void* addr, std::size_t len, int access) {
    auto m = std::make_unique<ibv_mr>();
    m->context = pd->context;
    m->pd = pd;
    m->addr = addr;
    m->length = len;
    m->lkey = next_key++;
    m->rkey = next_key++;
    auto* raw = m.get();
    mrs.emplace(raw, mr_state{std::move(m), access});
    return raw;
  }
  ibv_cq* add_cq(ibv_context* c, int entries) {
    auto q = std::make_unique<ibv_cq>();
    q->context = c;
    q->cqe = entries;
    auto* raw = q.get();
    cqs.emplace(raw, cq_state{std::move(q), {}});
    return raw;
  }
  int remove_cq(ibv_cq* cq) {
    for (auto& [p, q] : qps)
      if (q.qp->send_cq == cq || q.qp->recv_cq == cq) return EBUSY;
    return cqs.erase(cq) ? 0 : EINVAL;
  }
  ibv_qp* add_qp(ibv_pd* pd, const ibv_qp_init_attr& a) {
    if (a.qp_type != IBV_QPT_RC || !cqs.count(a.send_cq) || !cqs.count(a.recv_cq)) {
      errno = EINVAL;
      return nullptr;
    }
    auto q = std::make_unique<ibv_qp>();
    q->context = pd->context;
    q->pd = pd;
    q->send_cq = a.send_cq;
    q->recv_cq = a.recv_cq;
    q->qp_num = next_qpn++;
    q->qp_type = IBV_QPT_RC;
    auto* raw = q.get();
    qp_state st;
    st.qp = std::move(q);
    st.max_recv = a.cap.max_recv_wr;
    qps.emplace(raw, std::move(st));
    by_qpn[raw->qp_num] = raw;
    return raw;
  }
  int remove_qp(ibv_qp* qp) {
    by_qpn.erase(qp->qp_num);
    return qps.erase(qp) ? 0 : EINVAL;
  }

  // A completion onto its CQ; one beyond the CQ's size is lost and counted (a real overrun).
  void push(ibv_cq* cq, const ibv_wc& wc) {
    auto it = cqs.find(cq);
    if (it == cqs.end()) return;
    if (static_cast<int>(it->second.wcs.size()) >= it->second.cq->cqe) {
      cq_overruns++;
      return;
    }
    it->second.wcs.push_back(wc);
  }
  // A QP in the error state flushes what was posted to it.
  void to_error(qp_state& q) {
    if (q.state == IBV_QPS_ERR) return;
    q.state = IBV_QPS_ERR;
    q.qp->state = IBV_QPS_ERR;
    for (auto id : q.recvs) {
      ibv_wc wc{};
      wc.wr_id = id;
      wc.status = IBV_WC_WR_FLUSH_ERR;
      wc.qp_num = q.qp->qp_num;
      push(q.qp->recv_cq, wc);
    }
    q.recvs.clear();
  }

  // The registered region that covers [addr, addr + len) for this key in this PD; a remote key
  // also needs remote write access.
  mr_state* find_mr(std::uint32_t key, bool remote, ibv_pd* pd, std::uint64_t addr, std::size_t len) {
    for (auto& [p, m] : mrs) {
      if ((remote ? m.mr->rkey : m.mr->lkey) != key || m.mr->pd != pd) continue;
      auto base = reinterpret_cast<std::uintptr_t>(m.mr->addr);
      if (addr < base || addr + len > base + m.mr->length) return nullptr;
      if (remote && !(m.access & IBV_ACCESS_REMOTE_WRITE)) return nullptr;
      return &m;
    }
    return nullptr;
  }

  // The state machine RC QPs follow: RESET -> INIT -> RTR -> RTS, and ERR from anywhere.
  // check_rtr adds a fake's own conditions for RTR (0 to accept, else an errno).
  template <class CheckRtr>
  int modify(ibv_qp* qp, const ibv_qp_attr& a, int mask, CheckRtr&& check_rtr) {
    auto& q = qps.at(qp);
    if (!(mask & IBV_QP_STATE)) return EINVAL;
    switch (a.qp_state) {
      case IBV_QPS_INIT:
        if (q.state != IBV_QPS_RESET || !(mask & IBV_QP_PORT) || a.port_num != 1) return EINVAL;
        q.access = a.qp_access_flags;
        break;
      case IBV_QPS_RTR:
        if (q.state != IBV_QPS_INIT) return EINVAL;
        if (!(mask & IBV_QP_AV) || !(mask & IBV_QP_DEST_QPN) || !(mask & IBV_QP_PATH_MTU)) return EINVAL;
        if (int rc = check_rtr(q, a); rc != 0) return rc;
        q.dest_qpn = a.dest_qp_num;
        break;
      case IBV_QPS_RTS:
        if (q.state != IBV_QPS_RTR || !(mask & IBV_QP_SQ_PSN)) return EINVAL;
        break;
      case IBV_QPS_ERR: to_error(q); return 0;
      default: return EINVAL;
    }
    q.state = a.qp_state;
    qp->state = a.qp_state;
    return 0;
  }

  int post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad) {
    for (; wr; wr = wr->next) {
      *bad = wr;
      auto& q = qps.at(qp);
      if (q.state == IBV_QPS_RESET) return EINVAL;
      if (q.recvs.size() >= q.max_recv) {
        recv_overruns++;
        return ENOMEM;
      }
      if (q.state == IBV_QPS_ERR) {
        ibv_wc wc{};
        wc.wr_id = wr->wr_id;
        wc.status = IBV_WC_WR_FLUSH_ERR;
        push(qp->recv_cq, wc);
        continue;
      }
      q.recvs.push_back(wr->wr_id);
    }
    *bad = nullptr;
    return 0;
  }

  int poll(ibv_cq* cq, int n, ibv_wc* wc, int at_most) {
    auto& c = cqs.at(cq);
    int got = 0;
    while (got < n && got < at_most && !c.wcs.empty()) {
      wc[got++] = c.wcs.front();
      c.wcs.pop_front();
    }
    return got;
  }

  // A message lands on QP `to`: a posted receive is consumed and completed. False when nothing
  // was posted (the caller decides what the sender sees).
  bool receive(qp_state& to, ibv_wc_opcode opcode, std::uint32_t len, std::uint32_t imm_host) {
    if (to.recvs.empty()) return false;
    ibv_wc in{};
    in.wr_id = to.recvs.front();
    to.recvs.pop_front();
    in.status = IBV_WC_SUCCESS;
    in.opcode = opcode;
    in.byte_len = len;
    in.imm_data = htonl(imm_host);  // network order, as verbs carry it
    in.wc_flags = IBV_WC_WITH_IMM;
    in.qp_num = to.qp->qp_num;
    push(to.qp->recv_cq, in);
    return true;
  }
};

}  // namespace drun::fakes

// A stand-in libibverbs for the CLI tests: a shared library with the real ABI (the ibv_* symbols
// drun binds, and post/poll through the context's ops, as a provider fills them), loaded by drun
// through DRUN_IBVERBS_LIBRARY. Unlike the unit tests' in-process fabric, it carries RC traffic
// between processes: every process that creates a QP listens on an abstract Unix socket named
// for its pid, and a write or send travels there as a header and its bytes. The receiving side
// checks the rkey, the protection domain, the bounds and the access of the target region before
// it copies anything, consumes a posted receive, and queues the completion, as a responder does.
//
// What it proves that the in-process fake cannot: drun's dlopen'ed table (version-bound symbols,
// ibv_query_port's compat entry point, the ops dispatch) against the real structures, and RDMA
// between a `drun serve` and a `drun fetch` (or two drun-bench ends) in separate processes. It is
// not hardware: local completions are reported when the bytes are handed to the socket.
#include <infiniband/verbs.h>

#undef ibv_query_port
#undef ibv_reg_mr

#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr unsigned op_write = 1, op_send = 2;

struct wire_header {
  std::uint32_t op, dest_qpn, imm, rkey;
  std::uint64_t addr;
  std::uint32_t len, pad;
};

struct mr_state {
  std::unique_ptr<ibv_mr> mr;
  int access;
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
  pid_t dest_pid = 0;
  std::deque<std::uint64_t> recvs;
  std::uint32_t max_recv = 0;
};
struct peer_link {  // a connection to another process's fabric socket
  std::mutex m;
  int fd = -1;
};

struct fabric {
  std::mutex m;
  ibv_device dev{};
  ibv_device* list[2] = {&dev, nullptr};
  std::map<ibv_context*, std::unique_ptr<ibv_context>> ctxs;
  std::map<ibv_pd*, std::unique_ptr<ibv_pd>> pds;
  std::map<ibv_mr*, mr_state> mrs;
  std::map<ibv_cq*, cq_state> cqs;
  std::map<ibv_qp*, qp_state> qps;
  std::map<std::uint32_t, ibv_qp*> by_qpn;
  std::map<pid_t, std::shared_ptr<peer_link>> links;
  std::uint32_t next_qpn = 0x100, next_key = 0x2000;
  bool listening = false;
  fabric() { std::strcpy(dev.name, "fakeib0"); }
};
fabric& f() {
  static fabric* fb = new fabric();  // never destroyed: the agent thread outlives main()
  return *fb;
}

std::string socket_name(pid_t pid) { return "drun-fakeib-" + std::to_string(pid); }

sockaddr_un address_of(pid_t pid, socklen_t& len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  auto name = socket_name(pid);
  std::memcpy(a.sun_path + 1, name.data(), name.size());  // abstract namespace
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return a;
}

bool read_all(int fd, void* p, std::size_t n) {
  auto* b = static_cast<char*>(p);
  while (n) {
    ssize_t r = ::read(fd, b, n);
    if (r <= 0) {
      if (r < 0 && errno == EINTR) continue;
      return false;
    }
    b += r, n -= static_cast<std::size_t>(r);
  }
  return true;
}
bool write_all(int fd, const void* p, std::size_t n) {
  auto* b = static_cast<const char*>(p);
  while (n) {
    ssize_t r = ::send(fd, b, n, MSG_NOSIGNAL);
    if (r <= 0) {
      if (r < 0 && errno == EINTR) continue;
      return false;
    }
    b += r, n -= static_cast<std::size_t>(r);
  }
  return true;
}

void push(fabric& fb, ibv_cq* cq, const ibv_wc& wc) {
  auto it = fb.cqs.find(cq);
  if (it != fb.cqs.end() && static_cast<int>(it->second.wcs.size()) < it->second.cq->cqe) it->second.wcs.push_back(wc);
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

// The responder: one message from another process, applied as the hardware would.
bool deliver(int fd) {
  wire_header h{};
  if (!read_all(fd, &h, sizeof h)) return false;
  auto& fb = f();
  std::byte* target = nullptr;
  {
    std::lock_guard lock(fb.m);
    auto qit = fb.by_qpn.find(h.dest_qpn);
    if (h.op == op_write && qit != fb.by_qpn.end()) {
      auto& q = fb.qps.at(qit->second);
      for (auto& [p, m] : fb.mrs) {
        auto base = reinterpret_cast<std::uintptr_t>(m.mr->addr);
        if (m.mr->rkey == h.rkey && m.mr->pd == q.qp->pd && (m.access & IBV_ACCESS_REMOTE_WRITE) &&
            (q.access & IBV_ACCESS_REMOTE_WRITE) && h.addr >= base && h.addr + h.len <= base + m.mr->length)
          target = reinterpret_cast<std::byte*>(h.addr);
      }
    }
  }
  std::vector<std::byte> scratch;
  if (!target && h.len) {
    scratch.resize(h.len);
    target = scratch.data();
  }
  if (h.len && !read_all(fd, target, h.len)) return false;
  std::lock_guard lock(fb.m);
  auto qit = fb.by_qpn.find(h.dest_qpn);
  if (qit == fb.by_qpn.end()) return true;
  auto& q = fb.qps.at(qit->second);
  if (q.state != IBV_QPS_RTR && q.state != IBV_QPS_RTS) return true;
  if (!scratch.empty() || q.recvs.empty()) {  // a remote access violation, or nothing posted
    to_error(fb, q);
    return true;
  }
  ibv_wc wc{};
  wc.wr_id = q.recvs.front();
  q.recvs.pop_front();
  wc.status = IBV_WC_SUCCESS;
  wc.opcode = h.op == op_write ? IBV_WC_RECV_RDMA_WITH_IMM : IBV_WC_RECV;
  wc.byte_len = h.len;
  wc.imm_data = htonl(h.imm);
  wc.wc_flags = IBV_WC_WITH_IMM;
  wc.qp_num = h.dest_qpn;
  push(fb, q.qp->recv_cq, wc);
  return true;
}

void agent(int listener) {
  std::vector<pollfd> fds{{listener, POLLIN, 0}};
  for (;;) {
    if (::poll(fds.data(), fds.size(), -1) < 0) continue;
    for (std::size_t i = fds.size(); i-- > 0;) {
      if (!fds[i].revents) continue;
      if (i == 0) {
        int c = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (c >= 0) fds.push_back({c, POLLIN, 0});
      } else if (!deliver(fds[i].fd)) {
        ::close(fds[i].fd);
        fds.erase(fds.begin() + static_cast<std::ptrdiff_t>(i));
      }
    }
  }
}

// Every process with a QP listens for the traffic sent to its QPs.
bool ensure_listening(fabric& fb) {
  if (fb.listening) return true;
  int l = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  socklen_t len = 0;
  auto a = address_of(::getpid(), len);
  if (l < 0 || ::bind(l, reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(l, 64) != 0) return false;
  std::thread(agent, l).detach();
  fb.listening = true;
  return true;
}

std::shared_ptr<peer_link> link_to(fabric& fb, pid_t pid) {
  auto& l = fb.links[pid];
  if (!l) l = std::make_shared<peer_link>();
  return l;
}

int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) {
  auto& fb = f();
  for (; wr; wr = wr->next) {
    *bad = wr;
    wire_header h{};
    std::shared_ptr<peer_link> link;
    pid_t dest = 0;
    const void* payload = nullptr;
    ibv_wc done{};
    done.wr_id = wr->wr_id;
    done.qp_num = qp->qp_num;
    {
      std::lock_guard lock(fb.m);
      auto& q = fb.qps.at(qp);
      bool write = wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM;
      if (!write && wr->opcode != IBV_WR_SEND_WITH_IMM) return EINVAL;
      done.opcode = write ? IBV_WC_RDMA_WRITE : IBV_WC_SEND;
      if (q.state == IBV_QPS_ERR) {
        done.status = IBV_WC_WR_FLUSH_ERR;
        push(fb, qp->send_cq, done);
        continue;
      }
      if (q.state != IBV_QPS_RTS || wr->num_sge > 1) return EINVAL;
      h.op = write ? op_write : op_send;
      h.dest_qpn = q.dest_qpn;
      h.imm = ntohl(wr->imm_data);
      if (write) h.addr = wr->wr.rdma.remote_addr, h.rkey = wr->wr.rdma.rkey;
      if (wr->num_sge == 1) {
        h.len = wr->sg_list[0].length;
        payload = reinterpret_cast<const void*>(wr->sg_list[0].addr);
        bool local_ok = false;
        for (auto& [p, m] : fb.mrs) {
          auto base = reinterpret_cast<std::uintptr_t>(m.mr->addr);
          local_ok = local_ok || (m.mr->lkey == wr->sg_list[0].lkey && m.mr->pd == qp->pd &&
                                  wr->sg_list[0].addr >= base && wr->sg_list[0].addr + h.len <= base + m.mr->length);
        }
        if (!local_ok) {
          done.status = IBV_WC_LOC_PROT_ERR;
          push(fb, qp->send_cq, done);
          to_error(fb, q);
          continue;
        }
      }
      dest = q.dest_pid;
      link = link_to(fb, dest);
    }
    bool sent;
    {
      // Not under the fabric lock: the other process's agent may be waiting on ours.
      std::lock_guard lock(link->m);
      if (link->fd < 0) {
        int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        socklen_t len = 0;
        auto a = address_of(dest, len);
        if (s >= 0 && ::connect(s, reinterpret_cast<sockaddr*>(&a), len) == 0) link->fd = s;
        else if (s >= 0) ::close(s);
      }
      sent = link->fd >= 0 && write_all(link->fd, &h, sizeof h) && (!h.len || write_all(link->fd, payload, h.len));
      if (!sent && link->fd >= 0) {
        ::close(link->fd);
        link->fd = -1;
      }
    }
    std::lock_guard lock(fb.m);
    auto& q = fb.qps.at(qp);
    if (!sent) {  // the other end is gone: what a transport retry timeout reports
      done.status = IBV_WC_RETRY_EXC_ERR;
      push(fb, qp->send_cq, done);
      to_error(fb, q);
      continue;
    }
    if (wr->send_flags & IBV_SEND_SIGNALED) {
      done.status = IBV_WC_SUCCESS;
      push(fb, qp->send_cq, done);
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
    auto& q = fb.qps.at(qp);
    if (q.state == IBV_QPS_RESET || q.recvs.size() >= q.max_recv) return q.state == IBV_QPS_RESET ? EINVAL : ENOMEM;
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
  auto& c = fb.cqs.at(cq);
  int got = 0;
  while (got < n && !c.wcs.empty()) {
    wc[got++] = c.wcs.front();
    c.wcs.pop_front();
  }
  return got;
}

template <class T, class Map>
T* keep(Map& map, std::unique_ptr<T> object) {
  auto* raw = object.get();
  map.emplace(raw, std::move(object));
  return raw;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) ibv_device** ibv_get_device_list(int* num) {
  if (num) *num = 1;
  return f().list;
}
__attribute__((visibility("default"))) void ibv_free_device_list(ibv_device**) {}
__attribute__((visibility("default"))) const char* ibv_get_device_name(ibv_device* d) { return d->name; }

__attribute__((visibility("default"))) ibv_context* ibv_open_device(ibv_device* d) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto c = std::make_unique<ibv_context>();
  c->device = d;
  c->ops.post_send = post_send;
  c->ops.post_recv = post_recv;
  c->ops.poll_cq = poll_cq;
  return keep(fb.ctxs, std::move(c));
}
__attribute__((visibility("default"))) int ibv_close_device(ibv_context* c) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.ctxs.erase(c) ? 0 : EINVAL;
}

// The compat entry point fills the old structure, which ends before port_cap_flags2.
__attribute__((visibility("default"))) int ibv_query_port(ibv_context*, std::uint8_t port, _compat_ibv_port_attr* out) {
  if (port != 1) return EINVAL;
  ibv_port_attr a{};
  a.state = IBV_PORT_ACTIVE;
  a.max_mtu = a.active_mtu = IBV_MTU_4096;
  a.gid_tbl_len = 1;
  a.lid = 1;
  a.link_layer = IBV_LINK_LAYER_INFINIBAND;
  std::memcpy(out, &a, offsetof(ibv_port_attr, port_cap_flags2));
  return 0;
}

// GID 0 names this process: fe80::4452:554e:<pid>, so a peer's RTR says where to send.
__attribute__((visibility("default"))) int ibv_query_gid(ibv_context*, std::uint8_t, int index, ibv_gid* gid) {
  if (index != 0) return EINVAL;
  std::memset(gid, 0, sizeof *gid);
  gid->raw[0] = 0xfe, gid->raw[1] = 0x80;
  std::memcpy(gid->raw + 8, "DRUN", 4);
  std::uint32_t pid = htonl(static_cast<std::uint32_t>(::getpid()));
  std::memcpy(gid->raw + 12, &pid, 4);
  return 0;
}

__attribute__((visibility("default"))) ibv_pd* ibv_alloc_pd(ibv_context* c) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto p = std::make_unique<ibv_pd>();
  p->context = c;
  return keep(fb.pds, std::move(p));
}
__attribute__((visibility("default"))) int ibv_dealloc_pd(ibv_pd* pd) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  for (auto& [p, m] : fb.mrs)
    if (m.mr->pd == pd) return EBUSY;
  for (auto& [p, q] : fb.qps)
    if (q.qp->pd == pd) return EBUSY;
  return fb.pds.erase(pd) ? 0 : EINVAL;
}

__attribute__((visibility("default"))) ibv_mr* ibv_reg_mr(ibv_pd* pd, void* addr, std::size_t len, int access) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto m = std::make_unique<ibv_mr>();
  m->context = pd->context;
  m->pd = pd;
  m->addr = addr;
  m->length = len;
  m->lkey = fb.next_key++;
  m->rkey = fb.next_key++;
  auto* raw = m.get();
  fb.mrs.emplace(raw, mr_state{std::move(m), access});
  return raw;
}
__attribute__((visibility("default"))) int ibv_dereg_mr(ibv_mr* mr) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.mrs.erase(mr) ? 0 : EINVAL;
}

__attribute__((visibility("default"))) ibv_cq* ibv_create_cq(ibv_context* c, int cqe, void*, ibv_comp_channel*, int) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto q = std::make_unique<ibv_cq>();
  q->context = c;
  q->cqe = cqe;
  auto* raw = q.get();
  fb.cqs.emplace(raw, cq_state{std::move(q), {}});
  return raw;
}
__attribute__((visibility("default"))) int ibv_destroy_cq(ibv_cq* cq) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  for (auto& [p, q] : fb.qps)
    if (q.qp->send_cq == cq || q.qp->recv_cq == cq) return EBUSY;
  return fb.cqs.erase(cq) ? 0 : EINVAL;
}

__attribute__((visibility("default"))) ibv_qp* ibv_create_qp(ibv_pd* pd, ibv_qp_init_attr* a) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (a->qp_type != IBV_QPT_RC || !ensure_listening(fb)) {
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
  return raw;
}
__attribute__((visibility("default"))) int ibv_destroy_qp(ibv_qp* qp) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.by_qpn.erase(qp->qp_num);
  return fb.qps.erase(qp) ? 0 : EINVAL;
}

__attribute__((visibility("default"))) int ibv_modify_qp(ibv_qp* qp, ibv_qp_attr* a, int mask) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  auto& q = fb.qps.at(qp);
  if (!(mask & IBV_QP_STATE)) return EINVAL;
  switch (a->qp_state) {
    case IBV_QPS_INIT:
      if (q.state != IBV_QPS_RESET || !(mask & IBV_QP_PORT) || a->port_num != 1) return EINVAL;
      q.access = a->qp_access_flags;
      break;
    case IBV_QPS_RTR: {
      if (q.state != IBV_QPS_INIT || !(mask & IBV_QP_AV) || !(mask & IBV_QP_DEST_QPN)) return EINVAL;
      // Where the other end lives comes from its GID, as a routed (GRH) address would.
      if (!a->ah_attr.is_global || std::memcmp(a->ah_attr.grh.dgid.raw + 8, "DRUN", 4) != 0) return EINVAL;
      std::uint32_t pid = 0;
      std::memcpy(&pid, a->ah_attr.grh.dgid.raw + 12, 4);
      q.dest_pid = static_cast<pid_t>(ntohl(pid));
      q.dest_qpn = a->dest_qp_num;
      break;
    }
    case IBV_QPS_RTS:
      if (q.state != IBV_QPS_RTR) return EINVAL;
      break;
    case IBV_QPS_ERR: to_error(fb, q); return 0;
    default: return EINVAL;
  }
  q.state = a->qp_state;
  qp->state = a->qp_state;
  return 0;
}

}  // extern "C"

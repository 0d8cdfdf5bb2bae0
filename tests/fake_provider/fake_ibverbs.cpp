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
// between a `drun serve` and a `drun fetch` (or two drun-bench ends) in separate processes. As on
// RC hardware, a signalled write completes only once the responder has placed it (it answers
// with an acknowledgement); unsignalled ones are not waited for.
#include "verbs_objects.hpp"

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
  std::uint32_t len, want_ack;  // want_ack: answer one byte once the message is applied
};

struct peer_link {  // a connection to another process's fabric socket
  std::mutex m;
  int fd = -1;
};

struct fabric {
  std::mutex m;
  ibv_device dev{};
  ibv_device* list[2] = {&dev, nullptr};
  drun::fakes::verbs_objects o;
  std::map<ibv_qp*, pid_t> dest_pid;  // the process each connected QP sends to
  std::map<pid_t, std::shared_ptr<peer_link>> links;
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

// The responder: one message from another process, applied as the hardware would.
bool deliver(int fd, const wire_header& h) {
  auto& fb = f();
  std::byte* target = nullptr;
  {
    std::lock_guard lock(fb.m);
    auto qit = fb.o.by_qpn.find(h.dest_qpn);
    if (h.op == op_write && qit != fb.o.by_qpn.end()) {
      auto& q = fb.o.qps.at(qit->second);
      if ((q.access & IBV_ACCESS_REMOTE_WRITE) && fb.o.find_mr(h.rkey, true, q.qp->pd, h.addr, h.len))
        target = reinterpret_cast<std::byte*>(h.addr);
    }
  }
  std::vector<std::byte> scratch;
  if (!target && h.len) {
    scratch.resize(h.len);
    target = scratch.data();
  }
  if (h.len && !read_all(fd, target, h.len)) return false;
  std::lock_guard lock(fb.m);
  auto qit = fb.o.by_qpn.find(h.dest_qpn);
  if (qit == fb.o.by_qpn.end()) return true;
  auto& q = fb.o.qps.at(qit->second);
  if (q.state != IBV_QPS_RTR && q.state != IBV_QPS_RTS) return true;
  // A remote access violation, or nothing posted to receive it: the responder's QP goes to error.
  if (!scratch.empty() || !fb.o.receive(q, h.op == op_write ? IBV_WC_RECV_RDMA_WITH_IMM : IBV_WC_RECV, h.len, h.imm))
    fb.o.to_error(q);
  return true;
}

bool deliver_and_ack(int fd) {
  wire_header h{};
  if (!read_all(fd, &h, sizeof h)) return false;
  if (!deliver(fd, h)) return false;
  char ack = 1;
  return !h.want_ack || write_all(fd, &ack, 1);
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
      } else if (!deliver_and_ack(fds[i].fd)) {
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
      auto& q = fb.o.qps.at(qp);
      bool write = wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM;
      if (!write && wr->opcode != IBV_WR_SEND_WITH_IMM) return EINVAL;
      done.opcode = write ? IBV_WC_RDMA_WRITE : IBV_WC_SEND;
      if (q.state == IBV_QPS_ERR) {
        done.status = IBV_WC_WR_FLUSH_ERR;
        fb.o.push(qp->send_cq, done);
        continue;
      }
      if (q.state != IBV_QPS_RTS || wr->num_sge > 1) return EINVAL;
      h.op = write ? op_write : op_send;
      h.want_ack = (wr->send_flags & IBV_SEND_SIGNALED) ? 1 : 0;
      h.dest_qpn = q.dest_qpn;
      h.imm = ntohl(wr->imm_data);
      if (write) h.addr = wr->wr.rdma.remote_addr, h.rkey = wr->wr.rdma.rkey;
      if (wr->num_sge == 1) {
        h.len = wr->sg_list[0].length;
        payload = reinterpret_cast<const void*>(wr->sg_list[0].addr);
        if (!fb.o.find_mr(wr->sg_list[0].lkey, false, qp->pd, wr->sg_list[0].addr, h.len)) {
          done.status = IBV_WC_LOC_PROT_ERR;
          fb.o.push(qp->send_cq, done);
          fb.o.to_error(q);
          continue;
        }
      }
      dest = fb.dest_pid[qp];
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
      char ack = 0;
      sent = link->fd >= 0 && write_all(link->fd, &h, sizeof h) && (!h.len || write_all(link->fd, payload, h.len)) &&
             (!h.want_ack || read_all(link->fd, &ack, 1));
      if (!sent && link->fd >= 0) {
        ::close(link->fd);
        link->fd = -1;
      }
    }
    std::lock_guard lock(fb.m);
    auto& q = fb.o.qps.at(qp);
    if (!sent) {  // the other end is gone: what a transport retry timeout reports
      done.status = IBV_WC_RETRY_EXC_ERR;
      fb.o.push(qp->send_cq, done);
      fb.o.to_error(q);
      continue;
    }
    if (wr->send_flags & IBV_SEND_SIGNALED) {
      done.status = IBV_WC_SUCCESS;
      fb.o.push(qp->send_cq, done);
    }
  }
  *bad = nullptr;
  return 0;
}

int post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.post_recv(qp, wr, bad);
}

int poll_cq(ibv_cq* cq, int n, ibv_wc* wc) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.poll(cq, n, wc, n);
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
  auto* c = fb.o.add_context(d);
  c->ops.post_send = post_send;
  c->ops.post_recv = post_recv;
  c->ops.poll_cq = poll_cq;
  return c;
}
__attribute__((visibility("default"))) int ibv_close_device(ibv_context* c) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.ctxs.erase(c) ? 0 : EINVAL;
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
  return fb.o.add_pd(c);
}
__attribute__((visibility("default"))) int ibv_dealloc_pd(ibv_pd* pd) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.remove_pd(pd);
}
__attribute__((visibility("default"))) ibv_mr* ibv_reg_mr(ibv_pd* pd, void* addr, std::size_t len, int access) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.add_mr(pd, addr, len, access);
}
__attribute__((visibility("default"))) int ibv_dereg_mr(ibv_mr* mr) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.mrs.erase(mr) ? 0 : EINVAL;
}
__attribute__((visibility("default"))) ibv_cq* ibv_create_cq(ibv_context* c, int cqe, void*, ibv_comp_channel*, int) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.add_cq(c, cqe);
}
__attribute__((visibility("default"))) int ibv_destroy_cq(ibv_cq* cq) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.remove_cq(cq);
}
__attribute__((visibility("default"))) ibv_qp* ibv_create_qp(ibv_pd* pd, ibv_qp_init_attr* a) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  if (!ensure_listening(fb)) {
    errno = EIO;
    return nullptr;
  }
  return fb.o.add_qp(pd, *a);
}
__attribute__((visibility("default"))) int ibv_destroy_qp(ibv_qp* qp) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  fb.dest_pid.erase(qp);
  return fb.o.remove_qp(qp);
}
__attribute__((visibility("default"))) int ibv_modify_qp(ibv_qp* qp, ibv_qp_attr* a, int mask) {
  auto& fb = f();
  std::lock_guard lock(fb.m);
  return fb.o.modify(qp, *a, mask, [&](const drun::fakes::qp_state&, const ibv_qp_attr& attr) {
    // Where the other end lives comes from its GID, as a routed (GRH) address would.
    if (!attr.ah_attr.is_global || std::memcmp(attr.ah_attr.grh.dgid.raw + 8, "DRUN", 4) != 0) return EINVAL;
    std::uint32_t pid = 0;
    std::memcpy(&pid, attr.ah_attr.grh.dgid.raw + 12, 4);
    fb.dest_pid[qp] = static_cast<pid_t>(ntohl(pid));
    return 0;
  });
}

}  // extern "C"

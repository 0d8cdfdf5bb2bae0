// Loading libibverbs at run time, opening a device port, and the registration cache.
#include "transport/verbs.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <map>

namespace drun::rdma {
namespace {

// Symbols are looked up by version, as rdma-core's own tools link them: the IBVERBS_1.1 ABI is
// the one verbs.h describes (1.0 is the old compat one with different structures).
template <class F>
bool bind(void* lib, const char* name, F& out) {
  void* sym = ::dlvsym(lib, name, "IBVERBS_1.1");
  if (!sym) sym = ::dlsym(lib, name);
  out = reinterpret_cast<F>(sym);
  return sym != nullptr;
}

// The provider dispatches, and ibv_query_port's compat entry point (verbs.h turns the call into
// an inline that may need it).
int (*real_query_port_sym)(ibv_context*, std::uint8_t, _compat_ibv_port_attr*) = nullptr;
int real_query_port(ibv_context* c, std::uint8_t port, ibv_port_attr* attr) {
  std::memset(attr, 0, sizeof *attr);
  return real_query_port_sym(c, port, reinterpret_cast<_compat_ibv_port_attr*>(attr));
}
int real_post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) { return qp->context->ops.post_send(qp, wr, bad); }
int real_post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad) { return qp->context->ops.post_recv(qp, wr, bad); }
int real_poll_cq(ibv_cq* cq, int n, ibv_wc* wc) { return cq->context->ops.poll_cq(cq, n, wc); }

struct state {
  std::mutex mutex;
  bool loaded = false;
  verbs_table real{};
  loaded_verbs answer;
  const verbs_table* fake = nullptr;
  std::map<std::string, std::weak_ptr<device>> open;  // by device:port:gid
  std::optional<rdma_status> probe;
  bool noticed = false;
};
state& g() {
  static state s;
  return s;
}

loaded_verbs load_locked(state& s) {
  if (s.fake) return {s.fake, "(test table)", {}};
  if (s.loaded) return s.answer;
  s.loaded = true;
  const char* env = std::getenv("DRUN_IBVERBS_LIBRARY");
  s.answer.library = env && *env ? env : "libibverbs.so.1";
  // Never unloaded: providers keep threads and state for the life of the process.
  void* lib = ::dlopen(s.answer.library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = ::dlerror();
    s.answer.reason = fmt::format("cannot load {}: {}", s.answer.library, why ? why : "unknown error");
    return s.answer;
  }
  verbs_table t{};  // copied into s.real only when complete (devices may point at s.real)
  const char* missing = nullptr;
  auto need = [&](const char* name, auto& slot) {
    if (!bind(lib, name, slot) && !missing) missing = name;
  };
  need("ibv_get_device_list", t.get_device_list);
  need("ibv_free_device_list", t.free_device_list);
  need("ibv_get_device_name", t.get_device_name);
  need("ibv_open_device", t.open_device);
  need("ibv_close_device", t.close_device);
  need("ibv_query_port", real_query_port_sym);
  need("ibv_query_gid", t.query_gid);
  need("ibv_alloc_pd", t.alloc_pd);
  need("ibv_dealloc_pd", t.dealloc_pd);
  need("ibv_reg_mr", t.reg_mr);
  need("ibv_dereg_mr", t.dereg_mr);
  need("ibv_create_cq", t.create_cq);
  need("ibv_destroy_cq", t.destroy_cq);
  need("ibv_create_qp", t.create_qp);
  need("ibv_destroy_qp", t.destroy_qp);
  need("ibv_modify_qp", t.modify_qp);
  if (missing) {
    s.answer.reason = fmt::format("{} is not libibverbs: it has no {}", s.answer.library, missing);
    return s.answer;
  }
  t.query_port = real_query_port;
  t.post_send = real_post_send;
  t.post_recv = real_post_recv;
  t.poll_cq = real_poll_cq;
  s.real = t;
  s.answer.table = &s.real;
  return s.answer;
}

bool zero_gid(const ibv_gid& gid) {
  for (auto b : gid.raw)
    if (b) return false;
  return true;
}

// RoCE v2 over IPv4 uses the IPv4-mapped GID (::ffff:a.b.c.d); it routes, unlike v1's link-local.
bool ipv4_mapped(const ibv_gid& gid) {
  for (int i = 0; i < 10; ++i)
    if (gid.raw[i]) return false;
  return gid.raw[10] == 0xff && gid.raw[11] == 0xff;
}

}  // namespace

std::string gid_text(const ibv_gid& gid) {
  std::string out;
  for (int i = 0; i < 16; i += 2) out += fmt::format("{}{:02x}{:02x}", i ? ":" : "", gid.raw[i], gid.raw[i + 1]);
  return out;
}

loaded_verbs verbs() {
  auto& s = g();
  std::lock_guard lock(s.mutex);
  return load_locked(s);
}

bool first_unavailable_notice() {
  auto& s = g();
  std::lock_guard lock(s.mutex);
  return !std::exchange(s.noticed, true);
}

void install_verbs_for_testing(const verbs_table* fake) {
  auto& s = g();
  std::lock_guard lock(s.mutex);
  s.fake = fake;
  s.open.clear();
  s.probe.reset();
  s.noticed = false;
  s.loaded = false;  // the next verbs() loads again (a test may have changed DRUN_IBVERBS_LIBRARY)
  s.answer = {};
}

std::string wc_status_name(ibv_wc_status status) {
  switch (status) {
    case IBV_WC_SUCCESS: return "success";
    case IBV_WC_LOC_LEN_ERR: return "local length error";
    case IBV_WC_LOC_QP_OP_ERR: return "local QP operation error";
    case IBV_WC_LOC_PROT_ERR: return "local protection error";
    case IBV_WC_WR_FLUSH_ERR: return "work request flushed (the QP is in the error state)";
    case IBV_WC_REM_INV_REQ_ERR: return "remote invalid request";
    case IBV_WC_REM_ACCESS_ERR: return "remote access error";
    case IBV_WC_REM_OP_ERR: return "remote operation error";
    case IBV_WC_RETRY_EXC_ERR: return "transport retry counter exceeded (the peer does not answer)";
    case IBV_WC_RNR_RETRY_EXC_ERR: return "receiver-not-ready retry counter exceeded";
    case IBV_WC_FATAL_ERR: return "fatal device error";
    default: return fmt::format("completion status {}", static_cast<int>(status));
  }
}

device::~device() {
  for (auto& c : cache_) release(c);
  if (ctx_) api_->close_device(ctx_);
}

void device::release(const cached& c) noexcept {
  if (c.mr) api_->dereg_mr(c.mr);
  if (c.pd) api_->dealloc_pd(c.pd);
  std::free(c.mem);
}

std::uint64_t device::registrations() const noexcept {
  std::lock_guard lock(mutex_);
  return registrations_;
}

result<std::unique_ptr<device::region>> device::take_region(std::size_t bytes, int access) {
  {
    std::lock_guard lock(mutex_);
    for (auto it = cache_.begin(); it != cache_.end(); ++it)
      // Reusing the PD, MR and rkey for the next connection, possibly to another peer, is safe:
      // a remote peer reaches an MR only through a QP of ours in its PD, connected to that peer.
      // The endpoint destroys its QPs before it gives its region back (member order in
      // rdma.hpp), and the next connection's fresh QPs (random starting PSNs) are connected to
      // the new peer alone, so the old peer's rkey and address lead nowhere.
      if (it->bytes == bytes && it->access == access) {
        auto c = *it;
        cache_.erase(it);
        cached_bytes_ -= c.bytes;
        std::memset(c.mem, 0, c.bytes);  // nothing of the last connection's pieces is handed on
        return std::make_unique<region>(shared_from_this(), c);
      }
  }
  cached c{nullptr, nullptr, bytes, access, nullptr};
  std::size_t rounded = (bytes + 4095) & ~std::size_t{4095};
  c.mem = std::aligned_alloc(4096, rounded);
  if (!c.mem) return error(errc::io_error, fmt::format("RDMA: cannot allocate {} bytes to register", rounded));
  std::memset(c.mem, 0, rounded);
  c.pd = api_->alloc_pd(ctx_);
  if (c.pd) c.mr = api_->reg_mr(c.pd, c.mem, bytes, access);
  if (!c.mr) {
    int e = errno ? errno : EIO;
    const char* verb = c.pd ? "ibv_reg_mr" : "ibv_alloc_pd";
    release(c);
    return error(errc::io_error, fmt::format("RDMA: {} for {} bytes on {} failed: {}", verb, bytes, name_,
                                             std::strerror(e)))
        .with_errno(e);
  }
  std::lock_guard lock(mutex_);
  registrations_++;
  return std::make_unique<region>(shared_from_this(), c);
}

void device::give_back(const cached& c) noexcept {
  std::lock_guard lock(mutex_);
  // A few regions (64 MiB at most: it is pinned memory) stay registered for the next
  // connections; beyond that, memory goes back.
  if (cache_.size() < 16 && cached_bytes_ + c.bytes <= (std::size_t{64} << 20)) {
    cache_.push_back(c);
    cached_bytes_ += c.bytes;
    return;
  }
  release(c);
}

device::region::~region() { dev_->give_back(c_); }

result<std::shared_ptr<device>> device::open(const verbs_table& api, const rdma_options& o) {
  if (o.port == 0 || o.port > 255) return error(errc::invalid_argument, fmt::format("RDMA port {} is out of range", o.port));
  int count = 0;
  ibv_device** list = api.get_device_list(&count);
  if (!list || count <= 0) {
    if (list) api.free_device_list(list);
    return error(errc::unsupported, "libibverbs lists no RDMA device");
  }
  std::unique_ptr<ibv_device*, void (*)(ibv_device**)> guard(list, api.free_device_list);
  std::shared_ptr<device> d(new device());
  d->api_ = &api;
  d->port_ = static_cast<std::uint8_t>(o.port);
  std::string tried;
  for (int i = 0; i < count; ++i) {
    std::string name = api.get_device_name(list[i]);
    if (!o.device.empty() && name != o.device) continue;
    ibv_context* ctx = api.open_device(list[i]);
    if (!ctx) {
      tried += fmt::format("{}{}: cannot open", tried.empty() ? "" : "; ", name);
      continue;
    }
    ibv_port_attr attr{};
    if (api.query_port(ctx, d->port_, &attr) != 0 || attr.state != IBV_PORT_ACTIVE) {
      tried += fmt::format("{}{} port {}: not active", tried.empty() ? "" : "; ", name, o.port);
      api.close_device(ctx);
      continue;
    }
    d->ctx_ = ctx;
    d->name_ = name;
    d->lid_ = attr.lid;
    d->mtu_ = attr.active_mtu;
    d->ethernet_ = attr.link_layer == IBV_LINK_LAYER_ETHERNET;
    int table = std::min(attr.gid_tbl_len, 64);
    if (o.gid_index >= 0) {
      if (o.gid_index >= attr.gid_tbl_len || api.query_gid(ctx, d->port_, o.gid_index, &d->gid_) != 0)
        return error(errc::invalid_argument, fmt::format("RDMA: {} port {} has no GID index {}", name, o.port, o.gid_index));
      d->gid_index_ = o.gid_index;
    } else {
      d->gid_index_ = -1;
      for (int k = 0; k < table; ++k) {
        ibv_gid gid{};
        if (api.query_gid(ctx, d->port_, k, &gid) != 0 || zero_gid(gid)) continue;
        if (d->gid_index_ < 0 || (d->ethernet_ && ipv4_mapped(gid) && !ipv4_mapped(d->gid_))) {
          d->gid_index_ = k;
          d->gid_ = gid;
        }
      }
      if (d->gid_index_ < 0) {
        d->gid_index_ = 0;
        std::memset(&d->gid_, 0, sizeof d->gid_);
      }
    }
    if (d->ethernet_ && zero_gid(d->gid_))
      return error(errc::unsupported, fmt::format("RDMA: {} is RoCE but port {} has no GID", name, o.port));
    return d;
  }
  if (!o.device.empty() && tried.empty())
    return error(errc::unsupported, fmt::format("no RDMA device named {}", o.device));
  return error(errc::unsupported, fmt::format("no RDMA device with an active port {} ({})", o.port, tried));
}

result<std::shared_ptr<device>> open_device(const rdma_options& o) {
  auto v = verbs();
  if (!v.table) return error(errc::unsupported, v.reason);
  auto& s = g();
  std::string key = fmt::format("{}:{}:{}", o.device, o.port, o.gid_index);
  {
    std::lock_guard lock(s.mutex);
    if (auto it = s.open.find(key); it != s.open.end())
      if (auto d = it->second.lock()) return d;
  }
  auto d = device::open(*v.table, o);
  if (!d) return std::move(d).error();
  std::lock_guard lock(s.mutex);
  s.open[key] = *d;
  return std::move(*d);
}

}  // namespace drun::rdma

namespace drun {

rdma_status rdma_probe() {
  auto& s = rdma::g();
  {
    std::lock_guard lock(s.mutex);
    if (s.probe) return *s.probe;
  }
  rdma_status st;
  auto v = rdma::verbs();
  st.library = v.library;
  if (!v.table) {
    st.reason = v.reason;
  } else {
    int count = 0;
    if (ibv_device** list = v.table->get_device_list(&count)) {
      for (int i = 0; i < count; ++i) st.devices.emplace_back(v.table->get_device_name(list[i]));
      v.table->free_device_list(list);
    }
    auto d = rdma::open_device(rdma_options{});
    st.available = d.has_value();
    if (!d) st.reason = d.error().detail();
  }
  std::lock_guard lock(s.mutex);
  s.probe = st;
  return st;
}

}  // namespace drun

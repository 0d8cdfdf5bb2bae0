// libibverbs behind a function table. The real table is filled by dlopen() at run time, so one
// build runs on hosts without rdma-core; tests install a fake table (the seam) and drive every
// error path without hardware. Around it: RAII handles whose children keep their parents alive
// (a QP holds its CQs and PD, a PD its device), so teardown order is right by construction.
#pragma once

#include <drun/error.hpp>
#include <drun/transport.hpp>

#include <infiniband/verbs.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace drun::rdma {

// Every verb drun calls. post_send, post_recv and poll_cq are inline dispatches through the
// provider's ops in verbs.h; the real table wraps them, a fake one replaces them.
struct verbs_table {
  ibv_device** (*get_device_list)(int* count);
  void (*free_device_list)(ibv_device** list);
  const char* (*get_device_name)(ibv_device* device);
  ibv_context* (*open_device)(ibv_device* device);
  int (*close_device)(ibv_context* context);
  int (*query_port)(ibv_context* context, std::uint8_t port, ibv_port_attr* attr);
  int (*query_gid)(ibv_context* context, std::uint8_t port, int index, ibv_gid* gid);
  ibv_pd* (*alloc_pd)(ibv_context* context);
  int (*dealloc_pd)(ibv_pd* pd);
  ibv_mr* (*reg_mr)(ibv_pd* pd, void* addr, std::size_t length, int access);
  int (*dereg_mr)(ibv_mr* mr);
  ibv_cq* (*create_cq)(ibv_context* context, int entries, void* user, ibv_comp_channel* channel, int vector);
  int (*destroy_cq)(ibv_cq* cq);
  ibv_qp* (*create_qp)(ibv_pd* pd, ibv_qp_init_attr* attr);
  int (*destroy_qp)(ibv_qp* qp);
  int (*modify_qp)(ibv_qp* qp, ibv_qp_attr* attr, int mask);
  int (*post_send)(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad);
  int (*post_recv)(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad);
  int (*poll_cq)(ibv_cq* cq, int entries, ibv_wc* wc);
};

struct loaded_verbs {
  const verbs_table* table = nullptr;  // null when the library could not be loaded
  std::string library;                 // what was tried
  std::string reason;                  // why it is null
};

// The table in use: a test's fake when one is installed, else libibverbs loaded once
// (DRUN_IBVERBS_LIBRARY, else libibverbs.so.1).
loaded_verbs verbs();
// True the first time it is called in a process (again after install_verbs_for_testing): "this
// host has no RDMA" is said once, however many peers would have used it.
bool first_unavailable_notice();
// Tests only: replaces the table (null restores dlopen) and forgets opened devices and the probe.
void install_verbs_for_testing(const verbs_table* fake);

// A name for a completion status, for errors ("remote access error", "retry counter exceeded").
std::string wc_status_name(ibv_wc_status status);

// An opened device port, shared by every connection that uses it, with a cache of registered
// regions: registration pins pages and costs milliseconds, so a region freed by one connection is
// kept registered for the next instead of deregistered.
//
// Each region has a protection domain of its own, and a connection's QPs are made in its
// region's PD. An rkey works on any QP of its PD, so sharing one PD would let an authenticated
// peer write into another connection's landing slots with a guessed rkey; with a PD per region
// it reaches only its own. A cached region's old QPs are destroyed before it is handed on.
class device : public std::enable_shared_from_this<device> {
 public:
  ~device();
  device(const device&) = delete;
  device& operator=(const device&) = delete;

  const verbs_table& api() const noexcept { return *api_; }
  ibv_context* context() const noexcept { return ctx_; }
  const std::string& name() const noexcept { return name_; }
  std::uint8_t port() const noexcept { return port_; }
  std::uint16_t lid() const noexcept { return lid_; }
  const ibv_gid& gid() const noexcept { return gid_; }
  int gid_index() const noexcept { return gid_index_; }
  bool ethernet() const noexcept { return ethernet_; }  // RoCE: addressed by GID, never by LID
  ibv_mtu mtu() const noexcept { return mtu_; }
  std::uint64_t registrations() const noexcept;  // reg_mr calls so far (the cache's hit rate)

  // A page-aligned region of at least `bytes`, registered with `access`, from the cache when one
  // fits. Errors: io_error naming the failing verb.
  class region;
  result<std::unique_ptr<region>> take_region(std::size_t bytes, int access);

  static result<std::shared_ptr<device>> open(const verbs_table& api, const rdma_options& o);

 private:
  device() = default;
  friend class region;
  struct cached {
    ibv_pd* pd;
    void* mem;
    std::size_t bytes;
    int access;
    ibv_mr* mr;
  };
  void give_back(const cached& c) noexcept;
  void release(const cached& c) noexcept;

  const verbs_table* api_ = nullptr;
  ibv_context* ctx_ = nullptr;
  std::string name_;
  std::uint8_t port_ = 1;
  std::uint16_t lid_ = 0;
  ibv_gid gid_{};
  int gid_index_ = 0;
  bool ethernet_ = false;
  ibv_mtu mtu_ = IBV_MTU_1024;

  mutable std::mutex mutex_;
  std::vector<cached> cache_;
  std::size_t cached_bytes_ = 0;
  std::uint64_t registrations_ = 0;
};

// Registered memory: returned to its device's cache when destroyed (the device outlives it).
class device::region {  // NOLINT: declared inside device
 public:
  region(std::shared_ptr<device> d, const cached& c) noexcept : dev_(std::move(d)), c_(c) {}
  ~region();
  region(const region&) = delete;
  region& operator=(const region&) = delete;

  std::byte* data() const noexcept { return static_cast<std::byte*>(c_.mem); }
  std::size_t size() const noexcept { return c_.bytes; }
  ibv_pd* pd() const noexcept { return c_.pd; }
  std::uint32_t lkey() const noexcept { return c_.mr->lkey; }
  std::uint32_t rkey() const noexcept { return c_.mr->rkey; }
  const std::shared_ptr<device>& dev() const noexcept { return dev_; }

 private:
  std::shared_ptr<device> dev_;
  cached c_;
};

// 16 bytes as eight colon-separated groups of four hex digits.
std::string gid_text(const ibv_gid& gid);

// The device for these options, opened once per process and shared. Errors: unsupported (no
// library, no device, no active port: the reason in words), io_error (a verb failed).
result<std::shared_ptr<device>> open_device(const rdma_options& o);

// A completion queue and a queue pair, each freed by its destructor; both keep the device (the
// context) alive. Their owner declares them after the region whose PD the QPs use, so they are
// destroyed first, QPs before the CQs they use.
template <class T, int (*verbs_table::*Destroy)(T*)>
class verbs_handle {
 public:
  verbs_handle() = default;
  verbs_handle(std::shared_ptr<device> d, T* h) noexcept : dev_(std::move(d)), h_(h) {}
  verbs_handle(verbs_handle&& o) noexcept : dev_(std::move(o.dev_)), h_(std::exchange(o.h_, nullptr)) {}
  verbs_handle& operator=(verbs_handle&& o) noexcept {
    if (this != &o) {
      reset();
      dev_ = std::move(o.dev_);
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  ~verbs_handle() { reset(); }
  T* get() const noexcept { return h_; }

 private:
  void reset() noexcept {
    if (h_) (dev_->api().*Destroy)(h_);
    h_ = nullptr;
  }
  std::shared_ptr<device> dev_;
  T* h_ = nullptr;
};
using cq_handle = verbs_handle<ibv_cq, &verbs_table::destroy_cq>;
using qp_handle = verbs_handle<ibv_qp, &verbs_table::destroy_qp>;

}  // namespace drun::rdma

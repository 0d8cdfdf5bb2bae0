// The RDMA data path (design in rdma.hpp).
#include "transport/rdma.hpp"

#include "peer/wire.hpp"

#include <fmt/format.h>

#include <arpa/inet.h>
#include <cerrno>
#include <cstring>
#include <limits>
#include <poll.h>
#include <random>
#include <thread>

namespace drun::rdma {
namespace {

constexpr std::uint64_t none = std::numeric_limits<std::uint64_t>::max();
constexpr std::size_t credit_depth = 8;              // credit SENDs in flight, receiver side
constexpr std::size_t max_staging_bytes = std::size_t{16} << 20;
constexpr std::size_t max_staging_slots = 16;

std::size_t div_up(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

}  // namespace

std::size_t max_encoded_size(bool with_slots) noexcept {
  return 2 + 16 + 1 + 1 + max_queue_pairs * 8 + (with_slots ? 8 + 4 + 4 + 4 : 0);
}

std::vector<std::byte> encode(const endpoint_address& a, bool with_slots) {
  peer::writer w;
  w.u16(a.lid).bytes(std::as_bytes(std::span(a.gid.raw)));
  std::array<std::byte, 2> b{static_cast<std::byte>(a.mtu), static_cast<std::byte>(a.qps.size())};
  w.bytes(b);
  for (const auto& q : a.qps) w.u32(q.qpn).u32(q.psn);
  if (with_slots) w.u64(a.slots_addr).u32(a.rkey).u32(a.slot_size).u32(a.slot_count);
  auto v = w.view();
  return {v.begin(), v.end()};
}

result<endpoint_address> decode(std::span<const std::byte> body, bool with_slots) {
  auto bad = [](std::string why) { return error(errc::malformed_bundle, "RDMA address: " + why); };
  peer::reader rd(body);
  endpoint_address a;
  auto lid = rd.u16();
  auto gid = rd.bytes(16);
  auto mq = rd.bytes(2);
  if (!lid || !gid || !mq) return bad("too short");
  a.lid = *lid;
  std::memcpy(a.gid.raw, gid->data(), 16);
  a.mtu = std::to_integer<std::uint8_t>((*mq)[0]);
  std::size_t count = std::to_integer<std::size_t>((*mq)[1]);
  if (a.mtu < IBV_MTU_256 || a.mtu > IBV_MTU_4096) return bad(fmt::format("MTU code {} is not 1 to 5", a.mtu));
  if (count < 1 || count > max_queue_pairs) return bad(fmt::format("{} queue pairs (1 to {})", count, max_queue_pairs));
  for (std::size_t i = 0; i < count; ++i) {
    auto qpn = rd.u32();
    auto psn = rd.u32();
    if (!qpn || !psn) return bad("too short");
    if (*qpn > 0xffffff || *psn > 0xffffff) return bad("a QP number or PSN over 24 bits");
    a.qps.push_back({*qpn, *psn});
  }
  if (with_slots) {
    auto addr = rd.u64();
    auto rkey = rd.u32();
    auto size = rd.u32();
    auto slots = rd.u32();
    if (!addr || !rkey || !size || !slots) return bad("too short");
    a.slots_addr = *addr, a.rkey = *rkey, a.slot_size = *size, a.slot_count = *slots;
    if (a.slot_size < min_slot_size || a.slot_size > max_slot_size || a.slot_size % 4096 != 0)
      return bad(fmt::format("slot size {} (a multiple of 4096 from {} to {})", a.slot_size, min_slot_size, max_slot_size));
    if (a.slot_count < 1 || a.slot_count > max_slot_count)
      return bad(fmt::format("{} slots (1 to {})", a.slot_count, max_slot_count));
    if (a.slots_addr > std::numeric_limits<std::uint64_t>::max() - std::uint64_t{a.slot_size} * a.slot_count)
      return bad("the slots wrap around the address space");
  }
  if (!rd.done()) return bad("trailing bytes");
  return a;
}

result<void> check(const rdma_options& o) {
  auto bad = [](std::string why) { return error(errc::invalid_argument, "RDMA: " + why); };
  if (o.queue_pairs < 1 || o.queue_pairs > max_queue_pairs)
    return bad(fmt::format("queue_pairs must be 1 to {}", max_queue_pairs));
  if (o.slot_size < min_slot_size || o.slot_size > max_slot_size || o.slot_size % 4096 != 0)
    return bad(fmt::format("slot_size must be a multiple of 4096 from {} to {}", min_slot_size, max_slot_size));
  if (o.slot_count < 1 || o.slot_count > max_slot_count) return bad(fmt::format("slot_count must be 1 to {}", max_slot_count));
  if (o.signal_every < 1) return bad("signal_every must be at least 1");
  if (o.timeout.count() <= 0) return bad("timeout must be positive");
  return {};
}

endpoint::endpoint(std::shared_ptr<device> dev, role r, const rdma_options& o, int watch_fd)
    : dev_(std::move(dev)), role_(r), o_(o), watch_fd_(watch_fd) {}

endpoint::~endpoint() = default;

error endpoint::fail(std::string why) {
  error e(errc::io_error, fmt::format("RDMA on {}: {}", dev_->name(), why));
  if (!broken_) broken_ = e;
  return e;
}

result<void> endpoint::create_queues(std::size_t qps, std::size_t send_depth, std::size_t recv_depth, int access) {
  const auto& api = dev_->api();
  auto cq = [&](std::size_t entries) -> result<cq_handle> {
    ibv_cq* c = api.create_cq(dev_->context(), static_cast<int>(entries), nullptr, nullptr, 0);
    if (!c) return fail(fmt::format("ibv_create_cq ({} entries) failed: {}", entries, std::strerror(errno ? errno : EIO)));
    return cq_handle(dev_, c);
  };
  auto s = cq(qps * (send_depth + 1));
  if (!s) return std::move(s).error();
  auto r = cq(qps * (recv_depth + 1));
  if (!r) return std::move(r).error();
  scq_ = std::move(*s);
  rcq_ = std::move(*r);
  std::random_device rng;
  for (std::size_t i = 0; i < qps; ++i) {
    ibv_qp_init_attr init{};
    init.send_cq = scq_.get();
    init.recv_cq = rcq_.get();
    init.qp_type = IBV_QPT_RC;
    init.cap.max_send_wr = static_cast<std::uint32_t>(send_depth);
    init.cap.max_recv_wr = static_cast<std::uint32_t>(recv_depth);
    init.cap.max_send_sge = 1;
    init.cap.max_recv_sge = 1;
    ibv_qp* qp = api.create_qp(region_->pd(), &init);
    if (!qp) return fail(fmt::format("ibv_create_qp failed: {}", std::strerror(errno ? errno : EIO)));
    qps_.emplace_back(dev_, qp);
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_INIT;
    attr.pkey_index = 0;
    attr.port_num = dev_->port();
    attr.qp_access_flags = static_cast<unsigned>(access);
    if (int rc = api.modify_qp(qp, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS); rc != 0)
      return fail(fmt::format("cannot bring a QP to INIT: {}", std::strerror(rc)));
    local_.qps.push_back({qp->qp_num, rng() & 0xffffff});
  }
  local_.lid = dev_->lid();
  local_.gid = dev_->gid();
  local_.mtu = static_cast<std::uint8_t>(dev_->mtu());
  return {};
}

result<void> endpoint::to_rts(const endpoint_address& remote) {
  if (remote.qps.size() != qps_.size())
    return fail(fmt::format("the other end has {} queue pairs, this one {}", remote.qps.size(), qps_.size()));
  const auto& api = dev_->api();
  bool global = dev_->ethernet();
  for (auto b : remote.gid.raw) global = global || b != 0;
  for (std::size_t i = 0; i < qps_.size(); ++i) {
    ibv_qp_attr rtr{};
    rtr.qp_state = IBV_QPS_RTR;
    rtr.path_mtu = static_cast<ibv_mtu>(std::min<int>(remote.mtu, local_.mtu));
    rtr.dest_qp_num = remote.qps[i].qpn;
    rtr.rq_psn = remote.qps[i].psn;
    rtr.max_dest_rd_atomic = 1;
    rtr.min_rnr_timer = 12;
    rtr.ah_attr.dlid = remote.lid;
    rtr.ah_attr.port_num = dev_->port();
    if (global) {
      rtr.ah_attr.is_global = 1;
      rtr.ah_attr.grh.dgid = remote.gid;
      rtr.ah_attr.grh.sgid_index = static_cast<std::uint8_t>(dev_->gid_index());
      rtr.ah_attr.grh.hop_limit = 64;
    }
    if (int rc = api.modify_qp(qps_[i].get(), &rtr,
                               IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                   IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
        rc != 0)
      return fail(fmt::format("cannot bring QP {} to RTR: {}", i, std::strerror(rc)));
    ibv_qp_attr rts{};
    rts.qp_state = IBV_QPS_RTS;
    rts.timeout = 14;   // 4.096 us * 2^14 = 67 ms per try
    rts.retry_cnt = 7;
    rts.rnr_retry = 7;  // receives are always posted ahead; "infinite" costs nothing
    rts.sq_psn = local_.qps[i].psn;
    rts.max_rd_atomic = 1;
    if (int rc = api.modify_qp(qps_[i].get(), &rts,
                               IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                                   IBV_QP_MAX_QP_RD_ATOMIC);
        rc != 0)
      return fail(fmt::format("cannot bring QP {} to RTS: {}", i, std::strerror(rc)));
  }
  return {};
}

result<void> endpoint::post_receive(std::size_t qp) {
  ibv_recv_wr wr{};
  wr.wr_id = qp;
  wr.num_sge = 0;  // writes with immediate land in the slots; credits carry no bytes
  ibv_recv_wr* bad = nullptr;
  if (int rc = dev_->api().post_recv(qps_[qp].get(), &wr, &bad); rc != 0)
    return fail(fmt::format("ibv_post_recv failed: {}", std::strerror(rc)));
  return {};
}

result<std::unique_ptr<endpoint>> endpoint::receiver(std::shared_ptr<device> dev, const rdma_options& o, int watch_fd) {
  if (auto c = check(o); !c) return std::move(c).error();
  std::unique_ptr<endpoint> e(new endpoint(std::move(dev), role::receiver, o, watch_fd));
  e->slot_size_ = o.slot_size;
  e->slot_count_ = o.slot_count;
  auto region = e->dev_->take_region(o.slot_size * o.slot_count, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  if (!region) return std::move(region).error();
  e->region_ = std::move(*region);
  if (auto r = e->create_queues(o.queue_pairs, credit_depth, o.slot_count, IBV_ACCESS_REMOTE_WRITE); !r)
    return std::move(r).error();
  // Every QP can hold every slot's write: at most slot_count slices are in flight in all.
  for (std::size_t q = 0; q < e->qps_.size(); ++q)
    for (std::size_t k = 0; k < o.slot_count; ++k)
      if (auto r = e->post_receive(q); !r) return std::move(r).error();
  e->arrived_.assign(o.slot_count, none);
  e->arrived_len_.assign(o.slot_count, 0);
  e->local_.slots_addr = reinterpret_cast<std::uintptr_t>(e->region_->data());
  e->local_.rkey = e->region_->rkey();
  e->local_.slot_size = static_cast<std::uint32_t>(o.slot_size);
  e->local_.slot_count = o.slot_count;
  return e;
}

namespace {
std::size_t staging_slices(std::size_t slot_size, std::size_t slot_count) {
  return std::clamp<std::size_t>(max_staging_bytes / slot_size, 1, std::min(slot_count, max_staging_slots));
}
}  // namespace

std::size_t endpoint::sender_bytes(const endpoint_address& remote) noexcept {
  return staging_slices(remote.slot_size, remote.slot_count) * remote.slot_size;
}

result<std::unique_ptr<endpoint>> endpoint::sender(std::shared_ptr<device> dev, const rdma_options& o,
                                                   const endpoint_address& remote, int watch_fd) {
  if (auto c = check(o); !c) return std::move(c).error();
  std::unique_ptr<endpoint> e(new endpoint(std::move(dev), role::sender, o, watch_fd));
  e->slot_size_ = remote.slot_size;
  e->slot_count_ = remote.slot_count;
  e->remote_addr_ = remote.slots_addr;
  e->remote_rkey_ = remote.rkey;
  std::size_t qps = remote.qps.size();
  e->staging_ = staging_slices(e->slot_size_, e->slot_count_);
  // A staging slot is reused once the write that last used it completed; one of every
  // (staging - 1) / qps + 1 consecutive writes on a QP is signalled, so one always will.
  e->signal_every_ = std::clamp<std::size_t>(o.signal_every, 1, 1 + (e->staging_ - 1) / qps);
  auto region = e->dev_->take_region(e->staging_ * e->slot_size_, IBV_ACCESS_LOCAL_WRITE);
  if (!region) return std::move(region).error();
  e->region_ = std::move(*region);
  if (auto r = e->create_queues(qps, e->staging_, e->slot_count_, 0); !r) return std::move(r).error();
  for (std::size_t k = 0; k < e->slot_count_; ++k)  // credits arrive on QP 0
    if (auto r = e->post_receive(0); !r) return std::move(r).error();
  e->pending_.resize(qps);
  e->unsignalled_.assign(qps, 0);
  if (auto r = e->to_rts(remote); !r) return std::move(r).error();
  return e;
}

result<void> endpoint::connect(const endpoint_address& remote) {
  if (broken_) return *broken_;
  return to_rts(remote);
}

result<void> endpoint::handle(const ibv_wc& wc, bool send_cq) {
  if (wc.status != IBV_WC_SUCCESS) return fail(wc_status_name(wc.status));
  if (role_ == role::sender) {
    if (send_cq) {
      if (wc.opcode != IBV_WC_RDMA_WRITE) return fail("an unexpected send completion");
      auto& p = pending_[wc.wr_id % pending_.size()];
      std::size_t done = 0;
      while (done < p.size() && p[done] <= wc.wr_id) ++done;  // RC completes in order per QP
      p.erase(p.begin(), p.begin() + static_cast<std::ptrdiff_t>(done));
      return {};
    }
    if (wc.opcode != IBV_WC_RECV || !(wc.wc_flags & IBV_WC_WITH_IMM) || wc.byte_len != 0)
      return fail("the receiver sent something other than a credit");
    auto reported = consumed_ + static_cast<std::uint32_t>(ntohl(wc.imm_data) - static_cast<std::uint32_t>(consumed_));
    if (reported > written_) return fail(fmt::format("the receiver reports {} slices read of {} sent", reported, written_));
    consumed_ = reported;
    return post_receive(0);
  }
  if (send_cq) {
    if (wc.opcode != IBV_WC_SEND) return fail("an unexpected send completion");
    credits_in_flight_--;
    return {};
  }
  if (wc.opcode != IBV_WC_RECV_RDMA_WITH_IMM || !(wc.wc_flags & IBV_WC_WITH_IMM))
    return fail("the sender sent something other than a slice");
  auto seq = next_ + static_cast<std::uint32_t>(ntohl(wc.imm_data) - static_cast<std::uint32_t>(next_));
  if (seq >= answer_end_) return fail(fmt::format("slice {} arrived outside the answer (slices {} to {})", seq, next_, answer_end_));
  auto slot = seq % slot_count_;
  if (arrived_[slot] != none) return fail(fmt::format("slice {} overwrote slot {} before it was read", seq, slot));
  if (wc.wr_id >= qps_.size()) return fail("a completion for no QP of this connection");
  arrived_[slot] = seq;
  arrived_len_[slot] = wc.byte_len;
  return post_receive(wc.wr_id);
}

result<int> endpoint::poll_once() {
  std::array<ibv_wc, 16> wc{};
  int total = 0;
  for (bool send_cq : {true, false}) {
    int n = dev_->api().poll_cq(send_cq ? scq_.get() : rcq_.get(), static_cast<int>(wc.size()), wc.data());
    if (n < 0) return fail(fmt::format("ibv_poll_cq failed ({}): the device is gone or broken", n));
    for (int i = 0; i < n; ++i)
      if (auto r = handle(wc[static_cast<std::size_t>(i)], send_cq); !r) return std::move(r).error();
    total += n;
  }
  return total;
}

template <class Done>
result<void> endpoint::wait(Done&& done, transport::clock::time_point deadline, const std::atomic<bool>* stop,
                            const char* what) {
  using transport::clock;
  auto stall = clock::now() + o_.timeout;
  auto next_watch = clock::now();
  unsigned idle = 0;
  while (!done()) {
    if (stop && stop->load()) return error(errc::cancelled, "cancelled");
    auto n = poll_once();
    if (!n) return std::move(n).error();
    if (*n > 0) {
      idle = 0;
      stall = clock::now() + o_.timeout;
      continue;
    }
    // Spin first (completions come within microseconds on a fabric), then back off so that an
    // idle wait does not own a core.
    if (++idle < 256) continue;
    auto now = clock::now();
    if (now > std::min(deadline, stall))
      return fail(fmt::format("no completion for {} ms while {}",
                              std::chrono::duration_cast<std::chrono::milliseconds>(now - (stall - o_.timeout)).count(), what));
    if (watch_fd_ >= 0 && now >= next_watch) {
      next_watch = now + std::chrono::milliseconds(1);
      pollfd p{watch_fd_, POLLRDHUP, 0};
      if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)))
        return fail(fmt::format("the control channel closed while {}", what));
    }
    if (idle < 2048) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return {};
}

result<void> endpoint::send(std::span<const std::byte> bytes, transport::clock::time_point deadline,
                            const std::atomic<bool>* stop, const transport::pace_fn& pace) {
  if (broken_) return *broken_;
  assert(role_ == role::sender);
  const auto& api = dev_->api();
  std::size_t slices = div_up(bytes.size(), slot_size_), qps = qps_.size();
  auto oldest_pending = [&] {
    std::uint64_t oldest = none;
    for (const auto& p : pending_)
      if (!p.empty()) oldest = std::min(oldest, p.front());
    return oldest;
  };
  for (std::size_t i = 0; i < slices; ++i) {
    std::uint64_t seq = written_;
    auto room = [&] { return seq < consumed_ + slot_count_ && (seq < staging_ || seq - staging_ < oldest_pending()); };
    if (auto r = wait(room, deadline, stop, "waiting for the receiver's credits"); !r) return r;
    std::size_t len = std::min(slot_size_, bytes.size() - i * slot_size_);
    if (pace) {
      auto before = transport::clock::now();
      pace(len);
      deadline += transport::clock::now() - before;
    }
    std::byte* stage = region_->data() + (seq % staging_) * slot_size_;
    std::memcpy(stage, bytes.data() + i * slot_size_, len);
    std::size_t q = seq % qps;
    bool signal = i + qps >= slices || unsignalled_[q] + 1 >= signal_every_;
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(stage), static_cast<std::uint32_t>(len), region_->lkey()};
    ibv_send_wr wr{};
    wr.wr_id = seq;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
    wr.send_flags = signal ? IBV_SEND_SIGNALED : 0;
    wr.imm_data = htonl(static_cast<std::uint32_t>(seq));
    wr.wr.rdma.remote_addr = remote_addr_ + (seq % slot_count_) * slot_size_;
    wr.wr.rdma.rkey = remote_rkey_;
    ibv_send_wr* bad = nullptr;
    if (int rc = api.post_send(qps_[q].get(), &wr, &bad); rc != 0)
      return fail(fmt::format("ibv_post_send failed: {}", std::strerror(rc)));
    pending_[q].push_back(seq);
    unsignalled_[q] = signal ? 0 : unsignalled_[q] + 1;
    written_++;
  }
  return wait([&] { return oldest_pending() == none; }, deadline, stop, "waiting for the last writes to complete");
}

result<void> endpoint::send_credit() {
  if (auto r = wait([&] { return credits_in_flight_ < credit_depth; }, transport::clock::now() + o_.timeout, nullptr,
                    "waiting to send a credit");
      !r)
    return r;
  ibv_send_wr wr{};
  wr.wr_id = none;
  wr.num_sge = 0;
  wr.opcode = IBV_WR_SEND_WITH_IMM;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.imm_data = htonl(static_cast<std::uint32_t>(next_));
  ibv_send_wr* bad = nullptr;
  if (int rc = dev_->api().post_send(qps_[0].get(), &wr, &bad); rc != 0)
    return fail(fmt::format("ibv_post_send (credit) failed: {}", std::strerror(rc)));
  credits_in_flight_++;
  reported_ = next_;
  return {};
}

result<void> endpoint::receive(std::span<std::byte> out, transport::clock::time_point deadline,
                               const std::atomic<bool>* stop) {
  if (broken_) return *broken_;
  assert(role_ == role::receiver);
  std::size_t slices = div_up(out.size(), slot_size_);
  answer_end_ = next_ + slices;
  std::size_t batch = std::max<std::size_t>(1, slot_count_ / 4);
  for (std::size_t i = 0; i < slices; ++i) {
    std::uint64_t seq = next_;
    std::size_t slot = seq % slot_count_;
    if (auto r = wait([&] { return arrived_[slot] == seq; }, deadline, stop, "waiting for a slice"); !r) return r;
    std::size_t len = std::min(slot_size_, out.size() - i * slot_size_);
    if (arrived_len_[slot] != len) return fail(fmt::format("slice {} has {} bytes, not {}", seq, arrived_len_[slot], len));
    std::memcpy(out.data() + i * slot_size_, region_->data() + slot * slot_size_, len);
    arrived_[slot] = none;
    next_++;
    if (next_ - reported_ >= batch)
      if (auto r = send_credit(); !r) return r;
  }
  if (next_ != reported_) return send_credit();
  return {};
}

}  // namespace drun::rdma

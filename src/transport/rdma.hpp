// The RDMA data path: RC queue pairs set up on an authenticated TLS control channel.
//
// Design. The fetching end (receiver) registers one region of slot_count landing slots of
// slot_size bytes and posts receives; the serving end (sender) cuts each answer into slot-sized
// slices and RDMA-writes slice n into slot n % slot_count with immediate data n (the slice's
// sequence number, mod 2^32), striping slices over the QPs (slice n on QP n % qps). A write with
// immediate consumes one posted receive, so the receiver learns of each slice, its length and its
// slot from the completion alone, on any QP, in any order.
//
// Flow control is by credits: the sender may write slice n only while n < consumed +
// slot_count, where consumed is what the receiver last reported with a zero-byte SEND whose
// immediate is its count of slices copied out (mod 2^32). It reports every slot_count/4 slices
// and at the end of each answer, so a slot is never overwritten before it was copied.
//
// Why the copies: the receiver copies every slice out of the landing slot into the caller's
// buffer before the piece is verified, because a remote can write a registered region at any
// time: bytes verified in remotely writable memory could change after the check. The sender
// copies each slice into a small registered staging ring (staging_slots) rather than register
// the piece buffers, which are pooled and freed by the peer server at will; a registration
// cache over such buffers would have to learn of every free. Memory bandwidth per copy is a
// multiple of what one connection moves; parallel connections use more cores.
//
// Completions. The sender signals one write in signal_every per QP (capped so that a staging
// slot always has a signalled write behind it) and the last write of an answer on each QP, and
// waits at the end of each answer until every write completed, so errors belong to the answer
// that caused them and nothing is in flight between requests.
//
// Failure. A completion error, a QP in the error state, a protocol breach (a slice number or
// length that does not fit), no completion before the deadline, or the control channel closing
// ends the endpoint for good: every later call fails at once, and the peer code falls back to
// TCP+TLS for that peer.
#pragma once

#include "transport/transport.hpp"
#include "transport/verbs.hpp"

#include <optional>
#include <vector>

namespace drun::rdma {

struct qp_address {
  std::uint32_t qpn = 0;
  std::uint32_t psn = 0;  // 24 bits
};

// What one end tells the other on the control channel (RDMA_SETUP / RDMA_READY bodies).
struct endpoint_address {
  std::uint16_t lid = 0;
  ibv_gid gid{};
  std::uint8_t mtu = 0;  // enum ibv_mtu
  std::vector<qp_address> qps;
  // The receiver's landing slots (absent from the sender's address).
  std::uint64_t slots_addr = 0;
  std::uint32_t rkey = 0;
  std::uint32_t slot_size = 0;
  std::uint32_t slot_count = 0;
};

inline constexpr std::size_t max_queue_pairs = 16;
inline constexpr std::size_t min_slot_size = 4096;
inline constexpr std::size_t max_slot_size = std::size_t{16} << 20;
inline constexpr std::size_t max_slot_count = 1024;

// Big-endian wire bodies. with_slots: the receiver's address (RDMA_SETUP).
std::vector<std::byte> encode(const endpoint_address& a, bool with_slots);
// Errors: malformed_bundle naming what is out of bounds (the protocol error).
result<endpoint_address> decode(std::span<const std::byte> body, bool with_slots);
std::size_t max_encoded_size(bool with_slots) noexcept;

// Checks an options struct; Errors: invalid_argument naming the field.
result<void> check(const rdma_options& o);

class endpoint final : public transport::data_path {
 public:
  // The fetching end: registers its slots and posts receives; connect() completes it.
  static result<std::unique_ptr<endpoint>> receiver(std::shared_ptr<device> dev, const rdma_options& o, int watch_fd);
  // The serving end, connected at once to the receiver's address (its QP count and slots). Its
  // own options bound what a receiver may ask for.
  static result<std::unique_ptr<endpoint>> sender(std::shared_ptr<device> dev, const rdma_options& o,
                                                  const endpoint_address& remote, int watch_fd);
  ~endpoint() override;

  const endpoint_address& address() const noexcept { return local_; }
  // Brings the receiver's QPs to RTS against the sender's address.
  result<void> connect(const endpoint_address& remote);

  const char* kind() const noexcept override { return "rdma"; }
  // Answers are cut into the receiver's slots: split on slot boundaries, the slices are the same.
  std::size_t send_granule() const noexcept override { return slot_size_ ? slot_size_ : 1; }
  result<void> send(std::span<const std::byte> bytes, transport::clock::time_point deadline,
                    const std::atomic<bool>* stop, const transport::pace_fn& pace) override;
  result<void> receive(std::span<std::byte> out, transport::clock::time_point deadline,
                       const std::atomic<bool>* stop) override;

  bool broken() const noexcept { return broken_.has_value(); }
  std::size_t registered_bytes() const noexcept { return region_ ? region_->size() : 0; }
  // What a sender for this receiver address would register (the peer server budgets it).
  static std::size_t sender_bytes(const endpoint_address& remote) noexcept;

 private:
  enum class role { sender, receiver };
  endpoint(std::shared_ptr<device> dev, role r, const rdma_options& o, int watch_fd);
  result<void> create_queues(std::size_t qps, std::size_t send_depth, std::size_t recv_depth, int access);
  result<void> to_rts(const endpoint_address& remote);
  result<void> post_receive(std::size_t qp);
  // Polls both CQs once, handling what completed; returns how many completions it saw.
  result<int> poll_once();
  result<void> handle(const ibv_wc& wc, bool send_cq);
  // Waits until done() holds, polling; the deadline, stop and a closed control channel end it.
  template <class Done>
  result<void> wait(Done&& done, transport::clock::time_point deadline, const std::atomic<bool>* stop,
                    const char* what);
  result<void> send_credit();
  error fail(std::string why);

  std::shared_ptr<device> dev_;
  role role_;
  rdma_options o_;
  int watch_fd_;
  std::optional<error> broken_;

  // Declaration order is teardown order reversed: QPs go first, then CQs, then the region (and
  // its PD) back to the device's cache.
  std::unique_ptr<device::region> region_;  // receiver: landing slots; sender: staging ring
  cq_handle scq_, rcq_;
  std::vector<qp_handle> qps_;
  endpoint_address local_;

  std::size_t slot_size_ = 0, slot_count_ = 0;  // the receiver's slots
  std::uint64_t remote_addr_ = 0;
  std::uint32_t remote_rkey_ = 0;

  // Sender.
  std::size_t staging_ = 0;        // staging slices
  std::size_t signal_every_ = 1;   // effective, per QP
  std::uint64_t written_ = 0;      // slices posted
  std::uint64_t consumed_ = 0;     // the receiver's last report
  std::vector<std::vector<std::uint64_t>> pending_;  // per QP: posted, not yet known complete
  std::vector<std::size_t> unsignalled_;

  // Receiver.
  std::uint64_t next_ = 0;         // the next slice to copy out
  std::uint64_t answer_end_ = 0;   // one past the current answer's last slice
  std::uint64_t reported_ = 0;     // the consumed count last sent
  std::size_t credits_in_flight_ = 0;
  std::vector<std::uint64_t> arrived_;     // per slot: the slice there, or none
  std::vector<std::uint32_t> arrived_len_;
};

}  // namespace drun::rdma

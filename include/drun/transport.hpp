// Transports: how a piece's bytes cross from a serving peer to a fetching one once the TLS 1.3
// control channel has authenticated the caller. TCP+TLS carries them inside the TLS stream; RDMA
// carries them over RC queue pairs (libibverbs) that the two ends set up on that channel. Each
// peer connection uses RDMA when both ends ask for it and have a device, and TCP+TLS otherwise:
// one build runs on every host, because libibverbs is loaded at run time (dlopen).
//
// WARNING: RDMA moves piece bytes unencrypted on the fabric (the control channel stays TLS).
// Every piece is still verified against the signed manifest on arrival, so a fabric that flips
// or forges bytes cannot make drun use them, but anyone who can read the fabric can read the
// pieces. Enable RDMA only inside a fabric you trust, or keep to TCP+TLS.
#pragma once

#include <drun/config.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace drun {

// RDMA settings for one end of a peer connection (peer_server_options::rdma,
// peer_client_options::rdma). Off by default.
struct rdma_options {
  bool enabled = false;
  std::string device;            // e.g. "mlx5_0"; empty: the first device with an active port
  unsigned port = 1;             // the device's port
  int gid_index = -1;            // -1: a RoCE v2 IPv4 GID when there is one, else GID 0
  unsigned queue_pairs = 2;      // RC QPs per connection; slices are striped across them
  // The fetching end's landing slots: slot_count slots of slot_size bytes, registered once per
  // connection. Pieces are cut into slot-sized slices; slot_count bounds the slices in flight.
  std::size_t slot_size = std::size_t{256} << 10;
  unsigned slot_count = 32;
  unsigned signal_every = 8;     // the sender asks for a completion every N writes per QP
  // No completion for this long ends RDMA for the peer (its pieces continue over TCP+TLS).
  std::chrono::milliseconds timeout{10000};
};

// What this host offers. available is false when libibverbs cannot be loaded, lists no device,
// or the named device has no active port; reason says which, in words.
struct rdma_status {
  bool available = false;
  std::string reason;                 // why not (empty when available)
  std::string library;                // the library tried: DRUN_IBVERBS_LIBRARY, else libibverbs.so.1
  std::vector<std::string> devices;   // every device libibverbs lists
};

// Probes once per process and remembers the answer. Thread safe; never throws.
DRUN_API rdma_status rdma_probe();
inline bool rdma_available() { return rdma_probe().available; }

}  // namespace drun

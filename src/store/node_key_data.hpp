// Internal access to node key bytes (for HKDF only).
#pragma once

#include <drun/node_key.hpp>

#include <span>

namespace drun::detail {

struct node_key_access {
  static std::span<const std::byte> bytes(const node_key& k);
};

}  // namespace drun::detail

// Secret bytes in libsodium guarded memory (guard pages, mlock), wiped when freed.
#pragma once

#include "detail/sodium_init.hpp"

#include <cstddef>
#include <new>
#include <span>
#include <string_view>

namespace drun::detail {

class secret_buffer {
 public:
  explicit secret_buffer(std::size_t size) : n_(size) {
    ensure_sodium();
    p_ = static_cast<std::byte*>(sodium_malloc(size ? size : 1));
    if (!p_) throw std::bad_alloc();
  }
  ~secret_buffer() { sodium_free(p_); }  // sodium_free zeroes before unmapping
  secret_buffer(const secret_buffer&) = delete;
  secret_buffer& operator=(const secret_buffer&) = delete;

  std::byte* data() noexcept { return p_; }
  unsigned char* uchar() noexcept { return reinterpret_cast<unsigned char*>(p_); }
  std::size_t size() const noexcept { return n_; }
  std::span<std::byte> span() noexcept { return {p_, n_}; }
  std::string_view view(std::size_t len) const noexcept { return {reinterpret_cast<const char*>(p_), len}; }

 private:
  std::byte* p_ = nullptr;
  std::size_t n_;
};

}  // namespace drun::detail

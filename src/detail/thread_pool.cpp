// Parallel loops for hashing.
#include "detail/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

namespace drun::detail {

unsigned worker_count(unsigned requested, std::size_t tasks) noexcept {
  unsigned n = requested ? requested : std::max(1u, std::thread::hardware_concurrency());
  if (tasks < n) n = static_cast<unsigned>(std::max<std::size_t>(tasks, 1));
  return n;
}

void parallel_for(std::size_t tasks, unsigned workers,
                  const std::function<bool(std::size_t, unsigned)>& body) {
  std::atomic<std::size_t> next{0};
  std::atomic<bool> stop{false};
  auto run = [&](unsigned worker) {
    while (!stop.load(std::memory_order_relaxed)) {
      std::size_t task = next.fetch_add(1, std::memory_order_relaxed);
      if (task >= tasks) return;
      if (!body(task, worker)) stop.store(true, std::memory_order_relaxed);
    }
  };
  std::vector<std::jthread> threads;
  threads.reserve(workers > 0 ? workers - 1 : 0);
  for (unsigned w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
}

}  // namespace drun::detail

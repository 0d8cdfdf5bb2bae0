// Parallel loops for hashing: a fixed set of threads pulls task indices from a shared counter,
// so one big file's pieces spread over every core and no thread idles while work remains.
#pragma once

#include <cstddef>
#include <functional>

namespace drun::detail {

// Number of worker threads to use for `requested` (0 = hardware concurrency), at most `tasks`.
unsigned worker_count(unsigned requested, std::size_t tasks) noexcept;

// Runs body(task, worker) for every task in [0, tasks) on `workers` threads (the caller's thread
// is one of them). A body returning false stops the hand-out of further tasks. Blocks until all
// started tasks have finished. body must not throw.
void parallel_for(std::size_t tasks, unsigned workers,
                  const std::function<bool(std::size_t task, unsigned worker)>& body);

}  // namespace drun::detail

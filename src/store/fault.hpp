// Fault injection for the store's white-box tests (they link the library's objects): failures
// that cannot be provoked from outside deterministically.
#pragma once

#include <atomic>

namespace drun::store_detail {

// materialize fails the rename of its Nth top-level entry into place (-1: never).
extern std::atomic<int> fail_export_rename_after;
// The next fdatasync of a commit fails with EIO.
extern std::atomic<bool> fail_next_commit_sync;

}  // namespace drun::store_detail

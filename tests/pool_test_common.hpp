// Helpers shared by the Pool tests: small task functions, the worker-count parameter, waiting.
#pragma once

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <multiproc/multiproc.hpp>

#include "test_support.hpp"

// POOLTEST_ASAN: defined in builds with AddressSanitizer (gcc or clang), for the tests that must
// adapt to it; POOLTEST_TSAN: 1 in builds with ThreadSanitizer, else 0.
#if TESTSUPPORT_ASAN
#define POOLTEST_ASAN 1
#endif
#define POOLTEST_TSAN TESTSUPPORT_TSAN

// ThreadSanitizer postpones asynchronous signals to its own safe points, and in a child forked from
// a multi-threaded process a worker blocked in a task never reaches one: the parent-death signal
// handler that takes the worker's process group down does not run there. Tests of that path
// under fork are left out of TSan builds (the other builds run them).
#define POOLTEST_SKIP_FORK_PARENT_DEATH_UNDER_TSAN(method)                                  \
  do {                                                                                      \
    if (POOLTEST_TSAN && (method) == multiproc::StartMethod::fork)                          \
      GTEST_SKIP() << "ThreadSanitizer defers the parent-death handler in a forked worker"; \
  } while (0)

// Clang before 16 cannot compile libstdc++'s range views (std::views::iota, filter, ref_view,
// owning_view: llvm/llvm-project#52696), and Pool::imap wraps its input in std::views::all. Tests
// that need views or imap are left out of such builds (the project's TSan build uses clang).
#if defined(__clang__) && __clang_major__ < 16 && defined(__GLIBCXX__)
#define POOLTEST_HAVE_VIEWS 0
#else
#define POOLTEST_HAVE_VIEWS 1
#endif

namespace pooltest {

using namespace std::chrono_literals;

inline int square(int x) { return x * x; }
inline int add(int a, int b) { return a + b; }
inline pid_t pid_of_worker(int) { return ::getpid(); }
inline int sleep_ms_then_return(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}

/// A new empty file's path under /tmp (the caller unlinks it).
inline std::string temp_file() {
  char tmpl[] = "/tmp/multiproc-test-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  if (fd >= 0) ::close(fd);
  return tmpl;
}

/// The number of lines in the file at `path`.
inline std::size_t lines_in(const std::string& path) {
  std::ifstream in(path);
  std::size_t n = 0;
  for (std::string line; std::getline(in, line);) ++n;
  return n;
}

/// Appends a line to `path` (so a test can wait until the task has started), then sleeps `ms`.
inline int append_line_then_sleep(std::string path, int ms) {
  std::ofstream(path, std::ios::app) << "started\n";
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}

inline std::vector<int> iota_vector(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i;
  return v;
}

/// A real segfault: a store through a null pointer. The sanitizers are kept out of it, so that the
/// worker dies of SIGSEGV rather than of a sanitizer report (fork_process resets their handlers).
__attribute__((noinline, no_sanitize("address", "undefined"))) inline void segfault_now() {
  volatile int* volatile p = nullptr;
  *p = 42;
}

/// from, from + 1, ..., to - 1.
inline std::vector<int> range_vector(int from, int to) {
  std::vector<int> v;
  for (int i = from; i < to; ++i) v.push_back(i);
  return v;
}

inline std::vector<int> squares(int n) {
  std::vector<int> v;
  for (int i = 0; i < n; ++i) v.push_back(i * i);
  return v;
}

inline bool contains(const std::vector<pid_t>& pids, pid_t pid) {
  return std::find(pids.begin(), pids.end(), pid) != pids.end();
}

using test_support::eventually;
using test_support::generous;
using test_support::scaled;

/// Crashing workers must not write core files (slow, and litter the build tree): a limit of 1
/// byte disables both file and pipe (systemd-coredump, apport) dumps.
inline void disable_core_dumps() {
  rlimit r{};
  ::getrlimit(RLIMIT_CORE, &r);
  r.rlim_cur = std::min<rlim_t>(1, r.rlim_max);
  ::setrlimit(RLIMIT_CORE, &r);
}

/// Test-suite parameter: the number of workers.
class WorkersTest : public ::testing::TestWithParam<int> {
 protected:
  [[nodiscard]] int workers() const { return GetParam(); }
  [[nodiscard]] multiproc::Pool make_pool() const { return multiproc::Pool{{.processes = GetParam()}}; }
};

inline std::string workers_name(const ::testing::TestParamInfo<int>& info) { return "w" + std::to_string(info.param); }

}  // namespace pooltest

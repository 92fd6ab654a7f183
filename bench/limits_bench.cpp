// Machine limits: what the hardware and the kernel cost before any library code runs. The
// figures in bench/compare_all.py are read against these:
//   BM_ForkExitWait           fork() + _exit(0) in the child + waitpid (time per child)
//   BM_FutexPingPong          a round trip between two processes that sleep in FUTEX_WAIT and wake
//                             each other with FUTEX_WAKE on a word in shared anonymous memory
//   BM_FutexPingPongOneCpu    the same with both processes pinned to one CPU: no idle CPU to wake
//                             up (on a VM, waking an idle virtual CPU is most of the cost above)
//   BM_SpinPingPong           the same round trip with both processes spinning on the word (with
//                             a pause instruction): no system call at all, the cache-line transfer
//   BM_MemcpyTouched256MiB    memcpy of 256 MiB into a buffer already written once (bytes/s)
//   BM_MemcpyFresh256MiB      memcpy of 256 MiB into memory just mapped, munmap included: the
//                             page faults a receiver's new buffer pays (bytes/s)
//   BM_MemcpyFreshHuge256MiB  the same with madvise(MADV_HUGEPAGE) on the new mapping (one fault
//                             per 2 MiB where transparent huge pages are available)
//   BM_MapSegment16MiB        mmap of a memfd segment of 16 MiB / 1 GiB (written once, before),
//   BM_MapSegment1GiB         a write at each end, munmap: what a receiver of a shared segment pays
//                             in the kernel (page tables for two far-apart pages; no copy)
//   BM_ThreadPoolRoundTrip    an in-process round trip to one worker thread, with a mutex and a
//                             condition variable each way (no processes at all)
//   BM_ThreadPoolRoundTripOneCpu  the same, both threads pinned to one CPU
// Raw system calls on purpose: nothing here uses multiproc.
#include <benchmark/benchmark.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>

namespace {

constexpr std::size_t kCopyBytes = std::size_t{256} << 20;

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Pins the calling thread (and the processes and threads it starts) to one CPU it may run on,
// and restores its CPU set when destroyed.
class PinToOneCpu {
 public:
  explicit PinToOneCpu(bool pin) {
    if (!pin || ::sched_getaffinity(0, sizeof saved_, &saved_) != 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &saved_)) {
        CPU_SET(c, &one);
        break;
      }
    }
    pinned_ = ::sched_setaffinity(0, sizeof one, &one) == 0;
  }
  ~PinToOneCpu() {
    if (pinned_) ::sched_setaffinity(0, sizeof saved_, &saved_);
  }
  PinToOneCpu(const PinToOneCpu&) = delete;
  PinToOneCpu& operator=(const PinToOneCpu&) = delete;

 private:
  cpu_set_t saved_{};
  bool pinned_ = false;
};

bool wait_child(pid_t pid) {
  int status = 0;
  return ::waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

void BM_ForkExitWait(benchmark::State& state) {
  for (auto _ : state) {
    const pid_t pid = ::fork();
    if (pid == 0) ::_exit(0);
    if (pid < 0 || !wait_child(pid)) {
      state.SkipWithError("fork failed or child did not exit with 0");
      break;
    }
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ForkExitWait)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

// The word both processes share: whose turn it is.
enum Turn : std::uint32_t { kParent = 0, kChild = 1, kQuit = 2 };
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

std::atomic<std::uint32_t>* map_shared_word() {
  void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  return new (p) std::atomic<std::uint32_t>(kParent);
}

// Shared (not FUTEX_PRIVATE) operations: the word is mapped by two processes.
void futex_wait(std::atomic<std::uint32_t>* word, std::uint32_t expected) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT, expected, nullptr, nullptr, 0);
}
void futex_wake(std::atomic<std::uint32_t>* word) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

// One round trip: the parent hands the turn to the child and waits for it back. `Wait(word,
// value)` returns once the word may have changed from `value`; `Wake(word)` follows each store.
template <class Wait, class Wake>
void ping_pong(benchmark::State& state, Wait wait, Wake wake, bool one_cpu = false) {
  const PinToOneCpu pin(one_cpu);
  auto* word = map_shared_word();
  if (word == nullptr) {
    state.SkipWithError("mmap failed");
    return;
  }
  const pid_t pid = ::fork();
  if (pid == 0) {
    for (;;) {
      std::uint32_t t = word->load(std::memory_order_acquire);
      while (t == kParent) {
        wait(word, kParent);
        t = word->load(std::memory_order_acquire);
      }
      if (t == kQuit) ::_exit(0);
      word->store(kParent, std::memory_order_release);
      wake(word);
    }
  }
  if (pid < 0) {
    state.SkipWithError("fork failed");
    ::munmap(word, 4096);
    return;
  }
  for (auto _ : state) {
    word->store(kChild, std::memory_order_release);
    wake(word);
    while (word->load(std::memory_order_acquire) == kChild) wait(word, kChild);
  }
  word->store(kQuit, std::memory_order_release);
  wake(word);
  if (!wait_child(pid)) state.SkipWithError("child did not exit with 0");
  ::munmap(word, 4096);
  state.SetItemsProcessed(state.iterations());
}

void BM_FutexPingPong(benchmark::State& state) { ping_pong(state, futex_wait, futex_wake); }
BENCHMARK(BM_FutexPingPong)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

void BM_FutexPingPongOneCpu(benchmark::State& state) { ping_pong(state, futex_wait, futex_wake, true); }
BENCHMARK(BM_FutexPingPongOneCpu)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

void BM_SpinPingPong(benchmark::State& state) {
  ping_pong(
      state, [](std::atomic<std::uint32_t>*, std::uint32_t) { cpu_relax(); }, [](std::atomic<std::uint32_t>*) {});
}
BENCHMARK(BM_SpinPingPong)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

char* map_bytes(std::size_t n) {
  void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
}

void BM_MemcpyTouched256MiB(benchmark::State& state) {
  char* src = map_bytes(kCopyBytes);
  char* dst = map_bytes(kCopyBytes);
  if (src == nullptr || dst == nullptr) {
    state.SkipWithError("mmap failed");
    return;
  }
  std::memset(src, 'x', kCopyBytes);
  std::memset(dst, 0, kCopyBytes);
  for (auto _ : state) {
    std::memcpy(dst, src, kCopyBytes);
    benchmark::ClobberMemory();
  }
  ::munmap(src, kCopyBytes);
  ::munmap(dst, kCopyBytes);
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(kCopyBytes));
}
BENCHMARK(BM_MemcpyTouched256MiB)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.3);

void memcpy_fresh(benchmark::State& state, bool huge) {
  char* src = map_bytes(kCopyBytes);
  if (src == nullptr) {
    state.SkipWithError("mmap failed");
    return;
  }
  std::memset(src, 'x', kCopyBytes);
  for (auto _ : state) {
    char* dst = map_bytes(kCopyBytes);
    if (dst == nullptr) {
      state.SkipWithError("mmap failed");
      break;
    }
    if (huge) ::madvise(dst, kCopyBytes, MADV_HUGEPAGE);  // a hint: ignored where THP is off
    std::memcpy(dst, src, kCopyBytes);
    benchmark::ClobberMemory();
    ::munmap(dst, kCopyBytes);
  }
  ::munmap(src, kCopyBytes);
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(kCopyBytes));
}

void BM_MemcpyFresh256MiB(benchmark::State& state) { memcpy_fresh(state, false); }
BENCHMARK(BM_MemcpyFresh256MiB)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.3);

void BM_MemcpyFreshHuge256MiB(benchmark::State& state) { memcpy_fresh(state, true); }
BENCHMARK(BM_MemcpyFreshHuge256MiB)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.3);

// A memfd segment of `bytes`, written through once so that its pages exist; made once per size
// (kept for the program's life) so that repetitions do not pay for it again.
int populated_segment(std::size_t bytes) {
  const int fd = ::memfd_create("limits_bench", MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(bytes)) != 0) return -1;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return -1;
  std::memset(p, 'x', bytes);
  ::munmap(p, bytes);
  return fd;
}

void map_segment(benchmark::State& state, int fd, std::size_t bytes) {
  if (fd < 0) {
    state.SkipWithError("memfd failed");
    return;
  }
  for (auto _ : state) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      state.SkipWithError("mmap failed");
      break;
    }
    auto* bytes_p = static_cast<volatile char*>(p);
    bytes_p[0] = 1;
    bytes_p[bytes - 1] = 1;
    ::munmap(p, bytes);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_MapSegment16MiB(benchmark::State& state) {
  static const int fd = populated_segment(std::size_t{16} << 20);
  map_segment(state, fd, std::size_t{16} << 20);
}
BENCHMARK(BM_MapSegment16MiB)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);

void BM_MapSegment1GiB(benchmark::State& state) {
  static const int fd = populated_segment(std::size_t{1} << 30);
  map_segment(state, fd, std::size_t{1} << 30);
}
BENCHMARK(BM_MapSegment1GiB)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1);

// One worker thread; the caller posts a request and waits for the reply, each under the mutex and
// signalled through its own condition variable.
void thread_round_trip(benchmark::State& state, bool one_cpu) {
  const PinToOneCpu pin(one_cpu);  // before the worker starts: it inherits the CPU set
  std::mutex m;
  std::condition_variable to_worker, to_caller;
  std::uint64_t posted = 0, done = 0;
  bool quit = false;
  std::thread worker([&] {
    std::unique_lock lock(m);
    for (;;) {
      to_worker.wait(lock, [&] { return quit || posted != done; });
      if (quit) return;
      done = posted;  // the task: nothing
      to_caller.notify_one();
    }
  });
  for (auto _ : state) {
    std::unique_lock lock(m);
    ++posted;
    to_worker.notify_one();
    to_caller.wait(lock, [&] { return done == posted; });
  }
  {
    std::lock_guard lock(m);
    quit = true;
  }
  to_worker.notify_one();
  worker.join();
  state.SetItemsProcessed(state.iterations());
}

void BM_ThreadPoolRoundTrip(benchmark::State& state) { thread_round_trip(state, false); }
BENCHMARK(BM_ThreadPoolRoundTrip)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

void BM_ThreadPoolRoundTripOneCpu(benchmark::State& state) { thread_round_trip(state, true); }
BENCHMARK(BM_ThreadPoolRoundTripOneCpu)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

}  // namespace

BENCHMARK_MAIN();

// Pool benchmarks, on one Pool of 2 workers unless said otherwise:
//   BM_ApplyRoundTrip       apply of an idle task, one at a time (time per call)
//   BM_Map1e6Ints           map over 10^6 ints, default chunking (items/s)
//   BM_ImapChunksize1       imap over 20,000 ints, chunksize 1 (items/s)
//   BM_MapChunksize1        map over 20,000 ints, chunksize 1 (items/s)
//   BM_Vector256MiB         a 256 MiB std::vector<char> passed by value to apply, its size
//                           returned (bytes/s): streamed to the worker from the caller's vector
//   BM_Vector256MiBAsync    the same through apply_async: copied at submission, then streamed
//   BM_SharedArray16MiB     a SharedArray<char> of 16 MiB / 1 GiB passed to apply: the worker maps
//   BM_SharedArray1GiB      it, writes both ends and returns its size (time per call)
//   BM_CpuBoundSerial       40 tasks of ~40 ms of arithmetic, one after another in this process
//   BM_CpuBoundPool         the same 40 tasks: a Pool of 2 made inside the timed loop, map with
//                           chunksize 1, the pool torn down (wall time, pool start included)
//   BM_CpuBoundBareFork     the same 40 tasks on two bare fork()ed children (20 each), waitpid
//                           both: the speed-up a Pool can at best reach
// bench/compare_all.py runs these beside Python's multiprocessing and prints medians and ratios
// (bench/compare_python.py, the first three only).
#include <benchmark/benchmark.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <multiproc/multiproc.hpp>
#include <numeric>
#include <vector>

namespace {

int identity(int x) { return x; }
int square(int x) { return x * x; }

std::vector<int> iota_vector(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

multiproc::Pool& pool() {
  static multiproc::Pool p{{.processes = 2}};
  return p;
}

void BM_ApplyRoundTrip(benchmark::State& state) {
  auto& p = pool();
  int i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(p.apply(identity, ++i));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ApplyRoundTrip)->UseRealTime()->MinTime(0.5);

void BM_Map1e6Ints(benchmark::State& state) {
  auto& p = pool();
  const auto xs = iota_vector(1'000'000);
  for (auto _ : state) {
    auto ys = p.map(square, xs);
    benchmark::DoNotOptimize(ys.data());
  }
  state.SetItemsProcessed(state.iterations() * 1'000'000);
}
BENCHMARK(BM_Map1e6Ints)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

constexpr int kChunksize1Items = 20'000;

void BM_ImapChunksize1(benchmark::State& state) {
  auto& p = pool();
  const auto xs = iota_vector(kChunksize1Items);
  for (auto _ : state) {
    long sum = 0;
    for (int y : p.imap(square, xs, 1)) sum += y;
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(state.iterations() * kChunksize1Items);
}
BENCHMARK(BM_ImapChunksize1)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

void BM_MapChunksize1(benchmark::State& state) {
  auto& p = pool();
  const auto xs = iota_vector(kChunksize1Items);
  for (auto _ : state) {
    auto ys = p.map(square, xs, 1);
    benchmark::DoNotOptimize(ys.data());
  }
  state.SetItemsProcessed(state.iterations() * kChunksize1Items);
}
BENCHMARK(BM_MapChunksize1)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

// Taken by value: the worker receives its own copy (the pool moves the decoded argument in).
std::size_t byte_count(std::vector<char> v) { return v.size(); }

void BM_Vector256MiB(benchmark::State& state) {
  constexpr std::size_t kBytes = std::size_t{256} << 20;
  auto& p = pool();
  const std::vector<char> big(kBytes, 'x');  // built (and touched) once, outside the loop
  for (auto _ : state) {
    if (p.apply(byte_count, big) != kBytes) {
      state.SkipWithError("wrong size returned");
      break;
    }
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(kBytes));
}
BENCHMARK(BM_Vector256MiB)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

// The same through apply_async: the argument is copied at submission (the caller may change it at
// once), then streamed from that copy.
void BM_Vector256MiBAsync(benchmark::State& state) {
  constexpr std::size_t kBytes = std::size_t{256} << 20;
  auto& p = pool();
  const std::vector<char> big(kBytes, 'x');
  for (auto _ : state) {
    if (p.apply_async(byte_count, big).get() != kBytes) {
      state.SkipWithError("wrong size returned");
      break;
    }
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(kBytes));
}
BENCHMARK(BM_Vector256MiBAsync)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

// The worker maps the segment, writes one byte at each end (so the mapping is really used) and
// returns the size it sees.
std::size_t touch_ends(multiproc::SharedArray<char> a) {
  a[0] = 1;
  a[a.size() - 1] = 1;
  return a.size();
}

void shared_array(benchmark::State& state, std::size_t bytes) {
  auto& p = pool();
  multiproc::SharedArray<char> a(bytes);
  std::memset(a.data(), 'x', a.size());  // resident, as real data would be
  for (auto _ : state) {
    if (p.apply(touch_ends, a) != bytes) {
      state.SkipWithError("wrong size returned");
      break;
    }
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["bytes"] = static_cast<double>(bytes);
}

void BM_SharedArray16MiB(benchmark::State& state) { shared_array(state, std::size_t{16} << 20); }
BENCHMARK(BM_SharedArray16MiB)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

void BM_SharedArray1GiB(benchmark::State& state) { shared_array(state, std::size_t{1} << 30); }
BENCHMARK(BM_SharedArray1GiB)->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

// CPU-bound work: xorshift steps, each depending on the last, so the compiler cannot shorten or
// vectorize them; a fixed amount of work, whatever the scheduler does (not a sleep).
std::uint64_t spin(std::uint64_t steps) {
  std::uint64_t x = 88172645463325252ULL;
  for (std::uint64_t i = 0; i < steps; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
  }
  return x;
}

constexpr int kCpuTasks = 40;
constexpr double kTaskSeconds = 0.040;

// The number of steps that take kTaskSeconds here, measured once (best of 3) and shared by the
// three CPU-bound benchmarks, so that they do the same work.
std::uint64_t task_steps() {
  static const std::uint64_t steps = [] {
    constexpr std::uint64_t probe = std::uint64_t{1} << 22;
    benchmark::DoNotOptimize(spin(probe));  // warm up (clock frequency)
    double best = 1e9;
    for (int i = 0; i < 3; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      benchmark::DoNotOptimize(spin(probe));
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return static_cast<std::uint64_t>(static_cast<double>(probe) * kTaskSeconds / best);
  }();
  return steps;
}

void cpu_counters(benchmark::State& state) {
  state.counters["tasks"] = kCpuTasks;
  state.counters["steps_per_task"] = static_cast<double>(task_steps());
}

void BM_CpuBoundSerial(benchmark::State& state) {
  const std::uint64_t steps = task_steps();
  for (auto _ : state) {
    std::uint64_t acc = 0;
    for (int t = 0; t < kCpuTasks; ++t) acc += spin(steps);
    benchmark::DoNotOptimize(acc);
  }
  cpu_counters(state);
}
BENCHMARK(BM_CpuBoundSerial)->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(1);

void BM_CpuBoundPool(benchmark::State& state) {
  const std::vector<std::uint64_t> tasks(kCpuTasks, task_steps());
  for (auto _ : state) {
    multiproc::Pool p{{.processes = 2}};  // started, used and torn down inside the timed loop
    const auto ys = p.map(spin, tasks, 1);
    benchmark::DoNotOptimize(ys.data());
  }
  cpu_counters(state);
}
BENCHMARK(BM_CpuBoundPool)->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(1);

void BM_CpuBoundBareFork(benchmark::State& state) {
  const std::uint64_t steps = task_steps();
  for (auto _ : state) {
    pid_t pids[2];
    for (pid_t& pid : pids) {
      pid = ::fork();
      if (pid == 0) {
        std::uint64_t acc = 0;
        for (int t = 0; t < kCpuTasks / 2; ++t) acc += spin(steps);
        benchmark::DoNotOptimize(acc);
        ::_exit(0);
      }
      if (pid < 0) {
        state.SkipWithError("fork failed");
        return;
      }
    }
    for (pid_t pid : pids) {
      int status = 0;
      if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        state.SkipWithError("child did not exit with 0");
      }
    }
  }
  cpu_counters(state);
}
BENCHMARK(BM_CpuBoundBareFork)->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(1);

}  // namespace

BENCHMARK_MAIN();

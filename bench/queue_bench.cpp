// Queue and Pipe benchmarks: Queue throughput 1->1 and 2->2 (producers -> consumers, each a
// process) for small items (ints) and 1 MiB items, and the Pipe round trip.
// bench/compare_python_queue.py runs these beside Python's multiprocessing.Queue and Pipe.
#include <benchmark/benchmark.h>

#include <multiproc/multiproc.hpp>
#include <tuple>
#include <vector>

namespace {

namespace mp = multiproc;

constexpr int kSmallItems = 200'000;  // per iteration, over all producers
constexpr int kLargeItems = 64;
constexpr std::size_t kLargeBytes = std::size_t{1} << 20;

// `producers` processes put `total` items (made by `make`) between them; `consumers` take them
// (the benchmark's own process when there is one consumer, child processes otherwise).
template <class T, class Make>
void run(benchmark::State& state, int producers, int consumers, int total, Make make) {
  mp::Queue<std::optional<T>> q;
  for (auto _ : state) {
    std::vector<mp::Process> procs;
    for (int p = 0; p < producers; ++p) {
      procs.emplace_back([&, p] {
        for (int i = p; i < total; i += producers) q.put(make(i));
      });
    }
    if (consumers > 1) {
      for (int c = 0; c < consumers; ++c) {
        procs.emplace_back([&] {
          while (auto item = q.get()) benchmark::DoNotOptimize(*item);
        });
      }
    }
    for (auto& p : procs) p.start();
    if (consumers == 1) {
      for (int i = 0; i < total; ++i) benchmark::DoNotOptimize(q.get());
    } else {
      for (int p = 0; p < producers; ++p) procs[static_cast<std::size_t>(p)].join();
      for (int c = 0; c < consumers; ++c) q.put(std::nullopt);
    }
    for (auto& p : procs) p.join();
  }
  state.SetItemsProcessed(state.iterations() * total);
}

void BM_Queue1to1Small(benchmark::State& state) {
  run<int>(state, 1, 1, kSmallItems, [](int i) { return i; });
}
BENCHMARK(BM_Queue1to1Small)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

void BM_Queue2to2Small(benchmark::State& state) {
  run<int>(state, 2, 2, kSmallItems, [](int i) { return i; });
}
BENCHMARK(BM_Queue2to2Small)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

std::vector<char> large_item(int i) { return std::vector<char>(kLargeBytes, static_cast<char>(i)); }

void BM_Queue1to1_1MiB(benchmark::State& state) {
  run<std::vector<char>>(state, 1, 1, kLargeItems, large_item);
  state.SetBytesProcessed(state.iterations() * kLargeItems * static_cast<std::int64_t>(kLargeBytes));
}
BENCHMARK(BM_Queue1to1_1MiB)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

void BM_Queue2to2_1MiB(benchmark::State& state) {
  run<std::vector<char>>(state, 2, 2, kLargeItems, large_item);
  state.SetBytesProcessed(state.iterations() * kLargeItems * static_cast<std::int64_t>(kLargeBytes));
}
BENCHMARK(BM_Queue2to2_1MiB)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

// One message to a child that echoes it, and back.
void BM_PipeRoundTrip(benchmark::State& state) {
  mp::Connection<int> here, there;
  std::tie(here, there) = mp::Pipe<int>();
  mp::Process echo{[&] {
    here.close();
    for (;;) {
      const int x = there.recv();
      if (x < 0) return;
      there.send(x);
    }
  }};
  echo.start();
  there.close();
  int i = 0;
  for (auto _ : state) {
    here.send(++i);
    benchmark::DoNotOptimize(here.recv());
  }
  here.send(-1);
  echo.join();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_PipeRoundTrip)->UseRealTime()->MinTime(0.5);

}  // namespace

BENCHMARK_MAIN();

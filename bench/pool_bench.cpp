// Pool benchmarks: apply round trip, map over 10^6 ints, imap with chunksize 1.
// bench/compare_python.py runs these beside Python's multiprocessing.Pool and prints ratios.
#include <benchmark/benchmark.h>

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
BENCHMARK(BM_ApplyRoundTrip)->UseRealTime()->MinTime(1.0);

void BM_Map1e6Ints(benchmark::State& state) {
  auto& p = pool();
  const auto xs = iota_vector(1'000'000);
  for (auto _ : state) {
    auto ys = p.map(square, xs);
    benchmark::DoNotOptimize(ys.data());
  }
  state.SetItemsProcessed(state.iterations() * 1'000'000);
}
BENCHMARK(BM_Map1e6Ints)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(1.0);

void BM_ImapChunksize1(benchmark::State& state) {
  auto& p = pool();
  constexpr int n = 20'000;
  const auto xs = iota_vector(n);
  for (auto _ : state) {
    long sum = 0;
    for (int y : p.imap(square, xs, 1)) sum += y;
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_ImapChunksize1)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(1.0);

}  // namespace

BENCHMARK_MAIN();

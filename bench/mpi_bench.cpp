// multiproc::mpi against a local Pool with as many workers, on the same CPU-bound work.
//
//     mpirun -n 3 build/bench/mpi_bench            # 2 worker ranks
//     mpirun -n 5 build/bench/mpi_bench [tasks]    # 4 worker ranks
//
// Prints, for tasks of about 10 ms of arithmetic each: wall time and efficiency (serial time /
// (wall time × workers)) of map(chunksize 1) on the MPI pool and on a local Pool on rank 0; then
// the round trip of one trivial apply() on each. The local Pool runs while the worker ranks idle
// (they poll for work with sleeps of up to 200 us), and the other way round.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <multiproc/mpi.hpp>
#include <multiproc/multiproc.hpp>
#include <vector>

namespace {

// About `iterations` dependent multiply-adds: CPU-bound, no memory traffic.
std::uint64_t spin(std::uint64_t iterations) {
  std::uint64_t x = iterations;
  for (std::uint64_t i = 0; i < iterations; ++i) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
  return x;
}

int noop(int x) { return x; }

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Iterations of spin() that take about `ms` milliseconds here.
std::uint64_t calibrate(double ms) {
  std::uint64_t n = 1'000'000;
  for (;;) {
    const double t0 = now_s();
    volatile std::uint64_t sink = spin(n);
    (void)sink;
    const double dt = now_s() - t0;
    if (dt > 0.05) return static_cast<std::uint64_t>(static_cast<double>(n) * ms / 1000.0 / dt);
    n *= 2;
  }
}

struct Row {
  double map_s;
  double apply_us;
};

Row measure(multiproc::Pool& pool, const std::vector<std::uint64_t>& tasks, int applies) {
  (void)pool.map(spin, std::vector<std::uint64_t>(static_cast<std::size_t>(pool.processes()) * 2, 1000), 1);  // warm up
  const double t0 = now_s();
  const auto r = pool.map(spin, tasks, 1);
  const double map_s = now_s() - t0;
  (void)r;
  for (int i = 0; i < 50; ++i) (void)pool.apply(noop, i);
  const double t1 = now_s();
  for (int i = 0; i < applies; ++i) (void)pool.apply(noop, i);
  const double apply_us = (now_s() - t1) / applies * 1e6;
  return {map_s, apply_us};
}

}  // namespace

int main(int argc, char** argv) {
  multiproc::mpi::init(argc, argv);
  const int workers = multiproc::mpi::size() - 1;
  if (workers < 1) {
    std::fprintf(stderr, "run me under mpirun with 2 or more ranks\n");
    return 2;
  }
  const int ntasks = argc > 1 ? std::atoi(argv[1]) : 40 * workers;
  const int applies = 2000;
  const std::uint64_t per_task = calibrate(10.0);
  const std::vector<std::uint64_t> tasks(static_cast<std::size_t>(ntasks), per_task);

  const double s0 = now_s();
  for (auto t : tasks) {
    volatile std::uint64_t sink = spin(t);
    (void)sink;
  }
  const double serial = now_s() - s0;

  multiproc::Pool mpi_pool = multiproc::mpi::make_pool();
  const Row m = measure(mpi_pool, tasks, applies);
  multiproc::Pool local{{.processes = workers, .start_method = multiproc::StartMethod::forkserver}};
  const Row l = measure(local, tasks, applies);

  std::printf("%d worker(s), %d tasks of %.1f ms (serial %.3f s)\n", workers, ntasks, serial / ntasks * 1e3, serial);
  std::printf("%-22s %10s %11s %16s\n", "pool", "map s", "efficiency", "apply round trip");
  std::printf("%-22s %10.3f %10.1f%% %13.1f us\n", "multiproc::mpi", m.map_s, 100.0 * serial / (m.map_s * workers),
              m.apply_us);
  std::printf("%-22s %10.3f %10.1f%% %13.1f us\n", "local multiproc::Pool", l.map_s,
              100.0 * serial / (l.map_s * workers), l.apply_us);
  return 0;
}

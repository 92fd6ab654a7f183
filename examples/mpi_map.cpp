// Counting primes in blocks, spread over MPI ranks with multiproc::mpi, next to the same map on a
// local Pool of as many worker processes on rank 0.
//
//     mpirun -n 3 build/examples/mpi_map            # 2 worker ranks
//     mpirun -n 5 build/examples/mpi_map 200 50000  # 4 worker ranks, 200 blocks of 50000 numbers
//
// (As root, or with more ranks than cores, add --allow-run-as-root and --oversubscribe.)
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <multiproc/mpi.hpp>
#include <multiproc/multiproc.hpp>
#include <numeric>
#include <utility>
#include <vector>

namespace {

bool is_prime(std::int64_t n) {
  if (n < 2) return false;
  if (n % 2 == 0) return n == 2;
  for (std::int64_t d = 3; d * d <= n; d += 2) {
    if (n % d == 0) return false;
  }
  return true;
}

// The primes in [block.first, block.second).
std::int64_t count_primes(std::pair<std::int64_t, std::int64_t> block) {
  std::int64_t count = 0;
  for (std::int64_t n = block.first; n < block.second; ++n) count += is_prime(n) ? 1 : 0;
  return count;
}

template <class F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  multiproc::mpi::init(argc, argv);  // worker ranks serve tasks here and never return
  const int ranks = multiproc::mpi::size();
  if (ranks < 2) {
    std::fprintf(stderr, "run me under mpirun with 2 or more ranks: mpirun -n 3 %s\n", argv[0]);
    return 2;
  }
  const std::int64_t blocks = argc > 1 ? std::atoll(argv[1]) : 64;
  const std::int64_t block_size = argc > 2 ? std::atoll(argv[2]) : 20000;
  const std::int64_t base = 1'000'000'000;
  std::vector<std::pair<std::int64_t, std::int64_t>> work;
  for (std::int64_t b = 0; b < blocks; ++b) work.emplace_back(base + b * block_size, base + (b + 1) * block_size);
  const int workers = ranks - 1;

  std::int64_t serial_total = 0;
  const double t_serial = seconds([&] {
    for (const auto& b : work) serial_total += count_primes(b);
  });

  // Both pools are started before the clock runs: the table compares the maps alone.
  multiproc::Pool mpi_pool = multiproc::mpi::make_pool();
  multiproc::Pool local_pool{{.processes = workers, .start_method = multiproc::StartMethod::forkserver}};
  (void)local_pool.map(count_primes, std::vector<std::pair<std::int64_t, std::int64_t>>(static_cast<std::size_t>(workers), {0, 1}), 1);

  std::int64_t mpi_total = 0;
  const double t_mpi = seconds([&] {
    const auto counts = mpi_pool.map(count_primes, work, 1);
    mpi_total = std::accumulate(counts.begin(), counts.end(), std::int64_t{0});
  });

  std::int64_t local_total = 0;
  const double t_local = seconds([&] {
    const auto counts = local_pool.map(count_primes, work, 1);
    local_total = std::accumulate(counts.begin(), counts.end(), std::int64_t{0});
  });

  std::printf("primes in [%lld, %lld): %lld blocks of %lld numbers, %d workers\n", static_cast<long long>(base),
              static_cast<long long>(base + blocks * block_size), static_cast<long long>(blocks),
              static_cast<long long>(block_size), workers);
  std::printf("%-34s %10s %10s %9s %11s\n", "engine", "primes", "seconds", "speed-up", "efficiency");
  const auto row = [&](const char* name, std::int64_t total, double t, int n) {
    std::printf("%-34s %10lld %10.3f %8.2fx %10.0f%%\n", name, static_cast<long long>(total), t, t_serial / t,
                100.0 * t_serial / t / n);
  };
  row("serial (rank 0)", serial_total, t_serial, 1);
  row("multiproc::mpi pool (worker ranks)", mpi_total, t_mpi, workers);
  row("local multiproc::Pool (rank 0)", local_total, t_local, workers);
  const bool agree = serial_total == mpi_total && serial_total == local_total;
  if (!agree) std::printf("MISMATCH between the engines\n");
  return agree ? 0 : 1;
}

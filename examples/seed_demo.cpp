// seed_demo: several different computations on one large input, run one after another, then one
// multiproc::Process per computation, then on a multiproc::Pool, with a table of wall times and
// speed-ups. Then the same on a Pool where one extra computation crashes: its row reports the
// signal, and every other row still finishes.
//
//   seed_demo [--size N] [--processes P] [--no-crash]
#include <sys/mman.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <multiproc/multiproc.hpp>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace mp = multiproc;
using Input = std::vector<std::int32_t>;

// ---- the computations: each takes the whole input, returns one number for the table ---------

double compute_mean_stddev(const Input& xs) {
  double sum = 0, sq = 0;
  for (auto x : xs) {
    sum += x;
    sq += static_cast<double>(x) * x;
  }
  const double mean = sum / static_cast<double>(xs.size());
  return std::sqrt(sq / static_cast<double>(xs.size()) - mean * mean);
}

double compute_histogram_peak(const Input& xs) {
  std::vector<std::uint64_t> bins(1024);
  for (auto x : xs) bins[static_cast<std::uint32_t>(x) % bins.size()]++;
  return static_cast<double>(*std::max_element(bins.begin(), bins.end()));
}

double compute_sorted_median(const Input& xs) {
  Input copy = xs;
  std::sort(copy.begin(), copy.end());
  return copy[copy.size() / 2];
}

// Counts the inputs that are prime, by trial division (deliberately the heaviest computation).
bool is_prime(std::int32_t n) {
  if (n < 2) return false;
  if (n % 2 == 0) return n == 2;
  for (std::int32_t d = 3; static_cast<std::int64_t>(d) * d <= n; d += 2) {
    if (n % d == 0) return false;
  }
  return true;
}

double count_primes(const Input& xs) {
  std::uint64_t count = 0;
  for (auto x : xs) count += is_prime(x);
  return static_cast<double>(count);
}

// A computation with a bug: it dereferences a null pointer (a real SIGSEGV).
double faulty_computation(const Input& xs) {
  volatile std::int32_t* p = nullptr;
  if (!xs.empty()) *p = xs[0];
  return 0;
}

// The input, set before the pool starts: forked workers inherit it, so the blocks of the map
// below read it without any copy.
const Input* g_input = nullptr;
constexpr std::size_t kBlocks = 64;

double count_primes_in_block(std::size_t block) {
  const Input& xs = *g_input;
  const std::size_t begin = xs.size() * block / kBlocks, end = xs.size() * (block + 1) / kBlocks;
  std::uint64_t count = 0;
  for (std::size_t i = begin; i < end; ++i) count += is_prime(xs[i]);
  return static_cast<double>(count);
}

struct Computation {
  const char* name;
  double (*fn)(const Input&);
};

const Computation kComputations[] = {
    {"mean/stddev", compute_mean_stddev},
    {"histogram", compute_histogram_peak},
    {"sort median", compute_sorted_median},
    {"prime count", count_primes},
};

std::size_t block_count_of(std::size_t) { return kBlocks; }

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int main(int argc, char** argv) {
  mp::init();  // first: lets this program be a spawned or forkserver child of itself
  CLI::App app{"multiproc seed demo: several computations on one input, sequential vs processes vs pool"};
  std::size_t size = 10'000'000;
  int processes = mp::cpu_count();
  bool crash = true;
  app.add_option("-n,--size", size, "number of input integers")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 31));
  app.add_option("-p,--processes", processes, "pool size")->check(CLI::PositiveNumber);
  app.add_flag("!--no-crash", crash, "skip the crash demonstration");
  CLI11_PARSE(app, argc, argv);

  std::mt19937 rng(42);
  std::uniform_int_distribution<std::int32_t> dist(0, 50'000'000);
  Input input(size);
  for (auto& x : input) x = dist(rng);
  g_input = &input;
  constexpr std::size_t n = std::size(kComputations);
  std::printf("multiproc seed demo: %zu computations on %zu integers, %d CPUs, pool of %d\n\n", n, size,
              mp::cpu_count(), processes);

  // 1. Sequential.
  double seq_result[n], seq_time[n];
  auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < n; ++i) {
    auto t = std::chrono::steady_clock::now();
    seq_result[i] = kComputations[i].fn(input);
    seq_time[i] = seconds_since(t);
  }
  const double sequential = seconds_since(t0);

  // 2. One Process per computation: the child inherits the input through fork, and writes its
  // one number into memory shared with the parent.
  auto* shared = static_cast<double*>(
      ::mmap(nullptr, sizeof(double) * n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (shared == MAP_FAILED) throw std::bad_alloc();
  t0 = std::chrono::steady_clock::now();
  std::vector<mp::Process> children;
  for (std::size_t i = 0; i < n; ++i) {
    children.emplace_back([&input, shared, i] { shared[i] = kComputations[i].fn(input); });
    children.back().start();
  }
  for (auto& c : children) c.join();
  const double per_process = seconds_since(t0);
  for (std::size_t i = 0; i < n; ++i) {
    if (!children[i].exit_status().success() || shared[i] != seq_result[i]) {
      std::printf("process %zu: %s\n", i, children[i].exit_status().to_string().c_str());
      return 1;
    }
  }

  // 3. A Pool: invoke_all sends the input to each worker; map splits the heaviest computation
  // into blocks that read the input the workers inherited.
  t0 = std::chrono::steady_clock::now();
  mp::Pool pool{{.processes = processes}};
  const double pool_start = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  auto [mean, hist, median, primes] =
      pool.invoke_all(input, compute_mean_stddev, compute_histogram_peak, compute_sorted_median, count_primes);
  const double invoke_all = seconds_since(t0);
  const double pool_results[n] = {mean, hist, median, primes};
  for (std::size_t i = 0; i < n; ++i) {
    if (pool_results[i] != seq_result[i]) return std::printf("pool result %zu differs\n", i), 1;
  }
  t0 = std::chrono::steady_clock::now();
  std::vector<std::size_t> blocks(kBlocks);
  std::iota(blocks.begin(), blocks.end(), 0);
  const auto counts = pool.map(count_primes_in_block, blocks, 1);
  const double map_primes = seconds_since(t0);
  if (std::accumulate(counts.begin(), counts.end(), 0.0) != seq_result[3]) return std::puts("map differs"), 1;

  std::printf("%-14s %14s %12s\n", "computation", "result", "sequential");
  for (std::size_t i = 0; i < n; ++i) {
    std::printf("%-14s %14.1f %10.3f s\n", kComputations[i].name, seq_result[i], seq_time[i]);
  }
  std::printf("\n%-44s %10s %9s\n", "all computations", "wall", "speed-up");
  std::printf("%-44s %8.3f s %8.2fx\n", "sequential", sequential, 1.0);
  std::printf("%-44s %8.3f s %8.2fx\n", "one Process each (fork, input inherited)", per_process,
              sequential / per_process);
  std::printf("%-44s %8.3f s %8.2fx\n", "Pool.invoke_all (input sent to each task)", invoke_all,
              sequential / invoke_all);
  std::printf("%-44s %8.3f s %8.2fx\n", "prime count: sequential", seq_time[3], 1.0);
  std::printf("%-44s %8.3f s %8.2fx\n", "prime count: Pool.map over 64 blocks", map_primes, seq_time[3] / map_primes);
  const double longest = *std::max_element(seq_time, seq_time + n);
  std::printf("(pool start: %.1f ms; one task per computation cannot beat the longest one, %.3f s: %.2fx at most)\n",
              pool_start * 1e3, longest, sequential / longest);

  // Pool start by start method: construction to the first result (under forkserver and spawn the
  // workers would not see the input: tasks there must get their data as arguments).
  std::printf("\npool of %d to its first result:", processes);
  for (auto method : {mp::StartMethod::fork, mp::StartMethod::forkserver, mp::StartMethod::spawn}) {
    const auto t = std::chrono::steady_clock::now();
    mp::Pool p{{.processes = processes, .start_method = method}};
    (void)p.apply(block_count_of, std::size_t{0});
    std::printf("  %s %.1f ms", mp::to_string(method), seconds_since(t) * 1e3);
  }
  std::printf(" (forkserver includes starting its server)\n");

  if (crash) {
    // 4. The same computations plus one that segfaults: only its row fails.
    std::printf("\nwith a crashing computation (Pool.apply_async each):\n");
    std::vector<mp::AsyncResult<double>> results;
    std::vector<const char*> names;
    for (const auto& c : kComputations) {
      results.push_back(pool.apply_async(c.fn, input));
      names.push_back(c.name);
    }
    results.push_back(pool.apply_async(faulty_computation, input));
    names.push_back("faulty");
    for (std::size_t i = 0; i < results.size(); ++i) {
      try {
        std::printf("  %-14s %14.1f\n", names[i], results[i].get());
      } catch (const mp::WorkerCrashed& e) {
        std::printf("  %-14s failed: %s\n", names[i], e.what());
      }
    }
    std::printf("  the pool goes on: apply after the crash gives %.1f\n", pool.apply(compute_histogram_peak, input));
  }
  pool.close();
  pool.join();
  ::munmap(shared, sizeof(double) * n);
  return 0;
}

// Process start cost per start method (fork, forkserver, spawn): Process start+join of a function
// that does nothing, and a Pool's construction to its first result to its teardown, with 1 and 4
// workers. Raw fork()+_exit+waitpid and posix_spawn(/bin/true)+waitpid give the floor.
// bench/compare_python_start.py runs these beside Python's multiprocessing and prints ratios.
//
// Names: BM_ProcessStartJoin/<method>, BM_PoolFirstResult/<workers>/<method>, BM_RawFork,
// BM_RawPosixSpawn.
#include <benchmark/benchmark.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <multiproc/multiproc.hpp>
#include <string>

extern char** environ;

namespace {

constexpr double kMinTime = 0.25;  // seconds per repetition; the script asks for several

void noop() {}
int square(int x) { return x * x; }

constexpr multiproc::StartMethod kMethods[] = {multiproc::StartMethod::fork, multiproc::StartMethod::forkserver,
                                               multiproc::StartMethod::spawn};

// The fork server is started once per program, as Python's is, and outside the timed loop: the
// figures are the per-child cost of each method, not the server's own start-up.
void prepare(multiproc::StartMethod method) {
  if (method == multiproc::StartMethod::forkserver) multiproc::start_fork_server();
}

void wait_for(pid_t pid, benchmark::State& state) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    state.SkipWithError("child did not exit with 0");
  }
}

void BM_ProcessStartJoin(benchmark::State& state, multiproc::StartMethod method) {
  prepare(method);
  for (auto _ : state) {
    multiproc::Process p{multiproc::ProcessOptions{.start_method = method}, &noop};
    p.start();
    p.join();
    if (p.exitcode() != 0) {
      state.SkipWithError("child did not exit with 0");
      break;
    }
  }
  state.SetItemsProcessed(state.iterations());
}

// Construct, first result, tear down (the destructor terminates the workers and reaps them).
void BM_PoolFirstResult(benchmark::State& state, int workers, multiproc::StartMethod method) {
  prepare(method);
  for (auto _ : state) {
    multiproc::Pool pool{{.processes = workers, .start_method = method}};
    benchmark::DoNotOptimize(pool.apply(square, 3));
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_RawFork(benchmark::State& state) {
  for (auto _ : state) {
    const pid_t pid = fork();
    if (pid == 0) _exit(0);
    if (pid < 0) {
      state.SkipWithError("fork failed");
      break;
    }
    wait_for(pid, state);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_RawPosixSpawn(benchmark::State& state) {
  char path[] = "/bin/true";
  char* argv[] = {path, nullptr};
  for (auto _ : state) {
    pid_t pid = 0;
    if (posix_spawn(&pid, path, nullptr, nullptr, argv, environ) != 0) {
      state.SkipWithError("posix_spawn failed");
      break;
    }
    wait_for(pid, state);
  }
  state.SetItemsProcessed(state.iterations());
}

void register_all() {
  for (auto method : kMethods) {
    const std::string m = multiproc::to_string(method);
    benchmark::RegisterBenchmark(("BM_ProcessStartJoin/" + m).c_str(), BM_ProcessStartJoin, method)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond)
        ->MinTime(kMinTime);
  }
  for (int workers : {1, 4}) {
    for (auto method : kMethods) {
      const std::string name = "BM_PoolFirstResult/" + std::to_string(workers) + "/" + multiproc::to_string(method);
      benchmark::RegisterBenchmark(name.c_str(), BM_PoolFirstResult, workers, method)
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond)
          ->MinTime(kMinTime);
    }
  }
  benchmark::RegisterBenchmark("BM_RawFork", BM_RawFork)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(kMinTime);
  benchmark::RegisterBenchmark("BM_RawPosixSpawn", BM_RawPosixSpawn)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(kMinTime);
}

}  // namespace

int main(int argc, char** argv) {
  // First: in a child started by spawn or the fork server this runs the child's work and exits.
  multiproc::init();
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

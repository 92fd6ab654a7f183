// multiproc/mpi.hpp — the same Pool API over MPI ranks (Open MPI), in the spirit of mpi4py.futures.
// Optional: link multiproc::mpi (built when CMake finds MPI); the core library never needs MPI.
//
//     int main(int argc, char** argv) {
//       multiproc::mpi::init(argc, argv);   // ranks other than 0 serve tasks here and never return
//       multiproc::Pool pool = multiproc::mpi::make_pool();   // rank 0: tasks go to ranks 1..N-1
//       std::vector<int> ys = pool.map(square, xs);           // every Pool method works the same
//     }
//
//     mpirun -n 5 ./program        # rank 0 submits, 4 worker ranks compute
//
// Every rank runs the same executable (init() checks that: a rank running another build makes
// rank 0 throw BuildMismatch and every rank exit non-zero). A task is sent the way a local pool
// sends it to a spawned worker: its invoker id, callable and arguments, encoded; the outcome comes
// back encoded, so a task that throws std::runtime_error is rethrown on rank 0 as
// std::runtime_error, with multiproc::remote_info (type name, message, the worker rank's pid).
//
// How it runs. One supervisor thread on rank 0 makes every MPI call of the program after init():
// it keeps the submitted chunks in a queue and sends each worker rank the next one as soon as it
// has fewer than `in_flight_per_rank` chunks (dynamic load balancing; two by default, so a rank
// never waits for its next chunk), and delivers each result as it comes (MPI_Iprobe on any
// source). When nothing is in flight it sleeps on a condition variable; while something is, it
// polls: yielding the CPU for 500 us after the last message, then sleeping 20 us doubling to 200
// us. Idle worker ranks poll the same way rather than blocking in MPI_Probe, which spins at 100%
// CPU in Open MPI. A quick apply() round trip costs about 30 us when ranks have cores to spare.
// Several pools, one after another or at the same time, share the worker ranks. A task may itself
// use a local multiproc::Pool or Process (hybrid MPI + fork): those children never call MPI.
// Open MPI runs threads of its own in every rank, so fork warns unless the program said
// set_start_method(StartMethod::fork); forkserver and spawn work too (their exec'd children stop
// in init(), before MPI).
//
// Differences from a local Pool.
//   - A worker rank cannot be killed and replaced: a task that crashes its rank (SIGSEGV, abort,
//     exit) makes Open MPI abort the whole job — mpirun kills every rank and exits non-zero. Nothing
//     hangs, but nothing survives either. Use a local Pool inside the task for crash isolation.
//   - terminate() (and the destructor) fail unfinished calls with Cancelled at once, but a task
//     already running on a worker rank runs to its end (its result is discarded), and that rank
//     serves nothing else until then. Cancelling a call drops its queued chunks the same way.
//   - Per-task time limits (PoolOptions::task_timeout, CallOptions::timeout) are not enforced.
//   - worker_pids() are the pids of the worker ranks (on their hosts).
//   - At exit, rank 0 waits for the tasks still running on worker ranks (at most
//     MULTIPROC_MPI_SHUTDOWN_SECONDS, default 60, then it aborts the MPI job), tells every worker
//     rank to shut down and calls MPI_Finalize.
//   - One message is limited to 2 GiB (MPI's int counts): a larger chunk or result fails its call
//     with ProtocolError.
#pragma once

#include "multiproc/pool.hpp"

namespace multiproc::mpi {

/// Initializes MPI (MPI_Init_thread, asking for MPI_THREAD_MULTIPLE, needing at least
/// MPI_THREAD_SERIALIZED) and checks that every rank runs this very build. On rank 0 it returns;
/// on every other rank it serves tasks until rank 0 shuts down, then finalizes MPI and exits the
/// process with status 0 (it never returns). Registers an atexit handler on rank 0 that calls
/// finalize(). Throws StateError when called twice, BuildMismatch when the builds differ (after
/// finalizing MPI; the other ranks exit with status 1), SystemError when MPI fails to start.
void init(int& argc, char**& argv);

/// Rank 0: waits for the tasks still running on worker ranks, tells them to shut down and
/// finalizes MPI. Unfinished calls of pools still alive fail with Cancelled. Idempotent; runs at
/// exit by itself.
void finalize() noexcept;

/// True between init() and finalize().
[[nodiscard]] bool initialized() noexcept;
/// This process's rank in MPI_COMM_WORLD; -1 before init().
[[nodiscard]] int rank() noexcept;
/// The number of ranks; 0 before init().
[[nodiscard]] int size() noexcept;

struct PoolConfig {
  /// Chunks sent to one worker rank before its first result comes back (1 or more): 2 hides the
  /// round trip between two chunks; 1 balances best when tasks are few and long.
  int in_flight_per_rank = 2;
};

/// Rank 0: a Pool whose tasks run on ranks 1..size()-1 (processes() == size() - 1). StateError
/// before init(), after finalize(), on other ranks, or when there is no worker rank (size() == 1).
[[nodiscard]] Pool make_pool(PoolConfig config = {});

}  // namespace multiproc::mpi

// Pool faults: workers that really segfault, abort, get SIGKILL or exit inside a task fail exactly
// that task with WorkerCrashed; every other result is correct and the pool goes on. Also worker
// recycling (max_tasks_per_child) and the initializer.
#include <fcntl.h>
#include <link.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <ostream>
#include <ranges>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "pool_test_common.hpp"

#ifdef POOLTEST_ASAN
// A worker that calls std::exit() runs LeakSanitizer's exit-time check. A forked child of a
// multithreaded process cannot scan the parent's other threads (they do not exist in it), so LSan
// reports false leaks and replaces the exit code 3 by its own (23). Leak checking stays on in the
// test process itself.
namespace {
const pid_t test_process_pid = ::getpid();
}
extern "C" int __lsan_is_turned_off() { return ::getpid() != test_process_pid; }
#endif

namespace pooltest {
namespace {

enum class Crash : int { segv, abort, sigkill, quick_exit3, exit3 };

const char* crash_name(Crash c) {
  switch (c) {
    case Crash::segv:
      return "Segfault";
    case Crash::abort:
      return "Abort";
    case Crash::sigkill:
      return "SigKill";
    case Crash::quick_exit3:
      return "UnderscoreExit3";
    case Crash::exit3:
      return "Exit3";
  }
  return "?";
}

// gtest prints parameters with this (in CTest's test names too).
void PrintTo(Crash c, std::ostream* os) { *os << crash_name(c); }

multiproc::ExitStatus expected_status(Crash c) {
  switch (c) {
    case Crash::segv:
      return multiproc::ExitStatus::killed_by(SIGSEGV);
    case Crash::abort:
      return multiproc::ExitStatus::killed_by(SIGABRT);
    case Crash::sigkill:
      return multiproc::ExitStatus::killed_by(SIGKILL);
    case Crash::quick_exit3:
    case Crash::exit3:
      return multiproc::ExitStatus::exited_with(3);
  }
  return {};
}

[[noreturn]] void crash_now(Crash c) {
  switch (c) {
    case Crash::segv:
      segfault_now();
      break;
    case Crash::abort:
      std::abort();
    case Crash::sigkill:
      ::raise(SIGKILL);
      break;
    case Crash::quick_exit3:
      ::_exit(3);
    case Crash::exit3:
      std::exit(3);
  }
  std::_Exit(99);  // not reached
}

// Squares its argument, except at the given indexes, where it dies in the given way.
struct CrashAt {
  std::array<int, 3> index{-1, -1, -1};
  std::array<Crash, 3> how{Crash::segv, Crash::segv, Crash::segv};
  int operator()(int x) const {
    for (std::size_t i = 0; i < index.size(); ++i) {
      if (x == index[i]) crash_now(how[i]);
    }
    return x * x;
  }
};

int segfault_task(int) {
  segfault_now();
  return 0;
}

void expect_crashed(const multiproc::Outcome<int>& o, Crash how, std::size_t index, const std::vector<pid_t>& pids) {
  ASSERT_FALSE(o.has_value()) << "element " << index << " has a value";
  try {
    std::rethrow_exception(o.error());
  } catch (const multiproc::WorkerCrashed& e) {
    const auto want = expected_status(how);
    EXPECT_EQ(e.status().exited(), want.exited()) << e.what();
    EXPECT_EQ(e.status().signal(), want.signal()) << e.what();
    EXPECT_EQ(e.status().code(), want.code()) << e.what();
    EXPECT_EQ(e.task_index(), index);
    EXPECT_GT(e.worker_pid(), 0);
    EXPECT_NE(e.worker_pid(), ::getpid());
    if (!pids.empty()) {
      EXPECT_TRUE(contains(pids, e.worker_pid())) << e.worker_pid();
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "element " << index << ": not WorkerCrashed: " << e.what();
  }
}

// The pool is back to full strength and runs new work.
void expect_pool_recovers(multiproc::Pool& pool) {
  EXPECT_EQ(pool.apply(square, 9), 81);
  EXPECT_EQ(pool.map(square, iota_vector(50), 3), squares(50));
  EXPECT_TRUE(eventually([&] { return pool.worker_pids().size() == static_cast<std::size_t>(pool.processes()); }))
      << pool.worker_pids().size();
  for (pid_t p : pool.worker_pids()) EXPECT_EQ(::kill(p, 0), 0) << "worker " << p << " is not running";
}

class Environment : public ::testing::Environment {
 public:
  void SetUp() override { disable_core_dumps(); }
};
const auto* const environment = ::testing::AddGlobalTestEnvironment(new Environment);

// ---- one crash in a map over 0..99, every crash kind × chunk size × workers ------------------

using CrashParam = std::tuple<Crash, std::size_t, int>;  // how, chunksize (0 = auto), workers

class PoolCrashTest : public ::testing::TestWithParam<CrashParam> {};

std::string crash_param_name(const ::testing::TestParamInfo<CrashParam>& info) {
  const auto [how, chunksize, workers] = info.param;
  return std::string(crash_name(how)) + "_chunk" + (chunksize ? std::to_string(chunksize) : std::string("Auto")) +
         "_w" + std::to_string(workers);
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, PoolCrashTest,
    ::testing::Combine(::testing::Values(Crash::segv, Crash::abort, Crash::sigkill, Crash::quick_exit3, Crash::exit3),
                       ::testing::Values(std::size_t{1}, std::size_t{10}, std::size_t{0}), ::testing::Values(1, 2, 4)),
    crash_param_name);

TEST_P(PoolCrashTest, MapFailsOnlyTheCrashedElement) {
  const auto [how, chunksize, workers] = GetParam();
  multiproc::Pool pool{{.processes = workers}};
  const auto pids = pool.worker_pids();
  CrashAt f;
  f.index[0] = 37;
  f.how[0] = how;
  const auto out = pool.map_outcomes(f, iota_vector(100), chunksize);
  ASSERT_EQ(out.size(), 100u);
  for (int i = 0; i < 100; ++i) {
    if (i == 37) continue;
    ASSERT_TRUE(out[static_cast<std::size_t>(i)].has_value()) << "element " << i;
    EXPECT_EQ(out[static_cast<std::size_t>(i)].value(), i * i);
  }
  expect_crashed(out[37], how, 37, pids);
  expect_pool_recovers(pool);
}

// ---- map() throws; several crashes; apply_async; imap -------------------------------------------

class PoolCrashKindTest : public ::testing::TestWithParam<Crash> {};
INSTANTIATE_TEST_SUITE_P(Kinds, PoolCrashKindTest,
                         ::testing::Values(Crash::segv, Crash::abort, Crash::sigkill, Crash::quick_exit3, Crash::exit3),
                         [](const auto& info) { return std::string(crash_name(info.param)); });

TEST_P(PoolCrashKindTest, MapThrowsWorkerCrashed) {
  multiproc::Pool pool{{.processes = 2}};
  CrashAt f;
  f.index[0] = 61;
  f.how[0] = GetParam();
  try {
    (void)pool.map(f, iota_vector(100));
    FAIL() << "no exception";
  } catch (const multiproc::WorkerCrashed& e) {
    const auto want = expected_status(GetParam());
    EXPECT_EQ(e.status().exited(), want.exited()) << e.what();
    EXPECT_EQ(e.status().signal(), want.signal()) << e.what();
    EXPECT_EQ(e.status().code(), want.code()) << e.what();
    EXPECT_EQ(e.task_index(), 61u);
    EXPECT_GT(e.worker_pid(), 0);
    const std::string what = e.what();
    // The call, the item and the callable (a functor: its type) are named.
    EXPECT_EQ(what.rfind("worker " + std::to_string(e.worker_pid()) + " ", 0), 0u) << what;
    EXPECT_NE(what.find(" while running map #"), std::string::npos) << what;
    EXPECT_NE(what.find(", item 61 ("), std::string::npos) << what;
    EXPECT_NE(what.find(e.status().to_string()), std::string::npos) << what;
  }
  expect_pool_recovers(pool);
}

TEST_P(PoolCrashKindTest, ApplyAsyncCrashFailsThatResultOnly) {
  multiproc::Pool pool{{.processes = 2}};
  CrashAt f;
  f.index[0] = 5;
  f.how[0] = GetParam();
  auto before = pool.apply_async(sleep_ms_then_return, 100);
  auto crashed = pool.apply_async(f, 5);
  auto after = pool.apply_async(f, 6);
  try {
    (void)crashed.get();
    FAIL() << "no exception";
  } catch (const multiproc::WorkerCrashed& e) {
    EXPECT_EQ(e.status().signal(), expected_status(GetParam()).signal());
    EXPECT_EQ(e.status().code(), expected_status(GetParam()).code());
    EXPECT_EQ(e.task_index(), 0u);  // the only task of its call
  }
  EXPECT_TRUE(crashed.ready());
  EXPECT_FALSE(crashed.successful());
  EXPECT_EQ(before.get(), 100);
  EXPECT_EQ(after.get(), 36);
  expect_pool_recovers(pool);
}

class PoolCrashWorkersTest : public WorkersTest {};
INSTANTIATE_TEST_SUITE_P(Workers, PoolCrashWorkersTest, ::testing::Values(1, 2, 4), workers_name);

TEST_P(PoolCrashWorkersTest, SeveralCrashesInOneMap) {
  auto pool = make_pool();
  CrashAt f;
  f.index = {5, 50, 77};
  f.how = {Crash::segv, Crash::abort, Crash::quick_exit3};
  for (std::size_t chunksize : {std::size_t{1}, std::size_t{10}, std::size_t{0}}) {
    const auto out = pool.map_outcomes(f, iota_vector(100), chunksize);
    ASSERT_EQ(out.size(), 100u);
    for (int i = 0; i < 100; ++i) {
      if (i == 5 || i == 50 || i == 77) continue;
      ASSERT_TRUE(out[static_cast<std::size_t>(i)].has_value()) << "element " << i << " chunksize " << chunksize;
      EXPECT_EQ(out[static_cast<std::size_t>(i)].value(), i * i);
    }
    expect_crashed(out[5], Crash::segv, 5, {});
    expect_crashed(out[50], Crash::abort, 50, {});
    expect_crashed(out[77], Crash::quick_exit3, 77, {});
  }
  expect_pool_recovers(pool);
}

TEST_P(PoolCrashWorkersTest, EveryElementCrashingFailsEachAndPoolRecovers) {
  auto pool = make_pool();
  const auto out = pool.map_outcomes(segfault_task, iota_vector(12), 3);
  ASSERT_EQ(out.size(), 12u);
  for (std::size_t i = 0; i < 12; ++i) expect_crashed(out[i], Crash::segv, i, {});
  expect_pool_recovers(pool);
}

#if POOLTEST_HAVE_VIEWS
TEST_P(PoolCrashWorkersTest, ImapCrashedItemThrowsAndIterationGoesOn) {
  auto pool = make_pool();
  CrashAt f;
  f.index[0] = 13;
  f.how[0] = Crash::sigkill;
  int i = 0;
  auto range = pool.imap(f, std::views::iota(0, 40), 4);
  for (auto it = range.begin(); it != range.end(); ++it, ++i) {
    if (i == 13) {
      try {
        (void)*it;
        ADD_FAILURE() << "no exception at 13";
      } catch (const multiproc::WorkerCrashed& e) {
        EXPECT_EQ(e.status().signal(), SIGKILL);
        EXPECT_EQ(e.task_index(), 13u);
      }
    } else {
      EXPECT_EQ(*it, i * i);
    }
  }
  EXPECT_EQ(i, 40);
  expect_pool_recovers(pool);
}

TEST_P(PoolCrashWorkersTest, ImapUnorderedCrashedItemThrows) {
  auto pool = make_pool();
  CrashAt f;
  f.index[0] = 21;
  f.how[0] = Crash::abort;
  std::multiset<int> got;
  int crashes = 0;
  auto range = pool.imap_unordered(f, std::views::iota(0, 40), 3);
  for (auto it = range.begin(); it != range.end(); ++it) {
    try {
      got.insert(*it);
    } catch (const multiproc::WorkerCrashed& e) {
      ++crashes;
      EXPECT_EQ(e.task_index(), 21u);
      EXPECT_EQ(e.status().signal(), SIGABRT);
    }
  }
  EXPECT_EQ(crashes, 1);
  std::multiset<int> expected;
  for (int i = 0; i < 40; ++i)
    if (i != 21) expected.insert(i * i);
  EXPECT_EQ(got, expected);
}
#endif

int segfault_if_negative(int x) {
  if (x < 0) segfault_now();
  return x;
}

// With many calls in flight, an error names the one that failed: its kind, its number in the pool,
// the function and the worker.
TEST(PoolErrorText, NamesTheCallTheFunctionAndTheWorker) {
  multiproc::Pool pool{{.processes = 2}};
  std::vector<multiproc::AsyncResult<int>> fine;
  for (int i = 0; i < 20; ++i) fine.push_back(pool.apply_async(segfault_if_negative, i));  // calls #1 to #20
  auto crashed = pool.apply_async(segfault_if_negative, -1);                               // #21
  auto late = pool.apply_async({.timeout = 100ms}, sleep_ms_then_return, 30'000);          // #22
  try {
    (void)crashed.get();
    ADD_FAILURE() << "no exception";
  } catch (const multiproc::WorkerCrashed& e) {
    EXPECT_EQ(std::string(e.what()), "worker " + std::to_string(e.worker_pid()) + " " + e.status().to_string() +
                                         " while running apply_async #21 (pooltest::(anonymous "
                                         "namespace)::segfault_if_negative(int))");
  }
  try {
    (void)late.get();
    ADD_FAILURE() << "no exception";
  } catch (const multiproc::TaskTimeout& e) {
    const std::string what = e.what();
    EXPECT_EQ(
        what.rfind("apply_async #22 (pooltest::sleep_ms_then_return(int)) ran past its timeout of 100 ms; worker ", 0),
        0u)
        << what;
  }
  for (int i = 0; i < 20; ++i) EXPECT_EQ(fine[static_cast<std::size_t>(i)].get(), i);
  // A lambda is named by its type.
  try {
    (void)pool.apply([](int x) { return segfault_if_negative(x); }, -1);
    ADD_FAILURE() << "no exception";
  } catch (const multiproc::WorkerCrashed& e) {
    EXPECT_NE(std::string(e.what()).find(" while running apply #23 (pooltest::"), std::string::npos) << e.what();
    // g++ spells the type "...TestBody()::{lambda(int)#1}", clang "...TestBody()::$_2".
    EXPECT_NE(std::string(e.what()).find("NamesTheCallTheFunctionAndTheWorker_Test::TestBody()::"),
              std::string::npos)
        << e.what();
  }
}

TEST(PoolCrash, WorkerKilledFromOutsideFailsItsTask) {
  const std::string path = temp_file();
  multiproc::Pool pool{{.processes = 2}};
  auto r = pool.apply_async(append_line_then_sleep, path, 30'000);
  pid_t victim = 0;
  // Kill every worker once the task runs: only it was outstanding, so it alone fails.
  ASSERT_TRUE(eventually([&] { return lines_in(path) == 1; })) << "the task never started";
  ::unlink(path.c_str());
  for (pid_t p : pool.worker_pids()) {
    victim = p;
    ::kill(p, SIGKILL);
  }
  ASSERT_NE(victim, 0);
  try {
    (void)r.get();
    FAIL() << "no exception";
  } catch (const multiproc::WorkerCrashed& e) {
    EXPECT_EQ(e.status(), multiproc::ExitStatus::killed_by(SIGKILL));
    EXPECT_EQ(e.task_index(), 0u);
  }
  expect_pool_recovers(pool);
}

TEST(PoolCrash, CrashIsReportedWhenTheApplicationIgnoresSigchld) {
  // With SIGCHLD ignored the kernel reaps workers itself: the exit status is lost, but the crash
  // still fails exactly its task and the pool goes on.
  struct sigaction ignore {};
  struct sigaction old {};
  ignore.sa_handler = SIG_IGN;
  ::sigemptyset(&ignore.sa_mask);
  ASSERT_EQ(::sigaction(SIGCHLD, &ignore, &old), 0);
  {
    multiproc::Pool pool{{.processes = 2}};
    CrashAt f;
    f.index[0] = 5;
    const auto out = pool.map_outcomes(f, iota_vector(20), 3);
    ASSERT_EQ(out.size(), 20u);
    for (int i = 0; i < 20; ++i) {
      if (i == 5) continue;
      ASSERT_TRUE(out[static_cast<std::size_t>(i)].has_value()) << i;
      EXPECT_EQ(out[static_cast<std::size_t>(i)].value(), i * i);
    }
    try {
      std::rethrow_exception(out[5].error());
    } catch (const multiproc::WorkerCrashed& e) {
      EXPECT_EQ(e.task_index(), 5u);
      EXPECT_TRUE(e.status().signaled()) << e.what();
    }
    expect_pool_recovers(pool);
  }
  ::sigaction(SIGCHLD, &old, nullptr);
}

// ---- max_tasks_per_child -----------------------------------------------------------------------

TEST(PoolRecycling, MaxTasksPerChildTwoGivesTenWorkersForTwentyApplies) {
  multiproc::Pool pool{{.processes = 1, .max_tasks_per_child = 2}};
  std::vector<pid_t> seen;
  for (int i = 0; i < 20; ++i) {
    try {
      seen.push_back(pool.apply(pid_of_worker, i));
    } catch (const std::exception& e) {
      FAIL() << "apply " << i << " failed: " << e.what();
    }
  }
  std::map<pid_t, int> count;
  for (pid_t p : seen) ++count[p];
  EXPECT_EQ(count.size(), 10u);
  for (const auto& [pid, n] : count) EXPECT_EQ(n, 2) << "worker " << pid;
  for (std::size_t i = 0; i < seen.size(); i += 2) EXPECT_EQ(seen[i], seen[i + 1]) << i;
}

TEST(PoolRecycling, MaxTasksPerChildCountsChunksInAMap) {
  multiproc::Pool pool{{.processes = 2, .max_tasks_per_child = 3}};
  // 60 chunks of 1: at most 3 per worker, so at least 20 different workers; all results right.
  const auto pids = pool.map(pid_of_worker, iota_vector(60), 1);
  ASSERT_EQ(pids.size(), 60u);
  std::map<pid_t, int> count;
  for (pid_t p : pids) ++count[p];
  EXPECT_GE(count.size(), 20u);
  for (const auto& [pid, n] : count) EXPECT_LE(n, 3) << "worker " << pid;
  EXPECT_EQ(pool.map(square, iota_vector(100), 1), squares(100));
}

TEST(PoolRecycling, UnlimitedByDefault) {
  multiproc::Pool pool{{.processes = 1}};
  std::set<pid_t> seen;
  for (int i = 0; i < 50; ++i) seen.insert(pool.apply(pid_of_worker, i));
  EXPECT_EQ(seen.size(), 1u);
}

// ---- initializer ---------------------------------------------------------------------------------

std::vector<pid_t> read_pids(const std::string& path) {
  std::vector<pid_t> out;
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return out;
  long v = 0;
  while (std::fscanf(f, "%ld", &v) == 1) out.push_back(static_cast<pid_t>(v));
  std::fclose(f);
  return out;
}

// Appends the worker's pid to a file: an initializer with state that every start method can send
// (a functor the codec encodes through its serialize()).
struct AppendPidTo {
  std::string path;
  void operator()() const {
    const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("cannot open marker file");
    const std::string line = std::to_string(::getpid()) + "\n";
    const ssize_t n = ::write(fd, line.data(), line.size());
    ::close(fd);
    if (n != static_cast<ssize_t>(line.size())) throw std::runtime_error("short write");
  }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(path);
  }
};

TEST(PoolInitializer, RunsOnceInEachWorker) {
  char tmpl[] = "/tmp/multiproc-pool-init-XXXXXX";
  const int tfd = ::mkstemp(tmpl);
  ASSERT_GE(tfd, 0);
  ::close(tfd);
  const std::string path = tmpl;
  std::set<pid_t> task_pids;
  {
    multiproc::Pool pool{{.processes = 2, .initializer = AppendPidTo{path}}};
    for (int round = 0; round < 5; ++round) {
      for (pid_t p : pool.map(pid_of_worker, iota_vector(40), 1)) task_pids.insert(p);
    }
    EXPECT_EQ(pool.apply(square, 5), 25);
    pool.close();
    pool.join();
  }
  const auto pids = read_pids(path);
  ::unlink(path.c_str());
  ASSERT_EQ(pids.size(), 2u);
  EXPECT_NE(pids[0], pids[1]);
  for (pid_t p : task_pids) EXPECT_TRUE(contains(pids, p)) << "task ran in worker " << p << " with no initializer";
}

TEST(PoolInitializer, InitializerStateIsSeenByTasks) {
  static int configured = 0;  // set in each worker by the initializer, never in the parent
  multiproc::Pool pool{{.processes = 2, .initializer = [] { configured = 7; }}};
  EXPECT_EQ(pool.map([](int x) { return x * configured; }, iota_vector(20)), ([] {
              std::vector<int> v;
              for (int i = 0; i < 20; ++i) v.push_back(7 * i);
              return v;
            }()));
  EXPECT_EQ(configured, 0);
}

TEST(PoolInitializer, ThrowingInitializerFailsEveryTaskWithInitializerError) {
  const auto t0 = std::chrono::steady_clock::now();
  {
    multiproc::Pool pool{{.processes = 2, .initializer = [] { throw std::runtime_error("no config file"); }}};
    // Submitted at once, before the workers have had time to fail.
    const auto out = pool.map_outcomes(square, iota_vector(10), 1);
    ASSERT_EQ(out.size(), 10u);
    for (std::size_t i = 0; i < out.size(); ++i) {
      ASSERT_FALSE(out[i].has_value()) << i;
      try {
        std::rethrow_exception(out[i].error());
      } catch (const multiproc::InitializerError& e) {
        EXPECT_NE(std::string(e.what()).find("no config file"), std::string::npos) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << "element " << i << ": not InitializerError: " << e.what();
      }
    }
    // Later calls fail the same way, at once.
    EXPECT_THROW(pool.apply(square, 3), multiproc::InitializerError);
    EXPECT_THROW((void)pool.map(square, iota_vector(5)), multiproc::InitializerError);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, generous(300ms));
  EXPECT_TRUE(eventually([] { return test_support::has_no_children(); }));
}

TEST(PoolInitializer, SlowThrowingInitializerFailsTasksAlreadySentWithInitializerError) {
  // The tasks reach the workers while the initializer still runs: they must fail as the others
  // do, with InitializerError, not as crashes of the workers that held them.
  multiproc::Pool pool{{.processes = 2, .initializer = [] {
                          std::this_thread::sleep_for(200ms);
                          throw std::runtime_error("slow failure");
                        }}};
  const auto out = pool.map_outcomes(square, iota_vector(6), 1);
  ASSERT_EQ(out.size(), 6u);
  for (std::size_t i = 0; i < out.size(); ++i) {
    ASSERT_FALSE(out[i].has_value()) << i;
    try {
      std::rethrow_exception(out[i].error());
    } catch (const multiproc::InitializerError& e) {
      EXPECT_NE(std::string(e.what()).find("slow failure"), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "element " << i << ": not InitializerError: " << e.what();
    }
  }
}

TEST(PoolInitializer, ThrowingInitializerAfterTheFirstCallAlsoFailsWithInitializerError) {
  multiproc::Pool pool{{.processes = 1, .initializer = [] { throw std::logic_error("bad setup"); }}};
  ASSERT_TRUE(eventually([&] { return pool.worker_pids().empty(); })) << "the worker did not fail";
  try {
    pool.apply(square, 3);
    FAIL() << "no exception";
  } catch (const multiproc::InitializerError& e) {
    EXPECT_NE(std::string(e.what()).find("bad setup"), std::string::npos) << e.what();
  }
}

TEST(PoolInitializer, CrashingInitializerDoesNotRespawnForever) {
  const auto t0 = std::chrono::steady_clock::now();
  {
    multiproc::Pool pool{{.processes = 2, .initializer = [] { std::abort(); }}};
    ASSERT_TRUE(eventually([&] { return pool.worker_pids().empty(); })) << "the workers did not fail";
    try {
      pool.apply(square, 3);
      FAIL() << "no exception";
    } catch (const multiproc::InitializerError& e) {
      EXPECT_NE(std::string(e.what()).find("SIGABRT"), std::string::npos) << e.what();
    } catch (const multiproc::WorkerCrashed& e) {
      ADD_FAILURE() << "WorkerCrashed: " << e.what();
    }
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, generous(300ms)) << "the pool kept restarting its workers";
}

}  // namespace
}  // namespace pooltest

// ---- task timeout ------------------------------------------------------------------------------

int sleep_if_five(int x) {
  if (x == 5) std::this_thread::sleep_for(std::chrono::seconds(30));
  return x * 10;
}

TEST(PoolTaskTimeout, OnlyTheTaskPastItsTimeFailsWithTaskTimeout) {
  for (std::size_t chunksize : {std::size_t{1}, std::size_t{4}}) {
    // Far above what a quick item takes on a loaded machine; item 5 sleeps 30 s.
    const auto limit = pooltest::scaled(std::chrono::milliseconds(300));
    multiproc::Pool pool{{.processes = 2, .task_timeout = limit}};
    const auto t0 = std::chrono::steady_clock::now();
    const auto out = pool.map_outcomes(sleep_if_five, pooltest::iota_vector(10), chunksize);
    const auto took = std::chrono::steady_clock::now() - t0;
    ASSERT_EQ(out.size(), 10u);
    for (int i = 0; i < 10; ++i) {
      if (i == 5) {
        ASSERT_FALSE(out[5].has_value());
        try {
          std::rethrow_exception(out[5].error());
        } catch (const multiproc::TaskTimeout& e) {
          EXPECT_NE(std::string(e.what()).find(", item 5 (sleep_if_five(int)) ran past its timeout of " +
                                               std::to_string(limit.count()) + " ms"),
                    std::string::npos)
              << e.what();
        }
      } else {
        ASSERT_TRUE(out[static_cast<std::size_t>(i)].has_value()) << i;
        EXPECT_EQ(out[static_cast<std::size_t>(i)].value(), i * 10);
      }
    }
    EXPECT_LT(took, limit + pooltest::generous(std::chrono::milliseconds(300))) << "chunksize " << chunksize;
    EXPECT_EQ(pool.apply(pooltest::square, 6), 36);  // the worker was replaced
  }
}

TEST(PoolTaskTimeout, QuickTasksNeverTimeOut) {
  // The limit is far above one quick task (microseconds), even on a loaded machine.
  multiproc::Pool pool{{.processes = 2, .task_timeout = pooltest::scaled(std::chrono::milliseconds(200))}};
  for (int round = 0; round < 3; ++round) {
    EXPECT_EQ(pool.map(pooltest::square, pooltest::iota_vector(2000), 1), pooltest::squares(2000));
  }
}

TEST(PoolTaskTimeout, NegativeTimeoutIsInvalidArgument) {
  EXPECT_THROW((multiproc::Pool{{.processes = 1, .task_timeout = std::chrono::milliseconds(-1)}}),
               multiproc::InvalidArgument);
}

// Tasks that end right at their time limit race the supervisor's kill: it decides that a task is
// overdue, and the worker may finish it and start the next one before SIGKILL lands. Only a task
// that was running when it was judged may fail with TaskTimeout; a task that had not started must
// run once, elsewhere (with chunksize 1, a quick worker is sent batches: the item after the judged
// one may be in the same frame). Start counts live in memory shared with the forked workers.
namespace {
std::atomic<int>* g_limit_started = nullptr;
// 20 ms, stretched in slower builds so that a quick task (microseconds) stays far below it.
std::chrono::milliseconds race_limit() { return pooltest::scaled(std::chrono::milliseconds(20)); }

int sleep_near_the_limit(int i) {
  g_limit_started[i].fetch_add(1, std::memory_order_relaxed);
  if (i % 3 == 2) {  // a third of the tasks end within ±1 ms of the limit; the rest are quick
    const auto jitter = std::chrono::microseconds((i * 397) % 2000) - std::chrono::milliseconds(1);
    std::this_thread::sleep_for(race_limit() + jitter);
  }
  return i;
}
}  // namespace

TEST(PoolTaskTimeout, ATaskJudgedOverdueIsTheOnlyOneThatFails) {
  constexpr int n = 600;
  void* counters =
      ::mmap(nullptr, sizeof(std::atomic<int>) * n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(counters, MAP_FAILED);
  g_limit_started = new (counters) std::atomic<int>[n] {};
  int timed_out = 0;
  {
    // fork: the workers share the counters' mapping (a spawned worker would not).
    multiproc::Pool pool{{.processes = 4, .task_timeout = race_limit(), .start_method = multiproc::StartMethod::fork}};
    const auto out = pool.map_outcomes(sleep_near_the_limit, pooltest::iota_vector(n), 1);
    ASSERT_EQ(out.size(), static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      const auto& o = out[static_cast<std::size_t>(i)];
      EXPECT_EQ(g_limit_started[i].load(), 1) << "task " << i << " must start exactly once";
      if (o.has_value()) {
        EXPECT_EQ(o.value(), i);
        continue;
      }
      ++timed_out;
      EXPECT_EQ(i % 3, 2) << "task " << i << " is quick: it can only fail if it was blamed for another";
      try {
        std::rethrow_exception(o.error());
      } catch (const multiproc::TaskTimeout& e) {
        const std::string what = e.what();
        EXPECT_NE(what.find(", item " + std::to_string(i) + " ("), std::string::npos) << what;
        EXPECT_NE(what.find("sleep_near_the_limit(int)) ran past"), std::string::npos) << what;
      } catch (const std::exception& e) {
        ADD_FAILURE() << "task " << i << ": " << e.what();
      }
    }
  }
  std::printf("%d of %d tasks near the limit timed out\n", timed_out, n / 3);
  ::munmap(counters, sizeof(std::atomic<int>) * n);
  g_limit_started = nullptr;
}

// glibc's dl_iterate_phdr holds a loader lock that fork(2) leaves as it is. A pool worker forked
// while another thread of the parent iterates the modules (encoding a task's function pointer, as
// a map does while the supervisor replaces a crashed worker) must still decode its tasks' function
// pointers: it decodes them from a snapshot its parent took before forking, never calling
// dl_iterate_phdr. Here a thread holds the loader lock across two forks: a child that iterates
// itself hangs (the premise), a child using the snapshot decodes at once.
namespace {
std::atomic<bool> g_iterating{false};
std::atomic<bool> g_stop_iterating{false};
}  // namespace

TEST(PoolModules, AWorkerForkedWhileAnotherThreadIteratesModulesDecodesFromTheSnapshot) {
  if (POOLTEST_TSAN)
    GTEST_SKIP() << "a forked child of a thread holding the loader lock hangs in TSan's own fork handling";
  namespace d = multiproc::detail;
  const auto snapshot = d::snapshot_modules();
  multiproc::Writer encoded;
  d::encode_function_address(encoded, reinterpret_cast<void (*)()>(&pooltest::square));
  std::thread holder([] {
    ::dl_iterate_phdr(
        [](dl_phdr_info*, std::size_t, void*) -> int {
          g_iterating = true;
          while (!g_stop_iterating) std::this_thread::sleep_for(std::chrono::milliseconds(1));
          return 1;
        },
        nullptr);
  });
  while (!g_iterating) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto decode_in_child = [&](bool with_snapshot) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      if (with_snapshot) d::use_module_snapshot(snapshot.get());
      multiproc::Reader r(encoded.bytes());
      const auto fn = d::decode_function_address(r);
      ::_exit(fn == reinterpret_cast<void (*)()>(&pooltest::square) ? 0 : 1);
    }
    return pid;
  };
  const pid_t plain = decode_in_child(false);
  const pid_t with_snapshot = decode_in_child(true);
  const auto status = test_support::wait_exit(with_snapshot, std::chrono::seconds(10));
  ASSERT_TRUE(status.has_value()) << "the child decoding from the snapshot hung";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
  EXPECT_FALSE(test_support::wait_exit(plain, std::chrono::milliseconds(300)).has_value())
      << "a child calling dl_iterate_phdr itself did not hang: the premise of the snapshot no longer holds";
  ::kill(plain, SIGKILL);
  (void)test_support::wait_exit(plain);
  g_stop_iterating = true;
  holder.join();
}

// Start methods: fork, forkserver and spawn for Process and Pool; what a child inherits under
// each; threads in the parent; unknown task ids; a worker of another build; the environment and
// working directory of a child; contexts.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <multiproc/multiproc.hpp>

#include "launch.hpp"
#include "test_support.hpp"

namespace {

namespace mp = multiproc;
using mp::StartMethod;
using namespace std::chrono_literals;

// ---- task and target functions ------------------------------------------------------------------

int g_set_by_the_test = 1;  // 1 from static initialization; tests set it to 42 before starting

int read_global(int) { return g_set_by_the_test; }
int square(int x) { return x * x; }
pid_t parent_pid(int) { return ::getppid(); }
std::string env_var(std::string name) {
  const char* v = std::getenv(name.c_str());
  return v ? v : "<unset>";
}
std::string working_directory(int) { return std::filesystem::current_path().string(); }

void noop() {}
void exit_with(int code) { ::_exit(code); }
void check_arguments(std::string s, std::vector<int> v, double d) {
  if (s != "hello" || v != std::vector<int>{1, 2, 3} || d != 2.5) ::_exit(9);
}
void throw_runtime_error(std::string message) { throw std::runtime_error(message); }
void sleep_forever() {
  for (;;) ::pause();
}
__attribute__((noinline, no_sanitize("address", "undefined"))) void segfault() {
  const rlimit zero{0, 0};
  ::setrlimit(RLIMIT_CORE, &zero);
  volatile int* volatile p = nullptr;
  *p = 1;
}

std::mutex g_held;  // held by a parent thread in the thread tests
int lock_then_square(int x) {
  std::lock_guard lock(g_held);
  return x * x;
}

std::string method_name(const ::testing::TestParamInfo<StartMethod>& info) { return mp::to_string(info.param); }

class StartMethodTest : public ::testing::TestWithParam<StartMethod> {
 protected:
  StartMethod method() const { return GetParam(); }
  mp::ProcessOptions process_options() const { return {.start_method = method()}; }
};

INSTANTIATE_TEST_SUITE_P(Methods, StartMethodTest,
                         ::testing::Values(StartMethod::fork, StartMethod::forkserver, StartMethod::spawn),
                         method_name);

// ---- what a child sees --------------------------------------------------------------------------

// Exits with 10 + the start method the child reports.
void exit_with_start_method() { ::_exit(10 + static_cast<int>(mp::get_start_method())); }

void exit_zero_if_the_sum_is_500(const std::vector<double>& v) {
  ::_exit(std::accumulate(v.begin(), v.end(), 0.0) == 500.0 ? 0 : 1);
}

// std::cref (or a pointer) hands a forked child a reference into its copy of the parent's memory;
// no other start method can honour it, and start() says so in one line.
TEST_P(StartMethodTest, ReferenceArgumentsWorkUnderForkAndAreRefusedElsewhere) {
  const std::vector<double> input(1000, 0.5);
  mp::Process p{process_options(), exit_zero_if_the_sum_is_500, std::cref(input)};
  if (method() == StartMethod::fork) {
    p.start();
    ASSERT_TRUE(p.join_for(test_support::scaled(10s)));
    EXPECT_EQ(p.exitcode(), 0);
    return;
  }
  try {
    p.start();
    ADD_FAILURE() << "started under " << mp::to_string(method());
  } catch (const mp::InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    EXPECT_NE(what.find("under " + std::string(mp::to_string(method()))), std::string::npos) << what;
  }
  EXPECT_TRUE(test_support::has_no_children());
}

TEST_P(StartMethodTest, AChildSaysHowItWasStarted) {
  mp::Process p{process_options(), exit_with_start_method};
  p.start();
  ASSERT_TRUE(p.join_for(test_support::scaled(10s)));
  EXPECT_EQ(p.exitcode(), 10 + static_cast<int>(method())) << "started by " << mp::to_string(method());
}

TEST_P(StartMethodTest, OnlyForkInheritsWhatTheParentComputed) {
  g_set_by_the_test = 42;
  mp::Pool pool{{.processes = 2, .start_method = method()}};
  EXPECT_EQ(pool.apply(read_global, 0), method() == StartMethod::fork ? 42 : 1);
  g_set_by_the_test = 1;
}

TEST_P(StartMethodTest, WorkersAreChildrenOfTheParentOrOfTheForkServer) {
  mp::Pool pool{{.processes = 2, .start_method = method()}};
  const pid_t parent = pool.apply(parent_pid, 0);
  if (method() == StartMethod::forkserver) {
    EXPECT_EQ(parent, mp::detail::fork_server_pid());
    EXPECT_NE(parent, ::getpid());
  } else {
    EXPECT_EQ(parent, ::getpid());
  }
}

TEST_P(StartMethodTest, ChildSeesTheParentsEnvironmentAndDirectoryAsTheyAreWhenItStarts) {
  if (method() == StartMethod::forkserver) mp::start_fork_server();  // started before the changes
  const auto before = std::filesystem::current_path();
  char tmpl[] = "/tmp/multiproc-cwd-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = std::filesystem::canonical(tmpl).string();
  ::setenv("MULTIPROC_START_TEST", (std::string("value-") + mp::to_string(method())).c_str(), 1);
  std::filesystem::current_path(dir);
  {
    mp::Pool pool{{.processes = 1, .start_method = method()}};
    EXPECT_EQ(pool.apply(env_var, std::string("MULTIPROC_START_TEST")),
              std::string("value-") + mp::to_string(method()));
    EXPECT_EQ(pool.apply(working_directory, 0), dir);
    EXPECT_EQ(pool.apply(env_var, std::string("MULTIPROC_BOOT")), "<unset>");  // the boot variable is gone
  }
  std::filesystem::current_path(before);
  ::unsetenv("MULTIPROC_START_TEST");
  std::filesystem::remove(dir);
}

// ---- Process under each method --------------------------------------------------------------------

TEST_P(StartMethodTest, ProcessRunsAFunctionWithEncodedArguments) {
  mp::Process p{process_options(), check_arguments, std::string("hello"), std::vector<int>{1, 2, 3}, 2.5};
  EXPECT_EQ(p.start_method(), method());
  EXPECT_EQ(p.pid(), 0);
  p.start();
  EXPECT_GT(p.pid(), 0);
  p.join();
  EXPECT_EQ(p.exit_status(), mp::ExitStatus::exited_with(0));
  EXPECT_EQ(p.exitcode(), 0);
}

TEST_P(StartMethodTest, ProcessExitCodeComesBack) {
  mp::Process p{process_options(), exit_with, 7};
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), mp::ExitStatus::exited_with(7));
}

TEST_P(StartMethodTest, ProcessThrowingTargetExitsOneAndPrintsTypeAndMessage) {
  test_support::StderrCapture capture;
  mp::Process p{process_options(), throw_runtime_error, std::string("no such file")};
  p.start();
  p.join();
  const std::string err = capture.finish();
  EXPECT_EQ(p.exitcode(), 1);
  EXPECT_NE(err.find("Process " + p.name() + ":"), std::string::npos) << err;
  EXPECT_NE(err.find("std::runtime_error: no such file"), std::string::npos) << err;
}

TEST_P(StartMethodTest, ProcessKilledAndCrashedAreReportedAsSignals) {
  mp::Process sleeper{process_options(), sleep_forever};
  sleeper.start();
  EXPECT_TRUE(sleeper.is_alive());
  EXPECT_FALSE(sleeper.join_for(50ms));
  sleeper.kill();
  ASSERT_TRUE(sleeper.join_for(test_support::scaled(10s)));
  EXPECT_EQ(sleeper.exitcode(), -SIGKILL);
  EXPECT_FALSE(sleeper.is_alive());

  mp::Process crasher{process_options(), segfault};
  crasher.start();
  crasher.join();
  EXPECT_TRUE(crasher.exit_status().signaled());
  EXPECT_EQ(crasher.exit_status().signal(), SIGSEGV);
}

TEST_P(StartMethodTest, ProcessSentinelBecomesReadableWhenTheChildEnds) {
  mp::Process p{process_options(), sleep_forever};
  p.start();
  const int fd = p.sentinel();
  ASSERT_GE(fd, 0);
  EXPECT_FALSE(mp::detail::sys::wait_readable(fd, 20ms));
  p.terminate();
  EXPECT_TRUE(mp::detail::sys::wait_readable(fd, test_support::scaled(10'000ms)));
  p.join();
  EXPECT_EQ(p.exitcode(), -SIGTERM);
}

TEST_P(StartMethodTest, ManyStartsLeaveNoChildAndNoDescriptor) {
  if (method() == StartMethod::forkserver) mp::start_fork_server();
  const int fds_before = test_support::count_open_fds();
  for (int i = 0; i < 20; ++i) {
    mp::Process p{process_options(), exit_with, i};
    p.start();
    p.join();
    ASSERT_EQ(p.exitcode(), i);
  }
  for (int i = 0; i < 3; ++i) {
    mp::Pool pool{{.processes = 2, .max_tasks_per_child = 1, .start_method = method()}};
    EXPECT_EQ(pool.map(square, std::vector<int>{1, 2, 3, 4, 5}, 1), (std::vector<int>{1, 4, 9, 16, 25}));
  }
  EXPECT_TRUE(test_support::has_no_children());
  EXPECT_EQ(test_support::count_open_fds(), fds_before);
}

// ---- faults under each method -----------------------------------------------------------------------

TEST_P(StartMethodTest, CrashingTaskFailsAloneAndThePoolGoesOn) {
  mp::Pool pool{{.processes = 2, .start_method = method()}};
  auto crash = pool.apply_async(
      [](int) {
        segfault();
        return 0;
      },
      0);
  EXPECT_THROW(crash.get(), mp::WorkerCrashed);
  EXPECT_EQ(pool.map(square, std::vector<int>{1, 2, 3}), (std::vector<int>{1, 4, 9}));
}

TEST_P(StartMethodTest, UnknownTaskIdIsAProtocolErrorForThatTaskOnly) {
  mp::detail::PoolCore core(mp::PoolOptions{.processes = 1, .start_method = method()});
  auto job = std::make_shared<mp::detail::Job>();
  mp::detail::Chunk chunk;
  chunk.job = job;
  mp::detail::begin_chunk(chunk, 0x0123456789abcdefull);  // registered by no invoker
  mp::detail::mark_item(chunk);
  mp::encode(chunk.request, 5);
  chunk.count = 1;
  mp::detail::finish_chunk(chunk);
  core.submit(std::move(chunk));
  ASSERT_TRUE(job->wait_done(1, std::chrono::steady_clock::now() + test_support::scaled(30s)));
  auto pieces = job->take_all();
  ASSERT_EQ(pieces.size(), 1u);
  mp::Reader r(pieces[0].bytes.bytes());
  try {
    mp::detail::decode_outcome<int>(r);
    ADD_FAILURE() << "an unknown task id ran";
  } catch (const mp::ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown task id 0123456789abcdef"), std::string::npos) << e.what();
  }
  EXPECT_EQ(core.worker_pids().size(), 1u);  // the worker is still there
}

TEST(StartMethodRegistry, RunCallRefusesAnUnknownId) {
  mp::Writer request;
  request.write_value(std::uint64_t{42});
  mp::Reader r(request.bytes());
  mp::Writer reply;
  EXPECT_THROW(mp::detail::run_call(r, reply), mp::ProtocolError);
}

// ---- threads in the parent ------------------------------------------------------------------------

// A parent thread takes g_held and keeps it; another churns the allocator. Under every method the
// pool and Process still work; under forkserver and spawn even a task that takes g_held does.
TEST_P(StartMethodTest, ParentWithThreadsHoldingLocksDoesNotDeadlock) {
  std::atomic<bool> stop{false};
  std::atomic<bool> locked{false};
  std::thread holder([&] {
    std::lock_guard lock(g_held);
    locked = true;
    while (!stop) std::this_thread::sleep_for(1ms);
  });
  std::thread churner([&] {
    while (!stop) {
      auto v = std::make_unique<std::vector<char>>(4096);
      (*v)[0] = 1;
    }
  });
  while (!locked) std::this_thread::sleep_for(1ms);
  {
    test_support::StderrCapture quiet;  // the fork warning, checked elsewhere
    mp::Pool pool{{.processes = 2, .max_tasks_per_child = 2, .start_method = method()}};
    for (int round = 0; round < 5; ++round) {
      EXPECT_EQ(pool.map(square, std::vector<int>{1, 2, 3, 4}, 1), (std::vector<int>{1, 4, 9, 16}));
    }
    if (method() != StartMethod::fork) {
      EXPECT_EQ(pool.apply(lock_then_square, 6), 36);
    }
    mp::Process p{process_options(), exit_with, 3};
    p.start();
    ASSERT_TRUE(p.join_for(test_support::scaled(30s)));
    EXPECT_EQ(p.exitcode(), 3);
    (void)quiet.finish();
  }
  stop = true;
  holder.join();
  churner.join();
}

// What stderr got while `forks` Processes were started under fork with one other thread running.
std::string stderr_of_forks_beside_a_thread(int forks) {
  std::atomic<bool> stop{false};
  std::thread other([&] {
    while (!stop) std::this_thread::sleep_for(1ms);
  });
  test_support::StderrCapture capture;
  for (int i = 0; i < forks; ++i) {
    mp::Process p{noop};
    p.start();
    p.join();
  }
  std::string err = capture.finish();
  stop = true;
  other.join();
  return err;
}

// ThreadSanitizer runs a background thread of its own, which the fork check rightly counts: the
// exact-count warning tests are left out under it.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define STARTTEST_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) && !defined(STARTTEST_TSAN)
#define STARTTEST_TSAN 1
#endif
#ifndef STARTTEST_TSAN
#define STARTTEST_TSAN 0
#endif

TEST(StartMethodForkWarning, ForkWithForeignThreadsWarnsOnce) {
  if (STARTTEST_TSAN) GTEST_SKIP() << "ThreadSanitizer's own thread counts as another thread";
  const std::string err = stderr_of_forks_beside_a_thread(3);
  const auto first = err.find("multiproc: warning: fork() while 1 other thread");
  EXPECT_NE(first, std::string::npos) << err;
  EXPECT_EQ(err.find("multiproc: warning", first + 1), std::string::npos) << "warned more than once: " << err;
}

TEST(StartMethodForkWarning, ChoosingForkExplicitlySilencesIt) {
  mp::set_start_method(StartMethod::fork);
  const std::string err = stderr_of_forks_beside_a_thread(1);
  EXPECT_EQ(err.find("multiproc: warning"), std::string::npos) << err;
}

TEST(StartMethodForkWarning, PoolSupervisorThreadsDoNotCount) {
  if (STARTTEST_TSAN) GTEST_SKIP() << "ThreadSanitizer's own thread counts as another thread";
  test_support::StderrCapture capture;
  mp::Pool a{{.processes = 1}};
  mp::Pool b{{.processes = 1}};  // forked while a's supervisor runs
  mp::Process p{noop};
  p.start();
  p.join();
  EXPECT_EQ(b.apply(square, 3), 9);
  const std::string err = capture.finish();
  EXPECT_EQ(err.find("multiproc: warning"), std::string::npos) << err;
}

// ---- refusals --------------------------------------------------------------------------------------

TEST_P(StartMethodTest, ClosureTargetIsRefusedAtStartUnderForkserverAndSpawn) {
  int captured = 5;
  auto ctx = mp::get_context(method());
  mp::Process p = ctx.process([&captured] { ::_exit(captured); });
  if (method() == StartMethod::fork) {
    p.start();
    p.join();
    EXPECT_EQ(p.exitcode(), 5);
  } else {
    try {
      p.start();
      ADD_FAILURE() << "a closure was started under " << mp::to_string(method());
    } catch (const mp::InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("closure"), std::string::npos) << e.what();
    }
    EXPECT_EQ(p.pid(), 0);
  }
}

TEST_P(StartMethodTest, CapturingInitializerIsRefusedUnderForkserverAndSpawn) {
  int captured = 5;
  auto make = [&] {
    return mp::Pool{{.processes = 1, .initializer = [captured] { (void)captured; }, .start_method = method()}};
  };
  if (method() == StartMethod::fork) {
    EXPECT_NO_THROW(make());
  } else {
    EXPECT_THROW(make(), mp::InvalidArgument);
  }
}

TEST_P(StartMethodTest, StaticContextRunsProcessAndPool) {
  auto run = [](auto ctx) {
    mp::Process p = ctx.process(exit_with, 4);
    p.start();
    p.join();
    EXPECT_EQ(p.exitcode(), 4);
    mp::Pool pool = ctx.pool({.processes = 1});
    EXPECT_EQ(pool.apply(square, 9), 81);
  };
  switch (method()) {
    case StartMethod::fork:
      run(mp::get_context<StartMethod::fork>());
      break;
    case StartMethod::forkserver:
      run(mp::get_context<StartMethod::forkserver>());
      break;
    case StartMethod::spawn:
      run(mp::get_context<StartMethod::spawn>());
      break;
  }
}

// ---- another build ---------------------------------------------------------------------------------

// The peer is a separate program (tests/start_peer.cpp): a different build id.
std::string peer_path() {
  const auto self = std::filesystem::read_symlink("/proc/self/exe");
  return (self.parent_path() / "start_peer").string();
}

class OtherBuildTest : public StartMethodTest {};
INSTANTIATE_TEST_SUITE_P(Methods, OtherBuildTest, ::testing::Values(StartMethod::forkserver, StartMethod::spawn),
                         method_name);

TEST_P(OtherBuildTest, WorkerOfAnotherBuildRefusesWithBuildMismatch) {
  ASSERT_TRUE(std::filesystem::exists(peer_path())) << peer_path();
  mp::set_executable(peer_path());
  try {
    mp::Pool pool{{.processes = 2, .start_method = method()}};
    ADD_FAILURE() << "a pool started with workers of another build";
  } catch (const mp::BuildMismatch& e) {
    EXPECT_NE(std::string(e.what()).find("refusing to run tasks of another build"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(mp::detail::sys::build_id()), std::string::npos) << e.what();
  }
  mp::Process p{process_options(), noop};
  EXPECT_THROW(p.start(), mp::BuildMismatch);
  EXPECT_TRUE(test_support::has_no_children());
}

TEST_P(OtherBuildTest, ProgramWhoseMainSkipsInitIsAStartError) {
  mp::set_executable(peer_path());
  ::setenv("MULTIPROC_PEER_SKIP_INIT", "1", 1);
  mp::Process p{process_options(), noop};
  try {
    p.start();
    ADD_FAILURE() << "started";
  } catch (const mp::StartError& e) {
    EXPECT_EQ(dynamic_cast<const mp::BuildMismatch*>(&e), nullptr);
    EXPECT_NE(std::string(e.what()).find("multiproc::init()"), std::string::npos) << e.what();
  }
  ::unsetenv("MULTIPROC_PEER_SKIP_INIT");
}

// ---- settings ----------------------------------------------------------------------------------------

TEST(StartMethodSettings, DefaultIsForkAndSetStartMethodChangesIt) {
  if (std::getenv("MULTIPROC_START_METHOD")) GTEST_SKIP() << "the environment chooses the default";
  EXPECT_EQ(mp::get_start_method(), StartMethod::fork);
  mp::set_start_method(StartMethod::spawn);
  EXPECT_EQ(mp::get_start_method(), StartMethod::spawn);
  mp::Process p{exit_with, 6};
  EXPECT_EQ(p.start_method(), StartMethod::spawn);
  p.start();
  p.join();
  EXPECT_EQ(p.exitcode(), 6);
  mp::set_start_method(StartMethod::fork);
}

TEST(StartMethodSettings, NamesAndExecutable) {
  EXPECT_STREQ(mp::to_string(StartMethod::fork), "fork");
  EXPECT_STREQ(mp::to_string(StartMethod::forkserver), "forkserver");
  EXPECT_STREQ(mp::to_string(StartMethod::spawn), "spawn");
  EXPECT_EQ(mp::get_executable(), "/proc/self/exe");
  EXPECT_FALSE(mp::detail::sys::build_id().empty());
}

}  // namespace

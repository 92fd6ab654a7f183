// Signals and parent death: the processes a task started go with its worker when the parent dies,
// under every start method; Ctrl-C (SIGINT to the terminal's foreground process group) ends the
// program without a word from the workers, or, with the program's own handler, lets it cancel its
// work and go on.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "pool_test_common.hpp"
#include "test_support.hpp"

namespace {

namespace mp = multiproc;
using mp::StartMethod;
using namespace std::chrono_literals;

// Starts a process of the task's own that sleeps forever (in the worker's process group), and
// returns its pid.
pid_t start_grandchild(int) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    for (;;) ::pause();
  }
  return pid;
}

bool all_gone_within(const std::vector<pid_t>& pids, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    bool all = true;
    for (pid_t p : pids) all = all && test_support::is_dead(p);
    if (all) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
}

// The kernel's parent-death signal and the workers' own checks take milliseconds; the limit only
// says "promptly, not never".
std::chrono::milliseconds death_limit() { return pooltest::generous(100ms); }

// Waits until every worker runs in a process group of its own (not the program's), as it does
// once it is set up: from then on a signal to the program's group does not reach it.
bool in_groups_of_their_own(const std::vector<pid_t>& workers, pid_t program) {
  return pooltest::eventually([&] {
    for (pid_t p : workers) {
      const pid_t group = ::getpgid(p);
      if (group < 0 || group == program) return false;
    }
    return true;
  });
}

std::string method_name(const ::testing::TestParamInfo<StartMethod>& info) { return mp::to_string(info.param); }

class PoolSignals : public ::testing::TestWithParam<StartMethod> {};
INSTANTIATE_TEST_SUITE_P(Methods, PoolSignals,
                         ::testing::Values(StartMethod::fork, StartMethod::forkserver, StartMethod::spawn),
                         method_name);

TEST_P(PoolSignals, ProcessesATaskStartedDieWithTheParent) {
  const StartMethod method = GetParam();
  POOLTEST_SKIP_FORK_PARENT_DEATH_UNDER_TSAN(method);
  test_support::Pipe report;
  const int fd = report.write;
  mp::Process harness{mp::ProcessOptions{.start_method = StartMethod::fork}, [fd, method] {
                        mp::Pool pool{{.processes = 2, .start_method = method}};
                        const auto grandchildren = pool.map(start_grandchild, std::vector<int>{0, 1}, 1);
                        auto busy = pool.map_async(pooltest::sleep_ms_then_return, std::vector<int>(4, 30000), 1);
                        for (pid_t p : grandchildren) test_support::write_pid(fd, p);
                        for (pid_t p : pool.worker_pids()) test_support::write_pid(fd, p);
                        busy.wait();
                        std::_Exit(9);
                      }};
  harness.start();
  report.close_write();
  std::vector<pid_t> watched;
  for (int i = 0; i < 4; ++i) {
    const pid_t p = test_support::read_pid(report.read, 30000ms);
    ASSERT_GT(p, 0) << "the harness did not report";
    watched.push_back(p);
  }
  for (pid_t p : watched) ASSERT_FALSE(test_support::is_dead(p)) << p;
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(harness.pid(), SIGKILL), 0);
  EXPECT_TRUE(all_gone_within(watched, death_limit())) << "a worker or a process a task started outlived the parent";
  RecordProperty(
      "all_gone_ms",
      std::to_string(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count()));
  harness.join();
  for (pid_t p : watched) ::kill(p, SIGKILL);  // nothing should be left; never leave a sleeper behind
}

// Ctrl-C: the terminal sends SIGINT to its foreground process group. Workers have groups of their
// own, so only the program gets it: by default it dies of it, and its workers follow silently.
TEST_P(PoolSignals, CtrlCEndsTheProgramAndItsWorkersWithoutAWordFromThem) {
  const StartMethod method = GetParam();
  POOLTEST_SKIP_FORK_PARENT_DEATH_UNDER_TSAN(method);
  test_support::Pipe report;
  const int fd = report.write;
  test_support::StderrCapture capture;
  mp::Process program{mp::ProcessOptions{.start_method = StartMethod::fork}, [fd, method] {
                        mp::Pool pool{{.processes = 2, .start_method = method}};
                        auto busy = pool.map_async(pooltest::sleep_ms_then_return, std::vector<int>(4, 30000), 1);
                        for (pid_t p : pool.worker_pids()) test_support::write_pid(fd, p);
                        busy.wait();
                        std::_Exit(9);
                      }};
  program.start();
  report.close_write();
  std::vector<pid_t> workers;
  for (int i = 0; i < 2; ++i) workers.push_back(test_support::read_pid(report.read, 30000ms));
  for (pid_t p : workers) ASSERT_GT(p, 0);
  ASSERT_TRUE(in_groups_of_their_own(workers, program.pid()));
  ASSERT_EQ(::kill(-program.pid(), SIGINT), 0);  // the program's process group, as a terminal does
  ASSERT_TRUE(program.join_for(pooltest::scaled(10s)));
  EXPECT_EQ(program.exit_status(), mp::ExitStatus::killed_by(SIGINT)) << program.exit_status().to_string();
  EXPECT_TRUE(all_gone_within(workers, death_limit()));
  const std::string err = capture.finish();
  EXPECT_EQ(err, "") << "workers or the program printed on Ctrl-C";
  for (pid_t p : workers) ::kill(p, SIGKILL);
}

std::atomic<bool> g_interrupted{false};
void on_sigint(int) { g_interrupted = true; }

// With its own SIGINT handler the program decides: here it cancels the map and goes on.
TEST_P(PoolSignals, ProgramWithItsOwnHandlerCancelsItsWorkAndGoesOn) {
  const StartMethod method = GetParam();
  test_support::Pipe report;
  const int fd = report.write;
  mp::Process program{mp::ProcessOptions{.start_method = StartMethod::fork}, [fd, method] {
                        struct sigaction sa {};
                        sa.sa_handler = on_sigint;
                        ::sigemptyset(&sa.sa_mask);
                        ::sigaction(SIGINT, &sa, nullptr);
                        mp::Pool pool{{.processes = 2, .start_method = method}};
                        auto busy = pool.map_async(pooltest::sleep_ms_then_return, std::vector<int>(4, 30000), 1);
                        for (pid_t p : pool.worker_pids()) test_support::write_pid(fd, p);
                        while (!g_interrupted) std::this_thread::sleep_for(1ms);
                        busy.cancel();
                        int code = 3;
                        try {
                          busy.get();
                        } catch (const mp::Cancelled&) {
                          code = pool.apply(pooltest::square, 4) == 16 ? 0 : 4;
                        }
                        std::_Exit(code);
                      }};
  program.start();
  report.close_write();
  std::vector<pid_t> workers;
  for (int i = 0; i < 2; ++i) workers.push_back(test_support::read_pid(report.read, 30000ms));
  for (pid_t p : workers) ASSERT_GT(p, 0);
  ASSERT_TRUE(in_groups_of_their_own(workers, program.pid()));
  ASSERT_EQ(::kill(-program.pid(), SIGINT), 0);
  ASSERT_TRUE(program.join_for(pooltest::scaled(10s)));
  EXPECT_EQ(program.exit_status(), mp::ExitStatus::exited_with(0)) << program.exit_status().to_string();
}

}  // namespace

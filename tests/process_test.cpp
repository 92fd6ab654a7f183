// Process: real children that really exit, crash and get killed, with the exact status asserted;
// parent death, process groups, zombies, descriptors, and Python's exit semantics.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <multiproc/multiproc.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "platform.hpp"
#include "test_support.hpp"

namespace {

using multiproc::ExitStatus;
using multiproc::Process;
using multiproc::ProcessOptions;
using multiproc::StateError;
using namespace std::chrono_literals;
using test_support::generous;
using test_support::has_no_children;
using test_support::Pipe;
using test_support::read_pid;
using test_support::scaled;
using test_support::sleep_forever;
using test_support::StderrCapture;
using test_support::wait_exit;
using test_support::write_pid;

void no_core_dumps() noexcept {
  const rlimit zero{0, 0};
  ::setrlimit(RLIMIT_CORE, &zero);
}

// A real segmentation fault: a store to a page that allows no access (not a null pointer, which
// UBSan would report before the hardware does).
[[noreturn]] void segfault() noexcept {
  void* page = ::mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  *static_cast<volatile int*>(page) = 1;
  ::_exit(100);  // not reached
}

// ---- ExitStatus ---------------------------------------------------------------------------------

TEST(ExitStatusTest, ExitedWithCodeReportsTheCode) {
  const auto s = ExitStatus::exited_with(3);
  EXPECT_TRUE(s.exited());
  EXPECT_FALSE(s.signaled());
  EXPECT_FALSE(s.success());
  EXPECT_EQ(s.code(), 3);
  EXPECT_EQ(s.signal(), 0);
  EXPECT_FALSE(s.core_dumped());
  EXPECT_EQ(s.python_exitcode(), 3);
  EXPECT_EQ(s.to_string(), "exited with code 3");
  EXPECT_TRUE(ExitStatus::exited_with(0).success());
  EXPECT_EQ(ExitStatus(), ExitStatus::exited_with(0));
}

TEST(ExitStatusTest, KilledBySignalReportsTheSignal) {
  const auto s = ExitStatus::killed_by(SIGKILL);
  EXPECT_FALSE(s.exited());
  EXPECT_TRUE(s.signaled());
  EXPECT_FALSE(s.success());
  EXPECT_EQ(s.code(), -1);
  EXPECT_EQ(s.signal(), SIGKILL);
  EXPECT_EQ(s.python_exitcode(), -SIGKILL);
  EXPECT_EQ(s.to_string(), "killed by signal SIGKILL");
  EXPECT_EQ(ExitStatus::killed_by(SIGSEGV, true).to_string(), "killed by signal SIGSEGV (core dumped)");
  EXPECT_NE(ExitStatus::killed_by(SIGSEGV, true), ExitStatus::killed_by(SIGSEGV, false));
  EXPECT_NE(ExitStatus::killed_by(9), ExitStatus::exited_with(9));
}

TEST(ExitStatusTest, SignalNamesAreTheUsualAbbreviations) {
  EXPECT_EQ(multiproc::signal_name(SIGSEGV), "SIGSEGV");
  EXPECT_EQ(multiproc::signal_name(SIGTERM), "SIGTERM");
  EXPECT_EQ(multiproc::signal_name(SIGABRT), "SIGABRT");
  EXPECT_EQ(multiproc::signal_name(0), "signal 0");
  EXPECT_EQ(multiproc::signal_name(200), "signal 200");
}

TEST(ExitStatusTest, DecodesWaitStatusAndSiginfo) {
  EXPECT_EQ(ExitStatus::from_wait_status(3 << 8), ExitStatus::exited_with(3));
  EXPECT_EQ(ExitStatus::from_wait_status(SIGKILL), ExitStatus::killed_by(SIGKILL));
  EXPECT_EQ(ExitStatus::from_wait_status(SIGSEGV | 0x80), ExitStatus::killed_by(SIGSEGV, true));
  EXPECT_EQ(ExitStatus::from_siginfo(CLD_EXITED, 255), ExitStatus::exited_with(255));
  EXPECT_EQ(ExitStatus::from_siginfo(CLD_KILLED, SIGTERM), ExitStatus::killed_by(SIGTERM));
  EXPECT_EQ(ExitStatus::from_siginfo(CLD_DUMPED, SIGABRT), ExitStatus::killed_by(SIGABRT, true));
}

// ---- identity and options ------------------------------------------------------------------------

TEST(ProcessTest, PidIsZeroBeforeStartAndTheChildsAfter) {
  Pipe pids;
  Process p{[&] { write_pid(pids.write, ::getpid()); }};
  EXPECT_EQ(p.pid(), 0);
  p.start();
  EXPECT_GT(p.pid(), 0);
  EXPECT_NE(p.pid(), ::getpid());
  const pid_t child = p.pid();
  EXPECT_EQ(read_pid(pids.read), child);
  p.join();
  EXPECT_EQ(p.pid(), child);  // still reported after join
}

// "Process-N" -> N, or -1 when the name has another form.
int process_number(const std::string& name) {
  const std::string prefix = "Process-";
  if (name.rfind(prefix, 0) != 0 || name.size() == prefix.size()) return -1;
  int n = 0;
  for (char c : name.substr(prefix.size())) {
    if (c < '0' || c > '9') return -1;
    n = n * 10 + (c - '0');
  }
  return n;
}

TEST(ProcessTest, NameDefaultsToProcessN) {
  Process a{[] {}};
  Process b{[] {}};
  const int na = process_number(a.name());
  const int nb = process_number(b.name());
  EXPECT_GE(na, 1) << a.name();
  EXPECT_EQ(nb, na + 1) << b.name();
  EXPECT_FALSE(a.daemon());
  EXPECT_EQ(a.start_method(), multiproc::StartMethod::fork);
}

TEST(ProcessTest, OptionsNameAndDaemonAreHonoured) {
  Process p{ProcessOptions{.name = "worker", .daemon = true, .start_method = multiproc::StartMethod::fork}, [] {}};
  EXPECT_EQ(p.name(), "worker");
  EXPECT_TRUE(p.daemon());
  p.set_name("renamed");
  EXPECT_EQ(p.name(), "renamed");
  p.set_daemon(false);
  EXPECT_FALSE(p.daemon());
  p.start();
  EXPECT_THROW(p.set_daemon(true), StateError);
  EXPECT_FALSE(p.daemon());
  p.join();
}

TEST(ProcessTest, NameReachesTheChildsErrorReport) {
  Process p{ProcessOptions{.name = "named-child"}, [] { throw std::runtime_error("x"); }};
  StderrCapture err;
  p.start();
  p.join();
  EXPECT_EQ(err.finish(), "Process named-child:\nstd::runtime_error: x\n");
}

// ---- what the child sees ---------------------------------------------------------------------------

TEST(ProcessTest, ClosureCapturingByReferenceSeesTheParentsData) {
  std::vector<int> input(100000);
  for (int i = 0; i < 100000; ++i) input[static_cast<std::size_t>(i)] = i;
  std::string label = "parent data";
  Process p{[&] {
    long long sum = 0;
    for (int x : input) sum += x;
    ::_exit(sum == 4999950000LL && label == "parent data" ? 0 : 1);
  }};
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0));
}

TEST(ProcessTest, ChildsWritesAreNotVisibleInTheParent) {
  std::vector<int> data{1, 2, 3};
  int counter = 10;
  Process p{[&] {
    data.assign(5, 0);
    counter = 99;
    ::_exit(data.size() == 5 && counter == 99 ? 0 : 1);
  }};
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0));
  EXPECT_EQ(data, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(counter, 10);
}

void exit_with_sum_check(const std::vector<int>& v, const std::vector<int>* expected_address, int expected_sum) {
  int sum = 0;
  for (int x : v) sum += x;
  ::_exit((&v == expected_address ? 0 : 2) | (sum == expected_sum ? 0 : 1));
}

TEST(ProcessTest, FunctionWithCrefArgumentSeesTheParentsObject) {
  const std::vector<int> v{4, 5, 6};
  Process p{exit_with_sum_check, std::cref(v), &v, 15};
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0)) << "1: wrong sum, 2: a copy, not the object";
}

TEST(ProcessTest, ArgumentsWithoutRefAreCopiedAtConstruction) {
  std::vector<int> v{1, 2, 3};
  Process p{[](const std::vector<int>& copy) { ::_exit(copy == std::vector<int>{1, 2, 3} ? 0 : 1); }, v};
  v.assign({9, 9});  // after construction, before start: the child keeps the copy
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0));
}

// ---- exit codes ---------------------------------------------------------------------------------

TEST(ProcessTest, TargetReturningNormallyExitsZero) {
  Process p{[] {}};
  p.start();
  p.join();
  const ExitStatus s = p.exit_status();
  EXPECT_EQ(s, ExitStatus::exited_with(0));
  EXPECT_TRUE(s.success());
  EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessTest, StdExitCodeIsReported) {
  Process p{[] { std::exit(3); }};
  p.start();
  p.join();
  const ExitStatus s = p.exit_status();
  EXPECT_TRUE(s.exited());
  EXPECT_FALSE(s.signaled());
  EXPECT_EQ(s.code(), 3);
  EXPECT_EQ(s.signal(), 0);
  EXPECT_EQ(p.exitcode(), 3);
}

TEST(ProcessTest, UnderscoreExitCodeIsReported) {
  Process p{[] { ::_exit(3); }};
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(3));
  EXPECT_EQ(p.exitcode(), 3);
}

TEST(ProcessTest, ExitCode255IsReported) {
  Process p{[] { ::_exit(255); }};
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(255));
}

// ---- deaths by signal ---------------------------------------------------------------------------

void expect_killed_by(Process& p, int sig) {
  const ExitStatus s = p.exit_status();
  EXPECT_TRUE(s.signaled()) << s.to_string();
  EXPECT_FALSE(s.exited());
  EXPECT_EQ(s.signal(), sig) << s.to_string();
  EXPECT_EQ(s.code(), -1);
  EXPECT_EQ(p.exitcode(), -sig);
  EXPECT_EQ(s.to_string(), "killed by signal " + multiproc::signal_name(sig));
}

TEST(ProcessTest, ChildKilledBySigsegvReportsSignal) {
  Process p{[] {
    no_core_dumps();
    segfault();
  }};
  p.start();
  p.join();
  expect_killed_by(p, SIGSEGV);
  EXPECT_FALSE(p.exit_status().core_dumped());
  EXPECT_EQ(p.exit_status(), ExitStatus::killed_by(SIGSEGV, false));
}

TEST(ProcessTest, ChildKilledBySigabrtReportsSignal) {
  Process p{[] {
    no_core_dumps();
    std::abort();
  }};
  p.start();
  p.join();
  expect_killed_by(p, SIGABRT);
  EXPECT_EQ(p.exit_status(), ExitStatus::killed_by(SIGABRT, false));
}

TEST(ProcessTest, ChildKilledBySigkillReportsSignal) {
  Process p{[] { ::raise(SIGKILL); }};
  p.start();
  p.join();
  expect_killed_by(p, SIGKILL);
  EXPECT_EQ(p.exit_status(), ExitStatus::killed_by(SIGKILL, false));
}

// The parent's handler for a signal is reset in the child: a signal the parent would survive kills
// the child as the default action says.
std::atomic<int> g_term_seen{0};
void on_term(int) { g_term_seen = 1; }

TEST(ProcessTest, ParentsSignalHandlerDoesNotRunInTheChild) {
  struct sigaction sa {
  }, old{};
  sa.sa_handler = on_term;
  sigemptyset(&sa.sa_mask);
  ASSERT_EQ(::sigaction(SIGTERM, &sa, &old), 0);
  Process p{[] {
    ::raise(SIGTERM);
    ::_exit(g_term_seen ? 2 : 3);  // reached only if SIGTERM did not kill
  }};
  p.start();
  p.join();
  ::sigaction(SIGTERM, &old, nullptr);
  EXPECT_EQ(p.exit_status(), ExitStatus::killed_by(SIGTERM));
  EXPECT_EQ(g_term_seen.load(), 0);
}

// ---- exceptions in the target ----------------------------------------------------------------------

TEST(ProcessTest, ThrowingTargetExitsOneAndPrintsTypeAndMessage) {
  Process p{ProcessOptions{.name = "thrower"}, [] { throw std::runtime_error("boom"); }};
  StderrCapture err;
  p.start();
  p.join();
  const std::string out = err.finish();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(1));
  EXPECT_NE(out.find("Process thrower:"), std::string::npos) << out;
  EXPECT_NE(out.find("std::runtime_error: boom"), std::string::npos) << out;
  EXPECT_EQ(out, "Process thrower:\nstd::runtime_error: boom\n");
}

struct CustomError : std::logic_error {
  using std::logic_error::logic_error;
};

TEST(ProcessTest, ThrowingTargetReportsTheDynamicType) {
  Process p{ProcessOptions{.name = "custom"}, [] { throw CustomError("bad state"); }};
  StderrCapture err;
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(1));
  EXPECT_EQ(err.finish(), "Process custom:\n(anonymous namespace)::CustomError: bad state\n");
}

TEST(ProcessTest, ThrowingANonExceptionStillExitsOne) {
  Process p{ProcessOptions{.name = "int-thrower"}, [] { throw 42; }};
  StderrCapture err;
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(1));
  EXPECT_EQ(err.finish(), "Process int-thrower:\nint\n");
}

// ---- join, terminate, kill ------------------------------------------------------------------------

TEST(ProcessTest, JoinForOnSleepingChildTimesOutThenTerminateGivesSigterm) {
  Process p{[] { sleep_forever(); }};
  p.start();
  EXPECT_TRUE(p.is_alive());
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(p.join_for(100ms));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 100ms);
  EXPECT_TRUE(p.is_alive());
  EXPECT_EQ(p.exitcode(), std::nullopt);
  EXPECT_THROW((void)p.exit_status(), StateError);
  p.terminate();
  EXPECT_TRUE(p.join_for(scaled(5s)));
  EXPECT_FALSE(p.is_alive());
  expect_killed_by(p, SIGTERM);
  EXPECT_EQ(p.exitcode(), -SIGTERM);
}

TEST(ProcessTest, KillGivesSigkill) {
  Process p{[] {
    ::signal(SIGTERM, SIG_IGN);  // kill() must not depend on the child's cooperation
    sleep_forever();
  }};
  p.start();
  p.kill();
  p.join();
  expect_killed_by(p, SIGKILL);
}

TEST(ProcessTest, SendSignalDeliversAnySignal) {
  Process p{[] { sleep_forever(); }};
  p.start();
  p.send_signal(SIGUSR1);
  p.join();
  expect_killed_by(p, SIGUSR1);
}

TEST(ProcessTest, TerminateAndKillAfterTheEndDoNothing) {
  Process p{[] { ::_exit(4); }};
  p.start();
  p.join();
  EXPECT_NO_THROW(p.terminate());
  EXPECT_NO_THROW(p.kill());
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(4));
}

TEST(ProcessTest, IsAliveIsTrueWhileRunningAndFalseAfter) {
  Pipe go;
  Process p{[&] {
    char c;
    ::close(go.write);
    ssize_t n = ::read(go.read, &c, 1);
    (void)n;
  }};
  EXPECT_FALSE(p.is_alive());
  p.start();
  EXPECT_TRUE(p.is_alive());
  go.close_write();
  EXPECT_TRUE(p.join_for(scaled(5s)));
  EXPECT_FALSE(p.is_alive());
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0));
}

TEST(ProcessTest, IsAliveTurnsFalseWithoutJoin) {
  Process p{[] { ::_exit(6); }};
  p.start();
  EXPECT_TRUE(test_support::eventually([&] { return !p.is_alive(); }));
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(6));  // is_alive reaped it
  EXPECT_TRUE(has_no_children());
}

TEST(ProcessTest, JoinForReturnsTrueWhenTheChildEndsInTime) {
  Process p{[] {
    std::this_thread::sleep_for(50ms);
    ::_exit(2);
  }};
  p.start();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(p.join_for(scaled(10s)));
  EXPECT_LT(std::chrono::steady_clock::now() - start, scaled(5s));  // at the end, not at the timeout
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(2));
  EXPECT_TRUE(p.join_for(0ms));  // already over
  EXPECT_NO_THROW(p.join());     // joining again is harmless
}

TEST(ProcessTest, JoinForWithANegativeTimeoutOnlyPolls) {
  Process p{[] { sleep_forever(); }};
  p.start();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(p.join_for(-1s));
  EXPECT_LT(std::chrono::steady_clock::now() - start, generous(100ms));  // it did not wait
  p.kill();
  p.join();
}

// "Forever" spelled as the largest duration must wait, not overflow into "already expired".
TEST(ProcessTest, JoinForWithTheMaximumTimeoutWaitsForTheChild) {
  Process p{[] {
    std::this_thread::sleep_for(200ms);
    ::_exit(5);
  }};
  p.start();
  const bool ended = p.join_for(std::chrono::nanoseconds::max());
  EXPECT_TRUE(ended);
  if (!ended) p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(5));
}

// ---- misuse -----------------------------------------------------------------------------------------

TEST(ProcessTest, StartTwiceThrowsStateError) {
  Process p{[] {}};
  p.start();
  EXPECT_THROW(p.start(), StateError);
  p.join();
  EXPECT_THROW(p.start(), StateError);
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0));
}

TEST(ProcessTest, UsesBeforeStartThrowStateError) {
  Process p{[] {}};
  EXPECT_THROW(p.join(), StateError);
  EXPECT_THROW((void)p.join_for(1ms), StateError);
  EXPECT_THROW((void)p.exit_status(), StateError);
  EXPECT_THROW(p.terminate(), StateError);
  EXPECT_THROW(p.kill(), StateError);
  EXPECT_THROW(p.send_signal(SIGTERM), StateError);
  EXPECT_FALSE(p.is_alive());
  EXPECT_EQ(p.exitcode(), std::nullopt);
  EXPECT_THROW((void)p.sentinel(), StateError);
  try {
    p.join();
  } catch (const StateError& e) {
    EXPECT_NE(std::string(e.what()).find(p.name()), std::string::npos) << e.what();
  }
}

TEST(ProcessTest, ExitStatusWhileRunningThrowsStateError) {
  Process p{[] { sleep_forever(); }};
  p.start();
  EXPECT_THROW((void)p.exit_status(), StateError);
  EXPECT_THROW((void)p.exit_status(), multiproc::Error);
  EXPECT_THROW((void)p.exit_status(), std::logic_error);
  p.kill();
  p.join();
  EXPECT_NO_THROW((void)p.exit_status());
}

TEST(ProcessTest, MovedProcessKeepsTheChild) {
  Process a{[] { ::_exit(8); }};
  a.start();
  const pid_t pid = a.pid();
  Process b(std::move(a));
  EXPECT_EQ(b.pid(), pid);
  b.join();
  EXPECT_EQ(b.exit_status(), ExitStatus::exited_with(8));
  Process c{[] {}};
  c = std::move(b);
  EXPECT_EQ(c.pid(), pid);
  EXPECT_EQ(c.exit_status(), ExitStatus::exited_with(8));
}

// The parent lets go of the target and its copied arguments once the child has them: a large
// capture does not stay resident until join() or destruction.
TEST(ProcessTest, TargetAndArgumentsAreReleasedOnceTheChildHasThem) {
  auto captured = std::make_shared<std::vector<char>>(1 << 20, 'x');
  auto argument = std::make_shared<std::vector<char>>(1 << 20, 'y');
  const std::weak_ptr<std::vector<char>> captured_alive = captured;
  const std::weak_ptr<std::vector<char>> argument_alive = argument;
  Process p{[captured](const std::shared_ptr<std::vector<char>>& a) { ::_exit(captured->size() == a->size() ? 0 : 1); },
            argument};
  captured.reset();
  argument.reset();
  EXPECT_FALSE(captured_alive.expired());  // the Process holds them until start()
  p.start();
  EXPECT_TRUE(captured_alive.expired());
  EXPECT_TRUE(argument_alive.expired());
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0));
  EXPECT_THROW(p.start(), multiproc::StateError);  // still: a Process starts once
}

// ---- sentinel, process group ------------------------------------------------------------------------

TEST(ProcessTest, SentinelBecomesReadableWhenTheChildEnds) {
  Pipe go;
  Process p{[&] {
    ::close(go.write);
    char c;
    ssize_t n = ::read(go.read, &c, 1);
    (void)n;
  }};
  p.start();
  const int fd = p.sentinel();
  if (fd < 0) {
    go.close_write();
    p.join();
    GTEST_SKIP() << "no pidfd here";
  }
  pollfd pfd{fd, POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 50), 0);
  go.close_write();
  EXPECT_EQ(::poll(&pfd, 1, static_cast<int>(scaled(5000ms).count())), 1);
  p.join();
  // Still the same descriptor, open and readable, once reaped: a saved sentinel never names a file
  // opened later.
  EXPECT_EQ(p.sentinel(), fd);
  const int other = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  EXPECT_NE(other, fd);
  ::close(other);
  EXPECT_EQ(::poll(&pfd, 1, 0), 1);
  EXPECT_EQ(multiproc::wait({multiproc::Waitable(p)}, 0ms), std::vector<std::size_t>{0});
}

TEST(ProcessTest, ChildRunsInItsOwnProcessGroup) {
  Process p{[] { ::_exit(::getpgrp() == ::getpid() ? 0 : 1); }};
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0));
  Process q{[] { sleep_forever(); }};
  q.start();
  EXPECT_EQ(::getpgid(q.pid()), q.pid());
  EXPECT_NE(::getpgrp(), q.pid());
  q.kill();
  q.join();
}

// The test process becomes a subreaper so that orphaned grandchildren are reparented to it and
// their exact status can be read with waitpid.
class ProcessTreeTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0); }
  void TearDown() override {
    ::prctl(PR_SET_CHILD_SUBREAPER, 0);
    while (::waitpid(-1, nullptr, WNOHANG) > 0) {
    }
  }
};

TEST_F(ProcessTreeTest, TerminateReachesGrandchildren) {
  Pipe pids;
  Process p{[&] {
    const pid_t grandchild = ::fork();
    if (grandchild == 0) sleep_forever();
    write_pid(pids.write, grandchild);
    sleep_forever();
  }};
  p.start();
  const pid_t grandchild = read_pid(pids.read);
  ASSERT_GT(grandchild, 0);
  p.terminate();
  p.join();
  expect_killed_by(p, SIGTERM);
  const auto status = wait_exit(grandchild, 2000ms);
  ASSERT_TRUE(status.has_value()) << "grandchild " << grandchild
                                  << " still there: " << test_support::proc_state(grandchild);
  EXPECT_TRUE(WIFSIGNALED(*status));
  EXPECT_EQ(WTERMSIG(*status), SIGTERM);
}

TEST_F(ProcessTreeTest, ChildDiesWhenItsParentIsSigkilled) {
  Pipe pids;
  const pid_t parent = ::fork();
  ASSERT_GE(parent, 0);
  if (parent == 0) {
    try {
      Process child{[] { sleep_forever(); }};
      child.start();
      write_pid(pids.write, child.pid());
    } catch (...) {
      ::_exit(1);
    }
    sleep_forever();
  }
  const pid_t child = read_pid(pids.read);
  ASSERT_GT(child, 0);
  EXPECT_FALSE(test_support::is_dead(child));
  ASSERT_EQ(::kill(parent, SIGKILL), 0);
  const auto parent_status = wait_exit(parent);
  ASSERT_TRUE(parent_status.has_value());
  EXPECT_EQ(WTERMSIG(*parent_status), SIGKILL);
  const auto status = wait_exit(child, 2000ms);
  ASSERT_TRUE(status.has_value()) << "child " << child << " outlived its parent: " << test_support::proc_state(child);
  EXPECT_TRUE(WIFSIGNALED(*status));
  EXPECT_EQ(WTERMSIG(*status), SIGKILL);
}

// ---- no zombies, no leaked descriptors -------------------------------------------------------------

TEST(ProcessTest, HundredStartJoinCyclesLeaveNoZombieAndNoLeakedFd) {
  {
    Process warm{[] {}};  // one-time set-up (atexit registration, lists) out of the count
    warm.start();
    warm.join();
  }
  const int fds_before = test_support::count_open_fds();
  const std::size_t registered_before = multiproc::detail::sys::registered_fd_count();
  for (int i = 0; i < 100; ++i) {
    Process p{[i] {
      if (i % 3 == 1) ::raise(SIGKILL);
      ::_exit(i % 256);
    }};
    p.start();
    p.join();
    const ExitStatus expected = i % 3 == 1 ? ExitStatus::killed_by(SIGKILL) : ExitStatus::exited_with(i % 256);
    ASSERT_EQ(p.exit_status(), expected) << i;
  }
  EXPECT_TRUE(has_no_children());
  EXPECT_EQ(test_support::count_open_fds(), fds_before);
  EXPECT_EQ(multiproc::detail::sys::registered_fd_count(), registered_before);
}

TEST(ProcessTest, ChildDoesNotInheritTheSentinelOfASiblingStartedEarlier) {
  Process p1{[] { sleep_forever(); }};
  p1.start();
  const int fd = p1.sentinel();
  if (fd < 0) {
    p1.kill();
    p1.join();
    GTEST_SKIP() << "no pidfd here";
  }
  Process p2{[fd] { ::_exit(::fcntl(fd, F_GETFD) == -1 && errno == EBADF ? 0 : 1); }};
  p2.start();
  p2.join();
  EXPECT_EQ(p2.exit_status(), ExitStatus::exited_with(0)) << "the sibling's pidfd " << fd << " is open in p2";
  p1.kill();
  p1.join();
}

TEST(ProcessTest, DestroyedRunningProcessIsReapedByALaterStart) {
  pid_t pid = 0;
  Pipe go;
  {
    Process p{[&] {
      ::close(go.write);
      char c;
      ssize_t n = ::read(go.read, &c, 1);  // runs until told to end
      (void)n;
      ::_exit(0);
    }};
    p.start();
    pid = p.pid();
  }  // destroyed while the child runs: not killed
  EXPECT_FALSE(test_support::is_dead(pid));
  go.close_write();
  // Ended and waitable (WNOWAIT: not reaped here). A zombie leader is not waitable yet while other
  // threads of its (a sanitizer's, say) are still going down.
  const auto waitable = [pid] {
    siginfo_t info{};
    return ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid;
  };
  ASSERT_TRUE(test_support::eventually(waitable)) << "the child should have ended by now";
  ASSERT_EQ(test_support::proc_state(pid), 'Z');
  Process q{[] {}};
  q.start();
  q.join();
  EXPECT_EQ(test_support::proc_state(pid), 0) << "the destroyed Process's child was not reaped";
  EXPECT_TRUE(has_no_children());
}

// ---- exit semantics -----------------------------------------------------------------------------------

// What exit() costs a child forked from this process beyond its own work: a moment, or, under
// AddressSanitizer, whose leak check runs at every exit, up to seconds (a forked child leaves its
// parent's list of children behind on purpose, and the leak report about it is slow to write).
constexpr std::chrono::milliseconds kExitCost = TESTSUPPORT_ASAN ? 1000ms : 100ms;

int g_term_report_fd = -1;

// A child's SIGTERM handler: reports the signal on g_term_report_fd, then dies of it as by default.
void report_term_and_die(int) {
  write_pid(g_term_report_fd, ::getpid());
  ::signal(SIGTERM, SIG_DFL);
  ::raise(SIGTERM);  // delivered as the handler returns
}

TEST(ProcessTest, DaemonIsTerminatedAndNonDaemonJoinedWhenTheParentExits) {
  Pipe pids;
  Pipe done;
  Pipe ready;   // the daemon's handler is in place
  Pipe termed;  // the daemon got SIGTERM
  const auto start = std::chrono::steady_clock::now();
  const pid_t parent = ::fork();
  ASSERT_GE(parent, 0);
  if (parent == 0) {
    try {
      Process daemon{ProcessOptions{.name = "daemon", .daemon = true}, [&] {
                       g_term_report_fd = termed.write;
                       ::signal(SIGTERM, report_term_and_die);
                       write_pid(ready.write, ::getpid());
                       sleep_forever();
                     }};
      Process worker{[&] {
        std::this_thread::sleep_for(300ms);
        ssize_t n = ::write(done.write, "done", 4);
        (void)n;
        ::_exit(7);
      }};
      daemon.start();
      worker.start();
      if (read_pid(ready.read) != daemon.pid()) ::_exit(1);
      write_pid(pids.write, daemon.pid());
      write_pid(pids.write, worker.pid());
    } catch (...) {
      ::_exit(1);
    }
    std::exit(0);  // atexit: terminate the daemon, join the worker
  }
  done.close_write();
  termed.close_write();
  const pid_t daemon = read_pid(pids.read);
  const pid_t worker = read_pid(pids.read);
  ASSERT_GT(daemon, 0);
  ASSERT_GT(worker, 0);
  const auto status = wait_exit(parent, 10s);
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(status.has_value()) << "the parent never finished exiting";
  EXPECT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0);
  EXPECT_GE(took, 300ms) << "the parent did not wait for its non-daemon child";
  // Terminated: sent SIGTERM at once, not killed after the grace that a daemon ignoring SIGTERM
  // gets (and no hang either).
  EXPECT_EQ(read_pid(termed.read), daemon) << "the daemon was not sent SIGTERM";
  EXPECT_LT(took, 300ms + generous(kExitCost)) << "the daemon was not terminated promptly";
  EXPECT_EQ(test_support::read_all(done.read), "done");
  // Both were reaped by the parent before it exited.
  EXPECT_EQ(test_support::proc_state(daemon), 0);
  EXPECT_EQ(test_support::proc_state(worker), 0);
}

TEST(ProcessTest, StdoutBufferedBeforeStartIsWrittenOnce) {
  Pipe out;
  const pid_t parent = ::fork();
  ASSERT_GE(parent, 0);
  if (parent == 0) {
    std::fflush(stdout);
    ::dup2(out.write, STDOUT_FILENO);
    std::printf("x");  // a pipe: fully buffered, still in the buffer when start() is called
    int code = 1;
    try {
      Process p{[] { std::printf("y"); }};  // flushed when the child ends
      p.start();
      p.join();
      code = p.exit_status().success() ? 0 : 2;
    } catch (...) {
    }
    std::fflush(stdout);
    ::_exit(code);
  }
  out.close_write();
  const std::string text = test_support::read_all(out.read);
  const auto status = wait_exit(parent);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(WEXITSTATUS(*status), 0);
  EXPECT_EQ(text, "xy");  // start() flushed "x" before forking; the child wrote "y" when it ended
}

// A process made by a plain fork() (not by multiproc) that calls exit() must leave the children of
// the process it was forked from alone: they are not its children.
TEST(ProcessTest, PlainForkedProcessExitingDoesNotWaitForOrKillItsParentsChildren) {
  Process sleeper{[] { sleep_forever(); }};
  Process daemon{ProcessOptions{.name = "d", .daemon = true}, [] { sleep_forever(); }};
  sleeper.start();
  daemon.start();
  const auto start = std::chrono::steady_clock::now();
  const pid_t forked = ::fork();
  ASSERT_GE(forked, 0);
  if (forked == 0) std::exit(0);
  // An exit() that waited for the sleeper would never end.
  const auto status = wait_exit(forked, std::max<std::chrono::milliseconds>(3s, 10 * kExitCost));
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(status.has_value()) << "exit() in a plain fork waited for its parent's children";
  EXPECT_LT(took, generous(kExitCost));
  EXPECT_TRUE(sleeper.is_alive());
  EXPECT_TRUE(daemon.is_alive()) << "exit() in a plain fork terminated its parent's daemon child";
  sleeper.kill();
  daemon.kill();
  sleeper.join();
  daemon.join();
  if (!status) {
    ::kill(forked, SIGKILL);
    wait_exit(forked);
  }
}

// ---- failure after fork -------------------------------------------------------------------------------

int emfile_for_pidfd_open(const char* name) noexcept { return std::strcmp(name, "pidfd_open") == 0 ? EMFILE : 0; }

// If start() fails after fork(2) has made the child, the caller is told the process did not
// start: no child may be left running the target, or as an unreaped zombie.
TEST(ProcessTest, StartFailingAfterForkLeavesNoChildBehind) {
  ASSERT_TRUE(has_no_children());
  Process p{[] {
    std::this_thread::sleep_for(100ms);
    ::_exit(0);
  }};
  multiproc::detail::sys::set_fault_hook(&emfile_for_pidfd_open);
  bool threw = false;
  try {
    p.start();
  } catch (const multiproc::SystemError& e) {
    threw = true;
    EXPECT_EQ(e.code().value(), EMFILE);
  }
  multiproc::detail::sys::set_fault_hook(nullptr);
  if (threw) {
    EXPECT_EQ(p.pid(), 0);
    // No waiting first: start() must have killed and reaped the child before it threw. (Given
    // time, a child left running would end on its own and be reaped below, unnoticed.)
    Process q{[] {}};  // a later start() reaps whatever it knows of
    q.start();
    q.join();
    EXPECT_TRUE(has_no_children()) << "start() threw but left its child behind";
  } else {
    p.join();  // started without a pidfd: must still work
    EXPECT_EQ(p.exit_status(), ExitStatus::exited_with(0));
    EXPECT_TRUE(has_no_children());
  }
  while (::waitpid(-1, nullptr, 0) > 0) {
  }
}

}  // namespace

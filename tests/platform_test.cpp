// The platform layer: the checked-call wrapper, fault injection, descriptors and their registry,
// fork_process, signals and the socket helpers.
#include <gtest/gtest.h>
#include <poll.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <multiproc/process.hpp>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "platform.hpp"
#include "test_support.hpp"

// ---- interposed libc calls --------------------------------------------------------------------
// Defining close and recv here makes every call in this executable (the library included) come to
// these, so a test can see how often the library calls them and make them report EINTR. Unarmed,
// they are the plain system calls.
namespace {
std::atomic<bool> g_count_close{false};
std::atomic<int> g_close_calls{0};
std::atomic<bool> g_close_reports_eintr{false};

std::atomic<int> g_recv_calls{0};
std::atomic<int> g_recv_inject_eintr{0};
std::atomic<int> g_recv_real_eintr{0};
}  // namespace

extern "C" int close(int fd) {
  if (g_count_close.load()) g_close_calls.fetch_add(1);
  const long r = ::syscall(SYS_close, fd);
  // Linux's close releases the descriptor and may still report EINTR: simulate exactly that.
  if (r == 0 && g_close_reports_eintr.exchange(false)) {
    errno = EINTR;
    return -1;
  }
  return static_cast<int>(r);
}

extern "C" ssize_t recv(int fd, void* buf, size_t n, int flags) {
  g_recv_calls.fetch_add(1);
  if (g_recv_inject_eintr.load() > 0) {
    g_recv_inject_eintr.fetch_sub(1);
    errno = EINTR;
    return -1;
  }
  const long r = ::syscall(SYS_recvfrom, fd, buf, n, flags, nullptr, nullptr);
  if (r == -1 && errno == EINTR) g_recv_real_eintr.fetch_add(1);
  return static_cast<ssize_t>(r);
}

namespace {

namespace sys = multiproc::detail::sys;
using namespace std::chrono_literals;
using test_support::fd_is_open;
using test_support::has_no_children;
using test_support::StderrCapture;

// ---- a configurable fault hook ------------------------------------------------------------------
std::atomic<const char*> g_fault_name{nullptr};  // the call to fail
std::atomic<int> g_fault_errno{0};
std::atomic<int> g_fault_times{0};  // how many times more; negative: always
std::atomic<int> g_hook_calls{0};   // calls of any name that reached the hook
std::atomic<int> g_hook_named_calls{0};

int fault_hook(const char* name) noexcept {
  g_hook_calls.fetch_add(1);
  const char* target = g_fault_name.load();
  if (!target || std::strcmp(name, target) != 0) return 0;
  g_hook_named_calls.fetch_add(1);
  const int times = g_fault_times.load();
  if (times == 0) return 0;
  if (times > 0) g_fault_times.fetch_sub(1);
  return g_fault_errno.load();
}

void inject(const char* name, int err, int times = -1) {
  g_fault_name = name;
  g_fault_errno = err;
  g_fault_times = times;
  g_hook_calls = 0;
  g_hook_named_calls = 0;
  sys::set_fault_hook(&fault_hook);
}

class PlatformTest : public ::testing::Test {
 protected:
  void TearDown() override {
    sys::set_fault_hook(nullptr);
    g_fault_name = nullptr;
    g_count_close = false;
    g_close_reports_eintr = false;
    g_recv_inject_eintr = 0;
  }
};

std::vector<std::byte> pattern(std::size_t n) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 2654435761u) >> 13);
  return v;
}

sigset_t current_mask() {
  sigset_t s;
  sigemptyset(&s);
  pthread_sigmask(SIG_BLOCK, nullptr, &s);
  return s;
}

bool same_mask(const sigset_t& a, const sigset_t& b) {
  for (int sig = 1; sig < 65; ++sig) {
    if (sigismember(&a, sig) != sigismember(&b, sig)) return false;
  }
  return true;
}

// ---- checked() ------------------------------------------------------------------------------------

TEST_F(PlatformTest, CheckedReturnsTheCallsResult) {
  EXPECT_EQ(sys::checked("probe", [] { return 42; }), 42);
  EXPECT_EQ(sys::checked("probe", [] { return 0L; }), 0L);
  EXPECT_EQ(sys::checked("probe", [] { return static_cast<ssize_t>(-2); }), -2);  // only -1 is failure
}

TEST_F(PlatformTest, CheckedRetriesEintrFromTheCall) {
  int calls = 0;
  const int r = sys::checked("probe", [&] {
    if (++calls <= 3) {
      errno = EINTR;
      return -1;
    }
    return 7;
  });
  EXPECT_EQ(r, 7);
  EXPECT_EQ(calls, 4);
}

TEST_F(PlatformTest, CheckedThrowsSystemErrorWithTheErrnoAndTheCallsName) {
  int calls = 0;
  try {
    sys::checked("probe_call", [&] {
      ++calls;
      errno = ENOENT;
      return -1;
    });
    FAIL() << "no exception";
  } catch (const multiproc::SystemError& e) {
    EXPECT_EQ(e.code().value(), ENOENT);
    EXPECT_EQ(e.code(), std::errc::no_such_file_or_directory);
    EXPECT_EQ(&e.code().category(), &std::generic_category());
    EXPECT_EQ(std::string(e.what()).rfind("probe_call: ", 0), 0u) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::strerror(ENOENT)), std::string::npos) << e.what();
  }
  EXPECT_EQ(calls, 1);  // not retried
}

TEST_F(PlatformTest, RealSystemCallFailureIsCatchableAsEveryBase) {
  char c;
  const auto bad_read = [&] { sys::checked("read", [&] { return ::read(-1, &c, 1); }); };
  EXPECT_THROW(bad_read(), multiproc::SystemError);
  EXPECT_THROW(bad_read(), std::system_error);
  EXPECT_THROW(bad_read(), multiproc::Error);
  try {
    bad_read();
  } catch (const multiproc::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("read: ", 0), 0u) << e.what();
    EXPECT_EQ(dynamic_cast<const std::system_error&>(e).code().value(), EBADF);
  }
}

TEST_F(PlatformTest, CheckedNoexceptReturnsMinusErrnoAndRetriesEintr) {
  int calls = 0;
  const int r = sys::checked_noexcept("probe", [&] {
    if (++calls == 1) {
      errno = EINTR;
      return -1;
    }
    errno = EAGAIN;
    return -1;
  });
  EXPECT_EQ(r, -EAGAIN);
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(sys::checked_noexcept("probe", [] { return 5; }), 5);
}

TEST_F(PlatformTest, InjectedFaultThrowsWithoutRunningTheCall) {
  inject("probe", EIO);
  bool ran = false;
  try {
    sys::checked("probe", [&] {
      ran = true;
      return 0;
    });
    FAIL() << "no exception";
  } catch (const multiproc::SystemError& e) {
    EXPECT_EQ(e.code().value(), EIO);
    EXPECT_EQ(std::string(e.what()).rfind("probe: ", 0), 0u) << e.what();
  }
  EXPECT_FALSE(ran);
  EXPECT_EQ(sys::checked_noexcept("probe",
                                  [&] {
                                    ran = true;
                                    return 0;
                                  }),
            -EIO);
  EXPECT_FALSE(ran);
}

TEST_F(PlatformTest, InjectedFaultOnlyAffectsTheNamedCall) {
  inject("probe", EIO);
  EXPECT_EQ(sys::checked("other", [] { return 3; }), 3);
  EXPECT_EQ(g_hook_calls.load(), 1);
  EXPECT_EQ(g_hook_named_calls.load(), 0);
  sys::set_fault_hook(nullptr);
  EXPECT_EQ(sys::checked("probe", [] { return 4; }), 4);
  EXPECT_EQ(g_hook_calls.load(), 1);  // the hook is no longer consulted
}

TEST_F(PlatformTest, InjectedFaultStopsWhenTheHookSaysSo) {
  inject("probe", EMFILE, 1);
  EXPECT_THROW(sys::checked("probe", [] { return 1; }), multiproc::SystemError);
  EXPECT_EQ(sys::checked("probe", [] { return 2; }), 2);
}

// The wrapper's contract is "EINTR is retried"; a fault injected as EINTR must behave as a real
// interrupted call does, or the retry paths cannot be tested through the hook.
TEST_F(PlatformTest, CheckedRetriesInjectedEintr) {
  inject("probe", EINTR, 2);
  int calls = 0;
  int r = -100;
  EXPECT_NO_THROW(r = sys::checked("probe", [&] {
                    ++calls;
                    return 9;
                  }));
  EXPECT_EQ(r, 9);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(g_hook_named_calls.load(), 3);

  inject("probe", EINTR, 2);
  EXPECT_EQ(sys::checked_noexcept("probe", [] { return 8; }), 8);
}

// ---- fork failing -----------------------------------------------------------------------------------

int eagain_for_fork(const char* name) noexcept { return std::strcmp(name, "fork") == 0 ? EAGAIN : 0; }

TEST_F(PlatformTest, ForkFailingWithEagainMakesStartThrowAndLeavesTheProcessUnstarted) {
  ASSERT_TRUE(has_no_children());
  const std::size_t registered = sys::registered_fd_count();
  const sigset_t mask_before = current_mask();
  bool ran = false;
  multiproc::Process p{[&] { ran = true; }};
  sys::set_fault_hook(&eagain_for_fork);
  try {
    p.start();
    FAIL() << "start() did not throw";
  } catch (const multiproc::SystemError& e) {
    EXPECT_EQ(e.code().value(), EAGAIN);
    EXPECT_EQ(std::string(e.what()).rfind("fork: ", 0), 0u) << e.what();
  }
  sys::set_fault_hook(nullptr);

  EXPECT_TRUE(has_no_children());
  EXPECT_EQ(p.pid(), 0);
  EXPECT_FALSE(p.is_alive());
  EXPECT_EQ(p.exitcode(), std::nullopt);
  EXPECT_THROW(p.join(), multiproc::StateError);
  EXPECT_THROW((void)p.exit_status(), multiproc::StateError);
  EXPECT_THROW((void)p.sentinel(), multiproc::StateError);
  // Nothing was left half-done: the registry lock is free, the signal mask restored.
  EXPECT_EQ(sys::registered_fd_count(), registered);
  EXPECT_TRUE(same_mask(current_mask(), mask_before));

  // The same object can start once fork works again.
  p.start();
  EXPECT_GT(p.pid(), 0);
  p.join();
  EXPECT_EQ(p.exit_status(), multiproc::ExitStatus::exited_with(0));
  EXPECT_FALSE(ran);  // the target ran in the child, not here
}

TEST_F(PlatformTest, ForkProcessFailingWithEnomemThrowsSystemError) {
  inject("fork", ENOMEM);
  try {
    sys::fork_process({}, [] { ::_exit(0); });
    FAIL() << "no exception";
  } catch (const multiproc::SystemError& e) {
    EXPECT_EQ(e.code().value(), ENOMEM);
    EXPECT_EQ(std::string(e.what()).rfind("fork: ", 0), 0u) << e.what();
  }
  EXPECT_TRUE(has_no_children());
}

// ---- close_fd ----------------------------------------------------------------------------------------

TEST_F(PlatformTest, CloseFdClosesOnceAndDoesNotRetryEintr) {
  test_support::Pipe p;
  const int fd = p.read;
  p.read = -1;
  inject("close", EINTR);  // close_fd must not go through checked(): the hook never sees it
  g_close_calls = 0;
  g_close_reports_eintr = true;
  StderrCapture err;
  g_count_close = true;
  sys::close_fd(fd);
  g_count_close = false;
  EXPECT_EQ(err.finish(), "");  // EINTR after close is success on Linux: nothing reported
  EXPECT_EQ(g_close_calls.load(), 1);
  EXPECT_FALSE(fd_is_open(fd));
  EXPECT_EQ(g_hook_named_calls.load(), 0);
}

TEST_F(PlatformTest, CloseFdReportsOtherErrorsWithoutThrowing) {
  StderrCapture err;  // first, so that its descriptors do not take the closed number
  test_support::Pipe p;
  const int fd = p.read;
  p.close_read();
  g_close_calls = 0;
  g_count_close = true;
  sys::close_fd(fd);  // already closed: EBADF
  g_count_close = false;
  const std::string out = err.finish();
  EXPECT_EQ(g_close_calls.load(), 1);
  EXPECT_NE(out.find("multiproc: close failed"), std::string::npos) << out;
}

TEST_F(PlatformTest, CloseFdIgnoresNegativeDescriptors) {
  g_close_calls = 0;
  g_count_close = true;
  sys::close_fd(-1);
  g_count_close = false;
  EXPECT_EQ(g_close_calls.load(), 0);
}

// ---- UniqueFd and the registry ---------------------------------------------------------------------

int fresh_fd() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return -1;
  ::syscall(SYS_close, fds[1]);
  return fds[0];
}

TEST_F(PlatformTest, UniqueFdRegistersAndUnregisters) {
  const std::size_t before = sys::registered_fd_count();
  const int raw = fresh_fd();
  {
    sys::UniqueFd fd(raw);
    EXPECT_TRUE(fd.valid());
    EXPECT_TRUE(static_cast<bool>(fd));
    EXPECT_EQ(fd.get(), raw);
    EXPECT_EQ(sys::registered_fd_count(), before + 1);
  }
  EXPECT_EQ(sys::registered_fd_count(), before);
  EXPECT_FALSE(fd_is_open(raw));
}

TEST_F(PlatformTest, DefaultUniqueFdIsInvalidAndUnregistered) {
  const std::size_t before = sys::registered_fd_count();
  sys::UniqueFd fd;
  EXPECT_FALSE(fd.valid());
  EXPECT_EQ(fd.get(), -1);
  sys::UniqueFd negative(-1);
  EXPECT_EQ(sys::registered_fd_count(), before);
}

TEST_F(PlatformTest, UniqueFdMoveKeepsOneRegistration) {
  const std::size_t before = sys::registered_fd_count();
  const int raw = fresh_fd();
  sys::UniqueFd a(raw);
  sys::UniqueFd b(std::move(a));
  EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(b.get(), raw);
  EXPECT_EQ(sys::registered_fd_count(), before + 1);
  const int raw2 = fresh_fd();
  sys::UniqueFd c(raw2);
  EXPECT_EQ(sys::registered_fd_count(), before + 2);
  c = std::move(b);  // closes raw2
  EXPECT_FALSE(fd_is_open(raw2));
  EXPECT_TRUE(fd_is_open(raw));
  EXPECT_EQ(c.get(), raw);
  EXPECT_EQ(sys::registered_fd_count(), before + 1);
  c.reset();
  EXPECT_FALSE(fd_is_open(raw));
  EXPECT_EQ(sys::registered_fd_count(), before);
}

TEST_F(PlatformTest, UniqueFdReleaseUnregistersWithoutClosing) {
  const std::size_t before = sys::registered_fd_count();
  const int raw = fresh_fd();
  sys::UniqueFd fd(raw);
  EXPECT_EQ(fd.release(), raw);
  EXPECT_FALSE(fd.valid());
  EXPECT_EQ(sys::registered_fd_count(), before);
  EXPECT_TRUE(fd_is_open(raw));
  ::syscall(SYS_close, raw);
}

// ---- fork_process ------------------------------------------------------------------------------------

// Runs `child` in a fork_process child, which reports a small integer as its exit code.
template <class F>
int child_result(const sys::ForkOptions& options, F&& child) {
  const pid_t pid = sys::fork_process(options, [&] { ::_exit(child()); });
  EXPECT_GT(pid, 0);
  const auto status = test_support::wait_exit(pid);
  if (!status) return -1000;
  if (!WIFEXITED(*status)) return -WTERMSIG(*status);
  return WEXITSTATUS(*status);
}

TEST_F(PlatformTest, ForkedChildClosesRegisteredDescriptorsExceptKept) {
  auto [a, b] = sys::socket_pair();
  auto [c, d] = sys::socket_pair();
  const int keep[] = {b.get()};
  const int a_fd = a.get(), b_fd = b.get(), c_fd = c.get(), d_fd = d.get();
  const int r = child_result({.keep_fds = keep}, [&] {
    int bits = 0;
    if (fd_is_open(a_fd)) bits |= 1;
    if (!fd_is_open(b_fd)) bits |= 2;
    if (fd_is_open(c_fd)) bits |= 4;
    if (fd_is_open(d_fd)) bits |= 8;
    if (sys::registered_fd_count() != 0) bits |= 16;
    return bits;
  });
  EXPECT_EQ(r, 0) << "bit 1: a open, 2: kept b closed, 4: c open, 8: d open, 16: registry not empty";
  // The parent's descriptors are untouched.
  EXPECT_TRUE(fd_is_open(a_fd));
  EXPECT_TRUE(fd_is_open(b_fd));
  EXPECT_GE(sys::registered_fd_count(), 4u);
}

// In a child, a UniqueFd inherited from the parent must not close the number it held: the child
// already closed it, and the number may since belong to something else.
TEST_F(PlatformTest, InheritedUniqueFdDoesNotCloseAReusedNumberInTheChild) {
  sys::UniqueFd inherited(fresh_fd());
  const int number = inherited.get();
  const int r = child_result({}, [&] {
    const int mine = fresh_fd();  // the lowest free number: the one the registry just closed
    if (mine != number) return 2;
    const unsigned gen = sys::fork_generation();
    inherited.reset();
    if (!fd_is_open(mine)) return 1;
    return gen == 0 ? 3 : 0;
  });
  EXPECT_EQ(r, 0) << "1: reset() closed the reused number, 2: number not reused, 3: generation not bumped";
  EXPECT_TRUE(fd_is_open(number));
}

TEST_F(PlatformTest, ForkedChildGetsItsOwnProcessGroupAndDeathSignal) {
  const int r = child_result({}, [] {
    int pdeath = 0;
    ::prctl(PR_GET_PDEATHSIG, &pdeath);
    return (::getpgrp() == ::getpid() ? 0 : 1) | (pdeath == SIGKILL ? 0 : 2);
  });
  EXPECT_EQ(r, 0);
}

TEST_F(PlatformTest, ForkOptionsCanKeepTheParentsGroupAndSkipTheDeathSignal) {
  const pid_t my_group = ::getpgrp();
  const int r = child_result({.new_process_group = false, .die_with_parent = false, .keep_fds = {}}, [&] {
    int pdeath = -1;
    ::prctl(PR_GET_PDEATHSIG, &pdeath);
    return (::getpgrp() == my_group ? 0 : 1) | (pdeath == 0 ? 0 : 2);
  });
  EXPECT_EQ(r, 0);
}

TEST_F(PlatformTest, ForkedChildWhoseMainReturnsExitsZero) {
  const pid_t pid = sys::fork_process({}, [] {});
  const auto status = test_support::wait_exit(pid);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0);
}

std::atomic<int> g_usr1_count{0};
void count_usr1(int) { g_usr1_count.fetch_add(1); }

TEST_F(PlatformTest, ForkedChildResetsCaughtHandlersKeepsIgnoredAndTheMask) {
  struct sigaction sa {};
  sa.sa_handler = count_usr1;
  sigemptyset(&sa.sa_mask);
  struct sigaction old_usr1 {
  }, old_usr2{};
  ASSERT_EQ(::sigaction(SIGUSR1, &sa, &old_usr1), 0);
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  ASSERT_EQ(::sigaction(SIGUSR2, &ign, &old_usr2), 0);
  sigset_t winch, old_mask;
  sigemptyset(&winch);
  sigaddset(&winch, SIGWINCH);
  ASSERT_EQ(pthread_sigmask(SIG_BLOCK, &winch, &old_mask), 0);
  const sigset_t mask_before = current_mask();

  const int r = child_result({}, [] {
    struct sigaction now {};
    int bits = 0;
    ::sigaction(SIGUSR1, nullptr, &now);
    if (now.sa_handler != SIG_DFL) bits |= 1;
    ::sigaction(SIGUSR2, nullptr, &now);
    if (now.sa_handler != SIG_IGN) bits |= 2;
    const sigset_t mask = current_mask();
    if (!sigismember(&mask, SIGWINCH)) bits |= 4;
    if (sigismember(&mask, SIGTERM) || sigismember(&mask, SIGINT)) bits |= 8;
    return bits;
  });
  EXPECT_EQ(r, 0) << "1: handler kept, 2: SIG_IGN lost, 4: mask lost, 8: signals left blocked";
  EXPECT_TRUE(same_mask(current_mask(), mask_before));

  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  ::sigaction(SIGUSR1, &old_usr1, nullptr);
  ::sigaction(SIGUSR2, &old_usr2, nullptr);
}

// ---- pidfd, wait_child, wait_readable ----------------------------------------------------------------

TEST_F(PlatformTest, PidfdBecomesReadableAndWaitChildReportsTheExit) {
  test_support::Pipe go;
  const pid_t pid = sys::fork_process({}, [&] {
    ::close(go.write);
    char c;
    ssize_t n = ::read(go.read, &c, 1);
    (void)n;
    ::_exit(5);
  });
  sys::UniqueFd pidfd = sys::pidfd_open(pid);
  if (!pidfd.valid()) GTEST_SKIP() << "pidfd_open unavailable here";
  EXPECT_FALSE(sys::wait_readable(pidfd.get(), 20ms));
  EXPECT_EQ(sys::wait_child(pid, pidfd.get(), true), std::nullopt);
  go.close_write();
  EXPECT_TRUE(sys::wait_readable(pidfd.get(), test_support::scaled(5000ms)));
  const auto info = sys::wait_child(pid, pidfd.get(), false);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->si_pid, pid);
  EXPECT_EQ(info->si_code, CLD_EXITED);
  EXPECT_EQ(info->si_status, 5);
  EXPECT_TRUE(has_no_children());
}

TEST_F(PlatformTest, WaitChildWithoutPidfdReportsTheSignal) {
  const pid_t pid = sys::fork_process({}, [] { test_support::sleep_forever(); });
  EXPECT_EQ(sys::wait_child(pid, -1, true), std::nullopt);
  EXPECT_TRUE(sys::send_signal(pid, SIGKILL, true));
  const auto info = sys::wait_child(pid, -1, false);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->si_code, CLD_KILLED);
  EXPECT_EQ(info->si_status, SIGKILL);
}

TEST_F(PlatformTest, WaitChildOnANonChildThrowsEchild) {
  try {
    (void)sys::wait_child(1, -1, true);
    FAIL() << "no exception";
  } catch (const multiproc::SystemError& e) {
    EXPECT_EQ(e.code().value(), ECHILD);
    EXPECT_EQ(std::string(e.what()).rfind("waitid: ", 0), 0u) << e.what();
  }
}

TEST_F(PlatformTest, WaitReadableTimesOutThenSeesData) {
  auto [a, b] = sys::socket_pair();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(sys::wait_readable(a.get(), 50ms));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 50ms);
  EXPECT_FALSE(sys::wait_readable(a.get(), 0ms));
  const std::byte x{1};
  sys::write_all(b.get(), {&x, 1});
  EXPECT_TRUE(sys::wait_readable(a.get(), 0ms));
  EXPECT_TRUE(sys::wait_readable(a.get(), std::chrono::milliseconds(-1)));
}

// ---- send_signal ------------------------------------------------------------------------------------------

TEST_F(PlatformTest, SendSignalReturnsFalseForAProcessThatIsGone) {
  const pid_t pid = sys::fork_process({}, [] { ::_exit(0); });
  ASSERT_TRUE(test_support::wait_exit(pid).has_value());  // reaped: the pid names nobody now
  EXPECT_FALSE(sys::send_signal(pid, 0, false));
  EXPECT_FALSE(sys::send_signal(pid, SIGTERM, true));
}

TEST_F(PlatformTest, SendSignalReachesTheWholeGroup) {
  test_support::Pipe pids;
  const pid_t pid = sys::fork_process({}, [&] {
    const pid_t grandchild = ::fork();
    if (grandchild == 0) test_support::sleep_forever();
    test_support::write_pid(pids.write, grandchild);
    test_support::sleep_forever();
  });
  const pid_t grandchild = test_support::read_pid(pids.read);
  ASSERT_GT(grandchild, 0);
  EXPECT_TRUE(sys::send_signal(pid, 0, true));
  EXPECT_TRUE(sys::send_signal(pid, SIGKILL, true));
  const auto status = test_support::wait_exit(pid);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFSIGNALED(*status));
  EXPECT_EQ(WTERMSIG(*status), SIGKILL);
  EXPECT_TRUE(test_support::wait_dead(grandchild));
}

TEST_F(PlatformTest, SendSignalRejectsNonPositivePids) {
  EXPECT_THROW(sys::send_signal(0, SIGTERM, false), multiproc::InvalidArgument);
  EXPECT_THROW(sys::send_signal(-1, SIGTERM, true), multiproc::InvalidArgument);
}

TEST_F(PlatformTest, SendSignalThrowsForOtherErrors) {
  const pid_t pid = sys::fork_process({}, [] { test_support::sleep_forever(); });
  try {
    sys::send_signal(pid, 12345, false);  // EINVAL
    ADD_FAILURE() << "no exception";
  } catch (const multiproc::SystemError& e) {
    EXPECT_EQ(e.code().value(), EINVAL);
    EXPECT_EQ(std::string(e.what()).rfind("kill: ", 0), 0u) << e.what();
  }
  sys::send_signal(pid, SIGKILL, false);
  test_support::wait_exit(pid);
}

// ---- socket_pair, write_all, read_exact ---------------------------------------------------------

TEST_F(PlatformTest, SocketPairIsConnectedCloseOnExecAndRegistered) {
  const std::size_t before = sys::registered_fd_count();
  {
    auto [a, b] = sys::socket_pair();
    ASSERT_TRUE(a.valid());
    ASSERT_TRUE(b.valid());
    EXPECT_EQ(sys::registered_fd_count(), before + 2);
    EXPECT_TRUE(::fcntl(a.get(), F_GETFD) & FD_CLOEXEC);
    EXPECT_TRUE(::fcntl(b.get(), F_GETFD) & FD_CLOEXEC);
    int type = 0;
    socklen_t len = sizeof type;
    ASSERT_EQ(::getsockopt(a.get(), SOL_SOCKET, SO_TYPE, &type, &len), 0);
    EXPECT_EQ(type, SOCK_STREAM);
    const auto msg = pattern(100);
    sys::write_all(a.get(), msg);
    std::vector<std::byte> in(100);
    ASSERT_TRUE(sys::read_exact(b.get(), in));
    EXPECT_EQ(in, msg);
    sys::write_all(b.get(), msg);  // both directions
    ASSERT_TRUE(sys::read_exact(a.get(), in));
    EXPECT_EQ(in, msg);
  }
  EXPECT_EQ(sys::registered_fd_count(), before);
}

TEST_F(PlatformTest, WriteAllAndReadExactRoundTripMoreThanTheSocketBuffer) {
  auto [a, b] = sys::socket_pair();
  const auto msg = pattern(8 << 20);
  std::thread writer([&, fd = a.get()] { sys::write_all(fd, msg); });
  std::vector<std::byte> in(msg.size());
  const bool ok = sys::read_exact(b.get(), in);
  writer.join();
  EXPECT_TRUE(ok);
  EXPECT_TRUE(in == msg);
}

TEST_F(PlatformTest, ReadExactOfNothingReturnsTrueWithoutReading) {
  auto [a, b] = sys::socket_pair();
  const int before = g_recv_calls.load();
  EXPECT_TRUE(sys::read_exact(a.get(), {}));
  EXPECT_EQ(g_recv_calls.load(), before);
}

TEST_F(PlatformTest, ReadExactReturnsFalseOnCleanEof) {
  auto [a, b] = sys::socket_pair();
  b.reset();
  std::vector<std::byte> in(16);
  EXPECT_FALSE(sys::read_exact(a.get(), in));
}

TEST_F(PlatformTest, ReadExactReturnsFalseOnEofAfterWholeFrames) {
  auto [a, b] = sys::socket_pair();
  sys::write_all(b.get(), pattern(16));
  b.reset();
  std::vector<std::byte> in(16);
  EXPECT_TRUE(sys::read_exact(a.get(), in));
  EXPECT_FALSE(sys::read_exact(a.get(), in));
}

TEST_F(PlatformTest, ReadExactThrowsProtocolErrorOnEofMidFrame) {
  auto [a, b] = sys::socket_pair();
  sys::write_all(b.get(), pattern(10));
  b.reset();
  std::vector<std::byte> in(16);
  EXPECT_THROW(sys::read_exact(a.get(), in), multiproc::ProtocolError);
}

TEST_F(PlatformTest, ReadExactRetriesRecvEintr) {
  auto [a, b] = sys::socket_pair();
  const auto msg = pattern(32);
  sys::write_all(b.get(), msg);
  std::vector<std::byte> in(32);
  g_recv_calls = 0;
  g_recv_inject_eintr = 3;
  EXPECT_TRUE(sys::read_exact(a.get(), in));
  EXPECT_EQ(in, msg);
  EXPECT_EQ(g_recv_calls.load(), 4);
}

TEST_F(PlatformTest, ReadExactSurvivesARealSignalWithoutSaRestart) {
  struct sigaction sa {
  }, old{};
  sa.sa_handler = count_usr1;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a blocked recv fails with EINTR
  ASSERT_EQ(::sigaction(SIGUSR1, &sa, &old), 0);
  auto [a, b] = sys::socket_pair();
  const auto msg = pattern(64);
  g_usr1_count = 0;
  g_recv_real_eintr = 0;
  const int calls_before = g_recv_calls.load();
  const pthread_t reader = pthread_self();
  const pid_t reader_tid = ::gettid();
  std::thread interrupter([&, fd = b.get()] {
    for (int i = 0; i < 40; ++i) {
      // Each signal once the reader sleeps in recv, so that it interrupts it, and once the one
      // before was handled, so that none merges into one still pending.
      (void)test_support::eventually(
          [&] { return g_recv_calls.load() > calls_before && test_support::proc_state(reader_tid) == 'S'; });
      pthread_kill(reader, SIGUSR1);
      (void)test_support::eventually([&] { return g_usr1_count.load() == i + 1; });
    }
    sys::write_all(fd, msg);
  });
  std::vector<std::byte> in(64);
  bool ok = false;
  EXPECT_NO_THROW(ok = sys::read_exact(a.get(), in));
  interrupter.join();
  ::sigaction(SIGUSR1, &old, nullptr);
  EXPECT_TRUE(ok);
  EXPECT_EQ(in, msg);
  EXPECT_EQ(g_usr1_count.load(), 40);
  EXPECT_GE(g_recv_real_eintr.load(), 1) << "the signals never interrupted recv";
}

TEST_F(PlatformTest, WriteAllToAClosedPeerThrowsEpipeWithoutSigpipe) {
  auto [a, b] = sys::socket_pair();
  b.reset();
  // SIGPIPE's default action would kill this test; it must not be raised at all.
  try {
    sys::write_all(a.get(), pattern(1 << 16));
    FAIL() << "no exception";
  } catch (const multiproc::SystemError& e) {
    EXPECT_EQ(e.code().value(), EPIPE);
    EXPECT_EQ(std::string(e.what()).rfind("send: ", 0), 0u) << e.what();
  }
  sigset_t pending;
  sigemptyset(&pending);
  sigpending(&pending);
  EXPECT_FALSE(sigismember(&pending, SIGPIPE));
}

TEST_F(PlatformTest, InjectedFaultInSocketPairThrowsAndLeaksNothing) {
  const std::size_t before = sys::registered_fd_count();
  const int fds_before = test_support::count_open_fds();
  inject("socketpair", EMFILE);
  try {
    (void)sys::socket_pair();
    FAIL() << "no exception";
  } catch (const multiproc::SystemError& e) {
    EXPECT_EQ(e.code().value(), EMFILE);
    EXPECT_EQ(std::string(e.what()).rfind("socketpair: ", 0), 0u) << e.what();
  }
  EXPECT_EQ(sys::registered_fd_count(), before);
  EXPECT_EQ(test_support::count_open_fds(), fds_before);
}

}  // namespace

// ThreadSanitizer runs a background thread of its own that comes and goes: exact counts are left
// out under it.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PLATFORMTEST_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) && !defined(PLATFORMTEST_TSAN)
#define PLATFORMTEST_TSAN 1
#endif
#ifndef PLATFORMTEST_TSAN
#define PLATFORMTEST_TSAN 0
#endif

TEST(Platform, ThreadCountSeesAThreadStartAndEnd) {
  if (PLATFORMTEST_TSAN) GTEST_SKIP() << "ThreadSanitizer's own thread changes the count on its own";
  namespace sys = multiproc::detail::sys;
  const int before = sys::thread_count();
  ASSERT_GE(before, 1);
  std::atomic<bool> go{false};
  std::thread t([&] {
    while (!go.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  EXPECT_EQ(sys::thread_count(), before + 1);
  go.store(true);
  t.join();
  // join returns once the thread has cleared its tid, which the kernel does on the way out, a
  // moment before the thread leaves /proc/self/task.
  EXPECT_TRUE(test_support::eventually([&] { return sys::thread_count() == before; }));
  EXPECT_EQ(sys::thread_count(), before);
}

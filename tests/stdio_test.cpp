// The stdio contract: every line a program prints is written exactly once, whatever its workers
// and children do. The parent flushes before it forks; a child never writes what it inherited
// buffered (another thread of the parent may have printed between that flush and the fork); a
// child flushes its own output before it exits. Each case runs a small program (a forked child of
// the test, its stdout sent to a pipe or a file) many times and counts its lines exactly.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "pool_test_common.hpp"

namespace {

namespace mp = multiproc;
using multiproc::StartMethod;
using namespace std::chrono_literals;

constexpr int kLines = 40;

// Only fork children inherit the parent's buffers (a spawned or forkserver child is exec'd or
// forked from the server): those runs are the many that catch a race; the others check that
// nothing else writes twice.
int runs_for(StartMethod method) { return method == StartMethod::fork ? 12 : 3; }

enum class Sink { pipe, file };
enum class Scenario { recycled, crashed, timed_out, process };

int square_or_crash(int x) {
  if (x < 0) pooltest::segfault_now();
  return x * x;
}

int square_or_hang(int x) {
  if (x < 0) std::this_thread::sleep_for(600s);
  return x * x;
}

void print_a_line(int i) { std::printf("child %d\n", i); }

// The program: prints line i, then makes the pool (or a Process) fork a new child, kLines times.
// stdout is fully buffered here (a pipe or a file), so every line sits in the buffer while the
// pool's supervisor thread forks replacements.
[[noreturn]] void program(Scenario scenario, StartMethod method) {
  pooltest::disable_core_dumps();
  int code = 0;
  try {
    mp::PoolOptions options{.processes = 2, .start_method = method};
    if (scenario == Scenario::recycled) options.max_tasks_per_child = 1;
    if (scenario == Scenario::timed_out) options.task_timeout = pooltest::scaled(300ms);
    mp::Pool pool{options};
    for (int i = 0; i < kLines; ++i) {
      std::printf("line %d\n", i);
      switch (scenario) {
        case Scenario::recycled:
          if (pool.apply(pooltest::square, i) != i * i) code = 3;
          break;
        case Scenario::crashed:
          try {
            (void)pool.apply(square_or_crash, i % 4 == 0 ? -1 : i);
          } catch (const mp::WorkerCrashed&) {
          }
          break;
        case Scenario::timed_out:
          if (i == kLines / 2) {
            try {
              (void)pool.apply(square_or_hang, -1);
            } catch (const mp::TaskTimeout&) {
            }
          } else if (pool.apply(square_or_hang, i) != i * i) {
            code = 3;
          }
          break;
        case Scenario::process: {
          // A Process child prints its own line: it must come out once, before the parent's next.
          mp::Process child{mp::ProcessOptions{.start_method = method}, print_a_line, i};
          child.start();
          child.join();
          if (!child.exit_status().exited() || child.exit_status().code() != 0) code = 4;
          break;
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "program: %s\n", e.what());
    code = 5;
  }
  std::exit(code);  // flushes stdout, as a program's normal end does
}

std::string expected_output(Scenario scenario) {
  std::ostringstream out;
  for (int i = 0; i < kLines; ++i) {
    out << "line " << i << "\n";
    if (scenario == Scenario::process) out << "child " << i << "\n";
  }
  return out.str();
}

// Runs the program once with its stdout on `sink`; returns what it wrote, or a failure message.
std::string run_once(Scenario scenario, StartMethod method, Sink sink, int& exit_code) {
  std::fflush(nullptr);
  int read_fd = -1;
  int write_fd = -1;
  std::string path;
  if (sink == Sink::pipe) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return "pipe2 failed";
    read_fd = fds[0];
    write_fd = fds[1];
  } else {
    path = pooltest::temp_file();
    write_fd = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
    if (write_fd < 0) return "open failed";
  }
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(write_fd, STDOUT_FILENO);  // dup2 clears close-on-exec on the copy
    if (read_fd >= 0) ::close(read_fd);
    ::close(write_fd);
    program(scenario, method);
  }
  ::close(write_fd);
  std::string out;
  if (sink == Sink::pipe) {
    out = test_support::read_all(read_fd);
    ::close(read_fd);
  }
  const auto status = test_support::wait_exit(pid, 60s);
  if (!status) {
    ::kill(pid, SIGKILL);
    (void)test_support::wait_exit(pid);
    return "the program did not end";
  }
  exit_code = WIFEXITED(*status) ? WEXITSTATUS(*status) : 128 + WTERMSIG(*status);
  if (sink == Sink::file) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    out = test_support::read_all(fd);
    ::close(fd);
    ::unlink(path.c_str());
  }
  return out;
}

using Param = std::tuple<Scenario, StartMethod, Sink>;

class StdioContract : public ::testing::TestWithParam<Param> {};

TEST_P(StdioContract, EveryLineIsWrittenExactlyOnce) {
  const auto [scenario, method, sink] = GetParam();
  const std::string expected = expected_output(scenario);
  for (int run = 0; run < runs_for(method); ++run) {
    int code = -1;
    const std::string out = run_once(scenario, method, sink, code);
    ASSERT_EQ(code, 0) << "run " << run << ": " << out;
    ASSERT_EQ(out, expected) << "run " << run;
  }
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const char* scenarios[] = {"Recycled", "Crashed", "TimedOut", "Process"};
  const auto [scenario, method, sink] = info.param;
  return std::string(scenarios[static_cast<int>(scenario)]) + "_" + mp::to_string(method) + "_" +
         (sink == Sink::pipe ? "pipe" : "file");
}

INSTANTIATE_TEST_SUITE_P(
    Workers, StdioContract,
    ::testing::Combine(::testing::Values(Scenario::recycled, Scenario::crashed, Scenario::timed_out, Scenario::process),
                       ::testing::Values(StartMethod::fork, StartMethod::forkserver, StartMethod::spawn),
                       ::testing::Values(Sink::pipe, Sink::file)),
    param_name);

// A program that closed its standard descriptors (a daemon does) and has output pending: the
// library's descriptors must not take the numbers 0, 1 and 2, where the program's stdio (and the
// flush before a child starts) would write into them.
int return_seven() { return 7; }

[[noreturn]] void program_without_stdio(StartMethod method) {
  ::close(STDIN_FILENO);
  ::close(STDOUT_FILENO);
  std::printf("pending output");  // buffered: stdout's descriptor is gone
  int code = 0;
  try {
    mp::Process child{mp::ProcessOptions{.start_method = method}, return_seven};
    child.start();
    child.join();
    if (!child.exit_status().exited() || child.exit_status().code() != 0) code = 3;
    mp::Pool pool{{.processes = 1, .start_method = method}};
    if (pool.apply(return_seven) != 7) code = 4;
    // Neither a Process nor a worker holds a descriptor in the low range.
    for (int fd : {STDIN_FILENO, STDOUT_FILENO}) {
      if (::fcntl(fd, F_GETFD) != -1) {
        std::fprintf(stderr, "descriptor %d is open\n", fd);
        code = 5;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "program: %s\n", e.what());
    code = 6;
  }
  ::_exit(code);
}

class StdioClosed : public ::testing::TestWithParam<StartMethod> {};

TEST_P(StdioClosed, ChildrenStartWhenTheProgramClosedItsStandardDescriptors) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) program_without_stdio(GetParam());
  const auto status = test_support::wait_exit(pid, 60s);
  if (!status) {
    ::kill(pid, SIGKILL);
    (void)test_support::wait_exit(pid);
    FAIL() << "the program did not end";
  }
  ASSERT_TRUE(WIFEXITED(*status)) << "signal " << WTERMSIG(*status);
  EXPECT_EQ(WEXITSTATUS(*status), 0);
}

INSTANTIATE_TEST_SUITE_P(Methods, StdioClosed,
                         ::testing::Values(StartMethod::fork, StartMethod::forkserver, StartMethod::spawn),
                         [](const auto& info) { return mp::to_string(info.param); });

}  // namespace

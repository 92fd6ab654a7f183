// Helpers shared by the tests that fork: stderr capture, /proc inspection, pipes, waiting.
#pragma once

#include "launch.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

// TESTSUPPORT_ASAN / TESTSUPPORT_TSAN: 1 in builds with AddressSanitizer / ThreadSanitizer.
#if defined(__SANITIZE_ADDRESS__)
#define TESTSUPPORT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TESTSUPPORT_ASAN 1
#endif
#endif
#ifndef TESTSUPPORT_ASAN
#define TESTSUPPORT_ASAN 0
#endif
#if defined(__SANITIZE_THREAD__)
#define TESTSUPPORT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TESTSUPPORT_TSAN 1
#endif
#endif
#ifndef TESTSUPPORT_TSAN
#define TESTSUPPORT_TSAN 0
#endif

namespace test_support {

using namespace std::chrono_literals;

// Time in tests. A test asserts what happened, not how fast: a bound on elapsed time exists only
// where it is the point (a timeout fires, a call does not hang, a cancel is prompt), and then it is
// generous. Expected durations are those of a quiet developer build; scaled() stretches them for
// builds and machines that are slower (sanitizers, a loaded or slower CI machine), so that the same
// test holds on a machine whose processes start several times slower with every core busy.

/// How many times slower than a quiet developer build this run may be: 1, 3 under AddressSanitizer,
/// 5 under ThreadSanitizer, times MULTIPROC_TEST_SLOWDOWN from the environment when set (> 0).
inline double slowdown() {
  static const double factor = [] {
    double f = TESTSUPPORT_TSAN ? 5.0 : TESTSUPPORT_ASAN ? 3.0 : 1.0;
    if (const char* env = std::getenv("MULTIPROC_TEST_SLOWDOWN")) {
      const double extra = std::strtod(env, nullptr);
      if (extra > 0) f *= extra;
    }
    return f;
  }();
  return factor;
}

/// `d` stretched by slowdown(): the patience for something that takes up to `d` on a quiet machine.
template <class Rep, class Period>
std::chrono::milliseconds scaled(std::chrono::duration<Rep, Period> d) {
  const auto ms = std::chrono::duration<double, std::milli>(d).count() * slowdown();
  return std::chrono::milliseconds(static_cast<long long>(ms + 0.5));
}

/// An upper bound for something expected to take `expected`: ten times it, scaled. Use it only
/// where the bound is the point of the test (promptness), never to measure speed.
template <class Rep, class Period>
std::chrono::milliseconds generous(std::chrono::duration<Rep, Period> expected) {
  return scaled(expected * 10);
}

/// Polls `pred` every few milliseconds until it holds or scaled(`timeout`) passes; true when it held.
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout = 5000ms) {
  const auto deadline = std::chrono::steady_clock::now() + scaled(timeout);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return pred();
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

/// Redirects fd 2 to an anonymous file until finish() (or destruction) restores it.
class StderrCapture {
 public:
  StderrCapture() {
    std::fflush(stderr);
    file_ = ::memfd_create("stderr-capture", MFD_CLOEXEC);
    if (file_ < 0) throw std::runtime_error("memfd_create failed");
    saved_ = ::dup(STDERR_FILENO);
    ::dup2(file_, STDERR_FILENO);
  }
  StderrCapture(const StderrCapture&) = delete;
  StderrCapture& operator=(const StderrCapture&) = delete;
  ~StderrCapture() {
    restore();
    ::close(file_);
  }

  /// Restores stderr and returns everything written to it meanwhile.
  std::string finish() {
    restore();
    std::string out;
    char buf[4096];
    ssize_t n;
    off_t at = 0;
    while ((n = ::pread(file_, buf, sizeof buf, at)) > 0) {
      out.append(buf, static_cast<std::size_t>(n));
      at += n;
    }
    return out;
  }

 private:
  void restore() {
    if (saved_ >= 0) {
      std::fflush(stderr);
      ::dup2(saved_, STDERR_FILENO);
      ::close(saved_);
      saved_ = -1;
    }
  }
  int file_ = -1;
  int saved_ = -1;
};

/// A pipe whose ends close on destruction.
struct Pipe {
  int read = -1;
  int write = -1;
  Pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    read = fds[0];
    write = fds[1];
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  ~Pipe() {
    close_read();
    close_write();
  }
  void close_read() {
    if (read >= 0) ::close(read);
    read = -1;
  }
  void close_write() {
    if (write >= 0) ::close(write);
    write = -1;
  }
};

/// Writes a pid (async-signal-safe, usable in any child).
inline void write_pid(int fd, pid_t pid) noexcept {
  ssize_t r = ::write(fd, &pid, sizeof pid);
  (void)r;
}

/// Reads a pid written by write_pid, waiting at most scaled(timeout); 0 on EOF or timeout.
inline pid_t read_pid(int fd, std::chrono::milliseconds timeout = 5000ms) {
  const auto deadline = std::chrono::steady_clock::now() + scaled(timeout);
  pid_t pid = 0;
  std::size_t got = 0;
  auto* p = reinterpret_cast<char*>(&pid);
  while (got < sizeof pid) {
    const ssize_t n = ::read(fd, p + got, sizeof pid - got);
    if (n > 0) {
      got += static_cast<std::size_t>(n);
    } else if (n == 0) {
      return 0;
    } else if (errno != EINTR) {
      return 0;
    }
    if (std::chrono::steady_clock::now() > deadline) return 0;
  }
  return pid;
}

/// Everything readable from `fd` until EOF.
inline std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<std::size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      return out;
    }
  }
}

/// The state letter of /proc/<pid>/stat ('R', 'S', 'Z', ...), or 0 when there is no such process.
inline char proc_state(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(f, stat)) return 0;
  const auto paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return 0;
  return stat[paren + 2];
}

/// True when the process has ended (gone, or a zombie nobody reaped yet).
inline bool is_dead(pid_t pid) {
  const char s = proc_state(pid);
  return s == 0 || s == 'Z' || s == 'X';
}

/// Waits until is_dead(pid) or scaled(timeout) passes.
inline bool wait_dead(pid_t pid, std::chrono::milliseconds timeout = 5000ms) {
  const auto deadline = std::chrono::steady_clock::now() + scaled(timeout);
  while (!is_dead(pid)) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

/// waitpid(pid) polled with WNOHANG until scaled(timeout); the wait status, or nullopt on timeout.
inline std::optional<int> wait_exit(pid_t pid, std::chrono::milliseconds timeout = 5000ms) {
  const auto deadline = std::chrono::steady_clock::now() + scaled(timeout);
  for (;;) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    // ECHILD: not (yet) ours; an orphan reaches a subreaper a moment after its parent dies.
    if (r < 0 && errno != EINTR && errno != ECHILD) return std::nullopt;
    if (std::chrono::steady_clock::now() > deadline) return std::nullopt;
    std::this_thread::sleep_for(2ms);
  }
}

/// True when a thread of process `pid` is blocked in nanosleep or clock_nanosleep (a task in
/// std::this_thread::sleep_for), read from /proc/<pid>/task/*/syscall: a test can wait until a
/// worker is in its task rather than sleep for a while and hope.
inline bool is_in_sleep_call(pid_t pid) {
  const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = ::opendir(tasks.c_str());
  if (!d) return false;
  bool sleeping = false;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(tasks + "/" + e->d_name + "/syscall");
    long number = -1;
    if (f >> number && (number == SYS_nanosleep || number == SYS_clock_nanosleep)) sleeping = true;
  }
  ::closedir(d);
  return sleeping;
}

/// The pids of this process's children, running or zombie (from /proc), except the fork server,
/// which lives as long as the process once started.
inline std::vector<pid_t> child_pids() {
  std::vector<pid_t> out;
  const pid_t self = ::getpid();
  const pid_t server = multiproc::detail::fork_server_pid();
  DIR* d = ::opendir("/proc");
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    const pid_t pid = static_cast<pid_t>(std::atoi(e->d_name));
    if (pid <= 0 || pid == server) continue;
    const std::string path = std::string("/proc/") + e->d_name + "/stat";
    FILE* f = std::fopen(path.c_str(), "r");
    if (!f) continue;
    char buf[512];
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    const char* p = std::strrchr(buf, ')');
    char state = 0;
    int ppid = 0;
    if (p && std::sscanf(p + 1, " %c %d", &state, &ppid) == 2 && ppid == self) out.push_back(pid);
  }
  ::closedir(d);
  return out;
}

/// True when this process has no child left, running or zombie (the fork server aside).
inline bool has_no_children() { return child_pids().empty(); }

/// The number of open descriptors of this process.
inline int count_open_fds() {
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return -1;
  int n = 0;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n - 1;  // the directory's own descriptor
}

/// True when `fd` is an open descriptor of this process.
inline bool fd_is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1 || errno != EBADF; }

/// Sleeps in the child until killed (pause(), robust against stray signals).
[[noreturn]] inline void sleep_forever() noexcept {
  for (;;) ::pause();
}

}  // namespace test_support

#include "platform.hpp"

#include <poll.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <new>
#include <vector>

namespace multiproc::detail::sys {

std::atomic<FaultHook> g_fault_hook{nullptr};

void set_fault_hook(FaultHook hook) noexcept { g_fault_hook.store(hook); }

void close_fd(int fd) noexcept {
  if (fd < 0) return;
  // Linux releases the descriptor even when close reports EINTR: retrying could close a
  // descriptor another thread has just been given.
  if (::close(fd) == -1 && errno != EINTR) report_error("close failed");
}

namespace {

// The descriptors the library owns. Guarded by a mutex that fork_prepare_and_fork holds across
// fork(2), so the child sees a consistent list and can re-create the mutex.
struct FdRegistry {
  std::mutex mutex;
  std::vector<int> fds;
};

FdRegistry& fd_registry() {
  static FdRegistry* registry = new FdRegistry;  // never destroyed: used during exit
  return *registry;
}

void register_fd(int fd) {
  auto& r = fd_registry();
  std::lock_guard lock(r.mutex);
  r.fds.push_back(fd);
}

void unregister_fd(int fd) noexcept {
  auto& r = fd_registry();
  std::lock_guard lock(r.mutex);
  auto it = std::find(r.fds.begin(), r.fds.end(), fd);
  if (it != r.fds.end()) {
    *it = r.fds.back();
    r.fds.pop_back();
  }
}

}  // namespace

namespace {
unsigned g_fork_generation = 0;
}

unsigned fork_generation() noexcept { return g_fork_generation; }

UniqueFd::UniqueFd(int fd) noexcept : fd_(fd), generation_(g_fork_generation) {
  if (fd_ >= 0) {
    try {
      register_fd(fd_);
    } catch (...) {
      // Out of memory: the descriptor still works, a child may merely inherit it.
    }
  }
}

void UniqueFd::reset() noexcept {
  if (fd_ >= 0 && !registered_) {
    close_fd(fd_);  // inherited by forked children on purpose: each process closes its own copy
  } else if (fd_ >= 0 && generation_ == g_fork_generation) {
    unregister_fd(fd_);
    close_fd(fd_);
  }
  fd_ = -1;
}

int UniqueFd::release() noexcept {
  if (fd_ >= 0 && registered_ && generation_ == g_fork_generation) unregister_fd(fd_);
  return std::exchange(fd_, -1);
}

void close_registered_fds_in_child(std::span<const int> keep) noexcept {
  auto& r = fd_registry();
  // The parent held the mutex across fork; in the child it is a copy nobody will unlock.
  new (&r.mutex) std::mutex;
  for (int fd : r.fds) {
    if (std::find(keep.begin(), keep.end(), fd) == keep.end()) ::close(fd);
  }
  r.fds.clear();
  ++g_fork_generation;
}

std::size_t registered_fd_count() noexcept {
  auto& r = fd_registry();
  std::lock_guard lock(r.mutex);
  return r.fds.size();
}

namespace detail_fork {

pid_t fork_prepare_and_fork(sigset_t& old_mask) {
  // Output still buffered in stdio would otherwise be written twice, once by each process.
  try {
    std::cout.flush();
    std::cerr.flush();
  } catch (...) {
  }
  std::fflush(nullptr);
  sigset_t all;
  ::sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &old_mask);
  auto& r = fd_registry();
  r.mutex.lock();
  pid_t pid;
  try {
    pid = checked("fork", [] { return ::fork(); });
  } catch (...) {
    r.mutex.unlock();
    ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
    throw;
  }
  if (pid != 0) r.mutex.unlock();
  return pid;
}

void child_setup(const ForkOptions& options, const sigset_t& old_mask, pid_t parent) noexcept {
  // Exec's rule: caught signals go back to their default action, ignored ones stay ignored. The
  // parent's handlers belong to the parent's state (its threads, its event loop), not ours.
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    struct sigaction current {};
    if (::sigaction(sig, nullptr, &current) != 0) continue;
    if (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN) {
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      ::sigemptyset(&dfl.sa_mask);
      ::sigaction(sig, &dfl, nullptr);
    }
  }
  if (options.die_with_parent) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    // The parent may have died before prctl ran; then nobody would ever send the signal.
    // Die the way PDEATHSIG would have made us (SIGKILL cannot be blocked).
    if (::getppid() != parent) {
      ::kill(::getpid(), SIGKILL);
      ::_exit(128 + SIGKILL);
    }
  }
  if (options.new_process_group) ::setpgid(0, 0);
  close_registered_fds_in_child(options.keep_fds);
  if (options.clear_signal_mask) {
    sigset_t none;
    ::sigemptyset(&none);
    ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
  } else {
    ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  }
}

void parent_after_fork(const sigset_t& old_mask, pid_t child, bool new_process_group) noexcept {
  // Both sides call setpgid so that the group exists whichever runs first; EACCES/ESRCH mean the
  // child got there first or already exited.
  if (new_process_group) ::setpgid(child, child);
  ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
}

void child_exit(int code) noexcept {
  try {
    std::cout.flush();
    std::cerr.flush();
  } catch (...) {
  }
  std::fflush(nullptr);
  ::_exit(code);
}

}  // namespace detail_fork

UniqueFd pidfd_open(pid_t pid) {
  const long fd = checked_noexcept("pidfd_open", [&] { return ::syscall(SYS_pidfd_open, pid, 0); });
  if (fd >= 0) return UniqueFd(static_cast<int>(fd));
  if (fd == -ENOSYS || fd == -EPERM || fd == -EACCES) return UniqueFd();  // sandboxed: fall back
  throw SystemError(static_cast<int>(-fd), "pidfd_open");
}

std::optional<siginfo_t> wait_child(pid_t pid, int pidfd, bool nohang) {
  siginfo_t info{};
  const int flags = WEXITED | (nohang ? WNOHANG : 0);
  if (pidfd >= 0) {
    checked("waitid", [&] { return ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd), &info, flags); });
  } else {
    checked("waitid", [&] { return ::waitid(P_PID, static_cast<id_t>(pid), &info, flags); });
  }
  if (info.si_pid == 0) return std::nullopt;
  return info;
}

bool wait_readable(int fd, std::chrono::milliseconds timeout) {
  pollfd p{fd, POLLIN, 0};
  return poll_fds(&p, 1, timeout) > 0;
}

bool send_signal(pid_t pid, int sig, bool group) {
  if (pid <= 0) throw InvalidArgument("send_signal: pid must be positive");
  const int r = checked_noexcept(group ? "killpg" : "kill", [&] { return ::kill(group ? -pid : pid, sig); });
  if (r == 0) return true;
  if (r == -ESRCH) return false;
  throw SystemError(-r, group ? "killpg" : "kill");
}

UniqueFd memfd(const char* debug_name, std::size_t size) {
  UniqueFd fd(checked("memfd_create", [&] { return ::memfd_create(debug_name, MFD_CLOEXEC); }), UniqueFd::Inheritable{});
  checked("ftruncate", [&] { return ::ftruncate(fd.get(), static_cast<off_t>(size)); });
  return fd;
}

UniqueFd shm_open_named(const std::string& name, bool create, std::size_t size) {
  const int flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0);
  UniqueFd fd(checked("shm_open", [&] { return ::shm_open(name.c_str(), flags, 0600); }), UniqueFd::Inheritable{});
  if (create) {
    try {
      checked("ftruncate", [&] { return ::ftruncate(fd.get(), static_cast<off_t>(size)); });
    } catch (...) {
      ::shm_unlink(name.c_str());
      throw;
    }
  }
  return fd;
}

void shm_unlink_named(const std::string& name) {
  checked("shm_unlink", [&] { return ::shm_unlink(name.c_str()); });
}

UniqueFd dup_inheritable(int fd) {
  return UniqueFd(checked("fcntl", [&] { return ::fcntl(fd, F_DUPFD_CLOEXEC, 0); }), UniqueFd::Inheritable{});
}

UniqueFd open_process_fd(pid_t pid, int fd) {
  const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  return UniqueFd(checked("open", [&] { return ::open(path.c_str(), O_RDWR | O_CLOEXEC); }), UniqueFd::Inheritable{});
}

std::size_t file_size(int fd) {
  struct stat st {};
  checked("fstat", [&] { return ::fstat(fd, &st); });
  return static_cast<std::size_t>(st.st_size);
}

FileMapping::FileMapping(int fd, std::size_t size) : size_(size) {
  if (size == 0) return;
  const std::intptr_t p = checked("mmap", [&]() -> std::intptr_t {
    void* m = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return m == MAP_FAILED ? -1 : reinterpret_cast<std::intptr_t>(m);
  });
  data_ = reinterpret_cast<void*>(p);
}

void FileMapping::reset() noexcept {
  if (data_) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

void kill_and_reap(pid_t pid) noexcept {
  ::kill(-pid, SIGKILL);
  ::kill(pid, SIGKILL);
  siginfo_t info{};
  while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED) == -1 && errno == EINTR) {
  }
}

std::pair<UniqueFd, UniqueFd> socket_pair() {
  int fds[2];
  checked("socketpair", [&] { return ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds); });
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

void write_all(int fd, std::span<const std::byte> data) {
  while (!data.empty()) {
    const ssize_t n = checked("send", [&] { return ::send(fd, data.data(), data.size(), MSG_NOSIGNAL); });
    data = data.subspan(static_cast<std::size_t>(n));
  }
}

std::size_t read_some(int fd, std::span<std::byte> data) {
  const ssize_t n = checked_noexcept("recv", [&] { return ::recv(fd, data.data(), data.size(), 0); });
  if (n == -ECONNRESET) return 0;  // the peer died with data of ours unread
  if (n < 0) throw SystemError(static_cast<int>(-n), "recv");
  return static_cast<std::size_t>(n);
}

bool read_exact(int fd, std::span<std::byte> data) {
  std::size_t got = 0;
  while (got < data.size()) {
    ssize_t n = checked_noexcept("recv", [&] { return ::recv(fd, data.data() + got, data.size() - got, 0); });
    // A peer that dies with data of ours unread resets the connection: for us, that is its EOF.
    if (n == -ECONNRESET) n = 0;
    if (n < 0) throw SystemError(static_cast<int>(-n), "recv");
    if (n == 0) {
      if (got == 0) return false;
      throw ProtocolError("peer closed the channel in the middle of a frame");
    }
    got += static_cast<std::size_t>(n);
  }
  return true;
}

UniqueFd event_fd() {
  return UniqueFd(checked("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }));
}

void event_signal(int fd) {
  const std::uint64_t one = 1;
  const ssize_t r = checked_noexcept("write", [&] { return ::write(fd, &one, sizeof one); });
  if (r < 0 && r != -EAGAIN) throw SystemError(static_cast<int>(-r), "write(eventfd)");
}

void event_drain(int fd) noexcept {
  std::uint64_t value;
  (void)checked_noexcept("read", [&] { return ::read(fd, &value, sizeof value); });
}

int poll_fds(struct pollfd* fds, std::size_t n, std::chrono::milliseconds timeout) {
  using clock = std::chrono::steady_clock;
  // Beyond a century is forever (and now + timeout would overflow).
  const bool forever = timeout.count() < 0 || timeout > std::chrono::hours(24 * 365 * 100);
  const auto deadline = clock::now() + (forever ? std::chrono::milliseconds(0) : timeout);
  for (;;) {
    int ms = -1;
    if (!forever) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - clock::now());
      ms = static_cast<int>(std::max<long long>(0, std::min<long long>(left.count(), 1 << 30)));
    }
    // Not through checked(): after EINTR the loop recomputes the time left.
    int r;
    if (const int e = injected_fault("poll")) {
      r = -1;
      errno = e;
    } else {
      r = ::poll(fds, static_cast<nfds_t>(n), ms);
    }
    if (r >= 0) return r;
    if (errno != EINTR) throw SystemError(errno, "poll");
  }
}

SharedMapping::SharedMapping(std::size_t size) : size_(size) {
  const std::intptr_t p = checked("mmap", [&]() -> std::intptr_t {
    void* m = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return m == MAP_FAILED ? -1 : reinterpret_cast<std::intptr_t>(m);
  });
  data_ = reinterpret_cast<void*>(p);
}

void SharedMapping::reset() noexcept {
  if (data_) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

void block_all_signals_in_this_thread() noexcept {
  sigset_t all;
  ::sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, nullptr);
}

}  // namespace multiproc::detail::sys

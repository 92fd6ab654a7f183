#include "platform.hpp"

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdio_ext.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

#if defined(__SANITIZE_THREAD__)
#define MULTIPROC_PLATFORM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MULTIPROC_PLATFORM_TSAN 1
#endif
#endif
#if MULTIPROC_PLATFORM_TSAN
#include <sanitizer/tsan_interface.h>
#endif

#if defined(__GLIBCXX__)
#include <ext/stdio_sync_filebuf.h>
#endif

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <mutex>
#include <new>
#include <typeinfo>
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
// fork(2), so the child sees a consistent list. A forked child only reads the list and then starts
// a registry of its own when it first needs one: writing to the inherited one would make the child
// copy its page.
struct FdRegistry {
  std::mutex mutex;
  std::vector<int> fds;
  FdRegistry* inherited = nullptr;  // keeps the ones inherited through fork reachable
};

// Never destroyed: used during exit.
std::atomic<FdRegistry*> g_fd_registry{nullptr};
// In a forked child, the registry it inherited: never used again, but reachable, so that a leak
// checker does not report it.
FdRegistry* g_inherited_fd_registry = nullptr;
unsigned g_fork_generation = 0;

FdRegistry& fd_registry() {
  FdRegistry* r = g_fd_registry.load(std::memory_order_acquire);
  if (r) return *r;
  auto* fresh = new FdRegistry;
  fresh->inherited = g_inherited_fd_registry;
  if (g_fd_registry.compare_exchange_strong(r, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;
  return *r;
}

void register_fd(int fd) {
  auto& r = fd_registry();
  std::lock_guard lock(r.mutex);
  r.fds.push_back(fd);
}

void unregister_fd(int fd) noexcept {
  FdRegistry* r = g_fd_registry.load(std::memory_order_acquire);
  if (!r) return;
  std::lock_guard lock(r->mutex);
  auto it = std::find(r->fds.begin(), r->fds.end(), fd);
  if (it != r->fds.end()) {
    *it = r->fds.back();
    r->fds.pop_back();
  }
}

}  // namespace

int above_stdio(int fd) noexcept {
  if (fd < 0 || fd > STDERR_FILENO) return fd;
  // A program that closed its standard descriptors (a daemon) hands their numbers to the next
  // open(2). The library's descriptors must not take them: the program's stdio would write into
  // them, and a spawned child would find them where it expects its own standard streams.
  const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
  if (moved < 0) return fd;  // out of descriptors: a low one still works
  ::close(fd);
  return moved;
}

unsigned fork_generation() noexcept { return g_fork_generation; }

UniqueFd::UniqueFd(int fd) noexcept : fd_(above_stdio(fd)), generation_(g_fork_generation) {
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
  // fork_prepare_and_fork held the registry's lock across fork(2): the list is whole, and no other
  // thread exists here to change it. The lock stays held in this copy, which is never used again.
  if (FdRegistry* r = g_fd_registry.load(std::memory_order_relaxed)) {
    for (int fd : r->fds) {
      if (std::find(keep.begin(), keep.end(), fd) == keep.end()) ::close(fd);
    }
    g_inherited_fd_registry = r;
    g_fd_registry.store(nullptr, std::memory_order_relaxed);
  }
  ++g_fork_generation;
}

std::size_t registered_fd_count() noexcept {
  FdRegistry* r = g_fd_registry.load(std::memory_order_acquire);
  if (!r) return 0;
  std::lock_guard lock(r->mutex);
  return r->fds.size();
}

void reset_caught_signal_handlers() noexcept {
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
}

namespace {

// True when `stream` writes straight through to a stdio FILE, as libstdc++'s std::cout and
// std::cerr do while synced with stdio (the default): fflush(nullptr) then covers what it wrote.
bool writes_through_to_stdio(const std::ostream& stream) noexcept {
#if defined(__GLIBCXX__)
  const std::streambuf* buf = stream.rdbuf();
  return !buf || typeid(*buf) == typeid(__gnu_cxx::stdio_sync_filebuf<char>);
#else
  (void)stream;
  return false;
#endif
}

// Library calls that a forked child makes and its parent may not: with lazy binding (a program
// not linked with -z now) each child would look them up again, reading symbol tables it does not
// have mapped yet. One call here binds them in the parent, for all its children.
void bind_child_calls() noexcept {
  struct sigaction current {};
  (void)::sigaction(SIGCHLD, nullptr, &current);
  int sig = 0;
  (void)::prctl(PR_GET_PDEATHSIG, &sig);
  (void)::getppid();
}

}  // namespace

// Output still buffered would otherwise be written twice, once by each process (before fork), or
// lost (at a child's _exit), or come out after the output of a child started later. Flushing a stream that writes
// through to stdio would only repeat fflush(stdout) and rewrite its FILE, a page that parent and child would then each
// copy.
void flush_output() noexcept {
  try {
    if (!writes_through_to_stdio(std::cout)) std::cout.flush();
    if (!writes_through_to_stdio(std::cerr)) std::cerr.flush();
  } catch (...) {
  }
  std::fflush(nullptr);
}

namespace detail_fork {

pid_t fork_prepare_and_fork(sigset_t& old_mask) {
  static const bool bound = (bind_child_calls(), true);
  (void)bound;
  flush_output();
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
  // The parent flushed before fork, but another of its threads may have printed since: what stdout
  // and stderr hold now is the parent's to write, and the child's exit must not write it again.
  // __fpurge takes no lock, so a lock some other thread of the parent held cannot stop it.
  ::__fpurge(stdout);
  ::__fpurge(stderr);
  // Exec's rule: caught signals go back to their default action, ignored ones stay ignored. The
  // parent's handlers belong to the parent's state (its threads, its event loop), not ours.
  reset_caught_signal_handlers();
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

namespace {
// _exit called through its address, which the dynamic linker fills in when the program loads: a
// direct call would be bound lazily, by every child anew, as bind_child_calls explains.
std::atomic<void (*)(int)> g_exit_function{&::_exit};
}  // namespace

void child_exit(int code) noexcept {
  flush_output();
  g_exit_function.load(std::memory_order_relaxed)(code);
  ::_exit(code);  // not reached
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
  UniqueFd fd(checked("memfd_create", [&] { return ::memfd_create(debug_name, MFD_CLOEXEC); }),
              UniqueFd::Inheritable{});
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

UniqueFd descriptor_of(pid_t pid, int fd) {
  return pid == current_pid() ? dup_inheritable(fd) : open_process_fd(pid, fd);
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

namespace {
int group_death_signal() noexcept { return SIGRTMAX - 2; }
void kill_own_group(int) { ::kill(0, SIGKILL); }
}  // namespace

void kill_process_group_when_parent_dies(pid_t parent) noexcept {
  struct sigaction sa {};
  sa.sa_handler = kill_own_group;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(group_death_signal(), &sa, nullptr);
  sigset_t set;
  ::sigemptyset(&set);
  ::sigaddset(&set, group_death_signal());
  ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  ::prctl(PR_SET_PDEATHSIG, group_death_signal());
  if (::getppid() != parent) ::kill(0, SIGKILL);
}

void block_all_signals_in_this_thread() noexcept {
  sigset_t all;
  ::sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, nullptr);
}

// ---- queues and pipes ---------------------------------------------------------------------

void resize_file(int fd, std::size_t size) {
  checked("ftruncate", [&] { return ::ftruncate(fd, static_cast<off_t>(size)); });
}

std::pair<UniqueFd, UniqueFd> pipe_pair() {
  int fds[2];
  checked("pipe2", [&] { return ::pipe2(fds, O_CLOEXEC); });
  return {UniqueFd(fds[0], UniqueFd::Inheritable{}), UniqueFd(fds[1], UniqueFd::Inheritable{})};
}

UniqueFd open_process_pipe(pid_t pid, int fd, bool write_end) {
  const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  // A pipe opened by path behaves as a FIFO: without O_NONBLOCK, opening its write end waits for
  // a reader, forever if the readers are gone. Non-blocking, that case is ENXIO; the descriptor
  // is made blocking once open.
  const int flags = (write_end ? O_WRONLY : O_RDONLY) | O_CLOEXEC | O_NONBLOCK;
  UniqueFd out(checked("open", [&] { return ::open(path.c_str(), flags); }), UniqueFd::Inheritable{});
  const int fl = checked("fcntl", [&] { return ::fcntl(out.get(), F_GETFL); });
  checked("fcntl", [&] { return ::fcntl(out.get(), F_SETFL, fl & ~O_NONBLOCK); });
  return out;
}

void write_all_pipe(int fd, std::span<const std::byte> data) {
  // Unlike send(2), write(2) has no MSG_NOSIGNAL: a pipe without readers raises SIGPIPE, whose
  // default action kills the process. Block it in this thread for the write; if the write failed
  // with EPIPE, take the signal it raised off the pending set before unblocking (unless the
  // caller had SIGPIPE blocked already: then it stays pending, as the caller would expect).
  sigset_t pipe_only;
  ::sigemptyset(&pipe_only);
  ::sigaddset(&pipe_only, SIGPIPE);
  sigset_t old;
  ::pthread_sigmask(SIG_BLOCK, &pipe_only, &old);
  int error = 0;
  while (!data.empty()) {
    const ssize_t n = checked_noexcept("write", [&] { return ::write(fd, data.data(), data.size()); });
    if (n < 0) {
      error = static_cast<int>(-n);
      break;
    }
    data = data.subspan(static_cast<std::size_t>(n));
  }
  if (error == EPIPE && !::sigismember(&old, SIGPIPE)) {
    const timespec zero{0, 0};
    while (::sigtimedwait(&pipe_only, nullptr, &zero) == -1 && errno == EINTR) {
    }
  }
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (error != 0) throw SystemError(error, "write");
}

std::size_t read_fd_some(int fd, std::span<std::byte> data) {
  return static_cast<std::size_t>(checked("read", [&] { return ::read(fd, data.data(), data.size()); }));
}

// ---- process-shared synchronization -----------------------------------------------------------

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t) &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "a futex word must be a plain, lock-free 32-bit atomic");

namespace {
std::uint32_t* futex_address(const std::atomic<std::uint32_t>& word) noexcept {
  return const_cast<std::uint32_t*>(reinterpret_cast<const std::uint32_t*>(&word));
}
}  // namespace

FutexWaitResult futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                           std::chrono::nanoseconds timeout) {
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout.count() >= 0) {
    const auto s = std::chrono::duration_cast<std::chrono::seconds>(timeout);
    ts.tv_sec = static_cast<time_t>(std::min<long long>(s.count(), INT_MAX));
    ts.tv_nsec = static_cast<long>((timeout - s).count());
    tsp = &ts;
  }
  // Not through checked(): EINTR goes back to the caller, which knows what is left of its time.
  long r;
  if (const int e = injected_fault("futex")) {
    r = -1;
    errno = e;
  } else {
    r = ::syscall(SYS_futex, futex_address(word), FUTEX_WAIT, expected, tsp, nullptr, 0);
  }
  if (r == 0) return FutexWaitResult::woken;
  switch (errno) {
    case EAGAIN:
      return FutexWaitResult::value_changed;
    case ETIMEDOUT:
      return FutexWaitResult::timed_out;
    case EINTR:
      return FutexWaitResult::interrupted;
    default:
      throw SystemError(errno, "futex(FUTEX_WAIT)");
  }
}

int futex_wake(const std::atomic<std::uint32_t>& word, int n) noexcept {
  const long r = ::syscall(SYS_futex, futex_address(word), FUTEX_WAKE, n, nullptr, nullptr, 0);
  if (r < 0) {
    report_error("futex(FUTEX_WAKE) failed");
    return 0;
  }
  return static_cast<int>(r);
}

namespace {
// pthread_mutex_* return the error instead of setting errno; the fault hook stands in for them.
int mutex_call(const char* name, int (*call)(pthread_mutex_t*), pthread_mutex_t& mutex) {
  if (const int e = injected_fault(name); e != 0 && e != EINTR) throw SystemError(e, name);
  return call(&mutex);
}

MutexLockResult mutex_result(int e, const char* name) {
  switch (e) {
    case 0:
      return MutexLockResult::acquired;
    case EOWNERDEAD:
      return MutexLockResult::owner_died;
    case ENOTRECOVERABLE:
      return MutexLockResult::not_recoverable;
    case EBUSY:
      return MutexLockResult::busy;
    case ETIMEDOUT:
      return MutexLockResult::timed_out;
    case EDEADLK:
      return MutexLockResult::deadlock;
    default:
      throw SystemError(e, name);
  }
}

void check_pthread(int e, const char* name) {
  if (e != 0) throw SystemError(e, name);
}

// ThreadSanitizer's pthread_mutex_timedlock interceptor (LLVM 14, GCC 12) books the lock only when
// the call returns 0, although EOWNERDEAD hands the mutex over too (its lock and trylock
// interceptors know that): without this, the caller's unlock reads as "unlock of an unlocked mutex".
void tsan_note_locked_by_owner_death([[maybe_unused]] pthread_mutex_t& mutex) noexcept {
#if MULTIPROC_PLATFORM_TSAN
  __tsan_mutex_pre_lock(&mutex, __tsan_mutex_try_lock);
  __tsan_mutex_post_lock(&mutex, __tsan_mutex_try_lock, 0);
#endif
}
}  // namespace

void robust_mutex_init(pthread_mutex_t& mutex, bool recursive) {
  pthread_mutexattr_t attr;
  check_pthread(::pthread_mutexattr_init(&attr), "pthread_mutexattr_init");
  struct Destroy {
    pthread_mutexattr_t* a;
    ~Destroy() { ::pthread_mutexattr_destroy(a); }
  } destroy{&attr};
  check_pthread(::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED), "pthread_mutexattr_setpshared");
  // PTHREAD_MUTEX_ROBUST is an enumerator in glibc: it cannot be tested with #ifdef.
  check_pthread(::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST), "pthread_mutexattr_setrobust");
  check_pthread(::pthread_mutexattr_settype(&attr, recursive ? PTHREAD_MUTEX_RECURSIVE : PTHREAD_MUTEX_ERRORCHECK),
                "pthread_mutexattr_settype");
  check_pthread(::pthread_mutex_init(&mutex, &attr), "pthread_mutex_init");
}

MutexLockResult robust_mutex_lock(pthread_mutex_t& mutex) {
  return mutex_result(mutex_call("pthread_mutex_lock", ::pthread_mutex_lock, mutex), "pthread_mutex_lock");
}

MutexLockResult robust_mutex_try_lock(pthread_mutex_t& mutex) {
  const int e = mutex_call("pthread_mutex_trylock", ::pthread_mutex_trylock, mutex);
  if (e == ENOTRECOVERABLE) {
    // glibc's trylock (2.36 at least) takes a not-recoverable robust mutex, finds it unusable and
    // returns ENOTRECOVERABLE *with the lock word still holding the caller's tid* (it compares the
    // word's old value, 0, with its tid before unlocking), so every later lock would block forever
    // on a live "owner". pthread_mutex_lock and _timedlock give the word back; do what they do.
    const int tid = static_cast<int>(current_tid());
    const int word = __atomic_load_n(&mutex.__data.__lock, __ATOMIC_RELAXED);
    if ((word & FUTEX_TID_MASK) == tid) {
      const int old = __atomic_exchange_n(&mutex.__data.__lock, 0, __ATOMIC_RELEASE);
      if (old & FUTEX_WAITERS) ::syscall(SYS_futex, &mutex.__data.__lock, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
    }
  }
  return mutex_result(e, "pthread_mutex_trylock");
}

MutexLockResult robust_mutex_lock_until(pthread_mutex_t& mutex, std::chrono::steady_clock::time_point deadline) {
  using namespace std::chrono;
  for (;;) {
    const auto left = deadline - steady_clock::now();
    if (left <= nanoseconds::zero()) return robust_mutex_try_lock(mutex);
    const auto slice = duration_cast<nanoseconds>(std::min<steady_clock::duration>(left, milliseconds(100)));
    timespec at{};
    ::clock_gettime(CLOCK_REALTIME, &at);
    long long ns = at.tv_nsec + slice.count();
    at.tv_sec += static_cast<time_t>(ns / 1'000'000'000);
    at.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    if (const int e = injected_fault("pthread_mutex_timedlock"); e != 0 && e != EINTR) {
      throw SystemError(e, "pthread_mutex_timedlock");
    }
    const int e = ::pthread_mutex_timedlock(&mutex, &at);
    if (e == EOWNERDEAD) tsan_note_locked_by_owner_death(mutex);
    if (e == ETIMEDOUT) {
      if (steady_clock::now() >= deadline) return MutexLockResult::timed_out;
      continue;
    }
    return mutex_result(e, "pthread_mutex_timedlock");
  }
}

int robust_mutex_unlock(pthread_mutex_t& mutex) noexcept { return ::pthread_mutex_unlock(&mutex); }

int robust_mutex_consistent(pthread_mutex_t& mutex) noexcept { return ::pthread_mutex_consistent(&mutex); }

namespace {
thread_local pid_t t_tid = 0;
std::atomic<pid_t> g_pid{0};

void forget_ids_in_child() noexcept {
  // Runs in the child's only thread, the one that called fork: its cached tid is the parent's.
  t_tid = 0;
  g_pid.store(0, std::memory_order_relaxed);
}

void register_id_reset() noexcept {
  static const bool registered = ::pthread_atfork(nullptr, nullptr, forget_ids_in_child) == 0;
  (void)registered;
}
}  // namespace

pid_t current_tid() noexcept {
  if (t_tid == 0) {
    register_id_reset();
    t_tid = static_cast<pid_t>(::syscall(SYS_gettid));
  }
  return t_tid;
}

pid_t current_pid() noexcept {
  pid_t pid = g_pid.load(std::memory_order_relaxed);
  if (pid == 0) {
    register_id_reset();
    pid = ::getpid();
    g_pid.store(pid, std::memory_order_relaxed);
  }
  return pid;
}

namespace {
// Reads the start of a small file (a /proc entry) into `buf`, NUL-terminated; false if it cannot.
template <std::size_t N>
bool read_small_file(const char* path, char (&buf)[N]) noexcept {
  const int fd = checked_noexcept("open", [&] { return ::open(path, O_RDONLY | O_CLOEXEC); });
  if (fd < 0) return false;
  const ssize_t n = checked_noexcept("read", [&] { return ::read(fd, buf, N - 1); });
  close_fd(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  return true;
}
}  // namespace

std::uint64_t process_start_time(pid_t pid) noexcept {
  if (pid <= 0) return 0;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  char buf[1024];
  if (!read_small_file(path, buf)) return 0;
  // "pid (comm) S ...": comm may hold spaces and parentheses, so fields count from the last ')'.
  const char* p = std::strrchr(buf, ')');
  if (!p || p[1] != ' ') return 0;
  p += 2;
  if (*p == 'Z' || *p == 'X' || *p == 'x') return 0;
  // The state is field 3; the start time is field 22.
  for (int field = 3; field < 22; ++field) {
    p = std::strchr(p, ' ');
    if (!p) return 0;
    ++p;
  }
  std::uint64_t t = 0;
  for (; *p >= '0' && *p <= '9'; ++p) t = t * 10 + static_cast<std::uint64_t>(*p - '0');
  return t;
}

}  // namespace multiproc::detail::sys

// ---- start methods ------------------------------------------------------------------------------
namespace multiproc::detail::sys {

std::pair<UniqueFd, UniqueFd> seqpacket_pair() {
  int fds[2];
  checked("socketpair", [&] { return ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds); });
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

namespace {
constexpr std::size_t kMaxPassedFds = 8;
}

void send_message(int sock, std::span<const std::byte> data, std::span<const int> fds) {
  if (fds.size() > kMaxPassedFds) throw InvalidArgument("send_message: too many descriptors");
  iovec iov{const_cast<std::byte*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxPassedFds)]{};
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  checked("sendmsg", [&] { return ::sendmsg(sock, &msg, MSG_NOSIGNAL); });
}

std::size_t recv_message(int sock, std::span<std::byte> data, std::vector<UniqueFd>& fds) {
  iovec iov{data.data(), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxPassedFds)]{};
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  const ssize_t n = checked_noexcept("recvmsg", [&] { return ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); });
  if (n == -ECONNRESET) return 0;
  if (n < 0) throw SystemError(static_cast<int>(-n), "recvmsg");
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);
    }
  }
  if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) throw ProtocolError("a control message was larger than expected");
  return static_cast<std::size_t>(n);
}

std::pair<UniqueFd, UniqueFd> private_pipe() {
  int fds[2];
  checked("pipe2", [&] { return ::pipe2(fds, O_CLOEXEC); });
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

namespace {

std::string hex(const unsigned char* p, std::size_t n) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < n; ++i) {
    out += digits[p[i] >> 4];
    out += digits[p[i] & 15];
  }
  return out;
}

// The GNU build-id note of the main program (the first object dl_iterate_phdr reports).
std::string gnu_build_id() {
  std::string id;
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) -> int {
        auto& out = *static_cast<std::string*>(data);
        for (int i = 0; i < info->dlpi_phnum && out.empty(); ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type != PT_NOTE) continue;
          const auto* p = reinterpret_cast<const unsigned char*>(info->dlpi_addr + ph.p_vaddr);
          const unsigned char* end = p + ph.p_memsz;
          while (p + sizeof(ElfW(Nhdr)) <= end) {
            ElfW(Nhdr) note;
            std::memcpy(&note, p, sizeof note);
            const unsigned char* name = p + sizeof note;
            const unsigned char* desc = name + ((note.n_namesz + 3) & ~3u);
            const unsigned char* next = desc + ((note.n_descsz + 3) & ~3u);
            if (next > end) break;
            if (note.n_type == NT_GNU_BUILD_ID && note.n_namesz == 4 && std::memcmp(name, "GNU", 4) == 0) {
              out = hex(desc, note.n_descsz);
              break;
            }
            p = next;
          }
        }
        return 1;  // only the main program
      },
      &id);
  return id;
}

// FNV-1a over the executable file, for a program linked without a build-id note.
std::string file_hash() {
  const int fd = ::open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "unknown";
  std::uint64_t h = 14695981039346656037ull;
  std::vector<unsigned char> buf(1 << 16);
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (ssize_t i = 0; i < n; ++i) {
      h ^= buf[static_cast<std::size_t>(i)];
      h *= 1099511628211ull;
    }
  }
  ::close(fd);
  unsigned char bytes[8];
  std::memcpy(bytes, &h, sizeof h);
  return "sha:" + hex(bytes, sizeof bytes);
}

}  // namespace

const std::string& build_id() {
  static const std::string id = [] {
    std::string gnu = gnu_build_id();
    return gnu.empty() ? file_hash() : gnu;
  }();
  return id;
}

int thread_count() noexcept {
  // procfs gives a process's task directory 2 + (number of threads) links: one stat(2), about a
  // quarter of the cost of reading and parsing /proc/self/stat (which is the fallback).
  struct stat task {};
  if (::stat("/proc/self/task", &task) == 0 && task.st_nlink >= 3) return static_cast<int>(task.st_nlink - 2);
  char buf[1024];
  if (!read_small_file("/proc/self/stat", buf)) return 0;
  // Field 2 (the command) is in parentheses and may hold spaces: count fields after its ')'.
  const char* p = std::strrchr(buf, ')');
  if (!p) return 0;
  int field = 2;
  for (++p; *p && field < 20; ++p) {
    if (*p == ' ') ++field;
  }
  return field == 20 ? std::atoi(p) : 0;
}

void exec_in_child(const char* path, char* const argv[], char* const envp[], std::span<const int> keep) noexcept {
  for (int fd : keep) {
    const int flags = ::fcntl(fd, F_GETFD);
    if (flags >= 0) ::fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
  }
  ::execve(path, argv, envp);
  static constexpr char msg[] = "multiproc: execve of the worker executable failed\n";
  (void)!::write(2, msg, sizeof msg - 1);
  ::_exit(127);
}

UniqueFd child_signal_fd() {
  sigset_t set;
  ::sigemptyset(&set);
  ::sigaddset(&set, SIGCHLD);
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return UniqueFd(checked("signalfd", [&] { return ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK); }));
}

void drain_signal_fd(int fd) noexcept {
  signalfd_siginfo info[8];
  while (::read(fd, info, sizeof info) > 0) {
  }
}

std::optional<siginfo_t> reap_any_child() noexcept {
  siginfo_t info{};
  for (;;) {
    if (::waitid(P_ALL, 0, &info, WEXITED | WNOHANG) == 0) {
      if (info.si_pid == 0) return std::nullopt;
      return info;
    }
    if (errno != EINTR) return std::nullopt;  // ECHILD: no children at all
  }
}

std::size_t resident_bytes() noexcept {
  char buf[128];
  if (!read_small_file("/proc/self/statm", buf)) return 0;
  unsigned long size = 0, resident = 0;
  if (std::sscanf(buf, "%lu %lu", &size, &resident) != 2) return 0;
  return static_cast<std::size_t>(resident) * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

namespace {

// The function symbol of the ELF file at `path` whose range holds `offset` (an address relative
// to the module's load base): its .symtab, read whole. Empty when there is none.
std::string symtab_name(const char* path, std::uintptr_t offset) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  struct stat st {};
  void* map = MAP_FAILED;
  if (::fstat(fd, &st) == 0 && st.st_size > static_cast<off_t>(sizeof(ElfW(Ehdr))))
    map = ::mmap(nullptr, static_cast<std::size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return {};
  const auto size = static_cast<std::size_t>(st.st_size);
  const auto* base = static_cast<const unsigned char*>(map);
  std::string name;
  const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
  const bool is_elf = std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_shentsize == sizeof(ElfW(Shdr)) &&
                      eh->e_shoff < size && eh->e_shnum <= (size - eh->e_shoff) / sizeof(ElfW(Shdr));
  // `offset` is what the symbols hold: an address relative to the load base for a shared object or
  // a PIE, the absolute address for a position-dependent executable (symbol_name chooses).
  const std::uintptr_t wanted = offset;
  for (std::size_t i = 0; is_elf && i < eh->e_shnum && name.empty(); ++i) {
    const auto* sh = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff) + i;
    if (sh->sh_type != SHT_SYMTAB || sh->sh_entsize != sizeof(ElfW(Sym)) || sh->sh_link >= eh->e_shnum) continue;
    const auto* strh = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff) + sh->sh_link;
    if (sh->sh_offset > size || sh->sh_size > size - sh->sh_offset || strh->sh_offset > size ||
        strh->sh_size > size - strh->sh_offset)
      continue;
    const auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sh->sh_offset);
    const std::size_t count = sh->sh_size / sizeof(ElfW(Sym));
    const char* strings = reinterpret_cast<const char*>(base + strh->sh_offset);
    for (std::size_t k = 0; k < count; ++k) {
      const ElfW(Sym)& sym = syms[k];
      if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || sym.st_name >= strh->sh_size) continue;
      if (wanted >= sym.st_value && wanted < sym.st_value + std::max<std::uint64_t>(sym.st_size, 1)) {
        name.assign(strings + sym.st_name, ::strnlen(strings + sym.st_name, strh->sh_size - sym.st_name));
        break;
      }
    }
  }
  ::munmap(map, size);
  return name;
}

}  // namespace

std::string symbol_name(const void* address) {
  Dl_info info{};
  if (!address || ::dladdr(address, &info) == 0) return {};
  if (info.dli_sname && info.dli_saddr) return info.dli_sname;
  if (!info.dli_fname) return {};
  const auto offset = reinterpret_cast<std::uintptr_t>(address) - reinterpret_cast<std::uintptr_t>(info.dli_fbase);
  // For the main program dladdr answers with argv[0], which may be relative to another directory.
  const bool main_program = !info.dli_fname[0] || std::strcmp(info.dli_fname, program_invocation_name) == 0;
  const char* path = main_program ? "/proc/self/exe" : info.dli_fname;
  const auto* eh = static_cast<const ElfW(Ehdr)*>(info.dli_fbase);
  const bool absolute = eh && eh->e_type == ET_EXEC;
  return symtab_name(path, absolute ? reinterpret_cast<std::uintptr_t>(address) : offset);
}

std::string current_directory() {
  std::vector<char> buf(4096);
  for (;;) {
    if (::getcwd(buf.data(), buf.size())) return buf.data();
    if (errno != ERANGE) throw SystemError(errno, "getcwd");
    buf.resize(buf.size() * 2);
  }
}

void change_directory(const std::string& path) {
  checked("chdir", [&] { return ::chdir(path.c_str()); });
}

void advise_huge_pages(void* p, std::size_t n) noexcept {
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const auto begin = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(p) + n) & ~(kHuge - 1);
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

}  // namespace multiproc::detail::sys

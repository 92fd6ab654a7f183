// The platform layer: the only code in multiproc that makes system calls.
//
// Every call goes through `checked()`: EINTR is retried (never for close, whose descriptor is
// gone even when it reports EINTR), a failure becomes a `multiproc::SystemError` that names the
// call, and tests can make any named call fail through `set_fault_hook()`.
#pragma once

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "multiproc/error.hpp"

namespace multiproc::detail::sys {

/// A hook that decides whether the call `name` fails: it returns 0 to let it run, or the errno
/// the call should fail with. Tests only; nullptr (the default) costs one relaxed load per call.
using FaultHook = int (*)(const char* name) noexcept;
void set_fault_hook(FaultHook hook) noexcept;
extern std::atomic<FaultHook> g_fault_hook;

inline int injected_fault(const char* name) noexcept {
  FaultHook hook = g_fault_hook.load(std::memory_order_relaxed);
  return hook ? hook(name) : 0;
}

/// Runs `call` (which returns -1 and sets errno on failure), retrying EINTR.
template <class F>
auto checked(const char* name, F&& call) {
  for (;;) {
    // An injected error stands for the call failing with it: an injected EINTR is retried too.
    if (int e = injected_fault(name)) {
      if (e == EINTR) continue;
      throw SystemError(e, name);
    }
    auto r = call();
    if (r != -1) return r;
    if (errno != EINTR) throw SystemError(errno, name);
  }
}

/// Same as checked(), but returns -errno instead of throwing, for callers that handle some
/// errors themselves (EAGAIN, ECHILD, ...).
template <class F>
auto checked_noexcept(const char* name, F&& call) noexcept -> decltype(call()) {
  for (;;) {
    if (int e = injected_fault(name)) {
      if (e == EINTR) continue;
      return -e;
    }
    auto r = call();
    if (r != -1) return r;
    if (errno != EINTR) return -errno;
  }
}

/// close(2) without retrying EINTR. Reports, never throws.
void close_fd(int fd) noexcept;

/// Incremented in every child forked by fork_process: objects holding resources compare it with
/// the value they were created under to tell inherited resources from their own.
unsigned fork_generation() noexcept;

/// Returns `fd`, or where it is 0, 1 or 2, a close-on-exec duplicate of it above 2 (closing `fd`).
int above_stdio(int fd) noexcept;

/// An owned file descriptor, close-on-exec, never 0, 1 or 2 (see above_stdio), and known to the
/// library's descriptor registry so that a child forked for one purpose never inherits the
/// descriptors opened for another.
class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept;  // takes ownership and registers
  /// Takes ownership without registering: the descriptor of an object a forked child shares with
  /// its parent (shared memory), which the child must inherit.
  struct Inheritable {};
  UniqueFd(int fd, Inheritable) noexcept : fd_(above_stdio(fd)), generation_(fork_generation()), registered_(false) {}
  UniqueFd(UniqueFd&& o) noexcept
      : fd_(std::exchange(o.fd_, -1)), generation_(o.generation_), registered_(o.registered_) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
      generation_ = o.generation_;
      registered_ = o.registered_;
    }
    return *this;
  }
  ~UniqueFd() { reset(); }

  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }
  explicit operator bool() const noexcept { return valid(); }
  /// Closes the descriptor, unless it was inherited through fork: a forked child has already
  /// closed (or adopted, see release()) every descriptor of its parent's, and the number may since
  /// have been reused.
  void reset() noexcept;
  /// Gives up ownership (and registration) without closing. In a forked child this is how a kept
  /// descriptor is adopted: `UniqueFd mine(inherited.release());`.
  int release() noexcept;

 private:
  int fd_ = -1;
  unsigned generation_ = 0;
  bool registered_ = true;
};

/// In a freshly forked child: closes every registered descriptor except those in `keep` (which
/// the child adopts through UniqueFd::release()) and leaves the inherited registry untouched (its
/// page stays shared with the parent): the child's own descriptors go to a new, empty one.
void close_registered_fds_in_child(std::span<const int> keep) noexcept;
/// Number of descriptors in the registry (tests).
std::size_t registered_fd_count() noexcept;

// ---- processes --------------------------------------------------------------------------

struct ForkOptions {
  bool new_process_group = true;   // so a kill reaches the child's own children too
  bool die_with_parent = true;     // PR_SET_PDEATHSIG(SIGKILL) plus a getppid() re-check
  std::span<const int> keep_fds;   // registered descriptors the child keeps
  bool clear_signal_mask = false;  // the child starts with no signal blocked instead of the caller's mask
};

/// Forks. In the child, before `child_main` runs: caught signal handlers are reset to their
/// defaults (ignored ones stay ignored, as across exec), the parent's death kills the child, the
/// descriptors other children own are closed, and the signal mask is restored. `child_main` must
/// not return; if it does, the child exits 0. Returns the child's pid in the parent.
/// Signals are blocked around fork(2), so no handler of the parent's runs in the child.
template <class F>
pid_t fork_process(const ForkOptions& options, F&& child_main);

/// Flushes std::cout, std::cerr and every stdio stream: before a child is started by any method
/// (so that what the caller printed comes first, and once), and at a forked child's exit.
void flush_output() noexcept;

/// pidfd_open(2); returns an invalid fd where the kernel or a sandbox refuses (ENOSYS, EPERM),
/// in which case callers fall back to waitid(P_PID).
UniqueFd pidfd_open(pid_t pid);

/// waitid(2) for one child. `pidfd` is used when valid. Returns the siginfo when the child has
/// exited (reaping it), nullopt when `nohang` is set and it is still running.
std::optional<siginfo_t> wait_child(pid_t pid, int pidfd, bool nohang);

/// Waits until `fd` is readable or the timeout passes; true if readable. A negative timeout
/// waits forever.
bool wait_readable(int fd, std::chrono::milliseconds timeout);

/// Sends `sig` to the process (or its process group when `group` is set). ESRCH is not an error:
/// returns false.
bool send_signal(pid_t pid, int sig, bool group);

// ---- shared memory ----------------------------------------------------------------------------

/// An anonymous memory file of `size` bytes (memfd_create, close-on-exec, not registered: forked
/// children share it).
UniqueFd memfd(const char* debug_name, std::size_t size);
/// A named POSIX shared memory object: created 0600 with O_EXCL when `create`, else opened.
UniqueFd shm_open_named(const std::string& name, bool create, std::size_t size);
void shm_unlink_named(const std::string& name);
/// A close-on-exec duplicate of `fd`, not registered.
UniqueFd dup_inheritable(int fd);
/// A descriptor of ours for descriptor `fd` of process `pid`, as sent in a handle: a duplicate when
/// `pid` is this process, else opened through /proc/<pid>/fd/<fd>.
UniqueFd descriptor_of(pid_t pid, int fd);
/// Opens another process's descriptor through /proc/<pid>/fd/<fd> (read-write).
UniqueFd open_process_fd(pid_t pid, int fd);
/// The size of the file behind `fd`.
std::size_t file_size(int fd);
/// mmap(MAP_SHARED) of a whole file; munmap on destruction.
class FileMapping {
 public:
  FileMapping() noexcept = default;
  FileMapping(int fd, std::size_t size);
  FileMapping(FileMapping&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  FileMapping& operator=(FileMapping&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~FileMapping() { reset(); }
  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(data_); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  void reset() noexcept;

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

/// SIGKILLs a child's process group and reaps the child: for a child whose set-up failed after
/// fork(2), so that nothing is left running or unreaped. Never throws.
void kill_and_reap(pid_t pid) noexcept;

/// A connected, close-on-exec AF_UNIX SOCK_STREAM pair.
std::pair<UniqueFd, UniqueFd> socket_pair();

/// Writes all of `data` (retrying short writes and EINTR). Throws SystemError (EPIPE when the
/// peer is gone; SIGPIPE is never raised).
void write_all(int fd, std::span<const std::byte> data);
/// Reads what is there, at least one byte (blocking until then), at most `data.size()`. Returns 0
/// on EOF or a connection reset.
std::size_t read_some(int fd, std::span<std::byte> data);
/// Reads exactly `data.size()` bytes. Returns false on EOF (or a connection reset by a peer that
/// died) before the first byte; throws ProtocolError on EOF in the middle.
bool read_exact(int fd, std::span<std::byte> data);

/// An eventfd (close-on-exec) for waking a thread that sleeps in poll(2).
UniqueFd event_fd();
/// Adds 1 to an eventfd (wakes its poller).
void event_signal(int fd);
/// Resets an eventfd that poll reported readable.
void event_drain(int fd) noexcept;

/// poll(2) over `fds`, EINTR retried with the remaining time; a negative timeout waits forever.
/// Returns the number of ready descriptors.
int poll_fds(struct pollfd* fds, std::size_t n, std::chrono::milliseconds timeout);

/// Anonymous memory shared with the children forked after it was made (MAP_SHARED). Unmapped on
/// destruction.
class SharedMapping {
 public:
  SharedMapping() noexcept = default;
  explicit SharedMapping(std::size_t size);
  SharedMapping(SharedMapping&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  SharedMapping& operator=(SharedMapping&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~SharedMapping() { reset(); }
  [[nodiscard]] void* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  void reset() noexcept;

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

/// In a child that leads its own process group (a pool worker): when `parent` dies, the whole
/// group dies, including processes the child started. PR_SET_PDEATHSIG delivers a real-time
/// signal whose handler SIGKILLs the group; a child whose parent is already gone does that at once.
void kill_process_group_when_parent_dies(pid_t parent) noexcept;

/// Blocks every signal in the calling thread (for library threads, so that signals go to the
/// application's own threads).
void block_all_signals_in_this_thread() noexcept;

/// Caught signals back to their default action (ignored ones stay ignored): what exec does, for
/// a child whose runtime installed handlers of its own before its work began.
void reset_caught_signal_handlers() noexcept;

namespace detail_fork {
pid_t fork_prepare_and_fork(sigset_t& old_mask);
void child_setup(const ForkOptions& options, const sigset_t& old_mask, pid_t parent) noexcept;
void parent_after_fork(const sigset_t& old_mask, pid_t child, bool new_process_group) noexcept;
[[noreturn]] void child_exit(int code) noexcept;
}  // namespace detail_fork

template <class F>
pid_t fork_process(const ForkOptions& options, F&& child_main) {
  sigset_t old_mask;
  const pid_t parent = ::getpid();
  const pid_t pid = detail_fork::fork_prepare_and_fork(old_mask);
  if (pid == 0) {
    detail_fork::child_setup(options, old_mask, parent);
    std::forward<F>(child_main)();
    detail_fork::child_exit(0);
  }
  detail_fork::parent_after_fork(old_mask, pid, options.new_process_group);
  return pid;
}

// ---- process-shared synchronization (sync.cpp) ----------------------------------------------

/// What futex_wait saw.
enum class FutexWaitResult {
  woken,          ///< a futex_wake reached this waiter
  value_changed,  ///< the word no longer held `expected` when the call began (EAGAIN)
  timed_out,
  interrupted,  ///< a signal (EINTR): the caller recomputes its timeout and decides
};
/// FUTEX_WAIT on a 32-bit word that processes share: a shared futex (never FUTEX_PRIVATE_FLAG),
/// keyed by the memory it lives in, so every process's mapping of a memfd reaches the same one.
/// Sleeps while `word` holds `expected`, at most `timeout` (negative: no limit). EINTR is not
/// retried: the caller recomputes what is left of its timeout.
FutexWaitResult futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                           std::chrono::nanoseconds timeout);
/// FUTEX_WAKE: wakes at most `n` sleepers on `word`, in any process; returns how many woke.
int futex_wake(const std::atomic<std::uint32_t>& word, int n) noexcept;

/// The outcome of locking a robust, process-shared pthread mutex.
enum class MutexLockResult {
  acquired,
  owner_died,       ///< EOWNERDEAD: acquired, but the previous owner died holding it
  not_recoverable,  ///< ENOTRECOVERABLE: released while inconsistent; nobody can lock it again
  busy,             ///< try: held (for an error-checking mutex, by the caller too)
  timed_out,
  deadlock,  ///< EDEADLK: an error-checking mutex that the calling thread holds already
};
/// Initializes a mutex in shared memory as PTHREAD_PROCESS_SHARED and PTHREAD_MUTEX_ROBUST,
/// recursive or error-checking.
void robust_mutex_init(pthread_mutex_t& mutex, bool recursive);
MutexLockResult robust_mutex_lock(pthread_mutex_t& mutex);
MutexLockResult robust_mutex_try_lock(pthread_mutex_t& mutex);
/// Waits until `deadline` at most. pthread_mutex_timedlock takes a CLOCK_REALTIME deadline (and
/// pthread_mutex_clocklock is unknown to ThreadSanitizer), so the wait goes in slices of at most
/// 100 ms, each recomputed from the steady clock: a wall-clock jump stretches one slice, not the
/// wait.
MutexLockResult robust_mutex_lock_until(pthread_mutex_t& mutex, std::chrono::steady_clock::time_point deadline);
/// 0, or the error: EPERM when the calling thread does not hold it.
int robust_mutex_unlock(pthread_mutex_t& mutex) noexcept;
/// pthread_mutex_consistent: 0, or EINVAL when the mutex is not inconsistent.
int robust_mutex_consistent(pthread_mutex_t& mutex) noexcept;

/// The calling thread's kernel id (gettid), cached per thread; a child forked by fork(2) sees its
/// own (pthread_atfork resets the cache).
pid_t current_tid() noexcept;
/// getpid(), cached the same way.
pid_t current_pid() noexcept;
/// The start time of a process in clock ticks after boot (field 22 of /proc/<pid>/stat): with
/// the pid, an identity that pid reuse cannot fake. 0 when there is no such process or it has
/// ended (a zombie has ended).
std::uint64_t process_start_time(pid_t pid) noexcept;

// ---- queues and pipes ---------------------------------------------------------------------

/// Grows (or shrinks) the file behind `fd` to `size` bytes (ftruncate).
void resize_file(int fd, std::size_t size);

/// A pipe (close-on-exec, not registered: forked children inherit both ends): {read, write}.
std::pair<UniqueFd, UniqueFd> pipe_pair();
/// Opens one end of another process's pipe through /proc/<pid>/fd/<fd>: a new descriptor of the
/// same pipe, read-only or write-only as asked, blocking. Opening the write end of a pipe that
/// has no reader left fails with SystemError(ENXIO) instead of waiting.
UniqueFd open_process_pipe(pid_t pid, int fd, bool write_end);
/// Writes all of `data` to a pipe. A pipe with no reader left fails with SystemError(EPIPE); the
/// SIGPIPE the kernel raises for it is blocked in this thread during the write and consumed, so it
/// never kills the process.
void write_all_pipe(int fd, std::span<const std::byte> data);
/// read(2) of what is there, at least one byte (blocking until then), at most `data.size()`.
/// Returns 0 on EOF.
std::size_t read_fd_some(int fd, std::span<std::byte> data);

// ---- start methods (launch.cpp) -------------------------------------------------------------

/// A connected, close-on-exec AF_UNIX SOCK_SEQPACKET pair: messages keep their boundaries and can
/// carry descriptors.
std::pair<UniqueFd, UniqueFd> seqpacket_pair();
/// sendmsg(2) of one message with `fds` attached (SCM_RIGHTS). EPIPE when the peer is gone.
void send_message(int sock, std::span<const std::byte> data, std::span<const int> fds);
/// recvmsg(2) of one message: its length (0 on EOF); descriptors that came with it are appended
/// to `fds`, close-on-exec and registered. A message longer than `data` is a ProtocolError.
std::size_t recv_message(int sock, std::span<std::byte> data, std::vector<UniqueFd>& fds);
/// A pipe whose two ends are registered (children forked for other purposes do not get them).
std::pair<UniqueFd, UniqueFd> private_pipe();

/// The build id of the running program: its GNU build-id note (hex), or, for an executable linked
/// without one, "sha:" and a 64-bit hash of the executable file. Computed once.
const std::string& build_id();
/// The number of threads of this process (/proc/self/stat); 0 if unknown.
int thread_count() noexcept;

/// In a forked child: clears close-on-exec on `keep` and execve(2)s `path`. On failure writes a
/// line to stderr and _exit(127)s. Async-signal-safe.
[[noreturn]] void exec_in_child(const char* path, char* const argv[], char* const envp[],
                                std::span<const int> keep) noexcept;

/// Blocks SIGCHLD in the calling thread and returns a signalfd that becomes readable when it comes.
UniqueFd child_signal_fd();
/// Reads what a signalfd holds (nonblocking).
void drain_signal_fd(int fd) noexcept;
/// waitid(P_ALL, WEXITED | WNOHANG): one ended child, reaped, or nullopt when none has ended.
std::optional<siginfo_t> reap_any_child() noexcept;

/// The resident set size of this process in bytes (/proc/self/statm); 0 if unknown.
std::size_t resident_bytes() noexcept;

/// The (mangled) name of the function whose code holds `address`: the dynamic symbol table first
/// (dladdr), then the module file's own symbol table; empty when neither names it (a stripped
/// binary). Reads files: for error messages, never on a hot path.
std::string symbol_name(const void* address);

/// The current working directory.
std::string current_directory();
/// chdir(2).
void change_directory(const std::string& path);

/// Asks for transparent huge pages over the whole 2 MiB pages inside [p, p + n), before they are
/// first touched (madvise MADV_HUGEPAGE): filling fresh memory then takes one fault per 2 MiB
/// instead of one per 4 KiB. Advice only: ignored where the kernel has huge pages off.
void advise_huge_pages(void* p, std::size_t n) noexcept;

}  // namespace multiproc::detail::sys

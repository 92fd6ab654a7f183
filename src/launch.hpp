// Starting children by spawn and forkserver, and what such a child does before its work: the
// boot handshake. Internal.
//
// A spawned child is an exec of the program with MULTIPROC_BOOT in its environment naming its
// role, its parent and its descriptors; multiproc::init() in its main() reads that and never
// returns. A forkserver child is forked by the server (itself a spawned child whose role is
// "forkserver") from descriptors the parent passed over the server's control socket.
//
// Either way the child's first descriptor is its end of a Channel to the parent, and the first
// frame on it is the boot frame: the parent's build id, the child's role, the parent's working
// directory and environment, then the role's own data. The child answers with a hello frame: its
// own build id, its pid, and whether it accepts (a different build refuses: BuildMismatch).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "channel.hpp"
#include "multiproc/exit_status.hpp"
#include "multiproc/start_method.hpp"
#include "platform.hpp"

namespace multiproc::detail {

/// A child process however it was started, watched and reaped the same way. A forkserver's child
/// is the server's child, not ours: the server reaps it and writes its wait status to a pipe we
/// hold, which is what we watch.
class Child {
 public:
  Child() = default;
  /// Our own child (fork, spawn).
  Child(pid_t pid, sys::UniqueFd pidfd) noexcept : pid_(pid), pidfd_(std::move(pidfd)) {}
  /// A forkserver's child: `status` is the pipe the server writes its wait status to.
  static Child from_server(pid_t pid, sys::UniqueFd status, sys::UniqueFd pidfd) noexcept;

  [[nodiscard]] pid_t pid() const noexcept { return pid_; }
  [[nodiscard]] bool via_server() const noexcept { return via_server_; }
  /// Readable once the child has ended (and, for a forkserver's child, been reaped), and open as
  /// long as this Child is, reaped or not; -1 when no such descriptor exists (a kernel without
  /// pidfds): poll reap(true) instead.
  [[nodiscard]] int watch_fd() const noexcept { return via_server_ ? status_.get() : pidfd_.get(); }
  /// How the child ended, reaping it: nullopt while it runs when `nohang`, else waits. Throws
  /// SystemError(ECHILD) for our own child reaped by someone else.
  std::optional<ExitStatus> reap(bool nohang);
  /// Sends `sig` to the child (to its process group when `group`) unless it has been reaped.
  void signal(int sig, bool group) noexcept;

 private:
  pid_t pid_ = 0;
  sys::UniqueFd pidfd_;
  sys::UniqueFd status_;
  bool via_server_ = false;
  std::optional<ExitStatus> ended_;
};

/// The start method to use for options that may name none.
StartMethod resolve_start_method(const std::optional<StartMethod>& chosen);

/// Starts a child by spawn or forkserver. `fds[0]` is the child's end of its channel (its boot
/// frame comes through it); the others are passed along in order (a Pool worker's progress page).
Child launch(StartMethod method, std::span<const int> fds);

/// The fork server's pid, 0 when none runs (tests: it is a child that belongs to no Process or Pool).
pid_t fork_server_pid() noexcept;

enum class BootRole : std::uint8_t { pool_worker = 1, process = 2 };

/// Begins a boot frame: build id, role, working directory, environment. The role's data follows.
void begin_boot_frame(Writer& frame, BootRole role);
/// Sends a boot frame. A child that is already gone is not an error here: await_hello() says how.
void send_boot(Channel& channel, Writer& boot);
/// Waits for the child's hello (up to `timeout`). Throws BuildMismatch when the child is another
/// build, StartError when it refused, ended or did not answer in time.
void await_hello(Channel& channel, Child& child, std::chrono::milliseconds timeout);
/// The bound on boot and hello frames (they carry the environment), whatever the channel's own.
inline constexpr std::size_t kBootPayloadLimit = std::size_t{1} << 30;
/// How long a child may take to exec and answer.
inline constexpr std::chrono::milliseconds kHelloTimeout{30'000};

/// Role entry points, run in the child after its hello: defined where the role lives.
[[noreturn]] void run_pool_worker_role(Channel& channel, Reader& boot, std::vector<sys::UniqueFd>& fds) noexcept;
[[noreturn]] void run_process_role(Channel& channel, Reader& boot) noexcept;

/// Before fork(2) for the fork start method: warns once on stderr when threads other than the
/// caller's and multiproc's own are running (they may hold locks the child inherits locked),
/// unless fork was chosen explicitly with set_start_method().
void check_fork_safety() noexcept;
/// Bookkeeping of multiproc's own threads (pool supervisors), for the check above.
void library_thread_started() noexcept;
void library_thread_ended() noexcept;

}  // namespace multiproc::detail

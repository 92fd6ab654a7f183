// multiproc/process.hpp — one child process running one function, Python's
// multiprocessing.Process in C++.
//
//     std::vector<double> input = load();
//     multiproc::Process p{[&] { compute(input); }};       // fork: the closure and input are inherited
//     multiproc::Process q{compute, std::cref(input)};      // a target and its arguments
//     p.start();
//     if (!p.join_for(std::chrono::seconds(2))) p.terminate();
//     p.join();
//     multiproc::ExitStatus s = p.exit_status();           // exited(code) or signaled(signal)
//     std::optional<int> c = p.exitcode();                  // Python's convention: -signal if killed
//
// The target runs in a child made by fork(2): it sees a copy of the parent's memory as it was at
// start(), so references and captures are valid there, and writes stay in the child.
//   - A target that returns normally exits the child with code 0; one that throws prints
//     "Process <name>:" and the exception's type and message to stderr and exits with code 1,
//     as Python does. The child ends with _exit(2): the parent's atexit handlers and static
//     destructors do not run in it, but stdio is flushed.
//   - Output is written once, in order (Python's contract, for every start method, for Process
//     and pool workers alike): start() flushes std::cout, std::cerr and every stdio stream before
//     the child exists, so what the parent printed comes first; a forked child discards what
//     stdout and stderr still held from the parent (another thread may have printed after that
//     flush) and never writes it; a child flushes its own output before it exits.
//   - The child gets its own process group, so terminate() and kill() reach the processes it
//     started too. Signal handlers the parent installed are reset to their defaults in the child
//     (ignored signals stay ignored, as across exec).
//   - Children never outlive a parent that dies abnormally: PR_SET_PDEATHSIG(SIGKILL) with a
//     getppid() re-check. Linux sends that signal when the *thread* that started the child exits,
//     so start processes from a thread that lives at least as long as they do (the main thread
//     is always safe).
//   - When the parent exits normally (returns from main or calls exit), daemon children are
//     terminated and the others joined, as Python does. A Process destroyed while its child runs
//     does not kill it: the child is reaped when it ends (checked at every start()) or at exit.
//   - A child inherits none of the descriptors multiproc opened for other children or pools.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "multiproc/detail/task.hpp"
#include "multiproc/error.hpp"
#include "multiproc/exit_status.hpp"
#include "multiproc/start_method.hpp"

namespace multiproc {

struct ProcessOptions {
  /// Defaults to "Process-N", N counting from 1 in each process.
  std::string name{};
  /// A daemon child is terminated when its parent exits normally, instead of being joined; like
  /// every child it is killed when the parent dies abnormally.
  bool daemon = false;
  /// fork, forkserver or spawn (see start_method.hpp); default: get_start_method(). Under
  /// forkserver and spawn the target must be sendable (a function pointer, captureless lambda or
  /// encodable functor) and its arguments encodable: start() throws InvalidArgument otherwise
  /// (get_context<StartMethod::spawn>().process(...) refuses at compile time instead).
  std::optional<StartMethod> start_method{};
};

namespace detail {
struct ProcessState;

class Target {
 public:
  virtual ~Target() = default;
  virtual void run() = 0;
  /// Writes the target as a call request (encode_call) for a child that does not inherit this
  /// process's memory; false when it cannot be sent (a closure, an unencodable argument).
  virtual bool encode_call(Writer& w) const = 0;
};

// An argument that names memory of this process (a pointer, std::ref/std::cref): it means something
// only in a forked child, which is a copy of this process. Its bytes would encode (they are
// trivially copyable) but name nothing in another process.
template <class T>
struct refers_to_this_process : std::is_pointer<T> {};
template <class T>
struct refers_to_this_process<std::reference_wrapper<T>> : std::true_type {};

template <class T>
inline constexpr bool is_sendable_argument_v =
    !refers_to_this_process<T>::value && Encodable<T> && std::is_default_constructible_v<T>;

/// Whether a Process target and its arguments can reach a child that does not inherit this
/// process's memory (forkserver, spawn). When not, the Process still works under fork, and start()
/// under another method throws InvalidArgument.
template <class F, class... Args>
inline constexpr bool is_sendable_target_v = is_sendable_v<F> && (is_sendable_argument_v<Args> && ...);

template <class F, class... Args>
class BoundTarget final : public Target {
 public:
  template <class G, class... A>
  explicit BoundTarget(G&& f, A&&... args) : f_(std::forward<G>(f)), args_(std::forward<A>(args)...) {}
  void run() override {
    std::apply([this](auto&... a) { std::invoke(f_, a...); }, args_);
  }
  bool encode_call(Writer& w) const override {
    if constexpr (is_sendable_target_v<F, Args...>) {
      detail::encode_call(w, f_, args_);
      return true;
    } else {
      return false;
    }
  }

 private:
  F f_;
  std::tuple<Args...> args_;
};
}  // namespace detail

class Process {
 public:
  /// A process that will run `target(args...)`. Arguments are copied (use std::ref/std::cref to
  /// pass references, which are valid in the child because it is a copy of the parent).
  // clang-format 14 mangles requires-clauses:
  // clang-format off
  template <class F, class... Args>
    requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
  explicit Process(F&& target, Args&&... args)
      : Process(ProcessOptions{}, std::forward<F>(target), std::forward<Args>(args)...) {}

  template <class F, class... Args>
    requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
  Process(ProcessOptions options, F&& target, Args&&... args)
      : Process(std::move(options),
                std::make_unique<detail::BoundTarget<std::decay_t<F>, std::decay_t<Args>...>>(
                    std::forward<F>(target), std::forward<Args>(args)...)) {}
  // clang-format on

  Process(ProcessOptions options, std::unique_ptr<detail::Target> target);

  Process(Process&&) noexcept;
  Process& operator=(Process&&) noexcept;
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;
  /// Does not wait and does not kill: a still-running child is reaped later (see above).
  ~Process();

  /// Forks the child and runs the target in it. Throws StateError if already started,
  /// SystemError if fork fails (EAGAIN: too many processes; ENOMEM).
  void start();
  /// Waits for the child to end. Throws StateError if never started.
  void join();
  /// Waits at most `timeout`; true if the child has ended.
  bool join_for(std::chrono::nanoseconds timeout);

  /// True between start() and the child's end (reaps it when it has ended).
  [[nodiscard]] bool is_alive();
  /// The child's pid; 0 before start().
  [[nodiscard]] pid_t pid() const noexcept;
  [[nodiscard]] const std::string& name() const noexcept { return options_.name; }
  void set_name(std::string name) { options_.name = std::move(name); }
  [[nodiscard]] bool daemon() const noexcept { return options_.daemon; }
  /// Only before start(); StateError after.
  void set_daemon(bool daemon);
  /// The method start() uses (or used): the options' or, when they name none, get_start_method().
  [[nodiscard]] StartMethod start_method() const;

  /// SIGTERM to the child's process group. Does nothing if the child has already ended.
  void terminate();
  /// SIGKILL to the child's process group. Does nothing if the child has already ended.
  void kill();
  /// Any signal to the child's process group (not to a child that has been reaped).
  void send_signal(int signal);

  /// How the child ended. Throws StateError while it runs or before start().
  [[nodiscard]] ExitStatus exit_status() const;
  /// Python's Process.exitcode: empty while running (or before start), the exit code when it
  /// exited, minus the signal number when a signal killed it. Reaps the child if it has ended.
  [[nodiscard]] std::optional<int> exitcode();
  /// A descriptor that becomes readable when the child ends (a pidfd), for poll(2) and
  /// multiproc::wait. It stays open, readable, as long as this Process, even once the child has
  /// been joined; -1 where pidfds are unavailable. StateError before start().
  [[nodiscard]] int sentinel() const;

 private:
  std::shared_ptr<detail::ProcessState> state_;
  std::unique_ptr<detail::Target> target_;
  ProcessOptions options_;
};

}  // namespace multiproc

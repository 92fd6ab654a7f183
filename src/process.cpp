#include "multiproc/process.hpp"

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "channel.hpp"
#include "launch.hpp"
#include "platform.hpp"

namespace multiproc {

namespace detail {

struct ProcessState {
  std::mutex mutex;
  Child child;
  std::optional<ExitStatus> status;
  bool daemon = false;

  pid_t pid() const noexcept { return child.pid(); }

  // Reaps the child if it has ended (or waits for that when `nohang` is false). Returns true once
  // the status is known.
  bool reap(bool nohang) {
    std::lock_guard lock(mutex);
    if (status) return true;
    auto st = child.reap(nohang);
    if (!st) return false;
    status = *st;
    return true;
  }

  // Waits, without reaping and without holding the lock, until the child has ended or the
  // timeout passes (negative: forever). True if it has ended.
  bool wait_ended(std::chrono::nanoseconds timeout) {
    int fd;
    {
      std::lock_guard lock(mutex);
      if (status) return true;
      fd = child.watch_fd();
    }
    if (fd >= 0) {
      const auto ms =
          timeout.count() < 0 ? std::chrono::milliseconds(-1) : std::chrono::ceil<std::chrono::milliseconds>(timeout);
      return sys::wait_readable(fd, ms) ? true : reap(true);
    }
    // No pidfd (sandboxed kernel): poll with a growing sleep.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    auto nap = std::chrono::microseconds(50);
    for (;;) {
      if (reap(true)) return true;
      if (timeout.count() >= 0 && std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(10'000));
    }
  }
};

namespace {

// Children started by this process that have not been reaped yet. A forked child starts with an
// empty list: its parent's children are not its own.
struct Children {
  std::mutex mutex;
  std::vector<std::shared_ptr<ProcessState>> live;
  pid_t owner = sys::current_pid();
};

Children& children() {
  static Children* c = new Children;  // never destroyed: used by the atexit handler
  if (c->owner != sys::current_pid()) {
    // Inherited through fork (ours or anyone's): the parent's list, and perhaps its locked mutex,
    // are not ours. The old storage is left behind on purpose: destroying it would act on the
    // parent's children.
    c = new Children;
  }
  return *c;
}

void forget(const std::shared_ptr<ProcessState>& state) {
  auto& c = children();
  std::lock_guard lock(c.mutex);
  std::erase(c.live, state);
}

// Reaps children whose Process was destroyed while they ran, so none stays a zombie.
void reap_detached() noexcept {
  auto& c = children();
  std::lock_guard lock(c.mutex);
  std::erase_if(c.live, [](const std::shared_ptr<ProcessState>& s) {
    if (s.use_count() > 1) return false;  // a Process still owns it
    try {
      return s->reap(true);
    } catch (...) {
      return true;  // ECHILD: someone else reaped it
    }
  });
}

// At normal exit, as Python does: terminate daemon children, join the others.
void at_exit() noexcept {
  std::vector<std::shared_ptr<ProcessState>> live;
  {
    auto& c = children();
    std::lock_guard lock(c.mutex);
    live = c.live;
  }
  for (auto& s : live) {
    try {
      if (s->daemon && !s->reap(true)) {
        sys::send_signal(s->pid(), SIGTERM, true);
        if (!s->wait_ended(std::chrono::seconds(1))) sys::send_signal(s->pid(), SIGKILL, true);
      }
      s->wait_ended(std::chrono::nanoseconds(-1));
      s->reap(false);
    } catch (...) {
    }
  }
}

std::once_flag g_at_exit_once;
std::atomic<unsigned> g_process_counter{0};

[[noreturn]] void child_main(Target& target, const std::string& name) noexcept {
  int code = 0;
  try {
    target.run();
  } catch (const std::exception& e) {
    const std::string msg = "Process " + name + ":\n" + detail::current_exception_type_name() + ": " + e.what() + "\n";
    std::fwrite(msg.data(), 1, msg.size(), stderr);
    code = 1;
  } catch (...) {
    const std::string msg = "Process " + name + ":\n" + detail::current_exception_type_name() + "\n";
    std::fwrite(msg.data(), 1, msg.size(), stderr);
    code = 1;
  }
  sys::detail_fork::child_exit(code);
}

}  // namespace

// A Process target in a spawned or forkserver child: runs the call, reports an exception the way
// child_main does, and exits.
void run_process_role(Channel& channel, Reader& boot) noexcept {
  int code = 0;
  try {
    const auto name = decode<std::string>(boot);
    channel.handle().reset();
    Writer reply;
    std::string type;
    std::string message;
    try {
      run_call(boot, reply);
      Reader r(reply.bytes());
      if (read_outcome_tag(r) != OutcomeTag::value) {
        type = decode<std::string>(r);
        message = decode<std::string>(r);
        code = 1;
      }
    } catch (const std::exception& e) {
      type = current_exception_type_name();
      message = e.what();
      code = 1;
    }
    if (code) {
      const std::string msg = "Process " + name + ":\n" + type + (message.empty() ? "" : ": " + message) + "\n";
      (void)!::write(2, msg.data(), msg.size());
    }
  } catch (...) {
    code = 2;
  }
  sys::detail_fork::child_exit(code);
}

}  // namespace detail

Process::Process(ProcessOptions options, std::unique_ptr<detail::Target> target)
    : target_(std::move(target)), options_(std::move(options)) {
  if (options_.name.empty()) options_.name = "Process-" + std::to_string(++detail::g_process_counter);
}

Process::Process(Process&&) noexcept = default;
Process& Process::operator=(Process&& other) noexcept {
  if (this != &other) {
    if (state_ && state_->status) detail::forget(state_);
    state_ = std::move(other.state_);
    target_ = std::move(other.target_);
    options_ = std::move(other.options_);
  }
  return *this;
}

Process::~Process() {
  // A child that has ended is forgotten; one still running stays on the list, to be reaped by
  // reap_detached() or joined at exit.
  if (state_ && state_->status) detail::forget(state_);
}

void Process::start() {
  if (state_) throw StateError("Process " + options_.name + ": start() called twice");
  if (!target_) throw StateError("Process " + options_.name + ": no target");
  detail::reap_detached();
  std::call_once(detail::g_at_exit_once, [] { std::atexit(detail::at_exit); });

  auto state = std::make_shared<detail::ProcessState>();
  state->daemon = options_.daemon;
  const StartMethod method = start_method();
  if (method == StartMethod::fork) {
    detail::check_fork_safety();
    detail::Target& target = *target_;
    const std::string& name = options_.name;
    const pid_t pid = detail::sys::fork_process({}, [&] { detail::child_main(target, name); });
    try {
      state->child = detail::Child(pid, detail::sys::pidfd_open(pid));
    } catch (...) {
      // start() reports failure: the child must not go on without anyone knowing of it.
      detail::sys::kill_and_reap(pid);
      throw;
    }
  } else {
    Writer boot;
    detail::begin_boot_frame(boot, detail::BootRole::process);
    encode(boot, options_.name);
    if (!target_->encode_call(boot)) {
      throw InvalidArgument("Process " + options_.name + ": under " + to_string(method) +
                            " the target must be a function pointer, a captureless lambda or an encodable functor, "
                            "with encodable arguments: a closure or a reference cannot reach a process that does not "
                            "inherit this one's memory");
    }
    auto [ours, theirs] = detail::sys::socket_pair();
    const int fds[] = {theirs.get()};
    state->child = detail::launch(method, fds);
    theirs.reset();
    detail::Channel channel(std::move(ours), std::size_t{1} << 20);
    try {
      detail::send_boot(channel, boot);
      detail::await_hello(channel, state->child, detail::kHelloTimeout);
    } catch (...) {
      state->child.signal(SIGKILL, true);
      try {
        state->child.reap(false);
      } catch (...) {
      }
      throw;
    }
  }
  {
    auto& c = detail::children();
    std::lock_guard lock(c.mutex);
    c.live.push_back(state);
  }
  state_ = std::move(state);
  // The child has its own copy of the target and its arguments now (forked, or sent): this
  // process's copy is let go at once, not at join() or destruction (a large capture would stay
  // resident for nothing).
  target_.reset();
}

namespace {
[[noreturn]] void not_started(const std::string& name, const char* what) {
  throw StateError("Process " + name + ": " + what + " before start()");
}
}  // namespace

void Process::join() {
  if (!state_) not_started(options_.name, "join()");
  state_->wait_ended(std::chrono::nanoseconds(-1));
  state_->reap(false);
}

bool Process::join_for(std::chrono::nanoseconds timeout) {
  if (!state_) not_started(options_.name, "join_for()");
  if (timeout.count() < 0) timeout = std::chrono::nanoseconds(0);
  // Beyond a century is forever (and a deadline computed from it would overflow).
  if (timeout > std::chrono::hours(24 * 365 * 100)) timeout = std::chrono::nanoseconds(-1);
  return state_->wait_ended(timeout) && state_->reap(true);
}

bool Process::is_alive() {
  if (!state_) return false;
  return !state_->reap(true);
}

pid_t Process::pid() const noexcept { return state_ ? state_->pid() : 0; }

StartMethod Process::start_method() const { return detail::resolve_start_method(options_.start_method); }

void Process::set_daemon(bool daemon) {
  if (state_) throw StateError("Process " + options_.name + ": set_daemon() after start()");
  options_.daemon = daemon;
}

void Process::send_signal(int signal) {
  if (!state_) not_started(options_.name, "send_signal()");
  std::lock_guard lock(state_->mutex);
  // Once reaped, the pid may belong to someone else: never signal it.
  if (state_->status) return;
  detail::sys::send_signal(state_->pid(), signal, true);
}

void Process::terminate() { send_signal(SIGTERM); }
void Process::kill() { send_signal(SIGKILL); }

ExitStatus Process::exit_status() const {
  if (!state_) not_started(options_.name, "exit_status()");
  if (!state_->reap(true)) throw StateError("Process " + options_.name + ": exit_status() while it is running");
  return *state_->status;
}

std::optional<int> Process::exitcode() {
  if (!state_ || !state_->reap(true)) return std::nullopt;
  return state_->status->python_exitcode();
}

int Process::sentinel() const {
  if (!state_) not_started(options_.name, "sentinel()");
  std::lock_guard lock(state_->mutex);
  return state_->child.watch_fd();
}

}  // namespace multiproc

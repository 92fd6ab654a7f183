// Start methods: the spawn launcher, the fork server, the boot handshake, and init().
//
// The fork server is one per process, started on first use by spawning this program with the role
// "forkserver". It talks to its parent over a SOCK_SEQPACKET socket: each request is one message
// carrying the new child's descriptors; each reply is the child's pid (or an errno) carrying the
// read end of a pipe on which the server will write the child's wait status once it has reaped it,
// and a pidfd when the kernel gives one. The server forks from its single thread, so its children
// never inherit a lock held by another thread. It exits when its parent goes away (EOF on the
// socket), and its children die with it (PR_SET_PDEATHSIG), so nothing outlives the program.
#include "launch.hpp"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>
#if __has_include(<sys/single_threaded.h>)
#include <sys/single_threaded.h>
#define MULTIPROC_HAS_SINGLE_THREADED 1
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "multiproc/error.hpp"

extern char** environ;

namespace multiproc {

namespace detail {
namespace {

constexpr const char* kBootVariable = "MULTIPROC_BOOT";
constexpr std::uint32_t kServerRequest = 0x4B52464D;  // "MFRK"
// A request to the fork server: the op, and which of the parent's standard streams (bit 1 << fd)
// travel after the child's own descriptors.
struct ServerRequest {
  std::uint32_t op;
  std::uint32_t streams;
};
constexpr std::uint32_t kBothStreams = (1u << STDOUT_FILENO) | (1u << STDERR_FILENO);

// ---- settings -----------------------------------------------------------------------------------

struct Settings {
  std::mutex mutex;
  StartMethod method = StartMethod::fork;
  bool explicit_fork = false;
  std::string executable;  // empty: /proc/self/exe
};

std::optional<StartMethod> parse_method(const char* s) {
  if (!s) return std::nullopt;
  const std::string_view v(s);
  if (v == "fork") return StartMethod::fork;
  if (v == "forkserver") return StartMethod::forkserver;
  if (v == "spawn") return StartMethod::spawn;
  return std::nullopt;
}

Settings& settings() {
  static Settings* s = [] {
    auto* s = new Settings;
    if (const char* env = std::getenv("MULTIPROC_START_METHOD")) {
      if (auto m = parse_method(env)) {
        s->method = *m;
        s->explicit_fork = *m == StartMethod::fork;
      } else {
        std::fprintf(stderr, "multiproc: MULTIPROC_START_METHOD=%s is not fork, forkserver or spawn; using fork\n",
                     env);
      }
    }
    return s;
  }();
  return *s;
}

// A spawned or forkserver child says how it was started (get_start_method()), and starts its own
// children the same way by default.
void started_by(StartMethod method) {
  auto& s = settings();
  std::lock_guard lock(s.mutex);
  s.method = method;
  s.explicit_fork = false;
}

std::string executable_path() {
  auto& s = settings();
  std::lock_guard lock(s.mutex);
  return s.executable.empty() ? std::string("/proc/self/exe") : s.executable;
}

// ---- threads ------------------------------------------------------------------------------------

std::atomic<int> g_library_threads{0};
std::atomic<bool> g_warned{false};

// ---- exec -------------------------------------------------------------------------------------

// Everything execve needs, built before fork (the child may only make async-signal-safe calls).
struct ExecImage {
  std::string path;
  std::vector<std::string> strings;
  std::vector<char*> argv;
  std::vector<char*> envp;

  ExecImage(std::string program, const std::string& boot) : path(std::move(program)) {
    strings.push_back(program_invocation_name ? program_invocation_name : path);
    strings.push_back(std::string(kBootVariable) + "=" + boot);
    const std::size_t prefix = std::strlen(kBootVariable) + 1;
    for (char** e = environ; e && *e; ++e) {
      if (std::strncmp(*e, kBootVariable, prefix - 1) == 0 && (*e)[prefix - 1] == '=') continue;
      strings.emplace_back(*e);
    }
    argv = {strings[0].data(), nullptr};
    for (std::size_t i = 1; i < strings.size(); ++i) envp.push_back(strings[i].data());
    envp.push_back(nullptr);
  }
};

// "<role>:<parent pid>:<fd>,<fd>,..."
std::string boot_value(const char* role, std::span<const int> fds) {
  std::string v = std::string(role) + ":" + std::to_string(sys::current_pid()) + ":";
  for (std::size_t i = 0; i < fds.size(); ++i) {
    if (i) v += ",";
    v += std::to_string(fds[i]);
  }
  return v;
}

// In a process that was itself spawned but whose main() did not call init() first, starting more
// children would run main() again in each of them, without end.
void refuse_if_booting() {
  if (std::getenv(kBootVariable)) {
    static constexpr char msg[] =
        "multiproc: this process was started by spawn or forkserver, but its main() did not call "
        "multiproc::init() first; it will not start children of its own\n";
    (void)!::write(2, msg, sizeof msg - 1);
    ::_exit(70);
  }
}

Child exec_child(const char* role, std::span<const int> fds, bool die_with_parent) {
  refuse_if_booting();
  ExecImage image(executable_path(), boot_value(role, fds));
  sys::ForkOptions fo;
  fo.keep_fds = fds;
  fo.die_with_parent = die_with_parent;
  fo.clear_signal_mask = true;
  const pid_t pid =
      sys::fork_process(fo, [&] { sys::exec_in_child(image.path.c_str(), image.argv.data(), image.envp.data(), fds); });
  try {
    return Child(pid, sys::pidfd_open(pid));
  } catch (...) {
    sys::kill_and_reap(pid);
    throw;
  }
}

// ---- the fork server: client side -------------------------------------------------------------

struct ServerReply {
  std::int32_t pid_or_errno;
};

class ForkServerClient {
 public:
  void ensure_running() {
    std::lock_guard lock(mutex_);
    adopt();
    if (!control_.valid()) start();
  }

  pid_t pid() noexcept {
    std::lock_guard lock(mutex_);
    return owner_ == sys::current_pid() && server_ ? server_->pid() : 0;
  }

  Child launch(std::span<const int> fds) {
    std::lock_guard lock(mutex_);
    adopt();
    for (int attempt = 0;; ++attempt) {
      if (!control_.valid()) start();
      try {
        return request(fds);
      } catch (const StartError&) {
        // The server is gone (killed, or out of resources): start a new one, once.
        stop();
        if (attempt > 0) throw;
      }
    }
  }

 private:
  void adopt() {
    if (owner_ == sys::current_pid()) {
      // set_executable() since the server started: the next one runs the new program.
      if (control_.valid() && executable_ != executable_path()) stop();
      return;
    }
    // Inherited through fork: the server belongs to the parent. Start our own when needed.
    (void)server_.release();
    (void)control_.release();
    server_ = nullptr;
    owner_ = sys::current_pid();
  }

  void start() {
    refuse_if_booting();
    auto [ours, theirs] = sys::seqpacket_pair();
    const int keep[] = {theirs.get()};
    // Not tied to the starting thread's life (a pool's supervisor may start it): it ends when
    // this process does, through EOF on the control socket.
    executable_ = executable_path();
    server_ = std::make_unique<Child>(exec_child("forkserver", keep, false));
    control_ = std::move(ours);
  }

  void stop() noexcept {
    control_.reset();
    if (server_) {
      server_->signal(SIGKILL, true);
      try {
        server_->reap(false);
      } catch (...) {
      }
      server_.reset();
    }
  }

  Child request(std::span<const int> fds) {
    // The child writes to this process's stdout and stderr as they are now, not the server's;
    // where this process closed one, the child has it closed too.
    ServerRequest req{kServerRequest, 0};
    std::vector<int> all(fds.begin(), fds.end());
    for (int stream : {STDOUT_FILENO, STDERR_FILENO}) {
      if (::fcntl(stream, F_GETFD) == -1) continue;
      req.streams |= 1u << stream;
      all.push_back(stream);
    }
    try {
      sys::send_message(control_.get(), std::as_bytes(std::span(&req, 1)), all);
    } catch (const SystemError& e) {
      // Gone before it read the request (killed, or it never became a server: a program whose
      // main() runs before multiproc::init() exits at once).
      throw StartError(std::string("the fork server is gone (") + e.what() +
                       "): does the program's main() call multiproc::init() first?");
    }
    ServerReply reply{};
    std::vector<sys::UniqueFd> got;
    const std::size_t n = sys::recv_message(control_.get(), std::as_writable_bytes(std::span(&reply, 1)), got);
    if (n == 0) {
      throw StartError(
          "the fork server ended without answering: does the program's main() call multiproc::init() first?");
    }
    if (n != sizeof reply) throw ProtocolError("the fork server sent a malformed reply");
    if (reply.pid_or_errno < 0) throw SystemError(-reply.pid_or_errno, "fork (in the fork server)");
    if (got.empty()) throw ProtocolError("the fork server's reply carried no status pipe");
    sys::UniqueFd pidfd = got.size() > 1 ? std::move(got[1]) : sys::UniqueFd();
    return Child::from_server(reply.pid_or_errno, std::move(got[0]), std::move(pidfd));
  }

  std::mutex mutex_;
  pid_t owner_ = sys::current_pid();
  std::unique_ptr<Child> server_;
  sys::UniqueFd control_;
  std::string executable_;
};

ForkServerClient& fork_server() {
  static auto* c = new ForkServerClient;  // never destroyed: the server ends with the process
  return *c;
}

// ---- the child's side of the boot ----------------------------------------------------------------

[[noreturn]] void boot_child(std::vector<sys::UniqueFd> fds) noexcept;

[[noreturn]] void run_fork_server(sys::UniqueFd control) noexcept {
  try {
    sys::UniqueFd sigchld = sys::child_signal_fd();
    std::unordered_map<pid_t, sys::UniqueFd> status_pipes;
    for (;;) {
      pollfd p[2] = {{control.get(), POLLIN, 0}, {sigchld.get(), POLLIN, 0}};
      sys::poll_fds(p, 2, std::chrono::milliseconds(-1));
      if (p[1].revents) {
        sys::drain_signal_fd(sigchld.get());
        while (auto info = sys::reap_any_child()) {
          auto it = status_pipes.find(info->si_pid);
          if (it == status_pipes.end()) continue;
          const std::int32_t st[2] = {info->si_code, info->si_status};
          (void)!::write(it->second.get(), st, sizeof st);
          status_pipes.erase(it);
        }
      }
      if (!p[0].revents) continue;
      ServerRequest req{};
      std::vector<sys::UniqueFd> got;
      const std::size_t n = sys::recv_message(control.get(), std::as_writable_bytes(std::span(&req, 1)), got);
      if (n == 0) break;  // the parent is gone
      const std::size_t streams = static_cast<std::size_t>(std::popcount(req.streams));
      if (n != sizeof req || req.op != kServerRequest || (req.streams & ~kBothStreams) != 0 ||
          got.size() < streams + 1) {
        continue;
      }
      // The last ones are the parent's stdout and stderr, those it has open.
      const std::size_t boot_fds = got.size() - streams;
      int out = -1;
      int err = -1;
      {
        std::size_t at = boot_fds;
        if (req.streams & (1u << STDOUT_FILENO)) out = got[at++].get();
        if (req.streams & (1u << STDERR_FILENO)) err = got[at++].get();
      }
      std::vector<int> keep;
      for (auto& fd : got) keep.push_back(fd.get());
      ServerReply reply{};
      try {
        auto [status_read, status_write] = sys::private_pipe();
        sys::ForkOptions fo;
        fo.keep_fds = keep;
        fo.clear_signal_mask = true;
        const pid_t pid = sys::fork_process(fo, [&] {
          for (auto [from, to] : {std::pair{out, STDOUT_FILENO}, std::pair{err, STDERR_FILENO}}) {
            if (from >= 0) {
              ::dup2(from, to);
              ::close(from);
            } else {
              ::close(to);
            }
          }
          std::vector<sys::UniqueFd> mine;
          for (std::size_t i = 0; i < boot_fds; ++i) mine.emplace_back(keep[i]);
          started_by(StartMethod::forkserver);
          boot_child(std::move(mine));
        });
        reply.pid_or_errno = pid;
        sys::UniqueFd pidfd = sys::pidfd_open(pid);
        status_pipes.emplace(pid, std::move(status_write));
        std::vector<int> send = {status_read.get()};
        if (pidfd) send.push_back(pidfd.get());
        sys::send_message(control.get(), std::as_bytes(std::span(&reply, 1)), send);
      } catch (const SystemError& e) {
        reply.pid_or_errno = -e.code().value();
        try {
          sys::send_message(control.get(), std::as_bytes(std::span(&reply, 1)), {});
        } catch (...) {
          break;
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "multiproc: fork server: %s\n", e.what());
    sys::detail_fork::child_exit(1);
  }
  sys::detail_fork::child_exit(0);
}

std::string describe_build(const std::string& id) { return id.empty() ? std::string("(none)") : id; }

[[noreturn]] void boot_child(std::vector<sys::UniqueFd> fds) noexcept {
  try {
    Channel channel(std::move(fds.at(0)), kBootPayloadLimit);
    FrameHeader h{};
    Writer payload;
    if (!channel.recv(h, payload) || h.tag != static_cast<std::uint16_t>(FrameTag::boot)) {
      sys::detail_fork::child_exit(2);
    }
    Reader boot(payload.bytes());
    const auto parent_build = decode<std::string>(boot);
    const auto role = boot.read_value<std::uint8_t>();
    const auto cwd = decode<std::string>(boot);
    auto env = decode<std::vector<std::string>>(boot);

    std::string refusal;
    bool mismatch = false;
    if (parent_build != sys::build_id()) {
      mismatch = true;
      refusal = "the worker executable " + get_executable() + " is build " + describe_build(sys::build_id()) +
                ", the parent is build " + describe_build(parent_build) + ": refusing to run tasks of another build";
    } else {
      try {
        sys::change_directory(cwd);
      } catch (const std::exception& e) {
        refusal = "cannot enter the parent's working directory " + cwd + ": " + e.what();
      }
      ::clearenv();
      // putenv keeps the pointers: the strings live, reachable, until the process ends.
      static auto* kept = new std::vector<std::string>(std::move(env));
      for (auto& var : *kept) ::putenv(var.data());
    }
    Writer hello;
    Channel::begin_frame(hello);
    encode(hello, sys::build_id());
    hello.write_value(static_cast<std::int32_t>(sys::current_pid()));
    hello.write_value(static_cast<std::uint8_t>(refusal.empty() ? 0 : (mismatch ? 2 : 1)));
    encode(hello, refusal);
    channel.send(FrameTag::hello, 0, hello);
    if (!refusal.empty()) sys::detail_fork::child_exit(3);

    switch (static_cast<BootRole>(role)) {
      case BootRole::pool_worker:
        run_pool_worker_role(channel, boot, fds);
      case BootRole::process:
        run_process_role(channel, boot);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "multiproc: a child could not boot: %s\n", e.what());
  }
  sys::detail_fork::child_exit(2);
}

}  // namespace

// ---- Child --------------------------------------------------------------------------------------

Child Child::from_server(pid_t pid, sys::UniqueFd status, sys::UniqueFd pidfd) noexcept {
  Child c(pid, std::move(pidfd));
  c.status_ = std::move(status);
  c.via_server_ = true;
  return c;
}

std::optional<ExitStatus> Child::reap(bool nohang) {
  if (ended_) return ended_;
  if (!via_server_) {
    auto info = sys::wait_child(pid_, pidfd_.get(), nohang);
    if (!info) return std::nullopt;
    // The pidfd stays open (and readable) until the Child goes: a saved sentinel never names
    // another file.
    ended_ = ExitStatus::from_siginfo(info->si_code, info->si_status);
    return ended_;
  }
  if (nohang && !sys::wait_readable(status_.get(), std::chrono::milliseconds(0))) return std::nullopt;
  std::int32_t st[2];
  std::span<std::byte> bytes = std::as_writable_bytes(std::span(st));
  bool got = false;
  try {
    got = sys::read_fd_some(status_.get(), bytes) == bytes.size();
  } catch (const SystemError&) {
  }
  // No status: the server died before reaping; its children die with it (PR_SET_PDEATHSIG).
  // The status pipe stays open (at end of file: readable) until the Child goes, as the pidfd does.
  ended_ = got ? ExitStatus::from_siginfo(st[0], st[1]) : ExitStatus::from_siginfo(CLD_KILLED, SIGKILL);
  return ended_;
}

void Child::signal(int sig, bool group) noexcept {
  if (pid_ <= 0 || ended_) return;
  try {
    sys::send_signal(pid_, sig, group);
  } catch (...) {
  }
}

pid_t fork_server_pid() noexcept { return fork_server().pid(); }

// ---- launching -----------------------------------------------------------------------------------

StartMethod resolve_start_method(const std::optional<StartMethod>& chosen) {
  return chosen ? *chosen : get_start_method();
}

Child launch(StartMethod method, std::span<const int> fds) {
  switch (method) {
    case StartMethod::spawn:
      return exec_child("child", fds, true);
    case StartMethod::forkserver:
      // The server forks, not this process: flush here, as fork_process does before it forks.
      sys::flush_output();
      return fork_server().launch(fds);
    case StartMethod::fork:
      break;
  }
  throw InvalidArgument("launch: fork children are made by fork_process");
}

void begin_boot_frame(Writer& frame, BootRole role) {
  Channel::begin_frame(frame);
  encode(frame, sys::build_id());
  frame.write_value(static_cast<std::uint8_t>(role));
  encode(frame, sys::current_directory());
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) env.emplace_back(*e);
  encode(frame, env);
}

void send_boot(Channel& channel, Writer& boot) {
  const std::size_t bound = channel.max_payload();
  channel.set_max_payload(kBootPayloadLimit);
  try {
    channel.send(FrameTag::boot, 0, boot);
  } catch (const SystemError&) {
    // It died before reading: await_hello() says how.
  }
  channel.set_max_payload(bound);
}

void await_hello(Channel& channel, Child& child, std::chrono::milliseconds timeout) {
  const std::string who = "child " + std::to_string(child.pid());
  if (!channel.has_buffered_frame() && !sys::wait_readable(channel.fd(), timeout)) {
    throw StartError(who + " did not answer its start handshake within " + std::to_string(timeout.count()) +
                     " ms: does the program's main() call multiproc::init() first?");
  }
  FrameHeader h{};
  Writer payload;
  bool got = false;
  const std::size_t bound = channel.max_payload();
  channel.set_max_payload(kBootPayloadLimit);
  try {
    got = channel.recv(h, payload);
  } catch (const ProtocolError&) {
  }
  channel.set_max_payload(bound);
  if (!got || h.tag != static_cast<std::uint16_t>(FrameTag::hello)) {
    std::string how;
    if (auto st = child.reap(false)) how = " (" + st->to_string() + ")";
    throw StartError(who + " ended before its start handshake" + how +
                     ": does the program's main() call multiproc::init() first?");
  }
  Reader r(payload.bytes());
  (void)decode<std::string>(r);
  (void)r.read_value<std::int32_t>();
  const auto verdict = r.read_value<std::uint8_t>();
  const auto message = decode<std::string>(r);
  if (verdict == 2) throw BuildMismatch(message);
  if (verdict != 0) throw StartError(who + " refused to start: " + message);
}

void check_fork_safety() noexcept {
  if (g_warned.load(std::memory_order_relaxed)) return;
#if MULTIPROC_HAS_SINGLE_THREADED
  // glibc clears this when the process first creates a thread: while it is set there is no other
  // thread to warn about, and counting them (a stat of /proc) is skipped.
  if (__libc_single_threaded) return;
#endif
  {
    auto& s = settings();
    std::lock_guard lock(s.mutex);
    if (s.explicit_fork) return;
  }
  const int others = sys::thread_count() - 1 - g_library_threads.load(std::memory_order_relaxed);
  if (others <= 0 || g_warned.exchange(true)) return;
  std::fprintf(stderr,
               "multiproc: warning: fork() while %d other thread%s of this program run%s: a lock one of them holds "
               "stays locked forever in the child. Use StartMethod::forkserver or spawn (PoolOptions/"
               "ProcessOptions::start_method, or set_start_method), or call "
               "multiproc::set_start_method(StartMethod::fork) to say fork is intended.\n",
               others, others == 1 ? "" : "s", others == 1 ? "s" : "");
}

void library_thread_started() noexcept { g_library_threads.fetch_add(1, std::memory_order_relaxed); }
void library_thread_ended() noexcept { g_library_threads.fetch_sub(1, std::memory_order_relaxed); }

}  // namespace detail

// ---- the public part ------------------------------------------------------------------------------

const char* to_string(StartMethod method) noexcept {
  switch (method) {
    case StartMethod::fork:
      return "fork";
    case StartMethod::forkserver:
      return "forkserver";
    case StartMethod::spawn:
      return "spawn";
  }
  return "unknown";
}

void set_start_method(StartMethod method) {
  auto& s = detail::settings();
  std::lock_guard lock(s.mutex);
  s.method = method;
  s.explicit_fork = method == StartMethod::fork;
}

StartMethod get_start_method() {
  auto& s = detail::settings();
  std::lock_guard lock(s.mutex);
  return s.method;
}

void set_executable(std::string path) {
  auto& s = detail::settings();
  std::lock_guard lock(s.mutex);
  s.executable = std::move(path);
}

std::string get_executable() { return detail::executable_path(); }

void start_fork_server() { detail::fork_server().ensure_running(); }

void init() {
  const char* boot = std::getenv(detail::kBootVariable);
  if (!boot) return;
  // "<role>:<parent pid>:<fd>,<fd>,..."
  const std::string value(boot);
  ::unsetenv(detail::kBootVariable);
  const auto c1 = value.find(':');
  const auto c2 = c1 == std::string::npos ? c1 : value.find(':', c1 + 1);
  if (c2 == std::string::npos) {
    std::fprintf(stderr, "multiproc: malformed %s\n", detail::kBootVariable);
    ::_exit(2);
  }
  const std::string role = value.substr(0, c1);
  const pid_t parent = static_cast<pid_t>(std::atol(value.c_str() + c1 + 1));
  std::vector<detail::sys::UniqueFd> fds;
  for (std::size_t at = c2 + 1; at < value.size();) {
    const auto comma = value.find(',', at);
    const std::string item = value.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    fds.emplace_back(std::atoi(item.c_str()));
    at = comma == std::string::npos ? value.size() : comma + 1;
  }
  // PR_SET_PDEATHSIG survives exec; a parent that died before it was set is caught here.
  if (::getppid() != parent) ::_exit(2);
  if (fds.empty()) ::_exit(2);
  if (role == "forkserver") detail::run_fork_server(std::move(fds[0]));
  if (role == "child") {
    // As a forked child does: a crash is the signal itself, not a report of the runtime's
    // handlers (a sanitizer's, say), so that it reads the same under every start method.
    detail::sys::reset_caught_signal_handlers();
    detail::started_by(StartMethod::spawn);
    detail::boot_child(std::move(fds));
  }
  std::fprintf(stderr, "multiproc: unknown role '%s' in %s\n", role.c_str(), detail::kBootVariable);
  ::_exit(2);
}

}  // namespace multiproc

// Connection: framed messages over pipes.
//
// Why pipes and not a socketpair: an end must reach a Pool worker as an argument, and the only way
// to give another process a descriptor without a channel that carries descriptors (SCM_RIGHTS) or
// ptrace rights over the sender (pidfd_getfd, refused under Yama) is to open /proc/<pid>/fd/<fd>,
// which Linux refuses for sockets (ENXIO) and allows for pipes. A duplex connection is two pipes.
// The cost is SIGPIPE, which write(2) raises where send(2) would take MSG_NOSIGNAL; the platform
// layer blocks and consumes it (sys::write_all_pipe).
//
// Why no read-ahead: a buffer of bytes read past the current message would live in one process's
// memory. A forked child inherits a copy of it (and would receive the same messages as its
// parent), and a handle passed to another process would not carry it. So the header and the
// payload are read exactly, as Python does: two reads per message.
//
// Why recv() spins a little before it sleeps: a process that sleeps in read(2) is woken through
// the scheduler, and on another CPU that is idle (worse, a virtual CPU that has halted) the wake-up
// costs tens of microseconds, twice per round trip. Polling for up to 10 us first lets a peer that
// answers quickly find us awake (on a 2-vCPU VM: 1.5 us instead of 50 us per round trip); a slow
// peer costs 10 us of CPU per message, which is nothing beside its slowness.
#include <poll.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "multiproc/pipe.hpp"
#include "platform.hpp"

namespace multiproc::detail {

namespace {

struct MessageHeader {
  std::uint32_t magic;
  std::uint32_t reserved;
  std::uint64_t length;
};
static_assert(sizeof(MessageHeader) == 16);
constexpr std::uint32_t kMessageMagic = 0x3143504D;  // "MPC1"
constexpr std::uint64_t kMaxMessage = std::uint64_t{1} << 36;
// A payload is received in chunks no larger than what has arrived so far (and at least this), so
// a corrupt length field costs at most twice the bytes really sent, never the length it claims.
constexpr std::size_t kMinChunk = std::size_t{64} << 10;
constexpr auto kSpin = std::chrono::microseconds(10);

// Returns when `fd` is readable or kSpin has passed, without sleeping.
void spin_until_readable(int fd) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  pollfd p{fd, POLLIN, 0};
  do {
    if (sys::poll_fds(&p, 1, std::chrono::milliseconds(0)) > 0) return;
    // The peer may be waiting for this very CPU: let it run.
    std::this_thread::yield();
  } while (std::chrono::steady_clock::now() < until);
}

// Reads exactly `data.size()` bytes. False on EOF before the first byte; EOFError on EOF inside.
bool read_exact(int fd, std::span<std::byte> data) {
  std::size_t got = 0;
  while (got < data.size()) {
    const std::size_t n = sys::read_fd_some(fd, data.subspan(got));
    if (n == 0) {
      if (got == 0) return false;
      throw EOFError("Connection::recv: the other end closed in the middle of a message");
    }
    got += n;
  }
  return true;
}

}  // namespace

class ConnectionCore {
 public:
  ConnectionCore(sys::UniqueFd read_end, sys::UniqueFd write_end, bool readable, bool writable)
      : read_fd(std::move(read_end)), write_fd(std::move(write_end)), readable(readable), writable(writable) {}

  sys::UniqueFd read_fd;
  sys::UniqueFd write_fd;
  const bool readable;
  const bool writable;
  bool write_broken = false;  // decoded after every reader of the other side was gone
  std::atomic<bool> closed{false};
  std::mutex send_mutex;
  std::mutex recv_mutex;
};

namespace {
ConnectionCore& open_core(ConnectionCore* c, const char* what) {
  if (!c || c->closed.load()) throw StateError(std::string("Connection::") + what + ": the connection is closed");
  return *c;
}
}  // namespace

std::pair<std::shared_ptr<ConnectionCore>, std::shared_ptr<ConnectionCore>> make_pipe(bool duplex) {
  auto [r1, w1] = sys::pipe_pair();  // second end -> first end
  if (!duplex) {
    return {std::make_shared<ConnectionCore>(std::move(r1), sys::UniqueFd(), true, false),
            std::make_shared<ConnectionCore>(sys::UniqueFd(), std::move(w1), false, true)};
  }
  auto [r2, w2] = sys::pipe_pair();  // first end -> second end
  return {std::make_shared<ConnectionCore>(std::move(r1), std::move(w2), true, true),
          std::make_shared<ConnectionCore>(std::move(r2), std::move(w1), true, true)};
}

void connection_begin_message(Writer& w) {
  w.clear();
  w.grow(sizeof(MessageHeader));
}

void connection_send(ConnectionCore* core, Writer& message) {
  ConnectionCore& c = open_core(core, "send");
  if (!c.writable) throw StateError("Connection::send: this end only receives");
  const std::uint64_t length = message.size() - sizeof(MessageHeader);
  if (length > kMaxMessage) {
    throw InvalidArgument("Connection::send: a message of " + std::to_string(length) + " bytes exceeds the limit of " +
                          std::to_string(kMaxMessage));
  }
  const MessageHeader h{kMessageMagic, 0, length};
  std::memcpy(message.data(), &h, sizeof h);
  std::lock_guard lock(c.send_mutex);
  if (c.write_broken) throw SystemError(EPIPE, "write");
  sys::write_all_pipe(c.write_fd.get(), message.bytes());
}

void connection_recv(ConnectionCore* core, Writer& out) {
  ConnectionCore& c = open_core(core, "recv");
  if (!c.readable) throw StateError("Connection::recv: this end only sends");
  std::lock_guard lock(c.recv_mutex);
  spin_until_readable(c.read_fd.get());
  MessageHeader h;
  if (!read_exact(c.read_fd.get(), {reinterpret_cast<std::byte*>(&h), sizeof h})) {
    throw EOFError("Connection::recv: the other end is closed");
  }
  if (h.magic != kMessageMagic) throw ProtocolError("Connection::recv: corrupt message header");
  if (h.length > kMaxMessage) {
    throw ProtocolError("Connection::recv: a message of " + std::to_string(h.length) + " bytes exceeds the limit");
  }
  out.clear();
  const auto length = static_cast<std::size_t>(h.length);
  while (out.size() < length) {
    const std::size_t chunk = std::min(length - out.size(), std::max(kMinChunk, out.size()));
    std::byte* at = out.grow(chunk);
    if (!read_exact(c.read_fd.get(), {at, chunk})) {
      throw EOFError("Connection::recv: the other end closed in the middle of a message");
    }
  }
}

bool connection_poll(ConnectionCore* core, std::chrono::nanoseconds timeout) {
  ConnectionCore& c = open_core(core, "poll");
  if (!c.readable) throw StateError("Connection::poll: this end only sends");
  // A negative timeout is zero (the library's one rule, as Python's poll): look once, do not wait.
  timeout = std::max(timeout, std::chrono::nanoseconds::zero());
  return sys::wait_readable(c.read_fd.get(), std::chrono::ceil<std::chrono::milliseconds>(timeout));
}

void connection_close(ConnectionCore* c) noexcept {
  if (!c || c->closed.exchange(true)) return;
  c->read_fd.reset();
  c->write_fd.reset();
}

bool connection_closed(const ConnectionCore* c) noexcept { return !c || c->closed.load(); }
bool connection_readable(const ConnectionCore* c) noexcept { return c && c->readable; }
bool connection_writable(const ConnectionCore* c) noexcept { return c && c->writable; }

int connection_fileno(const ConnectionCore* core) {
  const ConnectionCore& c = open_core(const_cast<ConnectionCore*>(core), "fileno");
  return c.readable ? c.read_fd.get() : c.write_fd.get();
}

// The handle: which directions, the encoding process's pid and its two descriptors (-1 for a
// direction the end does not have).
void connection_encode(const ConnectionCore* core, Writer& w) {
  const ConnectionCore& c = open_core(const_cast<ConnectionCore*>(core), "encode");
  w.write_value(static_cast<std::uint8_t>((c.readable ? 1 : 0) | (c.writable ? 2 : 0)));
  w.write_value(static_cast<std::int32_t>(sys::current_pid()));
  w.write_value(static_cast<std::int32_t>(c.readable ? c.read_fd.get() : -1));
  w.write_value(static_cast<std::int32_t>(c.writable && !c.write_broken ? c.write_fd.get() : -1));
}

std::shared_ptr<ConnectionCore> connection_decode(Reader& r) {
  const auto flags = r.read_value<std::uint8_t>();
  const auto pid = r.read_value<std::int32_t>();
  const auto rfd = r.read_value<std::int32_t>();
  const auto wfd = r.read_value<std::int32_t>();
  const bool readable = (flags & 1) != 0;
  const bool writable = (flags & 2) != 0;
  if (flags == 0 || flags > 3 || pid <= 0 || (readable && rfd < 0) || (!readable && rfd != -1) ||
      (!writable && wfd != -1) || wfd < -1) {
    throw SerializationError("corrupt connection handle");
  }
  const bool own = pid == sys::current_pid();
  sys::UniqueFd read_end;
  sys::UniqueFd write_end;
  bool broken = writable && wfd < 0;
  if (readable) read_end = own ? sys::dup_inheritable(rfd) : sys::open_process_pipe(pid, rfd, false);
  if (writable && !broken) {
    try {
      write_end = own ? sys::dup_inheritable(wfd) : sys::open_process_pipe(pid, wfd, true);
    } catch (const SystemError& e) {
      // Every reader of the other side is gone: the end exists, and its sends fail with EPIPE.
      if (e.code().value() != ENXIO) throw;
      broken = true;
    }
  }
  auto core = std::make_shared<ConnectionCore>(std::move(read_end), std::move(write_end), readable, writable);
  core->write_broken = broken;
  return core;
}

Writer& connection_send_buffer() noexcept {
  thread_local Writer w;
  return w;
}
Writer& connection_recv_buffer() noexcept {
  thread_local Writer w;
  return w;
}

}  // namespace multiproc::detail

namespace multiproc {

std::vector<std::size_t> wait(std::span<const Waitable> objects, std::optional<std::chrono::nanoseconds> timeout) {
  using Clock = std::chrono::steady_clock;
  std::optional<Clock::time_point> deadline;
  if (timeout) {
    // A negative timeout is zero: look once, do not wait.
    const auto t = std::max(*timeout, std::chrono::nanoseconds::zero());
    if (t < std::chrono::hours(24 * 365 * 100)) deadline = Clock::now() + t;
  }
  std::vector<pollfd> fds;
  std::vector<std::size_t> fd_owner;
  std::vector<std::size_t> unwatchable;  // processes without a pidfd: asked in turns
  for (std::size_t i = 0; i < objects.size(); ++i) {
    const Waitable& o = objects[i];
    int fd = o.fd_;
    if (o.connection_) {
      if (detail::connection_closed(o.connection_)) throw StateError("multiproc::wait: a connection is closed");
      if (!detail::connection_readable(o.connection_)) throw StateError("multiproc::wait: a connection only sends");
      fd = detail::connection_fileno(o.connection_);
    } else if (o.process_) {
      if (o.process_->pid() == 0) throw StateError("multiproc::wait: a process was never started");
      fd = o.process_->sentinel();
      if (fd < 0) {
        unwatchable.push_back(i);
        continue;
      }
    } else if (fd < 0) {
      throw InvalidArgument("multiproc::wait: a negative descriptor");
    }
    fds.push_back({fd, POLLIN, 0});
    fd_owner.push_back(i);
  }
  if (objects.empty() && !deadline) throw InvalidArgument("multiproc::wait: nothing to wait for, without a timeout");
  std::vector<std::size_t> ready;
  for (;;) {
    for (std::size_t i : unwatchable) {
      if (!objects[i].process_->is_alive()) ready.push_back(i);
    }
    std::chrono::milliseconds ms(-1);
    if (!ready.empty()) {
      ms = std::chrono::milliseconds(0);
    } else {
      if (deadline) {
        ms = std::chrono::ceil<std::chrono::milliseconds>(std::max(Clock::duration::zero(), *deadline - Clock::now()));
      }
      // Processes without a pidfd are asked again every 10 ms.
      if (!unwatchable.empty() && (ms.count() < 0 || ms > std::chrono::milliseconds(10))) {
        ms = std::chrono::milliseconds(10);
      }
    }
    for (auto& p : fds) p.revents = 0;
    if (!fds.empty() || ms.count() >= 0) {
      if (fds.empty()) {
        std::this_thread::sleep_for(ms);
      } else {
        detail::sys::poll_fds(fds.data(), fds.size(), ms);
      }
    }
    for (std::size_t k = 0; k < fds.size(); ++k) {
      if (fds[k].revents != 0) ready.push_back(fd_owner[k]);
    }
    if (!ready.empty()) {
      std::sort(ready.begin(), ready.end());
      return ready;
    }
    if (deadline && Clock::now() >= *deadline) return ready;
  }
}

}  // namespace multiproc

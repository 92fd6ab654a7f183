// multiproc/pipe.hpp — Pipe<T>() and Connection<T>: Python's multiprocessing.Pipe, typed; and
// multiproc::wait(), which waits on several connections and processes at once.
//
//     multiproc::Connection<std::string> parent_end, child_end;
//     std::tie(parent_end, child_end) = multiproc::Pipe<std::string>();  // duplex by default
//     multiproc::Process child{[&] {
//       parent_end.close();                                // the child's copy of the other end
//       child_end.send("hello from " + std::to_string(getpid()));
//       std::string reply = child_end.recv();
//     }};
//     child.start();
//     child_end.close();                                   // the parent's copy (see "EOF" below)
//     std::string hello = parent_end.recv();
//     parent_end.send("hello back");
//     if (parent_end.poll(std::chrono::seconds(1))) { ... }   // a message (or EOF) is there
//
//     // Which of these is ready? Indexes into the list, in its order:
//     std::vector<std::size_t> ready = multiproc::wait({conn_a, conn_b, child}, std::chrono::seconds(5));
//
// Pipe<T>(false) is one-way: the first end only receives, the second only sends.
//
// Messages are anything the codec encodes, framed (a magic number and a length, checked on
// receipt), of any size: a large one is written while the peer reads it, so nothing waits for the
// two sides to agree on timing beyond that.
//
// EOF. recv() throws multiproc::EOFError once every holder of the other end has closed it or
// ended (whatever way: a process killed by SIGKILL closes its ends too) and no message is left,
// or when the last message was cut off by its sender's death. As in Python, a forked child
// inherits both ends: each process should close() the end it does not use, or it keeps the other
// side from ever seeing EOF. send() to an end nobody reads any more throws SystemError(EPIPE) (the
// SIGPIPE the kernel raises for it is intercepted; it never kills the process).
//
// Handles. A Connection is a handle: copies in one process share the end (close() closes it for
// all of them). A forked child inherits it; passed as an argument to a Pool task (or sent through
// a Queue or another Connection) it arrives as a new descriptor of the same end, opened through
// /proc/<pid>/fd of the process that sent it, which must hold its own handle until the receiver
// has decoded it. The ends are pipes, not sockets, for exactly that reason: Linux cannot open a
// socket through /proc (ENXIO).
//
// Like Python's, a Connection carries one conversation: two processes sending on the same end at
// once can interleave their messages (those up to 4 KiB, header included, cannot: a pipe writes
// them atomically), and two receiving on the same end can take each other's halves. Use a Queue
// for many producers or consumers. Within one process a Connection may be used by several threads
// (sends are serialized, and receives), but close() must not race with a send or receive.
#pragma once

#include <chrono>
#include <cstddef>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "multiproc/codec.hpp"
#include "multiproc/error.hpp"
#include "multiproc/process.hpp"

namespace multiproc {

namespace detail {
class ConnectionCore;

std::pair<std::shared_ptr<ConnectionCore>, std::shared_ptr<ConnectionCore>> make_pipe(bool duplex);
/// Clears `w` and leaves room for the message header; encode the message after this.
void connection_begin_message(Writer& w);
void connection_send(ConnectionCore* c, Writer& message);
/// The next message's bytes replace the contents of `out`. Throws EOFError at the end.
void connection_recv(ConnectionCore* c, Writer& out);
bool connection_poll(ConnectionCore* c, std::chrono::nanoseconds timeout);
void connection_close(ConnectionCore* c) noexcept;
bool connection_closed(const ConnectionCore* c) noexcept;
bool connection_readable(const ConnectionCore* c) noexcept;
bool connection_writable(const ConnectionCore* c) noexcept;
int connection_fileno(const ConnectionCore* c);
void connection_encode(const ConnectionCore* c, Writer& w);
std::shared_ptr<ConnectionCore> connection_decode(Reader& r);
Writer& connection_send_buffer() noexcept;
Writer& connection_recv_buffer() noexcept;
void trim_buffer(Writer& w) noexcept;
}  // namespace detail

template <class T>
class Connection {
  static_assert(Encodable<T>, MULTIPROC_NOT_ENCODABLE_MESSAGE);

 public:
  using value_type = T;

  /// No connection: closed() is true.
  Connection() = default;
  explicit Connection(std::shared_ptr<detail::ConnectionCore> core) : core_(std::move(core)) {}

  /// Sends one message. StateError on a closed or receive-only end; SystemError(EPIPE) when
  /// nobody can receive it any more.
  void send(const T& message) {
    Writer& w = detail::connection_send_buffer();
    Trim trim{w};
    detail::connection_begin_message(w);
    encode(w, message);
    detail::connection_send(core_.get(), w);
  }

  /// Receives the next message, waiting for it. EOFError when there will be none (see above).
  T recv() {
    Writer& w = detail::connection_recv_buffer();
    Trim trim{w};
    detail::connection_recv(core_.get(), w);
    return from_bytes<T>(w.bytes());
  }

  /// True when recv() has something to return (a message, or the EOF it would throw), waiting at
  /// most `timeout` for it (the default: not at all; nanoseconds::max(): without limit).
  [[nodiscard]] bool poll(std::chrono::nanoseconds timeout = std::chrono::nanoseconds::zero()) {
    return detail::connection_poll(core_.get(), timeout);
  }

  /// Closes this process's end (for every copy of this handle here). Idempotent.
  void close() noexcept { detail::connection_close(core_.get()); }
  [[nodiscard]] bool closed() const noexcept { return detail::connection_closed(core_.get()); }
  [[nodiscard]] bool readable() const noexcept { return detail::connection_readable(core_.get()); }
  [[nodiscard]] bool writable() const noexcept { return detail::connection_writable(core_.get()); }
  /// The descriptor that becomes readable when a message (or EOF) arrives; for a send-only end,
  /// the one it writes to. StateError when closed.
  [[nodiscard]] int fileno() const { return detail::connection_fileno(core_.get()); }

  [[nodiscard]] const std::shared_ptr<detail::ConnectionCore>& core() const noexcept { return core_; }

 private:
  // The thread's buffer, trimmed after use whatever happens (a large message gives its memory back).
  struct Trim {
    Writer& w;
    ~Trim() { detail::trim_buffer(w); }
  };
  std::shared_ptr<detail::ConnectionCore> core_;
};

/// Two connected ends. Duplex (the default): each sends to the other. One-way: the first only
/// receives, the second only sends, as Python's Pipe(duplex=False).
template <class T>
std::pair<Connection<T>, Connection<T>> Pipe(bool duplex = true) {
  auto [a, b] = detail::make_pipe(duplex);
  return {Connection<T>(std::move(a)), Connection<T>(std::move(b))};
}

template <class T>
struct Codec<Connection<T>> {
  static void encode(Writer& w, const Connection<T>& c) { detail::connection_encode(c.core().get(), w); }
  static void decode(Reader& r, Connection<T>& out) { out = Connection<T>(detail::connection_decode(r)); }
};

/// Something multiproc::wait() can wait on: a Connection's receiving end (ready when recv() would
/// not wait), a Process (ready when it has ended), or a raw descriptor (ready when readable or
/// hung up). It refers to the object, which must outlive the wait.
class Waitable {
 public:
  template <class T>
  Waitable(const Connection<T>& c) noexcept : connection_(c.core().get()) {}  // NOLINT: implicit on purpose
  Waitable(Process& p) noexcept : process_(&p) {}                             // NOLINT: implicit on purpose
  static Waitable from_fd(int fd) noexcept {
    Waitable w;
    w.fd_ = fd;
    return w;
  }

 private:
  Waitable() = default;
  friend std::vector<std::size_t> wait(std::span<const Waitable>, std::optional<std::chrono::nanoseconds>);

  const detail::ConnectionCore* connection_ = nullptr;
  Process* process_ = nullptr;
  int fd_ = -1;
};

/// Waits until at least one of `objects` is ready, or `timeout` passes (none: no limit), and
/// returns the indexes of those ready, in increasing order (empty on timeout). Python's
/// multiprocessing.connection.wait, with indexes instead of objects, since the objects differ in
/// type. StateError for a closed or send-only Connection or a Process never started.
std::vector<std::size_t> wait(std::span<const Waitable> objects,
                              std::optional<std::chrono::nanoseconds> timeout = std::nullopt);
inline std::vector<std::size_t> wait(std::initializer_list<Waitable> objects,
                                     std::optional<std::chrono::nanoseconds> timeout = std::nullopt) {
  return wait(std::span<const Waitable>(objects.begin(), objects.size()), timeout);
}

}  // namespace multiproc

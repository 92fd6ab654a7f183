// multiproc/queue.hpp — Queue, JoinableQueue and SimpleQueue: Python's multiprocessing queues,
// typed, in shared memory, and safe when a process using them dies.
//
//     multiproc::Queue<std::string> q;                      // unbounded; Queue<T> q{10}: maxsize 10
//     multiproc::Process producer{[&] {
//       for (int i = 0; i < 3; ++i) q.put("item " + std::to_string(i));
//     }};                                                   // the child uses the same queue
//     producer.start();
//     producer.join();                                      // safe before draining: see below
//     std::string first = q.get();                          // waits for an item
//     std::optional<std::string> next = q.try_get();        // never waits
//     std::string third = q.get(std::chrono::seconds(1));   // throws multiproc::Empty after 1 s
//
//     pool.apply(produce, q);                               // a Pool task gets the same queue too
//
// Any process that holds the queue can put and get: it is multi-producer, multi-consumer. Items
// are anything the codec encodes (codec.hpp). Each producer's items arrive in the order it put
// them, and every item is delivered exactly once.
//
// No feeder thread. put() copies the encoded item into the queue's shared memory before it
// returns, so a producer that exits (or is killed) right after put() loses nothing, and a parent
// can join a child that put more than any pipe holds before it reads anything: the deadlock of
// Python's Queue (CPython gh-73983) cannot happen. When its buffer is full, an unbounded queue
// grows it (up to `max_buffer_bytes`, 1 GiB by default; the memory is reserved as it is needed),
// so put() on an unbounded queue does not wait for consumers, as in Python, unless more than
// that is waiting. An item too large for even the largest buffer streams through it in pieces:
// then put() returns once consumers have taken all but the last piece.
//
// Waiting. put() waits while the queue holds `maxsize` items; get() while it is empty. The timed
// forms throw multiproc::Full / multiproc::Empty when the time runs out, the try_ forms never
// wait for room or items (they may wait a few milliseconds for another process's put or get in
// progress). A timeout is honoured within a few milliseconds, with one exception: a get() that has
// begun receiving an item streamed in pieces finishes it, as long as its producer is alive.
//
// Crashes. A producer killed in the middle of put() leaves no trace: its item is not delivered and
// the queue is intact. A consumer killed in the middle of get() loses at most the item it was
// taking; the others go on. Nothing can deadlock on a dead process: the queue's two locks are
// robust mutexes, repaired by the next process that takes them, and every wait is a futex wait in
// slices that re-checks the state.
//
// Handles. A Queue is a handle: copies share the queue, a forked child (Process, or a Pool worker
// started after it was made) inherits it, and one passed to a Pool task or put into another queue
// arrives as the same queue. The memory is an anonymous memfd: nothing is created in /dev/shm and
// nothing can leak; it is freed when the last process holding it lets go. (A handle in flight is
// reached through /proc/<pid>/fd of the process that sent it, which must keep its own handle until
// the receiver has decoded it, as for any argument in flight.)
//
// Unlike Python, qsize() is exact at the moment it reads (it can change right after, of course),
// and close() only marks this process's handle closed: the others keep working.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "multiproc/codec.hpp"
#include "multiproc/error.hpp"

namespace multiproc {

struct QueueOptions {
  /// The most items the queue holds; put() waits (or fails, with a timeout) beyond it. 0: no limit.
  std::size_t maxsize = 0;
  /// The size the shared buffer starts at, in bytes (rounded up to a power of two, at least 4 KiB).
  std::size_t buffer_bytes = std::size_t{64} << 10;
  /// The most the buffer grows to when items wait in it (rounded up to a power of two, at least
  /// `buffer_bytes`). Beyond it, put() waits for consumers; an item larger than this streams
  /// through the buffer in pieces.
  std::size_t max_buffer_bytes = std::size_t{1} << 30;
};

namespace detail {
class QueueCore;
using Deadline = std::optional<std::chrono::steady_clock::time_point>;

std::shared_ptr<QueueCore> queue_create(const QueueOptions& options);
/// False when the deadline passed first.
bool queue_put(QueueCore& q, std::span<const std::byte> item, Deadline deadline);
/// The item's bytes replace the contents of `out`. False when the deadline passed first.
bool queue_get(QueueCore& q, Writer& out, Deadline deadline);
std::size_t queue_size(const QueueCore& q) noexcept;
std::size_t queue_maxsize(const QueueCore& q) noexcept;
/// How often the robust paths ran in this queue, in every process (tests): locks taken over from
/// a dead owner, and streamed items ended by an ABORT record.
struct QueueRepairCounts {
  std::uint32_t put_lock_owner_died;
  std::uint32_t get_lock_owner_died;
  std::uint32_t streams_aborted;
};
QueueRepairCounts queue_repair_counts(const QueueCore& q) noexcept;
void queue_task_done(QueueCore& q);
bool queue_join(QueueCore& q, Deadline deadline);
void queue_close(QueueCore& q) noexcept;
bool queue_closed(const QueueCore& q) noexcept;
void queue_encode(const QueueCore* q, Writer& w);
std::shared_ptr<QueueCore> queue_decode(Reader& r);

/// This thread's buffers for encoding and receiving items (reused, trimmed after large items).
Writer& queue_put_buffer() noexcept;
Writer& queue_get_buffer() noexcept;
void trim_buffer(Writer& w) noexcept;

/// now + timeout; no deadline for a timeout too long to add. A negative timeout is zero.
Deadline queue_deadline(std::chrono::nanoseconds timeout);
}  // namespace detail

template <class T>
class Queue {
  static_assert(Encodable<T>, MULTIPROC_NOT_ENCODABLE_MESSAGE);

 public:
  using value_type = T;

  /// An unbounded queue.
  Queue() : Queue(QueueOptions{}) {}
  /// A queue that holds at most `maxsize` items (0: unbounded), as Python's Queue(maxsize).
  explicit Queue(std::size_t maxsize) : Queue(QueueOptions{.maxsize = maxsize}) {}
  explicit Queue(const QueueOptions& options) : core_(detail::queue_create(options)) {}

  /// Puts `item`, waiting while the queue is full.
  void put(const T& item) { (void)put_until(item, std::nullopt); }
  /// Puts `item`, waiting at most `timeout` for room; throws Full when there was none.
  void put(const T& item, std::chrono::nanoseconds timeout) {
    if (!put_until(item, detail::queue_deadline(timeout))) {
      throw Full("Queue::put: the queue stayed full for the whole timeout");
    }
  }
  /// Puts `item` if there is room now; false if the queue is full.
  bool try_put(const T& item) { return put_until(item, std::chrono::steady_clock::now()); }

  /// Takes the next item, waiting while the queue is empty.
  T get() { return *get_until(std::nullopt); }
  /// Takes the next item, waiting at most `timeout`; throws Empty when none came.
  T get(std::chrono::nanoseconds timeout) {
    auto item = get_until(detail::queue_deadline(timeout));
    if (!item) throw Empty("Queue::get: no item came within the timeout");
    return std::move(*item);
  }
  /// Takes the next item if there is one now.
  std::optional<T> try_get() { return get_until(std::chrono::steady_clock::now()); }

  /// The number of items in the queue.
  [[nodiscard]] std::size_t qsize() const noexcept { return detail::queue_size(*core_); }
  [[nodiscard]] bool empty() const noexcept { return qsize() == 0; }
  /// True when a maxsize is set and reached.
  [[nodiscard]] bool full() const noexcept {
    const std::size_t m = maxsize();
    return m != 0 && qsize() >= m;
  }
  /// 0 for an unbounded queue.
  [[nodiscard]] std::size_t maxsize() const noexcept { return detail::queue_maxsize(*core_); }

  /// Marks this process's handle (and its copies here) closed: put and get then throw StateError.
  /// Other processes are not affected; the memory goes when the last handle does.
  void close() noexcept { detail::queue_close(*core_); }
  [[nodiscard]] bool closed() const noexcept { return detail::queue_closed(*core_); }

  /// Codec support.
  [[nodiscard]] const std::shared_ptr<detail::QueueCore>& core() const noexcept { return core_; }
  explicit Queue(std::shared_ptr<detail::QueueCore> core) : core_(std::move(core)) {}

 protected:
  // The thread's buffer, trimmed after use whatever happens (a large item gives its memory back).
  struct Trim {
    Writer& w;
    ~Trim() { detail::trim_buffer(w); }
  };
  bool put_until(const T& item, detail::Deadline deadline) {
    Writer& w = detail::queue_put_buffer();
    Trim trim{w};
    w.clear();
    encode(w, item);
    return detail::queue_put(*core_, w.bytes(), deadline);
  }
  std::optional<T> get_until(detail::Deadline deadline) {
    Writer& w = detail::queue_get_buffer();
    Trim trim{w};
    if (!detail::queue_get(*core_, w, deadline)) return std::nullopt;
    return from_bytes<T>(w.bytes());
  }

  std::shared_ptr<detail::QueueCore> core_;
};

/// A Queue whose consumers report each item done, so that a producer can wait until all are:
/// Python's JoinableQueue.
///
///     multiproc::JoinableQueue<Job> jobs;
///     // workers:  for (;;) { Job j = jobs.get(); run(j); jobs.task_done(); }
///     for (auto& j : all) jobs.put(j);
///     jobs.join();                                        // every job put so far is done
///
/// An item whose consumer was killed while taking it (see Queue) counts as done: join() does not
/// wait for a task nobody can finish. One taken but never reported done keeps join() waiting.
template <class T>
class JoinableQueue : public Queue<T> {
 public:
  using Queue<T>::Queue;
  /// Reports one item taken with get() as done. StateError when called more often than items were
  /// taken (Python's ValueError).
  void task_done() { detail::queue_task_done(*this->core_); }
  /// Waits until every item put has been reported done.
  void join() { (void)detail::queue_join(*this->core_, std::nullopt); }
  /// Waits at most `timeout`; true when every item put has been reported done.
  bool join_for(std::chrono::nanoseconds timeout) {
    return detail::queue_join(*this->core_, detail::queue_deadline(timeout));
  }
};

/// The minimal queue: put, get, empty, close (Python's SimpleQueue). Unbounded, and as robust as
/// Queue, which it is built on.
template <class T>
class SimpleQueue {
 public:
  using value_type = T;
  SimpleQueue() = default;
  explicit SimpleQueue(Queue<T> q) : q_(std::move(q)) {}

  void put(const T& item) { q_.put(item); }
  T get() { return q_.get(); }
  [[nodiscard]] bool empty() const noexcept { return q_.empty(); }
  void close() noexcept { q_.close(); }
  [[nodiscard]] bool closed() const noexcept { return q_.closed(); }
  [[nodiscard]] const Queue<T>& queue() const noexcept { return q_; }

 private:
  Queue<T> q_;
};

// A queue travels as a handle to its shared memory: the receiver maps the same queue.
template <class T>
struct Codec<Queue<T>> {
  static void encode(Writer& w, const Queue<T>& q) { detail::queue_encode(q.core().get(), w); }
  static void decode(Reader& r, Queue<T>& out) { out = Queue<T>(detail::queue_decode(r)); }
};
template <class T>
struct Codec<JoinableQueue<T>> {
  static void encode(Writer& w, const JoinableQueue<T>& q) { detail::queue_encode(q.core().get(), w); }
  static void decode(Reader& r, JoinableQueue<T>& out) { out = JoinableQueue<T>(detail::queue_decode(r)); }
};
template <class T>
struct Codec<SimpleQueue<T>> {
  static void encode(Writer& w, const SimpleQueue<T>& q) { detail::queue_encode(q.queue().core().get(), w); }
  static void decode(Reader& r, SimpleQueue<T>& out) { out = SimpleQueue<T>(Queue<T>(detail::queue_decode(r))); }
};

}  // namespace multiproc

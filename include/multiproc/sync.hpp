// multiproc/sync.hpp — locks, semaphores, events, conditions and barriers shared by processes,
// Python's multiprocessing.{Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition, Barrier}.
//
//     multiproc::Lock lock;                                   // a new lock, in shared memory
//     multiproc::SharedArray<long> total(1);
//     std::vector<multiproc::Process> ps;
//     for (int i = 0; i < 4; ++i) {
//       ps.emplace_back([&] {                                 // fork: the same lock in the child
//         std::lock_guard guard(lock);
//         ++total[0];
//       });
//     }
//
//     int add(multiproc::Lock lock, multiproc::Value<long> v) {  // a Pool task: decoded, the same lock
//       std::lock_guard guard(lock); ...
//     }
//
// Each object lives in a small anonymous shared-memory segment (a memfd, see shared_memory.hpp),
// and an object is a handle to it: copies share the state, a child forked after it was made
// inherits it, and one passed to a Pool task or through a channel arrives as the same object, not a
// copy. The segment is freed when the last handle in the last process is gone, whatever way the
// processes end; nothing is ever left in /dev/shm. (Like every anonymous SharedMemory, an object in
// flight to a process forked before it existed is reached through the sender's descriptor, so the
// sender keeps its handle until the receiver has decoded it.)
//
// Timeouts: every `*_for(duration)` and `*_until(time_point)` measures on the steady clock, so a
// change of the wall clock neither shortens nor stretches a wait; a zero or negative timeout tries
// once without waiting. All waits may be cut short by nothing but what they document: signals are
// absorbed (the wait goes on for what is left of its time).
//
// What is guaranteed when a process dies (SIGKILL included) while using one of these objects:
//   - Lock, RLock: the next acquirer (or the one already blocked) gets OwnerDied at once and holds
//     the lock. It may repair the guarded data, call make_consistent() and use the lock as before;
//     if it releases without make_consistent(), every later acquire throws LockNotRecoverable
//     (POSIX robust mutex semantics). A thread that exits holding a lock counts as dead too.
//   - Condition: its waits reacquire the lock with the guarantee above (OwnerDied surfaces from
//     wait, with the lock held). A waiter that dies never swallows a notify: only live sleepers
//     are woken (unlike a pthread condition variable in shared memory, whose state a dead waiter
//     corrupts).
//   - Barrier: a party that dies while waiting breaks the barrier; the others get BrokenBarrier
//     within about 100 ms (waits run in 50 ms slices that check the liveness of a fellow waiter,
//     by pid and start time, so pid reuse cannot hide a death). A party that dies before arriving
//     cannot be told from a slow one: bound the wait with wait_for.
//   - Semaphore, BoundedSemaphore: they have no owner (any process may release): a unit held by a
//     dead process is not given back, as in Python. A waiter that dies takes nothing with it.
//   - Event: it has no owner either: nobody is "the setter", so a waiter cannot know that the
//     process that would have set it died. wait() waits until the event is set; use wait_for()
//     when the setter may die. The event's state is never corrupted by a death.
// No death ever corrupts an object for the survivors: every state change is a single atomic
// operation or is made under a robust internal mutex whose recovery repairs the state.
#pragma once

#include <pthread.h>
#include <sys/types.h>

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <variant>

#include "multiproc/codec.hpp"
#include "multiproc/error.hpp"
#include "multiproc/shared_memory.hpp"

namespace multiproc {

class RLock;
template <class T>
class Value;
template <class T>
class Array;

namespace detail {

using SteadyTime = std::chrono::steady_clock::time_point;

/// now + timeout on the steady clock; a timeout beyond a century is forever (no overflow), a
/// negative one is now.
template <class Rep, class Period>
SteadyTime deadline_after(std::chrono::duration<Rep, Period> timeout) noexcept {
  using namespace std::chrono;
  const auto now = steady_clock::now();
  if (timeout <= duration<Rep, Period>::zero()) return now;
  if (timeout >= hours(24 * 365 * 100)) return SteadyTime::max();
  return now + duration_cast<steady_clock::duration>(timeout);
}

template <class Clock, class Duration>
SteadyTime to_steady(std::chrono::time_point<Clock, Duration> t) noexcept {
  if constexpr (std::is_same_v<Clock, std::chrono::steady_clock>) {
    return std::chrono::time_point_cast<std::chrono::steady_clock::duration>(t);
  } else {
    return deadline_after(t - Clock::now());
  }
}

struct MutexState;
struct SemaphoreState;
struct EventState;
struct ConditionState;
struct BarrierState;

/// The robust, process-shared mutex behind Lock and RLock (and the lock of Value and Array).
class MutexHandle {
 public:
  MutexHandle() = default;
  // Copies share the mutex; there is no move, so a moved-from handle still works.
  MutexHandle(const MutexHandle&) = default;
  MutexHandle& operator=(const MutexHandle&) = default;
  /// A mutex at `offset` in `memory`: made there when `initialize`, otherwise checked to be one of
  /// the right kind (SerializationError if not).
  MutexHandle(SharedMemory memory, std::size_t offset, bool recursive, bool initialize);

  bool acquire(bool blocking);
  bool acquire_until(SteadyTime deadline);
  void release();
  void make_consistent();
  [[nodiscard]] bool locked() const noexcept;
  [[nodiscard]] bool is_owned() const noexcept;
  /// For Condition: releases every level the caller holds (StateError if it holds none) and
  /// returns how many; acquire_restore takes them back.
  std::uint32_t release_all(const char* who);
  void acquire_restore(std::uint32_t depth);
  [[nodiscard]] const SharedMemory& memory() const noexcept { return memory_; }
  [[nodiscard]] bool recursive() const noexcept;

 private:
  MutexState& state() const;
  SharedMemory memory_;
  MutexState* state_ = nullptr;
};

/// The size Value and Array reserve for the RLock at the start of their segment.
std::size_t mutex_state_size() noexcept;

}  // namespace detail

/// A non-recursive lock, Python's multiprocessing.Lock, with std::mutex's interface too
/// (BasicLockable, Lockable, TimedLockable: std::lock_guard, std::unique_lock, std::scoped_lock).
///
/// A Lock is owned by the thread that acquired it, and only that thread may release it (StateError
/// otherwise; Python lets anyone release a Lock, but ownership is what makes a holder's death
/// detectable). Acquiring a Lock the calling thread already holds throws StateError instead of
/// deadlocking (use RLock to re-acquire); try_acquire() returns false in that case.
///
/// Robust: see the top of this header. Because OwnerDied is thrown with the lock held, a caller
/// that guards with std::lock_guard must catch it around the guard and take over:
///
///     try { lock.acquire(); } catch (const multiproc::OwnerDied&) { repair(); lock.make_consistent(); }
///     std::lock_guard guard(lock, std::adopt_lock);
///
/// Do not destroy the last handle of a process while holding the lock: the kernel finds a dead
/// holder's locks through their addresses in that process.
class Lock {
 public:
  /// A new, unlocked lock.
  Lock();

  /// Blocks until acquired (true), or with `blocking` false tries once. Throws OwnerDied (acquired
  /// from a dead owner), LockNotRecoverable, or StateError (the caller holds it already).
  bool acquire(bool blocking = true) { return m_.acquire(blocking); }
  bool try_acquire() { return m_.acquire(false); }
  /// Waits at most `timeout`; false when it ran out. Errors as acquire().
  template <class Rep, class Period>
  bool acquire_for(std::chrono::duration<Rep, Period> timeout) {
    return m_.acquire_until(detail::deadline_after(timeout));
  }
  template <class Clock, class Duration>
  bool acquire_until(std::chrono::time_point<Clock, Duration> deadline) {
    return m_.acquire_until(detail::to_steady(deadline));
  }
  /// Releases it. StateError if the calling thread does not hold it.
  void release() { m_.release(); }
  /// After OwnerDied: marks the lock consistent again, so that releasing it does not make it
  /// unrecoverable. Does nothing on a consistent lock; StateError if the caller does not hold it.
  void make_consistent() { m_.make_consistent(); }
  /// True while some thread (possibly a dead one, until the next acquire) holds it. A snapshot.
  [[nodiscard]] bool locked() const noexcept { return m_.locked(); }
  /// True when the calling thread holds it.
  [[nodiscard]] bool is_owned() const noexcept { return m_.is_owned(); }

  void lock() { m_.acquire(true); }
  bool try_lock() { return m_.acquire(false); }
  void unlock() { m_.release(); }
  template <class Rep, class Period>
  bool try_lock_for(std::chrono::duration<Rep, Period> timeout) {
    return acquire_for(timeout);
  }
  template <class Clock, class Duration>
  bool try_lock_until(std::chrono::time_point<Clock, Duration> deadline) {
    return acquire_until(deadline);
  }

  /// Codec support.
  void encode_handle(Writer& w) const;
  static Lock decode_handle(Reader& r);

 private:
  friend class Condition;
  explicit Lock(detail::MutexHandle m) : m_(std::move(m)) {}
  detail::MutexHandle m_;
};

/// A recursive lock, Python's multiprocessing.RLock: the thread holding it may acquire it again,
/// and must release it as many times. Same interface, robustness and ownership rules as Lock;
/// releasing an RLock the calling thread does not hold throws StateError. After OwnerDied the
/// caller holds it once, whatever depth the dead owner had.
class RLock {
 public:
  RLock();

  bool acquire(bool blocking = true) { return m_.acquire(blocking); }
  bool try_acquire() { return m_.acquire(false); }
  template <class Rep, class Period>
  bool acquire_for(std::chrono::duration<Rep, Period> timeout) {
    return m_.acquire_until(detail::deadline_after(timeout));
  }
  template <class Clock, class Duration>
  bool acquire_until(std::chrono::time_point<Clock, Duration> deadline) {
    return m_.acquire_until(detail::to_steady(deadline));
  }
  void release() { m_.release(); }
  void make_consistent() { m_.make_consistent(); }
  [[nodiscard]] bool locked() const noexcept { return m_.locked(); }
  [[nodiscard]] bool is_owned() const noexcept { return m_.is_owned(); }

  void lock() { m_.acquire(true); }
  bool try_lock() { return m_.acquire(false); }
  void unlock() { m_.release(); }
  template <class Rep, class Period>
  bool try_lock_for(std::chrono::duration<Rep, Period> timeout) {
    return acquire_for(timeout);
  }
  template <class Clock, class Duration>
  bool try_lock_until(std::chrono::time_point<Clock, Duration> deadline) {
    return acquire_until(deadline);
  }

  void encode_handle(Writer& w) const;
  static RLock decode_handle(Reader& r);

 private:
  friend class Condition;
  template <class T>
  friend class Value;
  template <class T>
  friend class Array;
  // Value and Array: the RLock at the start of their own segment (made there when `initialize`,
  // otherwise checked).
  RLock(SharedMemory memory, bool initialize) : m_(std::move(memory), 0, true, initialize) {}
  explicit RLock(detail::MutexHandle m) : m_(std::move(m)) {}
  detail::MutexHandle m_;
};

/// A counting semaphore, Python's multiprocessing.Semaphore. It has no owner: any thread of any
/// process may release it.
class Semaphore {
 public:
  /// `value` units available at first.
  explicit Semaphore(std::uint32_t value = 1);
  // Copies share the semaphore (so do moves: a moved-from handle still works). The same holds for
  // every object of this header.
  Semaphore(const Semaphore&) = default;
  Semaphore& operator=(const Semaphore&) = default;

  /// Takes a unit, blocking until one is there (true), or with `blocking` false tries once.
  bool acquire(bool blocking = true);
  bool try_acquire() { return acquire(false); }
  template <class Rep, class Period>
  bool acquire_for(std::chrono::duration<Rep, Period> timeout) {
    return acquire_until_steady(detail::deadline_after(timeout));
  }
  template <class Clock, class Duration>
  bool acquire_until(std::chrono::time_point<Clock, Duration> deadline) {
    return acquire_until_steady(detail::to_steady(deadline));
  }
  /// Gives back `n` units, waking up to `n` waiters. A BoundedSemaphore throws StateError when
  /// that would exceed its initial value (and gives nothing back); any semaphore does at 2^32 - 1.
  void release(std::uint32_t n = 1);
  /// The units available now (a snapshot). Python's get_value().
  [[nodiscard]] std::uint32_t get_value() const noexcept;

  void lock() { acquire(); }
  bool try_lock() { return acquire(false); }
  void unlock() { release(); }

  void encode_handle(Writer& w) const;
  static Semaphore decode_handle(Reader& r);

 protected:
  Semaphore(std::uint32_t value, std::uint32_t max_value);
  explicit Semaphore(SharedMemory memory, bool bounded);
  SharedMemory memory_;
  detail::SemaphoreState* state_ = nullptr;

 private:
  bool acquire_until_steady(detail::SteadyTime deadline);
};

/// A semaphore that may not be released above its initial value, Python's BoundedSemaphore.
class BoundedSemaphore : public Semaphore {
 public:
  explicit BoundedSemaphore(std::uint32_t value = 1);

  static BoundedSemaphore decode_handle(Reader& r);

 private:
  explicit BoundedSemaphore(SharedMemory memory) : Semaphore(std::move(memory), true) {}
};

/// A flag that processes wait for, Python's multiprocessing.Event.
///
/// A wait returns as soon as set() is called after it began, even if clear() follows at once
/// (threading.Event's rule; multiprocessing.Event may miss such a pulse). See the top of this
/// header for what an Event can and cannot know about dead peers: wait() has no liveness check.
class Event {
 public:
  /// A new, clear event.
  Event();
  Event(const Event&) = default;
  Event& operator=(const Event&) = default;

  [[nodiscard]] bool is_set() const noexcept;
  /// Sets the flag and wakes every waiter.
  void set();
  void clear() noexcept;
  /// Waits until the flag is set.
  void wait();
  /// Waits at most `timeout`; true if the flag was (or became) set, false if the time ran out.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> timeout) {
    return wait_until_steady(detail::deadline_after(timeout));
  }
  template <class Clock, class Duration>
  bool wait_until(std::chrono::time_point<Clock, Duration> deadline) {
    return wait_until_steady(detail::to_steady(deadline));
  }

  void encode_handle(Writer& w) const;
  static Event decode_handle(Reader& r);

 private:
  explicit Event(SharedMemory memory);
  bool wait_until_steady(detail::SteadyTime deadline);
  SharedMemory memory_;
  detail::EventState* state_ = nullptr;
};

/// A condition variable over a Lock or an RLock, Python's multiprocessing.Condition.
///
/// Every wait and notify needs the lock held by the calling thread (StateError otherwise). A wait
/// releases it (every level of an RLock), sleeps, and reacquires it (restoring the depth) before
/// it returns or throws; if the lock's owner died meanwhile, the wait throws OwnerDied with the
/// lock held. notify(n) wakes at least min(n, sleeping waiters); like std::condition_variable it
/// may also wake a waiter that was about to sleep, so wait with a predicate. wait_for returns
/// false only when its time ran out without it being woken.
class Condition {
 public:
  /// A condition with a new RLock (Python's default).
  Condition();
  explicit Condition(Lock lock);
  explicit Condition(RLock lock);
  Condition(const Condition&) = default;
  Condition& operator=(const Condition&) = default;

  bool acquire(bool blocking = true);
  void release();
  void lock() { acquire(); }
  bool try_lock() { return acquire(false); }
  void unlock() { release(); }

  /// Waits for a notify.
  void wait() { wait_until_steady(detail::SteadyTime::max()); }
  /// Waits until `predicate()` holds (checked with the lock held).
  template <class Predicate>
  void wait(Predicate predicate) {
    while (!predicate()) wait();
  }
  /// Waits at most `timeout` for a notify; false if the time ran out.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> timeout) {
    return wait_until_steady(detail::deadline_after(timeout));
  }
  /// Waits at most `timeout` for `predicate()`; returns its last value (Python's wait_for).
  template <class Rep, class Period, class Predicate>
  bool wait_for(std::chrono::duration<Rep, Period> timeout, Predicate predicate) {
    return wait_until_steady(detail::deadline_after(timeout), predicate);
  }
  template <class Clock, class Duration>
  bool wait_until(std::chrono::time_point<Clock, Duration> deadline) {
    return wait_until_steady(detail::to_steady(deadline));
  }
  template <class Clock, class Duration, class Predicate>
  bool wait_until(std::chrono::time_point<Clock, Duration> deadline, Predicate predicate) {
    return wait_until_steady(detail::to_steady(deadline), predicate);
  }

  /// Wakes at least min(n, sleeping waiters) waiters.
  void notify(std::uint32_t n = 1);
  void notify_all();

  void encode_handle(Writer& w) const;
  static Condition decode_handle(Reader& r);

 private:
  Condition(detail::MutexHandle lock, SharedMemory memory, bool initialize);
  bool wait_until_steady(detail::SteadyTime deadline);
  template <class Predicate>
  bool wait_until_steady(detail::SteadyTime deadline, Predicate& predicate) {
    while (!predicate()) {
      if (!wait_until_steady(deadline)) return predicate();
    }
    return true;
  }
  detail::MutexHandle lock_;
  SharedMemory memory_;
  detail::ConditionState* state_ = nullptr;
};

/// A barrier for a fixed number of parties, Python's multiprocessing.Barrier (without `action`).
///
/// wait() returns the arrival index, 0 for the first party to arrive up to parties() - 1 for the
/// one that releases the others; then the barrier is ready for the next round. It throws
/// BrokenBarrier when the barrier is or becomes broken: abort(), reset() while parties wait, a
/// wait_for that timed out (as in Python, the timeout breaks the barrier for everyone), or a
/// waiting party that died (see the top of this header). A broken barrier stays broken until
/// reset().
///
/// A default-constructed Barrier is an empty handle (for decoding, or to assign later): using it
/// throws StateError.
class Barrier {
 public:
  Barrier() = default;
  /// InvalidArgument if `parties` is 0.
  explicit Barrier(std::uint32_t parties);
  Barrier(const Barrier&) = default;
  Barrier& operator=(const Barrier&) = default;

  std::uint32_t wait() { return wait_until_steady(detail::SteadyTime::max(), "Barrier::wait"); }
  template <class Rep, class Period>
  std::uint32_t wait_for(std::chrono::duration<Rep, Period> timeout) {
    return wait_until_steady(detail::deadline_after(timeout), "Barrier::wait_for");
  }
  template <class Clock, class Duration>
  std::uint32_t wait_until(std::chrono::time_point<Clock, Duration> deadline) {
    return wait_until_steady(detail::to_steady(deadline), "Barrier::wait_until");
  }
  /// Breaks the barrier: current and future waits throw BrokenBarrier until reset().
  void abort();
  /// Back to the empty, unbroken state; parties waiting now get BrokenBarrier.
  void reset();
  [[nodiscard]] bool broken() const;
  [[nodiscard]] std::uint32_t parties() const;
  /// The parties waiting now (a snapshot).
  [[nodiscard]] std::uint32_t n_waiting() const;

  void encode_handle(Writer& w) const;
  static Barrier decode_handle(Reader& r);

 private:
  explicit Barrier(SharedMemory memory);
  detail::BarrierState& state() const;
  std::uint32_t wait_until_steady(detail::SteadyTime deadline, const char* who);
  SharedMemory memory_;
  detail::BarrierState* state_ = nullptr;
};

// ---- codec: each object travels as its segment's handle and arrives as the same object --------

template <>
struct Codec<Lock> {
  static void encode(Writer& w, const Lock& v) { v.encode_handle(w); }
  static void decode(Reader& r, Lock& out) { out = Lock::decode_handle(r); }
};
template <>
struct Codec<RLock> {
  static void encode(Writer& w, const RLock& v) { v.encode_handle(w); }
  static void decode(Reader& r, RLock& out) { out = RLock::decode_handle(r); }
};
template <>
struct Codec<Semaphore> {
  static void encode(Writer& w, const Semaphore& v) { v.encode_handle(w); }
  static void decode(Reader& r, Semaphore& out) { out = Semaphore::decode_handle(r); }
};
template <>
struct Codec<BoundedSemaphore> {
  static void encode(Writer& w, const BoundedSemaphore& v) { v.encode_handle(w); }
  static void decode(Reader& r, BoundedSemaphore& out) { out = BoundedSemaphore::decode_handle(r); }
};
template <>
struct Codec<Event> {
  static void encode(Writer& w, const Event& v) { v.encode_handle(w); }
  static void decode(Reader& r, Event& out) { out = Event::decode_handle(r); }
};
template <>
struct Codec<Condition> {
  static void encode(Writer& w, const Condition& v) { v.encode_handle(w); }
  static void decode(Reader& r, Condition& out) { out = Condition::decode_handle(r); }
};
template <>
struct Codec<Barrier> {
  static void encode(Writer& w, const Barrier& v) { v.encode_handle(w); }
  static void decode(Reader& r, Barrier& out) { out = Barrier::decode_handle(r); }
};

}  // namespace multiproc

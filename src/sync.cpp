// The synchronization objects of sync.hpp.
//
// Locks are pthread robust mutexes (PTHREAD_PROCESS_SHARED + PTHREAD_MUTEX_ROBUST) rather than a
// futex scheme of our own: only the kernel's robust-futex list, which glibc maintains for each
// thread, learns of a holder's death at the moment it happens (and wakes a blocked waiter at once)
// without any polling, pid bookkeeping or pid-reuse hazard; a futex scheme of our own could only
// find dead owners by polling their pids. The list is glibc's, so the mutexes must be glibc's too.
//
// Everything that waits for something other than a mutex (Semaphore, Event, Condition, Barrier)
// sleeps on a shared futex word instead of a pthread condition variable: glibc's condition
// variable keeps per-waiter state in the shared memory, which a waiter killed in the middle of a
// wait leaves behind (notifies then go to the dead, and pthread_cond_destroy blocks forever). A
// futex waiter that dies simply stops being queued in the kernel.
#include "multiproc/sync.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <new>
#include <string>

#include "platform.hpp"

namespace multiproc {

namespace detail {

namespace {

using std::chrono::nanoseconds;
using std::chrono::steady_clock;

// Each object's segment starts with a magic number, so that a handle decoded as the wrong type (or
// a corrupt one) is refused instead of being used as something it is not.
constexpr std::uint32_t kMutexMagic = 0x6d704d58;      // "mpMX"
constexpr std::uint32_t kSemaphoreMagic = 0x6d705345;  // "mpSE"
constexpr std::uint32_t kEventMagic = 0x6d704556;      // "mpEV"
constexpr std::uint32_t kConditionMagic = 0x6d70434e;  // "mpCN"
constexpr std::uint32_t kBarrierMagic = 0x6d704252;    // "mpBR"

// How long a Barrier waiter sleeps before it checks that its fellow waiters are alive.
constexpr auto kLivenessSlice = std::chrono::milliseconds(50);

// What is left until `deadline`: -1 ns for no deadline, 0 when it has passed.
nanoseconds time_left(SteadyTime deadline) noexcept {
  if (deadline == SteadyTime::max()) return nanoseconds(-1);
  const auto left = std::chrono::duration_cast<nanoseconds>(deadline - steady_clock::now());
  return left.count() <= 0 ? nanoseconds(0) : left;
}

template <class State>
State& state_in(const SharedMemory& memory, std::size_t offset, std::size_t size, std::uint32_t magic,
                const char* what) {
  if (memory.size() < offset + size || offset % alignof(State) != 0) {
    throw SerializationError(std::string("not a multiproc::") + what + " handle (segment too small)");
  }
  auto* state = reinterpret_cast<State*>(static_cast<std::byte*>(memory.data()) + offset);
  if (state->magic != magic) throw SerializationError(std::string("not a multiproc::") + what + " handle");
  return *state;
}

}  // namespace

// ---- Lock, RLock -------------------------------------------------------------------------------

struct MutexState {
  std::uint32_t magic;
  std::uint32_t recursive;
  pthread_mutex_t mutex;
  // Who holds it: set by the owner right after it acquires, cleared right before it releases, read
  // by anyone (is_owned, locked, the pid in OwnerDied).
  std::atomic<pid_t> owner_tid;
  std::atomic<pid_t> owner_pid;
  // Levels held (1 for a Lock); only the owner touches it.
  std::uint32_t depth;
  // OwnerDied was reported and make_consistent() has not been called since.
  std::atomic<std::uint32_t> inconsistent;
  // Released while inconsistent: nobody may acquire it again. Checked before any pthread call, so
  // that a try_acquire never meets glibc's trylock on a not-recoverable mutex (see platform.cpp).
  std::atomic<std::uint32_t> not_recoverable;
};

namespace {

const char* kind(const MutexState& s) noexcept { return s.recursive ? "RLock" : "Lock"; }

bool held_by_caller(const MutexState& s) noexcept {
  return s.owner_tid.load(std::memory_order_relaxed) == sys::current_tid() &&
         s.owner_pid.load(std::memory_order_relaxed) == sys::current_pid();
}

void set_owner(MutexState& s) noexcept {
  s.owner_pid.store(sys::current_pid(), std::memory_order_relaxed);
  s.owner_tid.store(sys::current_tid(), std::memory_order_relaxed);
}

void clear_owner(MutexState& s) noexcept {
  s.owner_tid.store(0, std::memory_order_relaxed);
  s.owner_pid.store(0, std::memory_order_relaxed);
}

[[noreturn]] void throw_not_recoverable(const MutexState& s, const char* op) {
  throw LockNotRecoverable(std::string(kind(s)) + "::" + op +
                           ": the lock was released after its owner died without make_consistent(); it can "
                           "never be acquired again");
}

void check_recoverable(const MutexState& s, const char* op) {
  if (s.not_recoverable.load(std::memory_order_acquire) != 0) throw_not_recoverable(s, op);
}

// Books the outcome of a lock call: true when acquired, false when busy or out of time (or, for a
// try, held by the caller already).
bool took(MutexState& s, sys::MutexLockResult r, const char* op, bool trying = false) {
  switch (r) {
    case sys::MutexLockResult::acquired:
      if (s.depth++ == 0) set_owner(s);
      return true;
    case sys::MutexLockResult::busy:
    case sys::MutexLockResult::timed_out:
      return false;
    case sys::MutexLockResult::owner_died: {
      const pid_t dead = s.owner_pid.load(std::memory_order_relaxed);
      s.depth = 1;  // whatever depth the dead owner had: the kernel gives the mutex over once
      set_owner(s);
      s.inconsistent.store(1, std::memory_order_relaxed);
      throw OwnerDied(std::string(kind(s)) + "::" + op + ": the owner" +
                          (dead > 0 ? " (pid " + std::to_string(dead) + ")" : std::string()) +
                          " died holding the lock; the caller holds it now: repair what it guards, then call "
                          "make_consistent()",
                      dead);
    }
    case sys::MutexLockResult::not_recoverable:
      throw_not_recoverable(s, op);
    case sys::MutexLockResult::deadlock:
      if (trying) return false;
      throw StateError(std::string("Lock::") + op +
                       ": the calling thread holds this Lock already (an RLock may be acquired again)");
  }
  return false;
}

}  // namespace

MutexHandle::MutexHandle(SharedMemory memory, std::size_t offset, bool recursive, bool initialize) {
  const char* what = recursive ? "RLock" : "Lock";
  if (initialize) {
    if (memory.size() < offset + sizeof(MutexState) || offset % alignof(MutexState) != 0) {
      throw InvalidArgument(std::string(what) + ": no room for the lock in its segment");
    }
    auto* s = new (static_cast<std::byte*>(memory.data()) + offset) MutexState{};
    s->recursive = recursive ? 1 : 0;
    sys::robust_mutex_init(s->mutex, recursive);
    s->magic = kMutexMagic;
    state_ = s;
  } else {
    auto& s = state_in<MutexState>(memory, offset, sizeof(MutexState), kMutexMagic, what);
    if ((s.recursive != 0) != recursive) throw SerializationError(std::string("not a multiproc::") + what + " handle");
    state_ = &s;
  }
  memory_ = std::move(memory);
}

MutexState& MutexHandle::state() const {
  if (!state_) throw StateError("Lock: an empty handle");
  return *state_;
}

bool MutexHandle::acquire(bool blocking) {
  MutexState& s = state();
  check_recoverable(s, "acquire");
  if (!blocking) return took(s, sys::robust_mutex_try_lock(s.mutex), "acquire", true);
  return took(s, sys::robust_mutex_lock(s.mutex), "acquire");
}

bool MutexHandle::acquire_until(SteadyTime deadline) {
  MutexState& s = state();
  check_recoverable(s, "acquire_for");
  if (deadline == SteadyTime::max()) return took(s, sys::robust_mutex_lock(s.mutex), "acquire");
  return took(s, sys::robust_mutex_lock_until(s.mutex, deadline), "acquire_for");
}

void MutexHandle::release() {
  MutexState& s = state();
  if (!held_by_caller(s) || s.depth == 0) {
    throw StateError(std::string(kind(s)) + "::release: the calling thread does not hold the lock");
  }
  if (--s.depth == 0) {
    // pthread makes the mutex unrecoverable in this unlock; say so before anyone can try it.
    if (s.inconsistent.load(std::memory_order_relaxed) != 0) s.not_recoverable.store(1, std::memory_order_release);
    clear_owner(s);
  }
  if (const int e = sys::robust_mutex_unlock(s.mutex); e != 0) throw SystemError(e, "pthread_mutex_unlock");
}

void MutexHandle::make_consistent() {
  MutexState& s = state();
  if (!held_by_caller(s)) {
    throw StateError(std::string(kind(s)) + "::make_consistent: the calling thread does not hold the lock");
  }
  if (s.inconsistent.load(std::memory_order_relaxed) == 0) return;
  // EINVAL: the mutex is consistent already (the flag outlived a repair): nothing to do.
  if (const int e = sys::robust_mutex_consistent(s.mutex); e != 0 && e != EINVAL) {
    throw SystemError(e, "pthread_mutex_consistent");
  }
  s.inconsistent.store(0, std::memory_order_relaxed);
}

bool MutexHandle::locked() const noexcept { return state_ && state_->owner_tid.load(std::memory_order_relaxed) != 0; }

bool MutexHandle::is_owned() const noexcept { return state_ && held_by_caller(*state_); }

bool MutexHandle::recursive() const noexcept { return state_ && state_->recursive != 0; }

std::uint32_t MutexHandle::release_all(const char* who) {
  MutexState& s = state();
  if (!held_by_caller(s) || s.depth == 0) {
    throw StateError(std::string(who) + ": the lock is not held by the calling thread");
  }
  const std::uint32_t depth = s.depth;
  s.depth = 0;
  if (s.inconsistent.load(std::memory_order_relaxed) != 0) s.not_recoverable.store(1, std::memory_order_release);
  clear_owner(s);
  for (std::uint32_t i = 0; i < depth; ++i) {
    if (const int e = sys::robust_mutex_unlock(s.mutex); e != 0) throw SystemError(e, "pthread_mutex_unlock");
  }
  return depth;
}

void MutexHandle::acquire_restore(std::uint32_t depth) {
  MutexState& s = state();
  check_recoverable(s, "acquire");
  // Levels past the first are taken again at once: the caller holds the (recursive) mutex.
  auto restore = [&] {
    for (std::uint32_t i = 1; i < depth; ++i) (void)sys::robust_mutex_lock(s.mutex);
    s.depth = depth;
  };
  try {
    took(s, sys::robust_mutex_lock(s.mutex), "acquire");
  } catch (const OwnerDied&) {
    restore();
    throw;
  }
  restore();
}

std::size_t mutex_state_size() noexcept { return sizeof(MutexState); }

// ---- Semaphore ---------------------------------------------------------------------------------

struct SemaphoreState {
  std::uint32_t magic;
  std::uint32_t bounded;
  std::uint32_t max_value;
  std::atomic<std::uint32_t> value;  // the futex word: waiters sleep while it is 0
  std::atomic<std::uint32_t> waiters;
};

namespace {
bool semaphore_take(SemaphoreState& s, bool wait, SteadyTime deadline) {
  for (;;) {
    std::uint32_t v = s.value.load(std::memory_order_relaxed);
    while (v != 0) {
      if (s.value.compare_exchange_weak(v, v - 1, std::memory_order_acquire, std::memory_order_relaxed)) return true;
    }
    if (!wait) return false;
    const nanoseconds left = time_left(deadline);
    if (left.count() == 0) return false;
    // Counted before sleeping, and release() reads the count after it changes the value: either it
    // sees this waiter, or the kernel sees the new value and does not let it sleep.
    s.waiters.fetch_add(1, std::memory_order_seq_cst);
    try {
      (void)sys::futex_wait(s.value, 0, left);
    } catch (...) {
      s.waiters.fetch_sub(1, std::memory_order_relaxed);
      throw;
    }
    s.waiters.fetch_sub(1, std::memory_order_relaxed);
  }
}
}  // namespace

}  // namespace detail

// ---- the public objects ------------------------------------------------------------------------

namespace {
using detail::SteadyTime;
namespace sys = detail::sys;

// A fresh segment for an object's state, zero-filled.
SharedMemory segment_for(std::size_t size) { return SharedMemory(size); }

template <class State>
State* place(SharedMemory& memory) {
  return new (memory.data()) State{};
}
}  // namespace

Lock::Lock() : m_(segment_for(sizeof(detail::MutexState)), 0, false, true) {}

void Lock::encode_handle(Writer& w) const { multiproc::encode(w, m_.memory()); }

Lock Lock::decode_handle(Reader& r) {
  return Lock(detail::MutexHandle(multiproc::decode<SharedMemory>(r), 0, false, false));
}

RLock::RLock() : m_(segment_for(sizeof(detail::MutexState)), 0, true, true) {}

void RLock::encode_handle(Writer& w) const { multiproc::encode(w, m_.memory()); }

RLock RLock::decode_handle(Reader& r) {
  return RLock(detail::MutexHandle(multiproc::decode<SharedMemory>(r), 0, true, false));
}

// ---- Semaphore, BoundedSemaphore ----------------------------------------------------------------

Semaphore::Semaphore(std::uint32_t value) : Semaphore(value, UINT32_MAX) {}

Semaphore::Semaphore(std::uint32_t value, std::uint32_t max_value)
    : memory_(segment_for(sizeof(detail::SemaphoreState))) {
  auto* s = place<detail::SemaphoreState>(memory_);
  s->bounded = max_value != UINT32_MAX ? 1 : 0;
  s->max_value = max_value;
  s->value.store(value, std::memory_order_relaxed);
  s->magic = detail::kSemaphoreMagic;
  state_ = s;
}

Semaphore::Semaphore(SharedMemory memory, bool bounded)
    : memory_(std::move(memory)),
      state_(&detail::state_in<detail::SemaphoreState>(memory_, 0, sizeof(detail::SemaphoreState),
                                                       detail::kSemaphoreMagic,
                                                       bounded ? "BoundedSemaphore" : "Semaphore")) {
  if (bounded && state_->bounded == 0) throw SerializationError("not a multiproc::BoundedSemaphore handle");
}

BoundedSemaphore::BoundedSemaphore(std::uint32_t value) : Semaphore(value, value) {
  if (value == UINT32_MAX) throw InvalidArgument("BoundedSemaphore: the bound must be below 2^32 - 1");
}

bool Semaphore::acquire(bool blocking) { return detail::semaphore_take(*state_, blocking, SteadyTime::max()); }

bool Semaphore::acquire_until_steady(SteadyTime deadline) { return detail::semaphore_take(*state_, true, deadline); }

void Semaphore::release(std::uint32_t n) {
  detail::SemaphoreState& s = *state_;
  if (n == 0) return;
  std::uint32_t v = s.value.load(std::memory_order_relaxed);
  do {
    if (n > s.max_value - v) {
      throw StateError(s.bounded
                           ? "BoundedSemaphore::release: released more times than acquired (above its initial value " +
                                 std::to_string(s.max_value) + ")"
                           : std::string("Semaphore::release: the value would overflow"));
    }
  } while (!s.value.compare_exchange_weak(v, v + n, std::memory_order_seq_cst, std::memory_order_relaxed));
  if (s.waiters.load(std::memory_order_seq_cst) != 0) {
    sys::futex_wake(s.value, n > static_cast<std::uint32_t>(INT_MAX) ? INT_MAX : static_cast<int>(n));
  }
}

std::uint32_t Semaphore::get_value() const noexcept { return state_->value.load(std::memory_order_relaxed); }

void Semaphore::encode_handle(Writer& w) const { multiproc::encode(w, memory_); }

Semaphore Semaphore::decode_handle(Reader& r) { return Semaphore(multiproc::decode<SharedMemory>(r), false); }

BoundedSemaphore BoundedSemaphore::decode_handle(Reader& r) {
  return BoundedSemaphore(multiproc::decode<SharedMemory>(r));
}

// ---- Event -----------------------------------------------------------------------------------

namespace detail {
struct EventState {
  std::uint32_t magic;
  // The futex word: bit 0 is the flag; the bits above count set() calls, so that a waiter can tell
  // a set() that happened while it slept even if clear() followed.
  std::atomic<std::uint32_t> word;
  std::atomic<std::uint32_t> waiters;
};
}  // namespace detail

Event::Event() : memory_(segment_for(sizeof(detail::EventState))) {
  auto* s = place<detail::EventState>(memory_);
  s->magic = detail::kEventMagic;
  state_ = s;
}

Event::Event(SharedMemory memory)
    : memory_(std::move(memory)),
      state_(&detail::state_in<detail::EventState>(memory_, 0, sizeof(detail::EventState), detail::kEventMagic,
                                                   "Event")) {}

bool Event::is_set() const noexcept { return (state_->word.load(std::memory_order_acquire) & 1U) != 0; }

void Event::set() {
  detail::EventState& s = *state_;
  std::uint32_t w = s.word.load(std::memory_order_relaxed);
  do {
    if (w & 1U) return;
  } while (!s.word.compare_exchange_weak(w, (((w >> 1) + 1) << 1) | 1U, std::memory_order_seq_cst,
                                         std::memory_order_relaxed));
  if (s.waiters.load(std::memory_order_seq_cst) != 0) sys::futex_wake(s.word, INT_MAX);
}

void Event::clear() noexcept { state_->word.fetch_and(~1U, std::memory_order_release); }

void Event::wait() { (void)wait_until_steady(SteadyTime::max()); }

bool Event::wait_until_steady(SteadyTime deadline) {
  detail::EventState& s = *state_;
  const std::uint32_t seen = s.word.load(std::memory_order_acquire);
  if (seen & 1U) return true;
  for (;;) {
    const auto left = detail::time_left(deadline);
    if (left.count() == 0) return false;
    s.waiters.fetch_add(1, std::memory_order_seq_cst);
    try {
      (void)sys::futex_wait(s.word, seen, left);
    } catch (...) {
      s.waiters.fetch_sub(1, std::memory_order_relaxed);
      throw;
    }
    s.waiters.fetch_sub(1, std::memory_order_relaxed);
    // Any change of the word from a cleared `seen` is a set(): clear() of a clear flag changes
    // nothing.
    if (s.word.load(std::memory_order_acquire) != seen) return true;
  }
}

void Event::encode_handle(Writer& w) const { multiproc::encode(w, memory_); }

Event Event::decode_handle(Reader& r) { return Event(multiproc::decode<SharedMemory>(r)); }

// ---- Condition -------------------------------------------------------------------------------

namespace detail {
struct ConditionState {
  std::uint32_t magic;
  // The futex word, bumped by every notify that finds a waiter. Waiters read it and notifiers
  // bump it with the lock held, so a notify cannot fall between a waiter's release and its sleep.
  std::atomic<std::uint32_t> seq;
  std::atomic<std::uint32_t> waiters;
};
}  // namespace detail

Condition::Condition() : Condition(RLock()) {}

Condition::Condition(Lock lock) : Condition(std::move(lock.m_), segment_for(sizeof(detail::ConditionState)), true) {}

Condition::Condition(RLock lock) : Condition(std::move(lock.m_), segment_for(sizeof(detail::ConditionState)), true) {}

Condition::Condition(detail::MutexHandle lock, SharedMemory memory, bool initialize)
    : lock_(std::move(lock)), memory_(std::move(memory)) {
  if (initialize) {
    auto* s = place<detail::ConditionState>(memory_);
    s->magic = detail::kConditionMagic;
    state_ = s;
  } else {
    state_ = &detail::state_in<detail::ConditionState>(memory_, 0, sizeof(detail::ConditionState),
                                                       detail::kConditionMagic, "Condition");
  }
}

bool Condition::acquire(bool blocking) { return lock_.acquire(blocking); }

void Condition::release() { lock_.release(); }

bool Condition::wait_until_steady(SteadyTime deadline) {
  detail::ConditionState& s = *state_;
  if (!lock_.is_owned()) throw StateError("Condition::wait: the lock is not held by the calling thread");
  // Registered and read under the lock (see ConditionState::seq).
  s.waiters.fetch_add(1, std::memory_order_relaxed);
  const std::uint32_t seq = s.seq.load(std::memory_order_relaxed);
  std::uint32_t depth;
  try {
    depth = lock_.release_all("Condition::wait");
  } catch (...) {
    s.waiters.fetch_sub(1, std::memory_order_relaxed);
    throw;
  }
  bool notified = false;
  try {
    for (;;) {
      const auto left = detail::time_left(deadline);
      if (left.count() == 0) break;
      const auto r = sys::futex_wait(s.seq, seq, left);
      // Woken, or notified between the release and the sleep. A waiter whose own time ran out
      // reports the timeout even if a notify (meant for another) bumped the word meanwhile.
      if (r == sys::FutexWaitResult::woken || r == sys::FutexWaitResult::value_changed) {
        notified = true;
        break;
      }
      if (r == sys::FutexWaitResult::interrupted && s.seq.load(std::memory_order_relaxed) != seq) {
        notified = true;
        break;
      }
    }
  } catch (...) {
    s.waiters.fetch_sub(1, std::memory_order_relaxed);
    lock_.acquire_restore(depth);
    throw;
  }
  s.waiters.fetch_sub(1, std::memory_order_relaxed);
  lock_.acquire_restore(depth);
  return notified;
}

void Condition::notify(std::uint32_t n) {
  detail::ConditionState& s = *state_;
  if (!lock_.is_owned()) throw StateError("Condition::notify: the lock is not held by the calling thread");
  if (n == 0 || s.waiters.load(std::memory_order_relaxed) == 0) return;
  s.seq.fetch_add(1, std::memory_order_relaxed);
  sys::futex_wake(s.seq, n > static_cast<std::uint32_t>(INT_MAX) ? INT_MAX : static_cast<int>(n));
}

void Condition::notify_all() { notify(UINT32_MAX); }

void Condition::encode_handle(Writer& w) const {
  w.write_value(static_cast<std::uint8_t>(lock_.recursive() ? 1 : 0));
  multiproc::encode(w, lock_.memory());
  multiproc::encode(w, memory_);
}

Condition Condition::decode_handle(Reader& r) {
  const auto recursive = r.read_value<std::uint8_t>();
  if (recursive > 1) throw SerializationError("not a multiproc::Condition handle");
  detail::MutexHandle lock(multiproc::decode<SharedMemory>(r), 0, recursive != 0, false);
  return Condition(std::move(lock), multiproc::decode<SharedMemory>(r), false);
}

// ---- Barrier ---------------------------------------------------------------------------------

namespace detail {

struct Party {
  pid_t pid;
  std::uint64_t start_time;  // 0: unknown (no /proc)
};

enum class BrokenBy : std::uint32_t { none, abort, timeout, party_died, died_inside };

struct BarrierState {
  std::uint32_t magic;
  std::uint32_t parties;
  // A robust, error-checking mutex over everything below. A party that dies holding it may have
  // left the counts half-updated: whoever takes it over breaks the barrier.
  pthread_mutex_t guard;
  // The futex word: bumped when a round completes, the barrier breaks, or it is reset.
  std::atomic<std::uint32_t> seq;
  std::uint32_t count;  // parties waiting in this round (slots 0..count-1 are theirs)
  BrokenBy broken;
  pid_t dead_pid;
  std::uint64_t generation;        // rounds completed or reset
  std::uint64_t reset_generation;  // the round a reset() ended: its waiters get BrokenBarrier
  // Party slots[parties] follow.
};

namespace {

std::size_t barrier_slots_offset() noexcept {
  return (sizeof(BarrierState) + alignof(Party) - 1) / alignof(Party) * alignof(Party);
}

Party* slots(BarrierState& s) noexcept {
  return reinterpret_cast<Party*>(reinterpret_cast<std::byte*>(&s) + barrier_slots_offset());
}

// This process, as a Barrier slot records it; /proc is read once per process.
Party self_party() {
  static std::atomic<pid_t> cached_pid{0};
  static std::atomic<std::uint64_t> cached_start{0};
  const pid_t pid = sys::current_pid();
  if (cached_pid.load(std::memory_order_acquire) == pid) return {pid, cached_start.load(std::memory_order_relaxed)};
  const std::uint64_t start = sys::process_start_time(pid);
  cached_start.store(start, std::memory_order_relaxed);
  cached_pid.store(pid, std::memory_order_release);
  return {pid, start};
}

bool is_alive(const Party& p) {
  if (p.pid == sys::current_pid()) return true;
  if (p.start_time != 0) return sys::process_start_time(p.pid) == p.start_time;
  // Without /proc a zombie looks alive; a reaped process does not.
  try {
    return sys::send_signal(p.pid, 0, false);
  } catch (const SystemError&) {
    return true;  // EPERM: it exists
  }
}

void break_barrier(BarrierState& s, BrokenBy why, pid_t dead) noexcept {
  if (s.broken != BrokenBy::none) return;
  s.broken = why;
  s.dead_pid = dead;
  s.seq.fetch_add(1, std::memory_order_relaxed);
  sys::futex_wake(s.seq, INT_MAX);
}

std::string broken_message(const BarrierState& s, const char* who) {
  std::string m = std::string(who) + ": the barrier is broken: ";
  switch (s.broken) {
    case BrokenBy::abort:
      return m + "abort() was called";
    case BrokenBy::timeout:
      return m + "a wait timed out (which breaks the barrier for every party)";
    case BrokenBy::party_died:
      return m + "a waiting party (pid " + std::to_string(s.dead_pid) + ") died";
    case BrokenBy::died_inside:
      return m + "a party died while updating it";
    case BrokenBy::none:
      break;
  }
  return m + "unknown cause";
}

// Holds the guard; a dead previous holder breaks the barrier.
class Guard {
 public:
  explicit Guard(BarrierState& s) : s_(s) {
    switch (sys::robust_mutex_lock(s.guard)) {
      case sys::MutexLockResult::acquired:
        break;
      case sys::MutexLockResult::owner_died:
        (void)sys::robust_mutex_consistent(s.guard);
        break_barrier(s, BrokenBy::died_inside, 0);
        break;
      default:
        throw StateError("Barrier: its internal lock is unusable");
    }
  }
  Guard(const Guard&) = delete;
  Guard& operator=(const Guard&) = delete;
  ~Guard() { (void)sys::robust_mutex_unlock(s_.guard); }

 private:
  BarrierState& s_;
};

}  // namespace
}  // namespace detail

Barrier::Barrier(std::uint32_t parties) {
  if (parties == 0) throw InvalidArgument("Barrier: parties must be at least 1");
  memory_ = segment_for(detail::barrier_slots_offset() + std::size_t{parties} * sizeof(detail::Party));
  auto* s = place<detail::BarrierState>(memory_);
  s->parties = parties;
  s->reset_generation = UINT64_MAX;
  sys::robust_mutex_init(s->guard, false);
  s->magic = detail::kBarrierMagic;
  state_ = s;
}

Barrier::Barrier(SharedMemory memory) : memory_(std::move(memory)) {
  auto& s = detail::state_in<detail::BarrierState>(memory_, 0, sizeof(detail::BarrierState), detail::kBarrierMagic,
                                                   "Barrier");
  if (s.parties == 0 ||
      memory_.size() < detail::barrier_slots_offset() + std::size_t{s.parties} * sizeof(detail::Party)) {
    throw SerializationError("not a multiproc::Barrier handle (segment too small)");
  }
  state_ = &s;
}

detail::BarrierState& Barrier::state() const {
  if (!state_) throw StateError("Barrier: an empty handle");
  return *state_;
}

std::uint32_t Barrier::wait_until_steady(SteadyTime deadline, const char* who) {
  using detail::BrokenBy;
  detail::BarrierState& s = state();
  const detail::Party me = detail::self_party();
  std::uint64_t generation;
  std::uint32_t index;
  std::uint32_t seq;
  {
    detail::Guard guard(s);
    if (s.broken != BrokenBy::none) throw BrokenBarrier(detail::broken_message(s, who));
    index = s.count++;
    if (s.count == s.parties) {
      s.count = 0;
      ++s.generation;
      std::fill_n(detail::slots(s), s.parties, detail::Party{});
      s.seq.fetch_add(1, std::memory_order_relaxed);
      sys::futex_wake(s.seq, INT_MAX);
      return index;
    }
    detail::slots(s)[index] = me;
    generation = s.generation;
    seq = s.seq.load(std::memory_order_relaxed);
  }
  for (;;) {
    const auto left = detail::time_left(deadline);
    const std::chrono::nanoseconds slice =
        (left.count() < 0 || left > detail::kLivenessSlice) ? std::chrono::nanoseconds(detail::kLivenessSlice) : left;
    const auto r = left.count() == 0 ? sys::FutexWaitResult::timed_out : sys::futex_wait(s.seq, seq, slice);
    detail::Guard guard(s);
    if (s.generation != generation) {
      if (s.reset_generation == generation) {
        throw BrokenBarrier(std::string(who) + ": the barrier was reset while this party waited");
      }
      return index;
    }
    if (s.broken == BrokenBy::none) {
      if (deadline != SteadyTime::max() && std::chrono::steady_clock::now() >= deadline) {
        detail::break_barrier(s, BrokenBy::timeout, 0);
      } else if (r == sys::FutexWaitResult::timed_out && s.count > 1) {
        // Each waiter watches the next one (in arrival order, round the ring): a dead waiter's
        // nearest live predecessor notices, at one /proc read per waiter per slice.
        const detail::Party next = detail::slots(s)[(index + 1) % s.count];
        if (!detail::is_alive(next)) detail::break_barrier(s, BrokenBy::party_died, next.pid);
      }
    }
    if (s.broken != BrokenBy::none) {
      --s.count;
      detail::slots(s)[index] = detail::Party{};
      throw BrokenBarrier(detail::broken_message(s, who));
    }
    seq = s.seq.load(std::memory_order_relaxed);
  }
}

void Barrier::abort() {
  detail::BarrierState& s = state();
  detail::Guard guard(s);
  detail::break_barrier(s, detail::BrokenBy::abort, 0);
}

void Barrier::reset() {
  detail::BarrierState& s = state();
  detail::Guard guard(s);
  if (s.count > 0 || s.broken != detail::BrokenBy::none) {
    s.reset_generation = s.generation;
    ++s.generation;
  }
  s.count = 0;
  s.broken = detail::BrokenBy::none;
  s.dead_pid = 0;
  std::fill_n(detail::slots(s), s.parties, detail::Party{});
  s.seq.fetch_add(1, std::memory_order_relaxed);
  sys::futex_wake(s.seq, INT_MAX);
}

bool Barrier::broken() const {
  detail::BarrierState& s = state();
  detail::Guard guard(s);
  return s.broken != detail::BrokenBy::none;
}

std::uint32_t Barrier::parties() const { return state().parties; }

std::uint32_t Barrier::n_waiting() const {
  detail::BarrierState& s = state();
  detail::Guard guard(s);
  return s.count;
}

void Barrier::encode_handle(Writer& w) const { multiproc::encode(w, memory_); }

Barrier Barrier::decode_handle(Reader& r) {
  SharedMemory memory = multiproc::decode<SharedMemory>(r);
  if (!memory) return Barrier();
  return Barrier(std::move(memory));
}

}  // namespace multiproc

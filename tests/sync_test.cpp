// Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition and Barrier between real processes:
// exclusion, counting, wake-ups, timeouts, the death of a holder or a waiting party, passing the
// objects to Pool tasks, and nothing left behind.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <multiproc/multiproc.hpp>

#include "platform.hpp"
#include "test_support.hpp"

namespace {

using namespace std::chrono_literals;
using multiproc::Barrier;
using multiproc::BoundedSemaphore;
using multiproc::BrokenBarrier;
using multiproc::Condition;
using multiproc::Event;
using multiproc::Lock;
using multiproc::LockNotRecoverable;
using multiproc::OwnerDied;
using multiproc::Process;
using multiproc::RLock;
using multiproc::Semaphore;
using multiproc::SharedArray;
using multiproc::StateError;
using test_support::generous;
using test_support::Pipe;
using test_support::read_pid;
using test_support::scaled;
using test_support::write_pid;
using Clock = std::chrono::steady_clock;

// A started child running `f`.
template <class F>
Process start(F f) {
  Process p{std::move(f)};
  p.start();
  return p;
}

// Joins with a bound (scaled for slow builds), so that a hang fails the test instead of the whole
// binary; returns the exit code (-1 if it did not exit normally).
int join_code(Process& p, std::chrono::milliseconds bound = 10s) {
  if (!p.join_for(scaled(bound))) {
    p.kill();
    p.join();
    ADD_FAILURE() << "child " << p.pid() << " did not finish in time";
    return -1;
  }
  return p.exit_status().code();
}

// Reads the pid that a child writes to `ready` just before it blocks in the wait under test, then
// waits until that child sleeps. Nothing it does between the write and the wait can sleep, so
// asleep means blocked in the wait. The pid, or 0 when either did not happen in time.
pid_t blocked_child(const Pipe& ready) {
  const pid_t pid = read_pid(ready.read);
  if (pid == 0) return 0;
  return test_support::eventually([&] { return test_support::proc_state(pid) == 'S'; }) ? pid : 0;
}

// A read-modify-write slow enough that unsynchronized processes would lose updates.
void racy_increment(long& cell) {
  volatile long* p = &cell;
  const long v = *p;
  for (int i = 0; i < 20; ++i) asm volatile("" ::: "memory");
  *p = v + 1;
}

[[noreturn]] void die_by_sigkill() {
  ::kill(::getpid(), SIGKILL);
  for (;;) ::pause();
}

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }
double ms(std::chrono::milliseconds d) { return static_cast<double>(d.count()); }

// ---- Lock ----------------------------------------------------------------------------------------

// Without the lock, the same 4 x 20000 racy increments from processes released together lose
// about one in seven updates (measured); with it, none.
TEST(SyncLock, MutualExclusionCounterIsExactAcrossProcesses) {
  constexpr int kProcesses = 4;
  constexpr int kIncrements = 20000;
  Lock lock;
  Event go;
  SharedArray<long> counter(1);
  std::vector<Process> children;
  for (int i = 0; i < kProcesses; ++i) {
    children.push_back(start([&] {
      go.wait();  // all at once, so that they really compete
      for (int j = 0; j < kIncrements; ++j) {
        std::lock_guard guard(lock);
        racy_increment(counter[0]);
      }
    }));
  }
  go.set();
  for (auto& c : children) EXPECT_EQ(join_code(c), 0);
  EXPECT_EQ(counter[0], long{kProcesses} * kIncrements);
  EXPECT_FALSE(lock.locked());
}

TEST(SyncLock, MutualExclusionCounterIsExactAcrossThreads) {
  Lock lock;
  long counter = 0;
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int j = 0; j < 5000; ++j) {
        std::lock_guard guard(lock);
        ++counter;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(counter, 20000);
}

TEST(SyncLock, WorksWithStandardLockGuards) {
  Lock lock;
  {
    std::unique_lock guard(lock, std::defer_lock);
    EXPECT_TRUE(guard.try_lock_for(10ms));
    EXPECT_TRUE(lock.is_owned());
    EXPECT_TRUE(lock.locked());
  }
  EXPECT_FALSE(lock.locked());
  EXPECT_FALSE(lock.is_owned());
  {
    std::scoped_lock guard(lock);
    EXPECT_TRUE(lock.is_owned());
  }
  std::unique_lock until(lock, Clock::now() + 10ms);
  EXPECT_TRUE(until.owns_lock());
}

TEST(SyncLock, AcquireForTimesOutWhileAnotherProcessHoldsIt) {
  Lock lock;
  Pipe held, go;
  Process child = start([&] {
    lock.acquire();
    write_pid(held.write, ::getpid());
    (void)read_pid(go.read, 10s);
    lock.release();
  });
  ASSERT_EQ(read_pid(held.read), child.pid());
  EXPECT_TRUE(lock.locked());
  EXPECT_FALSE(lock.is_owned());
  EXPECT_FALSE(lock.try_acquire());
  const auto t0 = Clock::now();
  EXPECT_FALSE(lock.acquire_for(100ms));
  const double waited = ms_since(t0);
  EXPECT_GE(waited, 100.0);
  EXPECT_LT(waited, ms(100ms + generous(100ms)));  // it returned, and did not wait for the holder
  EXPECT_FALSE(lock.acquire(false));
  write_pid(go.write, 1);
  EXPECT_TRUE(lock.acquire_for(scaled(5s)));
  lock.release();
  EXPECT_EQ(join_code(child), 0);
}

TEST(SyncLock, ZeroOrNegativeTimeoutTriesOnce) {
  Lock lock;
  EXPECT_TRUE(lock.acquire_for(0ms));
  lock.release();
  EXPECT_TRUE(lock.acquire_for(-5s));
  lock.release();
}

TEST(SyncLock, AcquiringItTwiceInOneThreadThrowsStateError) {
  Lock lock;
  lock.acquire();
  EXPECT_THROW(lock.acquire(), StateError);
  EXPECT_FALSE(lock.try_acquire());
  lock.release();
}

TEST(SyncLock, ReleaseByANonOwnerThrowsStateError) {
  Lock lock;
  EXPECT_THROW(lock.release(), StateError);
  lock.acquire();
  std::thread other([&] { EXPECT_THROW(lock.release(), StateError); });
  other.join();
  EXPECT_TRUE(lock.is_owned());
  lock.release();
}

TEST(SyncLock, HolderKilledGivesOwnerDiedThenMakeConsistentRecovers) {
  Lock lock;
  Process child = start([&] {
    lock.acquire();
    die_by_sigkill();
  });
  child.join();
  ASSERT_TRUE(child.exit_status().signaled());
  ASSERT_EQ(child.exit_status().signal(), SIGKILL);
  try {
    lock.acquire();
    FAIL() << "expected OwnerDied";
  } catch (const OwnerDied& e) {
    EXPECT_EQ(e.owner_pid(), child.pid());
    EXPECT_NE(std::string(e.what()).find("pid " + std::to_string(child.pid())), std::string::npos) << e.what();
  }
  EXPECT_TRUE(lock.is_owned());  // the survivor holds it
  lock.make_consistent();
  lock.release();
  // As good as new, in this process and in another.
  EXPECT_TRUE(lock.acquire_for(1s));
  lock.release();
  Process next = start([&] {
    if (!lock.acquire_for(1s)) ::_exit(2);
    lock.release();
  });
  EXPECT_EQ(join_code(next), 0);
}

TEST(SyncLock, BlockedWaiterGetsOwnerDiedAsSoonAsTheHolderDies) {
  Lock lock;
  Pipe held;
  Process child = start([&] {
    lock.acquire();
    write_pid(held.write, ::getpid());
    std::this_thread::sleep_for(200ms);
    die_by_sigkill();
  });
  ASSERT_EQ(read_pid(held.read), child.pid());
  const auto t0 = Clock::now();
  EXPECT_THROW(lock.acquire(), OwnerDied);  // blocked until the kernel reports the death
  EXPECT_LT(ms_since(t0), ms(200ms + generous(100ms)));
  lock.make_consistent();
  lock.release();
  child.join();
  EXPECT_EQ(child.exit_status().signal(), SIGKILL);
}

TEST(SyncLock, TimedAcquireReportsOwnerDiedToo) {
  Lock lock;
  Process child = start([&] {
    lock.acquire();
    die_by_sigkill();
  });
  child.join();
  EXPECT_THROW((void)lock.acquire_for(1s), OwnerDied);
  lock.make_consistent();
  lock.release();
}

TEST(SyncLock, ReleasedWithoutMakeConsistentBecomesNotRecoverable) {
  Lock lock;
  Process child = start([&] {
    lock.acquire();
    die_by_sigkill();
  });
  child.join();
  EXPECT_THROW(lock.acquire(), OwnerDied);
  lock.release();  // not marked consistent
  EXPECT_THROW(lock.acquire(), LockNotRecoverable);
  EXPECT_THROW((void)lock.try_acquire(), StateError);  // LockNotRecoverable is a StateError
  Process other = start([&] {
    try {
      lock.acquire();
    } catch (const LockNotRecoverable&) {
      ::_exit(3);
    }
    ::_exit(0);
  });
  EXPECT_EQ(join_code(other), 3);
}

// glibc's pthread_mutex_trylock on a not-recoverable robust mutex returns ENOTRECOVERABLE but
// leaves the lock word holding the caller's tid, so that every later pthread_mutex_lock blocks
// forever (pthread_mutex_lock and _timedlock do not). The platform wrapper gives the word back.
TEST(SyncLock, PlatformTryLockOnANotRecoverableMutexLeavesItUnlocked) {
  namespace sys = multiproc::detail::sys;
  using R = sys::MutexLockResult;
  multiproc::SharedMemory memory(sizeof(pthread_mutex_t));
  auto& m = *static_cast<pthread_mutex_t*>(memory.data());
  sys::robust_mutex_init(m, false);
  Process holder = start([&] {
    (void)sys::robust_mutex_lock(m);
    die_by_sigkill();
  });
  holder.join();
  ASSERT_EQ(sys::robust_mutex_lock(m), R::owner_died);
  ASSERT_EQ(sys::robust_mutex_unlock(m), 0);  // not made consistent
  EXPECT_EQ(sys::robust_mutex_try_lock(m), R::not_recoverable);
  EXPECT_EQ(sys::robust_mutex_try_lock(m), R::not_recoverable);
  Process other = start([&] {
    const auto r = sys::robust_mutex_lock_until(m, Clock::now() + 2s);
    ::_exit(r == R::not_recoverable ? 3 : 1);
  });
  EXPECT_EQ(join_code(other), 3);
  EXPECT_EQ(sys::robust_mutex_lock(m), R::not_recoverable);
}

TEST(SyncLock, MakeConsistentNeedsTheLockAndIsANoOpWhenConsistent) {
  Lock lock;
  EXPECT_THROW(lock.make_consistent(), StateError);
  lock.acquire();
  lock.make_consistent();
  lock.release();
  EXPECT_TRUE(lock.try_acquire());
  lock.release();
}

TEST(SyncLock, CopiesShareTheLock) {
  Lock a;
  Lock b = a;
  Lock moved = std::move(b);
  a.acquire();
  EXPECT_TRUE(b.is_owned());
  EXPECT_TRUE(moved.locked());
  b.release();
  EXPECT_FALSE(a.locked());
}

// ---- RLock ---------------------------------------------------------------------------------------

TEST(SyncRLock, IsReentrantAndFreeOnlyAfterAsManyReleases) {
  RLock lock;
  lock.acquire();
  lock.acquire();
  EXPECT_TRUE(lock.acquire_for(10ms));
  auto other_process_can_take_it = [&] {
    Process p = start([&] { ::_exit(lock.try_acquire() ? 1 : 0); });
    return join_code(p) == 1;
  };
  lock.release();
  lock.release();
  EXPECT_TRUE(lock.is_owned());
  EXPECT_FALSE(other_process_can_take_it());
  lock.release();
  EXPECT_FALSE(lock.is_owned());
  EXPECT_TRUE(other_process_can_take_it());
  EXPECT_THROW(lock.release(), StateError);
}

TEST(SyncRLock, ReleaseByANonOwnerThrowsStateError) {
  RLock lock;
  EXPECT_THROW(lock.release(), StateError);
  Pipe held, go;
  Process child = start([&] {
    lock.acquire();
    lock.acquire();
    write_pid(held.write, ::getpid());
    (void)read_pid(go.read, 10s);
    lock.release();
    lock.release();
  });
  ASSERT_EQ(read_pid(held.read), child.pid());
  EXPECT_THROW(lock.release(), StateError);  // held by the child, not by us
  std::thread other([&] {
    lock.acquire();  // waits for the child
    std::thread third([&] { EXPECT_THROW(lock.release(), StateError); });
    third.join();
    lock.release();
  });
  write_pid(go.write, 1);
  other.join();
  EXPECT_EQ(join_code(child), 0);
}

TEST(SyncRLock, HolderKilledAtDepthThreeGivesOwnerDiedAtDepthOne) {
  RLock lock;
  Process child = start([&] {
    lock.acquire();
    lock.acquire();
    lock.acquire();
    die_by_sigkill();
  });
  child.join();
  try {
    lock.acquire();
    FAIL() << "expected OwnerDied";
  } catch (const OwnerDied& e) {
    EXPECT_EQ(e.owner_pid(), child.pid());
  }
  lock.make_consistent();
  lock.acquire();  // reentrant as before
  lock.release();
  lock.release();
  EXPECT_FALSE(lock.locked());
  EXPECT_THROW(lock.release(), StateError);
}

// ---- Semaphore, BoundedSemaphore --------------------------------------------------------------

TEST(SyncSemaphore, CountsAcrossProcesses) {
  Semaphore sem(2);
  EXPECT_EQ(sem.get_value(), 2u);
  EXPECT_TRUE(sem.acquire());
  EXPECT_TRUE(sem.try_acquire());
  EXPECT_FALSE(sem.try_acquire());
  EXPECT_EQ(sem.get_value(), 0u);
  Process waiter = start([&] {
    sem.acquire();
    ::_exit(7);
  });
  EXPECT_FALSE(waiter.join_for(100ms));  // nothing to take
  sem.release();
  EXPECT_EQ(join_code(waiter), 7);
  EXPECT_EQ(sem.get_value(), 0u);
  sem.release(2);
  EXPECT_EQ(sem.get_value(), 2u);
}

TEST(SyncSemaphore, AtMostValueHoldersAtOnce) {
  constexpr int kHolders = 3;
  Semaphore sem(kHolders);
  Lock lock;
  SharedArray<int> state(2);  // [0]: holding now, [1]: most ever holding at once
  std::vector<Process> children;
  for (int i = 0; i < 6; ++i) {
    children.push_back(start([&] {
      for (int round = 0; round < 5; ++round) {
        sem.acquire();
        {
          std::lock_guard guard(lock);
          state[1] = std::max(state[1], ++state[0]);
        }
        std::this_thread::sleep_for(5ms);
        {
          std::lock_guard guard(lock);
          --state[0];
        }
        sem.release();
      }
    }));
  }
  for (auto& c : children) EXPECT_EQ(join_code(c), 0);
  EXPECT_EQ(state[0], 0);
  EXPECT_LE(state[1], kHolders);
  EXPECT_GE(state[1], 1);
  EXPECT_EQ(sem.get_value(), static_cast<std::uint32_t>(kHolders));
}

TEST(SyncSemaphore, ReleaseNWakesNWaiters) {
  Semaphore sem(0);
  Pipe ready;
  std::vector<Process> waiters;
  for (int i = 0; i < 3; ++i) {
    waiters.push_back(start([&] {
      write_pid(ready.write, ::getpid());
      sem.acquire();
    }));
  }
  for (std::size_t i = 0; i < waiters.size(); ++i) ASSERT_NE(blocked_child(ready), 0);
  sem.release(2);
  auto finished = [&] {
    int n = 0;
    for (auto& w : waiters) n += w.is_alive() ? 0 : 1;
    return n;
  };
  EXPECT_TRUE(test_support::eventually([&] { return finished() >= 2; }));
  std::this_thread::sleep_for(50ms);  // time for a third to finish, were it wrongly woken too
  EXPECT_EQ(finished(), 2);
  sem.release();
  for (auto& w : waiters) EXPECT_EQ(join_code(w), 0);
  EXPECT_EQ(sem.get_value(), 0u);
}

TEST(SyncSemaphore, AcquireForTimesOutWithinTolerance) {
  Semaphore sem(0);
  const auto t0 = Clock::now();
  EXPECT_FALSE(sem.acquire_for(100ms));
  const double waited = ms_since(t0);
  EXPECT_GE(waited, 100.0);
  EXPECT_LT(waited, ms(100ms + generous(100ms)));
  EXPECT_FALSE(sem.acquire_until(std::chrono::system_clock::now() + 20ms));
}

TEST(SyncBoundedSemaphore, OverReleaseThrowsAndChangesNothing) {
  BoundedSemaphore sem(2);
  EXPECT_THROW(sem.release(), StateError);
  EXPECT_EQ(sem.get_value(), 2u);
  EXPECT_TRUE(sem.acquire());
  EXPECT_THROW(sem.release(2), StateError);
  EXPECT_EQ(sem.get_value(), 1u);
  // Released by another process: no owner, but the bound holds there too.
  Process child = start([&] {
    sem.release();
    try {
      sem.release();
    } catch (const StateError&) {
      ::_exit(5);
    }
    ::_exit(0);
  });
  EXPECT_EQ(join_code(child), 5);
  EXPECT_EQ(sem.get_value(), 2u);
}

TEST(SyncBoundedSemaphore, IsASemaphoreThatKeepsItsBoundWhenSliced) {
  BoundedSemaphore bounded(1);
  Semaphore plain = bounded;
  EXPECT_THROW(plain.release(), StateError);
}

// ---- Event ---------------------------------------------------------------------------------------

TEST(SyncEvent, SetWakesWaitersInOtherProcesses) {
  Event event;
  EXPECT_FALSE(event.is_set());
  Pipe ready;
  std::vector<Process> waiters;
  for (int i = 0; i < 3; ++i) {
    waiters.push_back(start([&] {
      write_pid(ready.write, ::getpid());
      event.wait();
      ::_exit(event.is_set() ? 4 : 1);
    }));
  }
  for (std::size_t i = 0; i < waiters.size(); ++i) ASSERT_NE(blocked_child(ready), 0);
  for (auto& w : waiters) EXPECT_TRUE(w.is_alive());
  const auto t0 = Clock::now();
  event.set();
  for (auto& w : waiters) EXPECT_EQ(join_code(w), 4);
  EXPECT_LT(ms_since(t0), ms(generous(100ms)));
  EXPECT_TRUE(event.is_set());
  EXPECT_TRUE(event.wait_for(0ms));
  event.clear();
  EXPECT_FALSE(event.is_set());
}

TEST(SyncEvent, WaitForReturnsFalseWhenTheSetterDied) {
  Event event;
  Process setter = start([&] {
    std::this_thread::sleep_for(10ms);
    die_by_sigkill();  // before it could set the event
  });
  setter.join();
  const auto t0 = Clock::now();
  EXPECT_FALSE(event.wait_for(100ms));
  const double waited = ms_since(t0);
  EXPECT_GE(waited, 100.0);
  EXPECT_LT(waited, ms(100ms + generous(100ms)));
  EXPECT_FALSE(event.is_set());
}

TEST(SyncEvent, ASetFollowedByClearStillWakesTheWaiter) {
  Event event;
  Pipe ready;
  Process waiter = start([&] {
    write_pid(ready.write, ::getpid());
    ::_exit(event.wait_for(scaled(10s)) ? 6 : 1);
  });
  ASSERT_EQ(blocked_child(ready), waiter.pid());  // set and clear must both fall within its wait
  event.set();
  event.clear();
  EXPECT_EQ(join_code(waiter), 6);
  EXPECT_FALSE(event.is_set());
}

// ---- Condition -----------------------------------------------------------------------------------

TEST(SyncCondition, ProducerConsumerAcrossProcesses) {
  constexpr long kItems = 2000;
  constexpr long kSlots = 8;
  Condition cond{Lock()};
  SharedArray<long> ring(kSlots);
  SharedArray<long> counts(2);  // [0]: produced, [1]: consumed
  Process producer = start([&] {
    for (long i = 0; i < kItems; ++i) {
      std::unique_lock guard(cond);
      cond.wait([&] { return counts[0] - counts[1] < kSlots; });
      ring[static_cast<std::size_t>(counts[0] % kSlots)] = i * 3;
      ++counts[0];
      cond.notify_all();
    }
  });
  long sum = 0;
  bool in_order = true;
  for (long i = 0; i < kItems; ++i) {
    std::unique_lock guard(cond);
    ASSERT_TRUE(cond.wait_for(scaled(10s), [&] { return counts[0] > counts[1]; }));
    const long item = ring[static_cast<std::size_t>(counts[1] % kSlots)];
    in_order = in_order && item == i * 3;
    sum += item;
    ++counts[1];
    cond.notify_all();
  }
  EXPECT_TRUE(in_order);
  EXPECT_EQ(sum, 3 * kItems * (kItems - 1) / 2);
  EXPECT_EQ(join_code(producer), 0);
}

TEST(SyncCondition, NotifyWakesAWaiterInAnotherProcess) {
  Condition cond;
  SharedArray<int> flag(1);
  Pipe ready;
  Process waiter = start([&] {
    std::lock_guard guard(cond);
    write_pid(ready.write, ::getpid());
    const bool ok = cond.wait_for(scaled(10s), [&] { return flag[0] == 1; });
    ::_exit(ok ? 8 : 1);
  });
  ASSERT_EQ(blocked_child(ready), waiter.pid());
  {
    std::lock_guard guard(cond);
    flag[0] = 1;
    cond.notify();
  }
  EXPECT_EQ(join_code(waiter), 8);
}

TEST(SyncCondition, WaitForTimesOutWithinToleranceAndKeepsTheLock) {
  Condition cond{Lock()};
  std::lock_guard guard(cond);
  const auto t0 = Clock::now();
  EXPECT_FALSE(cond.wait_for(100ms));
  const double waited = ms_since(t0);
  EXPECT_GE(waited, 100.0);
  EXPECT_LT(waited, ms(100ms + generous(100ms)));
  EXPECT_FALSE(cond.wait_for(20ms, [] { return false; }));
  EXPECT_TRUE(cond.wait_for(20ms, [] { return true; }));
}

TEST(SyncCondition, WaitAndNotifyWithoutTheLockThrowStateError) {
  Condition cond;
  EXPECT_THROW(cond.notify(), StateError);
  EXPECT_THROW(cond.notify_all(), StateError);
  EXPECT_THROW(cond.wait(), StateError);
  EXPECT_THROW((void)cond.wait_for(1ms), StateError);
}

TEST(SyncCondition, WaitOverAnRLockRestoresItsDepth) {
  RLock lock;
  Condition cond(lock);
  lock.acquire();
  lock.acquire();
  EXPECT_FALSE(cond.wait_for(10ms));
  EXPECT_TRUE(lock.is_owned());
  lock.release();
  EXPECT_TRUE(lock.is_owned());
  lock.release();
  EXPECT_FALSE(lock.locked());
  EXPECT_THROW(lock.release(), StateError);
}

TEST(SyncCondition, WaitSurfacesOwnerDiedWhenTheNotifierDiesHoldingTheLock) {
  Lock lock;
  Condition cond(lock);
  Pipe held;
  Process notifier = start([&] {
    (void)read_pid(held.read, 10s);  // the parent holds the lock: it gets it only once the parent waits
    lock.acquire();
    cond.notify();
    die_by_sigkill();  // with the lock held
  });
  lock.acquire();
  write_pid(held.write, ::getpid());
  const auto t0 = Clock::now();
  // Woken by the notify, well before its own timeout, which would end in OwnerDied too.
  EXPECT_THROW((void)cond.wait_for(scaled(10s)), OwnerDied);
  EXPECT_LT(ms_since(t0), ms(generous(200ms)));
  EXPECT_TRUE(lock.is_owned());  // reacquired, from the dead
  lock.make_consistent();
  lock.release();
  notifier.join();
  EXPECT_EQ(notifier.exit_status().signal(), SIGKILL);
}

// ---- Barrier -------------------------------------------------------------------------------------

TEST(SyncBarrier, ThreeProcessesGetDistinctIndicesZeroToTwoEveryRound) {
  Barrier barrier(3);
  EXPECT_EQ(barrier.parties(), 3u);
  constexpr int kRounds = 3;
  SharedArray<int> indices(3 * kRounds);
  std::vector<Process> children;
  for (int p = 0; p < 3; ++p) {
    children.push_back(start([&, p] {
      for (int round = 0; round < kRounds; ++round) {
        indices[static_cast<std::size_t>(round * 3 + p)] = static_cast<int>(barrier.wait_for(scaled(10s)));
      }
    }));
  }
  for (auto& c : children) EXPECT_EQ(join_code(c), 0);
  for (int round = 0; round < kRounds; ++round) {
    std::set<int> got;
    for (int p = 0; p < 3; ++p) got.insert(indices[static_cast<std::size_t>(round * 3 + p)]);
    EXPECT_EQ(got, (std::set<int>{0, 1, 2})) << "round " << round;
  }
  EXPECT_FALSE(barrier.broken());
  EXPECT_EQ(barrier.n_waiting(), 0u);
}

TEST(SyncBarrier, APartyKilledWhileWaitingBreaksItForTheOthers) {
  Barrier barrier(4);
  Process victim = start([&] { (void)barrier.wait(); });
  ASSERT_TRUE(test_support::eventually([&] { return barrier.n_waiting() >= 1; }));
  Process other = start([&] {
    try {
      (void)barrier.wait();
    } catch (const BrokenBarrier&) {
      ::_exit(3);
    }
    ::_exit(0);
  });
  ASSERT_TRUE(test_support::eventually([&] { return barrier.n_waiting() >= 2; }));
  ASSERT_EQ(barrier.n_waiting(), 2u);
  victim.kill();  // SIGKILL while it waits; it stays a zombie until joined
  const auto t0 = Clock::now();
  // Told of the death within a few of its 50 ms slices, well before its own timeout (which would
  // break the barrier too).
  try {
    (void)barrier.wait_for(scaled(10s));
    ADD_FAILURE() << "expected BrokenBarrier";
  } catch (const BrokenBarrier& e) {
    EXPECT_NE(std::string(e.what()).find("pid " + std::to_string(victim.pid())), std::string::npos) << e.what();
  }
  EXPECT_LT(ms_since(t0), ms(generous(100ms)));
  EXPECT_EQ(join_code(other), 3);
  EXPECT_TRUE(barrier.broken());
  EXPECT_THROW((void)barrier.wait_for(10s), BrokenBarrier);  // stays broken
  victim.join();
  barrier.reset();
  EXPECT_FALSE(barrier.broken());
  EXPECT_EQ(barrier.n_waiting(), 0u);
}

TEST(SyncBarrier, AReapedDeadPartyIsDetectedToo) {
  Barrier barrier(3);
  Process victim = start([&] { (void)barrier.wait(); });
  ASSERT_TRUE(test_support::eventually([&] { return barrier.n_waiting() >= 1; }));
  victim.kill();
  victim.join();  // gone, not a zombie
  const auto t0 = Clock::now();
  EXPECT_THROW((void)barrier.wait_for(scaled(10s)), BrokenBarrier);
  EXPECT_LT(ms_since(t0), ms(generous(100ms)));  // the death noticed, not the timeout
}

TEST(SyncBarrier, WaitForTimeoutBreaksItAsInPython) {
  Barrier barrier(2);
  const auto t0 = Clock::now();
  EXPECT_THROW((void)barrier.wait_for(100ms), BrokenBarrier);
  const double waited = ms_since(t0);
  EXPECT_GE(waited, 100.0);
  EXPECT_LT(waited, ms(100ms + generous(100ms)));
  EXPECT_TRUE(barrier.broken());
  EXPECT_EQ(barrier.n_waiting(), 0u);
  barrier.reset();
  EXPECT_FALSE(barrier.broken());
  Process partner = start([&] { ::_exit(static_cast<int>(barrier.wait_for(scaled(10s))) + 10); });
  const std::uint32_t mine = barrier.wait_for(scaled(10s));
  const int theirs = join_code(partner) - 10;
  EXPECT_EQ(std::set<int>({static_cast<int>(mine), theirs}), (std::set<int>{0, 1}));
}

TEST(SyncBarrier, AbortWakesWaitersWithBrokenBarrier) {
  Barrier barrier(3);
  Process waiter = start([&] {
    try {
      (void)barrier.wait();
    } catch (const BrokenBarrier&) {
      ::_exit(3);
    }
    ::_exit(0);
  });
  ASSERT_TRUE(test_support::eventually([&] { return barrier.n_waiting() == 1; }));
  barrier.abort();
  EXPECT_EQ(join_code(waiter), 3);
  EXPECT_TRUE(barrier.broken());
  EXPECT_THROW((void)barrier.wait(), BrokenBarrier);
}

TEST(SyncBarrier, ResetWhileWaitingBreaksTheWaitersAndLeavesItUsable) {
  Barrier barrier(2);
  Process waiter = start([&] {
    try {
      (void)barrier.wait();
    } catch (const BrokenBarrier&) {
      ::_exit(3);
    }
    ::_exit(0);
  });
  ASSERT_TRUE(test_support::eventually([&] { return barrier.n_waiting() == 1; }));
  barrier.reset();
  EXPECT_EQ(join_code(waiter), 3);
  EXPECT_FALSE(barrier.broken());
  std::thread partner([&] { EXPECT_NO_THROW((void)barrier.wait_for(scaled(10s))); });
  EXPECT_NO_THROW((void)barrier.wait_for(scaled(10s)));
  partner.join();
}

TEST(SyncBarrier, OnePartyPassesAtOnceAndZeroIsInvalid) {
  Barrier one(1);
  EXPECT_EQ(one.wait(), 0u);
  EXPECT_EQ(one.wait(), 0u);
  EXPECT_THROW(Barrier(0), multiproc::InvalidArgument);
  Barrier empty;
  EXPECT_THROW((void)empty.wait(), StateError);
}

// ---- Value, Array ------------------------------------------------------------------------------

TEST(SyncValue, UpdateIsExactAcrossProcesses) {
  multiproc::Value<long> total;
  EXPECT_EQ(total.get(), 0);
  std::vector<Process> children;
  for (int i = 0; i < 4; ++i) {
    children.push_back(start([&] {
      for (int j = 0; j < 2000; ++j) {
        if (j % 2) {
          total.update([](long v) { return v + 1; });
        } else {
          std::lock_guard guard(total.get_lock());  // recursive: get() and set() take it again
          total.set(total.get() + 1);
        }
      }
    }));
  }
  for (auto& c : children) EXPECT_EQ(join_code(c), 0);
  EXPECT_EQ(total.get(), 8000);
  EXPECT_EQ(*total.get_obj(), 8000);
}

TEST(SyncValue, HoldsAnyTriviallyCopyableType) {
  struct Point {
    double x;
    int y;
  };
  multiproc::Value<Point> p(Point{1.5, 2});
  Process child = start([&] { p.set(Point{p.get().x * 2, p.get().y + 1}); });
  EXPECT_EQ(join_code(child), 0);
  EXPECT_EQ(p.get().x, 3.0);
  EXPECT_EQ(p.get().y, 3);
}

TEST(SyncArray, WritesInAChildAreSeenByTheParent) {
  multiproc::Array<int> a(std::vector<int>{1, 2, 3});
  EXPECT_EQ(a.size(), 3u);
  Process child = start([&] {
    for (auto& x : a) x *= 10;
    a.set(2, 99);
  });
  EXPECT_EQ(join_code(child), 0);
  EXPECT_EQ(a.to_vector(), (std::vector<int>{10, 20, 99}));
  EXPECT_EQ(a.get(0), 10);
  EXPECT_THROW((void)a.get(3), multiproc::InvalidArgument);
  multiproc::Array<double> empty;
  EXPECT_TRUE(empty.empty());
  EXPECT_TRUE(empty.to_vector().empty());
}

// ---- the codec: every object arrives as the same object ---------------------------------------

template <class T>
T round_trip(const T& value) {
  return multiproc::from_bytes<T>(multiproc::to_bytes(value));
}

// Decoded in the process that encoded it, an object is a second mapping of the same memory: a
// mutex locked through one mapping is unlocked through the same one, so that ThreadSanitizer (which
// knows mutexes by address) follows.
TEST(SyncCodec, EveryObjectDecodesAsTheSameObject) {
  Lock lock;
  Lock lock2 = round_trip(lock);
  lock2.acquire();
  EXPECT_TRUE(lock.is_owned());
  EXPECT_TRUE(lock.locked());
  lock2.release();
  EXPECT_FALSE(lock.locked());

  RLock rlock;
  rlock.acquire();
  EXPECT_TRUE(round_trip(rlock).is_owned());
  rlock.release();

  Semaphore sem(3);
  EXPECT_TRUE(round_trip(sem).acquire());
  EXPECT_EQ(sem.get_value(), 2u);

  BoundedSemaphore bounded(1);
  EXPECT_THROW(round_trip(bounded).release(), StateError);
  EXPECT_THROW(multiproc::from_bytes<Semaphore>(multiproc::to_bytes(bounded)).release(), StateError);

  Event event;
  round_trip(event).set();
  EXPECT_TRUE(event.is_set());

  Condition cond{lock};
  Condition cond2 = round_trip(cond);
  cond2.acquire();
  EXPECT_TRUE(lock.is_owned());
  cond.notify();  // the same lock
  cond2.release();

  Barrier barrier(2);
  round_trip(barrier).abort();
  EXPECT_TRUE(barrier.broken());
  EXPECT_EQ(round_trip(barrier).parties(), 2u);
  EXPECT_THROW((void)round_trip(Barrier()).wait(), StateError);

  multiproc::Value<int> value(5);
  round_trip(value).set(6);
  EXPECT_EQ(value.get(), 6);
  auto value2 = round_trip(value);
  value2.get_lock().acquire();
  EXPECT_TRUE(value.get_lock().is_owned());
  value2.get_lock().release();

  multiproc::Array<double> array(4);
  round_trip(array)[3] = 2.5;
  EXPECT_EQ(array[3], 2.5);
  EXPECT_EQ(round_trip(array).size(), 4u);
}

TEST(SyncCodec, AHandleDecodedAsAnotherTypeIsRefused) {
  using multiproc::from_bytes;
  using multiproc::SerializationError;
  using multiproc::to_bytes;
  EXPECT_THROW(from_bytes<RLock>(to_bytes(Lock())), SerializationError);
  EXPECT_THROW(from_bytes<Lock>(to_bytes(RLock())), SerializationError);
  EXPECT_THROW(from_bytes<Semaphore>(to_bytes(Event())), SerializationError);
  EXPECT_THROW(from_bytes<BoundedSemaphore>(to_bytes(Semaphore(1))), SerializationError);
  EXPECT_THROW(from_bytes<Barrier>(to_bytes(Lock())), SerializationError);
  EXPECT_THROW(from_bytes<Event>(to_bytes(multiproc::SharedMemory(4096))), SerializationError);
  EXPECT_THROW(from_bytes<multiproc::Value<float>>(to_bytes(multiproc::Value<int>(1))), SerializationError);
  EXPECT_THROW(from_bytes<multiproc::Array<int>>(to_bytes(multiproc::Value<int>(1))), SerializationError);
  EXPECT_THROW(from_bytes<multiproc::Value<int>>(to_bytes(multiproc::Array<int>(1))), SerializationError);
  EXPECT_THROW(from_bytes<Lock>(to_bytes(multiproc::SharedMemory())), SerializationError);
}

// ---- Pool tasks ----------------------------------------------------------------------------------

int add_thousand_under_lock(Lock lock, multiproc::Value<int> value) {
  for (int i = 0; i < 1000; ++i) {
    std::lock_guard guard(lock);
    value.set(value.get() + 1);
  }
  return 0;
}

int fill_array(multiproc::Array<double> a) {
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<double>(i) * 0.5;
  return static_cast<int>(a.size());
}

int wait_event_then_release(Event event, Semaphore sem) {
  if (!event.wait_for(scaled(10s))) return -1;
  sem.release();
  return 1;
}

TEST(SyncPool, TasksIncrementAValueUnderALockExactly) {
  multiproc::Pool pool{{.processes = 2}};
  // Made after the workers were forked: they reach the memory through the codec alone.
  Lock lock;
  multiproc::Value<int> value;
  std::vector<std::tuple<Lock, multiproc::Value<int>>> args(4, {lock, value});
  const std::vector<int> results = pool.starmap(add_thousand_under_lock, args, 1);
  EXPECT_EQ(results, std::vector<int>(4, 0));
  EXPECT_EQ(value.get(), 4000);
}

TEST(SyncPool, AnArrayWrittenByATaskIsVisibleToTheParent) {
  multiproc::Array<double> a(100);  // made before the workers: they inherit it, and decode it too
  multiproc::Pool pool{{.processes = 2}};
  EXPECT_EQ(pool.apply(fill_array, a), 100);
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], static_cast<double>(i) * 0.5) << i;
}

TEST(SyncPool, AnEventAndASemaphoreReachTasksAsTheSameObjects) {
  multiproc::Pool pool{{.processes = 2}};
  Event go;
  Semaphore done(0);
  auto r1 = pool.apply_async(wait_event_then_release, go, done);
  auto r2 = pool.apply_async(wait_event_then_release, go, done);
  EXPECT_FALSE(done.acquire_for(50ms));
  go.set();
  EXPECT_TRUE(done.acquire_for(scaled(10s)));
  EXPECT_TRUE(done.acquire_for(scaled(10s)));
  EXPECT_EQ(r1.get(), 1);
  EXPECT_EQ(r2.get(), 1);
}

// ---- nothing left behind ---------------------------------------------------------------------

// Lines of /proc/self/maps: all of them, or those of the library's memfds (the sanitizers'
// allocators map and unmap memory of their own as they go, so under them only the latter is exact).
int count_map_lines(bool memfd_only = false) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  int n = 0;
  while (std::getline(maps, line)) {
    if (!memfd_only || line.find("/memfd:multiproc") != std::string::npos) ++n;
  }
  return n;
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kExactMaps = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kExactMaps = false;
#else
constexpr bool kExactMaps = true;
#endif
#else
constexpr bool kExactMaps = true;
#endif

std::set<std::string> dev_shm_entries() {
  std::set<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) out.insert(e.path().filename().string());
  return out;
}

void use_every_object_once() {
  Lock lock;
  RLock rlock;
  Semaphore sem(1);
  BoundedSemaphore bounded(1);
  Event event;
  Condition cond;
  Condition cond_lock{lock};
  Barrier barrier(2);
  multiproc::Value<double> value(1.0);
  multiproc::Array<int> array(1000);
  Lock lock_copy = round_trip(lock);
  { std::lock_guard guard(lock_copy); }
  {
    RLock rlock_copy = round_trip(rlock);
    std::lock_guard guard(rlock_copy);
  }
  (void)round_trip(sem).try_acquire();
  round_trip(bounded).acquire();
  round_trip(event).set();
  {
    Condition c = round_trip(cond);
    std::lock_guard guard(c);
    c.notify_all();
  }
  (void)round_trip(cond_lock);
  round_trip(barrier).abort();
  round_trip(value).set(2.0);
  round_trip(array)[999] = 1;
}

TEST(SyncResources, NoDescriptorsOrMappingsLeftAndNothingInDevShm) {
  use_every_object_once();  // first use may set up what stays for good (caches, atfork handlers)
  const int fds = test_support::count_open_fds();
  const int maps = count_map_lines();
  const int memfd_maps = count_map_lines(true);
  const auto shm = dev_shm_entries();
  for (int i = 0; i < 20; ++i) use_every_object_once();
  EXPECT_EQ(test_support::count_open_fds(), fds);
  EXPECT_EQ(count_map_lines(true), memfd_maps);
  if (kExactMaps) {
    EXPECT_EQ(count_map_lines(), maps);
  }
  EXPECT_EQ(dev_shm_entries(), shm);
}

TEST(SyncResources, EachObjectHoldsOneDescriptorAndOneMapping) {
  const int fds = test_support::count_open_fds();
  const int maps = count_map_lines(true);
  {
    Lock lock;
    Lock copy = lock;
    multiproc::Value<int> value;  // data and lock in one segment
    EXPECT_EQ(test_support::count_open_fds(), fds + 2);
    EXPECT_EQ(count_map_lines(true), maps + 2);
  }
  EXPECT_EQ(test_support::count_open_fds(), fds);
  EXPECT_EQ(count_map_lines(true), maps);
}

}  // namespace

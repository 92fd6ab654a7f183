// Queue, JoinableQueue, SimpleQueue: values, ordering, limits and timeouts, stress over real
// processes, large items, processes killed in the middle of put and get, handles passed to
// children and Pool tasks, and what is left behind.
#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <multiproc/multiproc.hpp>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "platform.hpp"
#include "test_support.hpp"

namespace mp = multiproc;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test_support::generous;
using test_support::scaled;

namespace {

// A producer id and a sequence number in one item.
std::uint64_t item_of(std::uint32_t producer, std::uint32_t seq) { return (std::uint64_t{producer} << 32) | seq; }
std::uint32_t producer_of(std::uint64_t item) { return static_cast<std::uint32_t>(item >> 32); }
std::uint32_t seq_of(std::uint64_t item) { return static_cast<std::uint32_t>(item); }
constexpr std::uint64_t kStop = ~std::uint64_t{0};

template <class T>
std::uint64_t add(const mp::SharedArray<T>& a, std::size_t i, T v = 1) {
  return std::atomic_ref<T>(a[i]).fetch_add(v);
}
template <class T>
T load(const mp::SharedArray<T>& a, std::size_t i) {
  return std::atomic_ref<T>(a[i]).load();
}

// Waits for a child and returns its exit status; fails the test (and kills it) after `timeout`,
// scaled for slow builds.
mp::ExitStatus finish(mp::Process& p, std::chrono::milliseconds timeout = 60s) {
  if (!p.join_for(scaled(timeout))) {
    ADD_FAILURE() << p.name() << " did not finish in time";
    p.kill();
    p.join();
  }
  return p.exit_status();
}

std::vector<std::uint32_t> pattern(std::size_t n, std::uint32_t seed) {
  std::vector<std::uint32_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint32_t>(i * 2654435761u) ^ seed;
  return v;
}

int count_queue_mappings() {
  std::ifstream maps("/proc/self/maps");
  int n = 0;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("multiproc-queue") != std::string::npos) ++n;
  }
  return n;
}

std::set<std::string> dev_shm() {
  std::set<std::string> out;
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d)) out.insert(e->d_name);
    ::closedir(d);
  }
  return out;
}

}  // namespace

// ---- one process ----------------------------------------------------------------------------

TEST(Queue, PutGetRoundTripsTypedItemsInFifoOrder) {
  using Item = std::pair<std::string, std::vector<int>>;
  mp::Queue<Item> q;
  for (int i = 0; i < 100; ++i) q.put({"item " + std::to_string(i), std::vector<int>(static_cast<std::size_t>(i), i)});
  EXPECT_EQ(q.qsize(), 100u);
  for (int i = 0; i < 100; ++i) {
    Item it = q.get();
    EXPECT_EQ(it.first, "item " + std::to_string(i));
    EXPECT_EQ(it.second, std::vector<int>(static_cast<std::size_t>(i), i));
  }
  EXPECT_TRUE(q.empty());
}

TEST(Queue, QsizeEmptyFullFollowMaxsize) {
  mp::Queue<int> q(3);
  EXPECT_EQ(q.maxsize(), 3u);
  EXPECT_TRUE(q.empty());
  EXPECT_FALSE(q.full());
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(q.try_put(i));
  EXPECT_TRUE(q.full());
  EXPECT_EQ(q.qsize(), 3u);
  EXPECT_FALSE(q.try_put(99));
  EXPECT_EQ(q.get(), 0);
  EXPECT_FALSE(q.full());
  EXPECT_TRUE(q.try_put(3));
  EXPECT_EQ(q.get(), 1);
  EXPECT_EQ(q.get(), 2);
  EXPECT_EQ(q.get(), 3);
  EXPECT_EQ(q.try_get(), std::nullopt);
}

TEST(Queue, GetTimeoutThrowsEmptyWithinTolerance) {
  mp::Queue<int> q;
  const auto t0 = Clock::now();
  EXPECT_THROW(q.get(200ms), mp::Empty);
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 200ms);
  EXPECT_LT(took, 200ms + generous(150ms));  // it returned: the timeout fired
  EXPECT_EQ(q.try_get(), std::nullopt);
}

TEST(Queue, PutTimeoutThrowsFullWithinTolerance) {
  mp::Queue<int> q(10);
  for (int i = 0; i < 10; ++i) q.put(i);
  const auto t0 = Clock::now();
  EXPECT_THROW(q.put(10, 200ms), mp::Full);
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 200ms);
  EXPECT_LT(took, 200ms + generous(150ms));  // it returned: the timeout fired
  EXPECT_EQ(q.qsize(), 10u);
  EXPECT_EQ(q.get(), 0);  // nothing was half-put
}

TEST(Queue, TimedGetReturnsAnItemPutByAnotherProcessMeanwhile) {
  mp::Queue<std::string> q;
  mp::Process p{[&] {
    std::this_thread::sleep_for(100ms);
    q.put("late");
  }};
  p.start();
  const auto t0 = Clock::now();
  EXPECT_EQ(q.get(scaled(5s)), "late");
  EXPECT_LT(Clock::now() - t0, 100ms + generous(100ms));  // woken by the put, not by its timeout
  EXPECT_TRUE(finish(p).success());
}

// The library's one rule: a negative timeout is zero (as in Python): try once, do not wait.
TEST(Queue, NegativeTimeoutIsZero) {
  mp::Queue<int> q;
  const auto t0 = Clock::now();
  EXPECT_THROW(q.get(-1ms), mp::Empty);
  q.put(1, -1ms);  // room: it goes in
  EXPECT_EQ(q.get(-1s), 1);
  mp::Queue<int> full(1);
  full.put(1);
  EXPECT_THROW(full.put(2, -5ms), mp::Full);
  EXPECT_LT(Clock::now() - t0, generous(100ms));
}

TEST(Queue, CloseMakesThisHandleUnusable) {
  mp::Queue<int> q;
  q.put(1);
  mp::Queue<int> copy = q;
  q.close();
  EXPECT_TRUE(copy.closed());
  EXPECT_THROW(q.put(2), mp::StateError);
  EXPECT_THROW((void)q.get(), mp::StateError);
  EXPECT_EQ(q.qsize(), 1u);
}

TEST(Queue, UnboundedPutGrowsTheBufferInsteadOfWaiting) {
  // Python's put() on an unbounded queue never waits for a consumer: 32 MiB queued by one
  // process that only reads afterwards.
  mp::Queue<std::vector<std::uint32_t>> q;
  for (std::uint32_t i = 0; i < 32; ++i) q.put(pattern(256 * 1024, i));
  EXPECT_EQ(q.qsize(), 32u);
  for (std::uint32_t i = 0; i < 32; ++i) ASSERT_EQ(q.get(), pattern(256 * 1024, i));
}

TEST(Queue, FullBufferAtItsLimitMakesPutWait) {
  mp::Queue<std::vector<char>> q(mp::QueueOptions{.buffer_bytes = 4096, .max_buffer_bytes = 16384});
  int n = 0;
  while (q.try_put(std::vector<char>(1000, 'x'))) ++n;
  EXPECT_GE(n, 14);  // 16 KiB of 1 KiB records, less headers
  EXPECT_LE(n, 16);
  EXPECT_THROW(q.put(std::vector<char>(1000, 'y'), 50ms), mp::Full);
  (void)q.get();
  EXPECT_TRUE(q.try_put(std::vector<char>(1000, 'z')));
  EXPECT_EQ(q.qsize(), static_cast<std::size_t>(n));
}

// ---- across processes ---------------------------------------------------------------------

TEST(QueueStress, TwoProducersTwoConsumersMillionItemsExactlyOnceInOrder) {
  constexpr std::uint32_t kPerProducer = 250'000;
  constexpr int kProducers = 2;
  constexpr int kConsumers = 2;
  mp::Queue<std::uint64_t> q;
  mp::SharedArray<std::uint8_t> seen(kProducers * kPerProducer);
  mp::SharedArray<std::uint64_t> stats(4);  // [0] order violations, [1] bad items, [2] items taken
  std::vector<mp::Process> procs;
  for (int c = 0; c < kConsumers; ++c) {
    procs.emplace_back([&] {
      std::vector<std::int64_t> last(kProducers, -1);
      for (;;) {
        const std::uint64_t it = q.get();
        if (it == kStop) return;
        const auto p = producer_of(it);
        const auto s = seq_of(it);
        if (p >= kProducers || s >= kPerProducer) {
          add(stats, 1);
          continue;
        }
        if (static_cast<std::int64_t>(s) <= last[p]) add(stats, 0);
        last[p] = s;
        add(seen, std::size_t{p} * kPerProducer + s, std::uint8_t{1});
        add(stats, 2);
      }
    });
  }
  for (int p = 0; p < kProducers; ++p) {
    procs.emplace_back([&, p] {
      for (std::uint32_t s = 0; s < kPerProducer; ++s) q.put(item_of(static_cast<std::uint32_t>(p), s));
    });
  }
  for (auto& p : procs) p.start();
  for (int p = kConsumers; p < kConsumers + kProducers; ++p) ASSERT_TRUE(finish(procs[p]).success());
  for (int c = 0; c < kConsumers; ++c) q.put(kStop);
  for (int c = 0; c < kConsumers; ++c) ASSERT_TRUE(finish(procs[c]).success());
  EXPECT_EQ(load(stats, 0), 0u) << "items out of order within a producer";
  EXPECT_EQ(load(stats, 1), 0u) << "corrupt items";
  EXPECT_EQ(load(stats, 2), std::uint64_t{kProducers} * kPerProducer);
  std::size_t missing = 0;
  std::size_t duplicated = 0;
  for (std::uint8_t v : seen) {
    missing += v == 0;
    duplicated += v > 1;
  }
  EXPECT_EQ(missing, 0u);
  EXPECT_EQ(duplicated, 0u);
  EXPECT_TRUE(q.empty());
}

TEST(QueueStress, BoundedQueueOfTenUnderPressureNeverHoldsMore) {
  constexpr std::uint32_t kPerProducer = 20'000;
  constexpr int kProducers = 3;
  constexpr int kConsumers = 2;
  mp::Queue<std::uint64_t> q(10);
  mp::SharedArray<std::uint8_t> seen(kProducers * kPerProducer);
  mp::SharedArray<std::uint64_t> stats(4);  // [0] order violations, [1] qsize over 10, [2] taken
  std::vector<mp::Process> procs;
  for (int c = 0; c < kConsumers; ++c) {
    procs.emplace_back([&] {
      std::vector<std::int64_t> last(kProducers, -1);
      for (;;) {
        if (q.qsize() > 10) add(stats, 1);
        const std::uint64_t it = q.get();
        if (it == kStop) return;
        const auto p = producer_of(it);
        if (static_cast<std::int64_t>(seq_of(it)) <= last[p]) add(stats, 0);
        last[p] = seq_of(it);
        add(seen, std::size_t{p} * kPerProducer + seq_of(it), std::uint8_t{1});
        add(stats, 2);
      }
    });
  }
  for (int p = 0; p < kProducers; ++p) {
    procs.emplace_back([&, p] {
      for (std::uint32_t s = 0; s < kPerProducer; ++s) {
        q.put(item_of(static_cast<std::uint32_t>(p), s));
        if (q.qsize() > 10) add(stats, 1);
      }
    });
  }
  for (auto& p : procs) p.start();
  for (int p = kConsumers; p < kConsumers + kProducers; ++p) ASSERT_TRUE(finish(procs[p]).success());
  for (int c = 0; c < kConsumers; ++c) q.put(kStop);
  for (int c = 0; c < kConsumers; ++c) ASSERT_TRUE(finish(procs[c]).success());
  EXPECT_EQ(load(stats, 0), 0u);
  EXPECT_EQ(load(stats, 1), 0u) << "the queue held more than maxsize";
  EXPECT_EQ(load(stats, 2), std::uint64_t{kProducers} * kPerProducer);
  EXPECT_EQ(std::count(seen.begin(), seen.end(), std::uint8_t{1}), std::ptrdiff_t{kProducers} * kPerProducer);
}

TEST(QueueLarge, EightMiBItemsStreamThroughA64KiBBufferBesideSmallOnes) {
  // The buffer cannot grow past 64 KiB: every 8 MiB item goes through it in pieces, while another
  // producer's small items go through the same buffer.
  mp::Queue<std::vector<std::uint32_t>> q(mp::QueueOptions{.buffer_bytes = 65536, .max_buffer_bytes = 65536});
  constexpr std::size_t kLarge = 2 * 1024 * 1024;  // elements: 8 MiB
  mp::Process big{[&] {
    for (std::uint32_t i = 0; i < 4; ++i) q.put(pattern(kLarge, 1000 + i));
  }};
  mp::Process small{[&] {
    for (std::uint32_t i = 0; i < 2000; ++i) q.put(std::vector<std::uint32_t>{i});
  }};
  big.start();
  small.start();
  std::uint32_t next_small = 0;
  std::uint32_t next_large = 0;
  for (int i = 0; i < 2004; ++i) {
    auto v = q.get(scaled(20s));
    if (v.size() == 1) {
      EXPECT_EQ(v[0], next_small++);
    } else {
      ASSERT_EQ(v.size(), kLarge);
      EXPECT_TRUE(v == pattern(kLarge, 1000 + next_large)) << "large item " << next_large << " corrupt";
      ++next_large;
    }
  }
  EXPECT_EQ(next_small, 2000u);
  EXPECT_EQ(next_large, 4u);
  EXPECT_TRUE(finish(big).success());
  EXPECT_TRUE(finish(small).success());
  EXPECT_TRUE(q.empty());
}

TEST(QueueLarge, ParentJoinsAProducerBeforeReadingItsItems) {
  // CPython gh-73983: a child that put more than a pipe holds cannot exit until someone reads,
  // so a parent that joins it first deadlocks. Here put() has written the items before it returns.
  mp::Queue<std::vector<std::uint32_t>> q;
  mp::Process p{[&] {
    q.put(pattern(2 * 1024 * 1024, 7));  // 8 MiB
    for (std::uint32_t i = 0; i < 10'000; ++i) q.put({i});
  }};
  p.start();
  ASSERT_TRUE(finish(p, 20s).success());
  EXPECT_EQ(q.qsize(), 10'001u);
  EXPECT_TRUE(q.get() == pattern(2 * 1024 * 1024, 7));
  for (std::uint32_t i = 0; i < 10'000; ++i) ASSERT_EQ(q.get(), std::vector<std::uint32_t>{i});
}

// ---- processes killed mid-put and mid-get -----------------------------------------------------

namespace {

// Producer 0 puts `n` items of `survivor_payload` words and ends; producer 1 puts items of
// `victim_payload` words until it is SIGKILLed, after the parent has received `kill_after` of them.
// With `stall_first`, the parent stops reading for a while before the kill, so that the victim is
// blocked inside put() when it dies. Returns what the parent received, per producer.
std::vector<std::vector<std::uint32_t>> run_producer_kill(mp::Queue<std::vector<std::uint64_t>>& q, std::uint32_t n,
                                                          std::size_t survivor_payload, std::size_t victim_payload,
                                                          std::uint32_t kill_after, bool stall_first) {
  mp::Process survivor{[&] {
    for (std::uint32_t s = 0; s < n; ++s) q.put(std::vector<std::uint64_t>(survivor_payload, item_of(0, s)));
  }};
  mp::Process victim{[&] {
    for (std::uint32_t s = 0;; ++s) q.put(std::vector<std::uint64_t>(victim_payload, item_of(1, s)));
  }};
  survivor.start();
  victim.start();
  std::vector<std::vector<std::uint32_t>> got(2);
  bool killed = false;
  auto take = [&](const std::vector<std::uint64_t>& v) {
    ASSERT_FALSE(v.empty());
    EXPECT_TRUE(std::all_of(v.begin(), v.end(), [&](std::uint64_t x) { return x == v[0]; })) << "torn item";
    const auto p = producer_of(v[0]);
    ASSERT_LT(p, 2u);
    EXPECT_EQ(v.size(), p == 0 ? survivor_payload : victim_payload);
    got[p].push_back(seq_of(v[0]));
  };
  while (got[0].size() < n || !killed) {
    take(q.get(scaled(20s)));
    if (!killed && got[1].size() >= kill_after) {
      if (stall_first) {
        // Nobody reads now: the ring fills and the victim blocks inside put(), holding the
        // producers' lock in the middle of a streamed item. It may also sleep waiting for that
        // lock, but only while the survivor holds it, awake (small items are never waited for
        // with the lock held): so the victim seen asleep between two looks that find the survivor
        // asleep or ended is the victim blocked inside put().
        const auto survivor_idle = [&] {
          const char s = test_support::proc_state(survivor.pid());
          return s == 'S' || s == 0 || s == 'Z' || s == 'X';
        };
        EXPECT_TRUE(test_support::eventually([&] {
          return survivor_idle() && test_support::proc_state(victim.pid()) == 'S' && survivor_idle();
        })) << "the victim never blocked inside put()";
      }
      victim.kill();
      killed = true;
    }
  }
  EXPECT_TRUE(finish(survivor).success());
  const auto status = finish(victim);
  EXPECT_TRUE(status.signaled());
  EXPECT_EQ(status.signal(), SIGKILL);
  // What the victim published before it died is still there, whole.
  while (auto v = q.try_get()) take(*v);
  return got;
}

void expect_prefix(const std::vector<std::uint32_t>& seqs, std::size_t at_least) {
  EXPECT_GE(seqs.size(), at_least);
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    ASSERT_EQ(seqs[i], i) << "item " << i << " missing, repeated or out of order";
  }
}

}  // namespace

TEST(QueueDeath, ProducerKilledMidPutLosesOnlyItsUnfinishedItem) {
  // Killed in its put loop: inside put() most of the time, holding the lock some of it.
  mp::Queue<std::vector<std::uint64_t>> q;
  auto got = run_producer_kill(q, 100'000, 4, 4, 2000, false);
  expect_prefix(got[0], 100'000);  // every item of the surviving producer, once, in order
  expect_prefix(got[1], 2000);     // the killed one's: a gapless prefix, each once
  // Whether it died holding the lock is up to chance here (the streamed test makes it certain).
  RecordProperty("put_lock_owner_died",
                 static_cast<int>(mp::detail::queue_repair_counts(*q.core()).put_lock_owner_died));
  // The queue is intact for whoever comes next.
  q.put({item_of(5, 5)});
  EXPECT_EQ(q.get(1s), std::vector<std::uint64_t>{item_of(5, 5)});
  EXPECT_TRUE(q.empty());
}

TEST(QueueDeath, ProducerKilledMidStreamedPutDoesNotStallConsumers) {
  // 256 KiB items through a 64 KiB buffer that nobody reads for a while: the victim dies blocked
  // in the middle of one, holding the producers' lock. Small items of the survivor go on.
  mp::Queue<std::vector<std::uint64_t>> q(mp::QueueOptions{.buffer_bytes = 65536, .max_buffer_bytes = 65536});
  auto got = run_producer_kill(q, 20'000, 4, 32 * 1024, 20, true);
  expect_prefix(got[0], 20'000);
  expect_prefix(got[1], 20);
  // The next put takes the producers' lock over from the dead victim and closes its stream (when
  // the survivor finished before the kill, nobody else has). A streamed item would wait for a
  // consumer, so a small one.
  q.put(std::vector<std::uint64_t>(1000, 9));
  const auto counts = mp::detail::queue_repair_counts(*q.core());
  EXPECT_GE(counts.put_lock_owner_died, 1u);
  EXPECT_GE(counts.streams_aborted, 1u);
  EXPECT_EQ(q.get(1s), std::vector<std::uint64_t>(1000, 9));
}

namespace {

// The parent and a victim consumer take `n` items of one producer; the victim is SIGKILLed after
// it has taken `kill_after`. Every item must be seen at most once, and at most one (the one the
// victim was taking) by nobody.
void run_consumer_kill(mp::Queue<std::vector<std::uint32_t>>& q, std::uint32_t n, std::size_t payload,
                       std::uint32_t kill_after) {
  mp::SharedArray<std::uint8_t> seen_by_victim(n);
  mp::SharedArray<std::uint64_t> victim_count(1);
  mp::Process producer{[&] {
    for (std::uint32_t s = 0; s < n; ++s) q.put(std::vector<std::uint32_t>(payload, s));
  }};
  mp::Process victim{[&] {
    for (;;) {
      const auto v = q.get();
      add(seen_by_victim, v.at(0), std::uint8_t{1});
      add(victim_count, 0);
    }
  }};
  producer.start();
  victim.start();
  std::vector<std::uint8_t> seen_by_parent(n);
  std::uint32_t last = 0;
  bool first = true;
  bool killed = false;
  auto take = [&](const std::vector<std::uint32_t>& v) {
    ASSERT_EQ(v.size(), payload);
    ASSERT_TRUE(std::all_of(v.begin(), v.end(), [&](std::uint32_t x) { return x == v[0]; })) << "torn item";
    ASSERT_LT(v[0], n);
    EXPECT_TRUE(first || v[0] > last) << "out of order";
    first = false;
    last = v[0];
    ++seen_by_parent[v[0]];
  };
  // The parent competes for items only once the victim has taken half of its share, so the victim
  // reaches `kill_after` even on a loaded machine where the parent would otherwise take them all;
  // and should the producer still finish first, the victim is killed where it waits in get().
  const auto give_up = std::chrono::steady_clock::now() + scaled(60s);
  for (;;) {
    ASSERT_LT(std::chrono::steady_clock::now(), give_up)
        << "victim took " << load(victim_count, 0) << " items; producer alive: " << producer.is_alive();
    const bool producer_done = !producer.is_alive();
    if (!killed && (load(victim_count, 0) >= kill_after || producer_done)) {
      victim.kill();
      killed = true;
    }
    if (killed && producer_done) break;
    if (!killed && load(victim_count, 0) < kill_after / 2) {
      std::this_thread::sleep_for(1ms);
      continue;
    }
    try {
      take(q.get(10ms));
    } catch (const mp::Empty&) {
    }
  }
  const auto status = finish(victim);
  EXPECT_TRUE(status.signaled());
  EXPECT_TRUE(finish(producer).success());
  while (auto v = q.try_get()) take(*v);
  std::size_t twice = 0;
  std::size_t nobody = 0;
  for (std::uint32_t s = 0; s < n; ++s) {
    const int k = seen_by_parent[s] + load(seen_by_victim, s);
    twice += k > 1;
    nobody += k == 0;
  }
  EXPECT_EQ(twice, 0u);
  EXPECT_LE(nobody, 1u) << "more than the item the victim was taking is lost";
  EXPECT_GE(load(victim_count, 0), kill_after / 2);
  const auto counts = mp::detail::queue_repair_counts(*q.core());
  ::testing::Test::RecordProperty("get_lock_owner_died", static_cast<int>(counts.get_lock_owner_died));
  EXPECT_TRUE(q.empty());
  q.put(std::vector<std::uint32_t>(100, 1));
  EXPECT_EQ(q.get(1s), std::vector<std::uint32_t>(100, 1));
}

}  // namespace

TEST(QueueDeath, ConsumerKilledMidGetLosesAtMostTheItemItWasTaking) {
  mp::Queue<std::vector<std::uint32_t>> q(100);
  run_consumer_kill(q, 100'000, 4, 5000);
}

TEST(QueueDeath, ConsumerKilledMidStreamedGetLosesAtMostThatItem) {
  mp::Queue<std::vector<std::uint32_t>> q(
      mp::QueueOptions{.maxsize = 4, .buffer_bytes = 65536, .max_buffer_bytes = 65536});
  run_consumer_kill(q, 300, 64 * 1024, 20);
}

// ---- processes killed at exact points inside put and get ------------------------------------------
//
// The queue names the instants inside its critical sections where a death matters (test points,
// seen by the platform's fault hook). A victim child SIGKILLs itself at the n-th passage of one,
// and the outcome is asserted exactly.

namespace {

const char* g_kill_point = nullptr;
std::atomic<int> g_kill_countdown{0};

// In a child: dies by SIGKILL the `nth` time the queue passes `point`.
void die_at(const char* point, int nth) {
  g_kill_point = point;
  g_kill_countdown = nth;
  mp::detail::sys::set_fault_hook([](const char* name) noexcept -> int {
    if (std::strcmp(name, g_kill_point) == 0 && --g_kill_countdown == 0) ::raise(SIGKILL);
    return 0;
  });
}

void expect_killed(mp::Process& p) {
  const auto status = finish(p);
  EXPECT_TRUE(status.signaled());
  EXPECT_EQ(status.signal(), SIGKILL);
}

mp::detail::QueueRepairCounts repairs(const auto& q) { return mp::detail::queue_repair_counts(*q.core()); }

}  // namespace

TEST(QueueCrashPoints, ProducerKilledAfterWritingBeforePublishingPublishesNothing) {
  mp::Queue<std::uint64_t> q;
  mp::Process victim{[&] {
    die_at("queue:put:written", 100);
    for (std::uint64_t s = 0;; ++s) q.put(s);
  }};
  victim.start();
  expect_killed(victim);
  EXPECT_EQ(q.qsize(), 99u);
  q.put(1000);  // takes the producers' lock over from the dead victim
  EXPECT_EQ(repairs(q).put_lock_owner_died, 1u);
  EXPECT_EQ(q.qsize(), 100u);
  for (std::uint64_t s = 0; s < 99; ++s) ASSERT_EQ(q.get(), s);
  EXPECT_EQ(q.get(), 1000u);  // the half-put item left no trace
  EXPECT_TRUE(q.empty());
}

TEST(QueueCrashPoints, ProducerKilledAfterPublishingBeforeCountingIsCompletedByTheNext) {
  mp::Queue<std::uint64_t> q;
  mp::Process victim{[&] {
    die_at("queue:put:published", 100);
    for (std::uint64_t s = 0;; ++s) q.put(s);
  }};
  victim.start();
  expect_killed(victim);
  q.put(1000);
  EXPECT_EQ(repairs(q).put_lock_owner_died, 1u);
  EXPECT_EQ(q.qsize(), 101u);  // the 100th item was published: it counts
  for (std::uint64_t s = 0; s < 100; ++s) ASSERT_EQ(q.get(), s);
  EXPECT_EQ(q.get(), 1000u);
  EXPECT_TRUE(q.empty());
}

TEST(QueueCrashPoints, ConsumerKilledAfterCopyingBeforeTakingLosesNothing) {
  mp::Queue<std::uint64_t> q;
  for (std::uint64_t s = 0; s < 200; ++s) q.put(s);
  mp::Process victim{[&] {
    die_at("queue:get:copied", 50);
    for (;;) (void)q.get();
  }};
  victim.start();
  expect_killed(victim);
  EXPECT_EQ(q.qsize(), 151u);
  EXPECT_EQ(q.get(), 49u);  // the item it was copying out is still in the queue
  EXPECT_EQ(repairs(q).get_lock_owner_died, 1u);
  for (std::uint64_t s = 50; s < 200; ++s) ASSERT_EQ(q.get(), s);
  EXPECT_TRUE(q.empty());
}

TEST(QueueCrashPoints, ConsumerKilledAfterTakingBeforeCountingLosesExactlyThatItem) {
  mp::Queue<std::uint64_t> q;
  for (std::uint64_t s = 0; s < 200; ++s) q.put(s);
  mp::Process victim{[&] {
    die_at("queue:get:taken", 50);
    for (;;) (void)q.get();
  }};
  victim.start();
  expect_killed(victim);
  EXPECT_EQ(q.get(), 50u);  // item 49 went with the victim, which had taken it
  EXPECT_EQ(repairs(q).get_lock_owner_died, 1u);
  EXPECT_EQ(q.qsize(), 149u);  // and the count says so
  for (std::uint64_t s = 51; s < 200; ++s) ASSERT_EQ(q.get(), s);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(q.try_get(), std::nullopt);
}

TEST(QueueCrashPoints, ProducerKilledMidStreamIsAbortedForTheConsumerWaitingOnIt) {
  // 256 KiB items through a 64 KiB buffer: about 8 pieces each; the victim dies after the 4th
  // piece of its second item, while the parent is receiving that item.
  mp::Queue<std::vector<std::uint32_t>> q(mp::QueueOptions{.buffer_bytes = 65536, .max_buffer_bytes = 65536});
  mp::Process victim{[&] {
    die_at("queue:put:piece", 12);
    for (std::uint32_t i = 0;; ++i) q.put(pattern(64 * 1024, i));
  }};
  victim.start();
  EXPECT_TRUE(q.get(scaled(10s)) == pattern(64 * 1024, 0));
  const auto t0 = Clock::now();
  // Item 1 was cut short: it is not delivered. The victim gets to the piece it dies at only while
  // this get() takes the pieces before it (the ring holds two), so the wait, scaled for slow
  // builds, must outlast the victim's way there.
  const auto wait = scaled(500ms);
  EXPECT_THROW((void)q.get(wait), mp::Empty);
  EXPECT_LT(Clock::now() - t0, wait + generous(300ms));  // the dead producer noticed: no hang
  expect_killed(victim);
  const auto counts = repairs(q);
  EXPECT_EQ(counts.put_lock_owner_died, 1u);
  EXPECT_EQ(counts.streams_aborted, 1u);
  EXPECT_TRUE(q.empty());
  q.put({1, 2, 3});
  EXPECT_EQ(q.get(1s), (std::vector<std::uint32_t>{1, 2, 3}));
}

TEST(QueueCrashPoints, ConsumerKilledMidStreamLosesThatItemAndJoinDoesNotWaitForIt) {
  mp::JoinableQueue<std::vector<std::uint32_t>> q(mp::QueueOptions{.buffer_bytes = 65536, .max_buffer_bytes = 65536});
  mp::Process producer{[&] {
    for (std::uint32_t i = 0; i < 3; ++i) q.put(pattern(64 * 1024, i));
  }};
  mp::Process victim{[&] {
    die_at("queue:get:piece", 3);  // inside item 0
    for (;;) (void)q.get();
  }};
  victim.start();
  producer.start();
  expect_killed(victim);
  EXPECT_TRUE(q.get(scaled(10s)) == pattern(64 * 1024, 1));
  q.task_done();
  EXPECT_TRUE(q.get(scaled(10s)) == pattern(64 * 1024, 2));
  q.task_done();
  EXPECT_TRUE(finish(producer).success());
  EXPECT_EQ(repairs(q).get_lock_owner_died, 1u);
  EXPECT_EQ(q.try_get(), std::nullopt);
  EXPECT_EQ(q.qsize(), 0u);
  EXPECT_TRUE(q.join_for(1s));  // item 0 counts as lost, not as a task someone still owes
}

TEST(QueueCrashPoints, ProducerKilledWhileGrowingTheBufferLeavesItIntact) {
  mp::Queue<std::vector<char>> q(mp::QueueOptions{.buffer_bytes = 4096});
  // 30 records of 120 bytes, 20 taken, 20 more: the queued bytes wrap around the 4 KiB ring, so
  // growing it must move some of them.
  for (int i = 0; i < 30; ++i) q.put(std::vector<char>(100, static_cast<char>(i)));
  for (int i = 0; i < 20; ++i) ASSERT_EQ(q.get(), std::vector<char>(100, static_cast<char>(i)));
  for (int i = 30; i < 50; ++i) q.put(std::vector<char>(100, static_cast<char>(i)));
  mp::Process victim{[&] {
    die_at("queue:grow:moved", 1);
    q.put(std::vector<char>(2000, 'v'));
  }};
  victim.start();
  expect_killed(victim);
  for (int i = 20; i < 50; ++i) ASSERT_EQ(q.get(1s), std::vector<char>(100, static_cast<char>(i)));
  EXPECT_EQ(repairs(q).get_lock_owner_died, 1u);
  EXPECT_TRUE(q.empty());
  q.put(std::vector<char>(6000, 'w'));  // grows it for real
  EXPECT_EQ(repairs(q).put_lock_owner_died, 1u);
  EXPECT_EQ(q.get(1s), std::vector<char>(6000, 'w'));
}

// ---- JoinableQueue, SimpleQueue -----------------------------------------------------------------

TEST(JoinableQueue, JoinReturnsWhenEveryItemIsDone) {
  mp::JoinableQueue<int> q;
  mp::SharedArray<std::uint64_t> sum(1);
  std::vector<mp::Process> workers;
  for (int w = 0; w < 2; ++w) {
    workers.emplace_back([&] {
      for (;;) {
        const int x = q.get();
        if (x < 0) {
          q.task_done();
          return;
        }
        std::this_thread::sleep_for(100us);
        add(sum, 0, static_cast<std::uint64_t>(x));
        q.task_done();
      }
    });
  }
  for (int i = 1; i <= 500; ++i) q.put(i);
  EXPECT_FALSE(q.join_for(0ms));
  for (auto& w : workers) w.start();
  q.join();
  EXPECT_EQ(load(sum, 0), 500u * 501u / 2);  // every item done before join returned
  for (int w = 0; w < 2; ++w) q.put(-1);
  q.join();
  for (auto& w : workers) EXPECT_TRUE(finish(w).success());
}

TEST(JoinableQueue, JoinWaitsForAnItemTakenButNotDone) {
  mp::JoinableQueue<int> q;
  q.put(1);
  EXPECT_EQ(q.get(), 1);
  const auto t0 = Clock::now();
  EXPECT_FALSE(q.join_for(100ms));
  EXPECT_GE(Clock::now() - t0, 100ms);
  q.task_done();
  EXPECT_TRUE(q.join_for(0ms));
  EXPECT_THROW(q.task_done(), mp::StateError);
}

TEST(SimpleQueue, CarriesItemsBetweenProcesses) {
  mp::SimpleQueue<std::string> q;
  EXPECT_TRUE(q.empty());
  mp::Process p{[&] {
    for (int i = 0; i < 1000; ++i) q.put(std::to_string(i));
  }};
  p.start();
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(q.get(), std::to_string(i));
  EXPECT_TRUE(finish(p).success());
  EXPECT_TRUE(q.empty());
}

// ---- handles --------------------------------------------------------------------------------

namespace {
void produce_into(mp::Queue<int> q, int n) {
  for (int i = 0; i < n; ++i) q.put(i);
}
int drain_joinable(mp::JoinableQueue<int> q) {
  int sum = 0;
  while (auto x = q.try_get()) {
    sum += *x;
    q.task_done();
  }
  return sum;
}
int reply_through(mp::Queue<mp::Queue<int>> mailbox) {
  mp::Queue<int> reply = mailbox.get(scaled(std::chrono::seconds(10)));
  reply.put(getpid());
  return 0;
}
}  // namespace

TEST(QueueHandles, PoolTasksGetTheSameQueue) {
  mp::Queue<int> q;
  mp::JoinableQueue<int> jq;
  for (int i = 1; i <= 10; ++i) jq.put(i);
  mp::Pool pool{{.processes = 2}};
  pool.apply(produce_into, q, 1000);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(q.get(1s), i);
  EXPECT_EQ(pool.apply(drain_joinable, jq), 55);
  EXPECT_TRUE(jq.join_for(1s));
  EXPECT_TRUE(q.empty());
}

TEST(QueueHandles, AQueueSentThroughAQueueIsTheSameQueue) {
  mp::Queue<mp::Queue<int>> mailbox;
  mp::Queue<int> reply;
  mp::Pool pool{{.processes = 1}};  // started before `reply` travels: it cannot have inherited it
  auto r = pool.apply_async(reply_through, mailbox);
  mailbox.put(reply);
  const int pid = reply.get(scaled(10s));
  EXPECT_NE(pid, getpid());
  EXPECT_EQ(r.get(), 0);
}

TEST(QueueHandles, CorruptHandleIsRejected) {
  mp::Writer w;
  w.write_value(std::uint8_t{1});
  w.write_value(std::int32_t{getpid()});
  w.write_value(std::int32_t{0});  // stdin: not a queue
  mp::Reader r(w.bytes());
  EXPECT_THROW((void)mp::decode<mp::Queue<int>>(r), mp::Error);
  std::vector<std::byte> junk{std::byte{7}, std::byte{1}};
  EXPECT_THROW((void)mp::from_bytes<mp::Queue<int>>(junk), mp::SerializationError);
}

TEST(QueueResources, NoDescriptorsOrMappingsLeftAndNothingInDevShm) {
  const auto shm_before = dev_shm();
  const int fds_before = test_support::count_open_fds();
  const int maps_before = count_queue_mappings();
  {
    mp::Queue<std::vector<char>> q;
    mp::JoinableQueue<int> jq(5);
    mp::Process p{[&] {
      for (int i = 0; i < 64; ++i) q.put(std::vector<char>(64 * 1024, 'x'));  // grows the buffer
      jq.put(1);
    }};
    p.start();
    for (int i = 0; i < 64; ++i) (void)q.get(scaled(10s));
    EXPECT_EQ(jq.get(scaled(10s)), 1);
    EXPECT_TRUE(finish(p).success());
    EXPECT_GT(count_queue_mappings(), maps_before);
  }
  EXPECT_EQ(test_support::count_open_fds(), fds_before);
  EXPECT_EQ(count_queue_mappings(), maps_before);
  EXPECT_EQ(dev_shm(), shm_before);
}

// Queue: a byte ring in an anonymous memfd, shared by every process that holds the queue.
//
// Layout: a 4 KiB header, then the ring (a power of two of bytes). Records are a 8-byte header
// (kind, length) and the payload padded to 8 bytes, at positions that only grow (u64: they never
// wrap in practice); a position's byte lives at index `pos % capacity`. A record header never
// straddles the end of the ring, a payload may.
//
// Why two locks and no copy under a shared lock: producers take `put_lock` and consumers
// `get_lock`, so at any moment the ring has one writer and one reader, and it is a
// single-producer single-consumer ring between them: the writer publishes with a store of `tail`,
// the reader frees with a store of `head`, and both copy their bytes at the same time.
//
// Why a record commits by one store: a producer killed before it stores `tail` has published
// nothing (the half-written bytes lie beyond the tail and are overwritten later); a consumer killed
// before it stores `head` has taken nothing (the next consumer reads the same record). The
// counters that go with those stores (`puts`, `gets`, `lost`) are written right after them, with
// the intended values noted first ("pending"), so the next holder of the lock, told by the robust
// mutex that its owner died, completes them.
//
// Why items larger than the ring stream through it rather than travel in their own memfd: a memfd
// is reached through /proc/<pid>/fd of a process that holds it, and the producer may exit (that is
// the point of a queue) before a consumer looks. Streaming keeps everything in the one segment
// that all holders map. A streamed item is a FIRST record, MIDDLE records and a LAST record,
// written by a producer that holds `put_lock` throughout and read by a consumer that holds
// `get_lock` throughout, so its pieces are contiguous in the ring. A producer that dies (or times
// out) mid-stream is followed by an ABORT record, written by itself, by the next producer, or by
// the consumer waiting for the next piece, which checks the producer's liveness by try-locking
// `put_lock` (the robust mutex reports a dead owner); room for that record is always kept free.
// The pieces of an item whose consumer died mid-stream are skipped by the next consumer, and the
// item counts as lost (for join()).
//
// Why the ring grows: Python's put() on an unbounded queue never waits (its feeder thread buffers
// without limit). Here, when a record does not fit and a short grace passes without consumers
// making room (or none is coming: a try_put), the producer takes `get_lock` too, grows the file,
// moves the bytes whose index changes into the new upper half (never over bytes still to move), and
// commits with one store of `capacity`. A process that sees a larger capacity than it has mapped
// maps the file again; old mappings stay until the queue is destroyed (threads may still use
// them).
//
// Waits: a futex word per condition (data, room, join). A waiter sets the word's low bit and
// re-checks its condition before sleeping; a waker that changed the state looks at the word and
// only then advances it and wakes everyone (sequentially consistent on both sides, so one of them
// sees the other). Sleeps last at most 100 ms before the state is checked again, so a waker that
// died between its change and its wake delays a waiter by that much, never forever.
//
// Test points: the instants where a death matters (a record written but not published, published
// but not counted, copied out but not taken, ...) are named, and the platform's fault hook sees
// the names, so tests kill a process exactly there (tests/queue_test.cpp, QueueCrashPoints).
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "multiproc/queue.hpp"
#include "platform.hpp"

namespace multiproc::detail {

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr std::uint64_t kMagic = 0x4555455551504D31ull;  // "1MPQUEUE"
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeaderBytes = 4096;
constexpr std::uint64_t kRecordHeader = 8;
constexpr std::uint64_t kAbortReserve = kRecordHeader;  // always free: room for an ABORT record
constexpr std::uint64_t kMinCapacity = 4096;
constexpr std::uint64_t kMaxCapacity = std::uint64_t{1} << 40;
constexpr std::uint64_t kMaxRecordPayload = 0xFFFFFFF8u;
constexpr auto kSlice = 100ms;     // the longest sleep before the state is checked again
constexpr auto kGrowGrace = 2ms;   // how long a full ring waits for consumers before it grows
constexpr auto kLockGrace = 10ms;  // how long a try_ or timed call may wait for the other side's lock
constexpr auto kSpin = 5us;        // how long get() watches an empty queue before it sleeps

enum class Kind : std::uint32_t { whole = 1, first = 2, middle = 3, last = 4, abort = 5 };

struct RecordHeader {
  std::uint32_t kind;
  std::uint32_t length;
};
static_assert(sizeof(RecordHeader) == kRecordHeader);

using U64 = std::atomic<std::uint64_t>;
using U32 = std::atomic<std::uint32_t>;
static_assert(U64::is_always_lock_free && U32::is_always_lock_free);

struct Header {
  // Set at creation.
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t reserved;
  std::uint64_t maxsize;
  std::uint64_t max_capacity;
  // Changed only by a producer holding both locks; read under either.
  U64 capacity;

  alignas(64) pthread_mutex_t put_lock;
  // The producer side (under put_lock).
  alignas(64) U64 tail;  // end of the published records
  U64 puts;              // items committed
  U32 put_pending;       // the two below hold what the current commit will store
  U32 streaming;         // a producer is streaming an item: an ABORT is due if it dies
  std::uint64_t put_pending_tail;
  std::uint64_t put_pending_puts;

  alignas(64) pthread_mutex_t get_lock;
  // The consumer side (under get_lock).
  alignas(64) U64 head;  // start of the first unread record
  U64 gets;              // items taken (including lost ones)
  U64 lost;              // items whose consumer died while taking them
  U32 get_pending;
  std::uint32_t reserved2;
  std::uint64_t get_pending_head;
  std::uint64_t get_pending_gets;
  std::uint64_t get_pending_lost;

  // Futex words.
  alignas(64) U32 data_seq;  // advanced when a record is published
  alignas(64) U32 room_seq;  // advanced when a record is taken
  alignas(64) U32 join_seq;  // advanced when a task is done
  alignas(64) U64 done;      // task_done() calls
  // How often the robust paths ran (for tests): dead owners of each lock, stream ends by ABORT.
  U32 put_repairs;
  U32 get_repairs;
  U32 aborts;
};
static_assert(sizeof(Header) <= kHeaderBytes);

std::uint64_t align8(std::uint64_t n) { return (n + 7) & ~std::uint64_t{7}; }

std::uint64_t round_capacity(std::size_t bytes) {
  std::uint64_t c = kMinCapacity;
  while (c < bytes && c < kMaxCapacity) c <<= 1;
  return c;
}

bool is_pow2(std::uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// A named instant inside a critical section, seen by the platform's fault hook like a call: a test
// can end the process exactly there (one relaxed load when no hook is set).
void test_point(const char* name) noexcept { (void)sys::injected_fault(name); }

// Marks a sleeper on `word`; returns the value to sleep on.
std::uint32_t arm(U32& word) { return word.fetch_or(1, std::memory_order_seq_cst) | 1; }

// Called after a state change: wakes the sleepers on `word`, if any.
void bump(U32& word) {
  std::uint32_t v = word.load(std::memory_order_seq_cst);
  while (v & 1) {
    if (word.compare_exchange_weak(v, (v + 2) & ~1u, std::memory_order_seq_cst)) {
      sys::futex_wake(word, INT_MAX);
      return;
    }
  }
}

// Sleeps on `word` (armed as `v`) until woken, the deadline, or the end of a slice (at most
// `limit`). False when the deadline has passed.
bool sleep_on(U32& word, std::uint32_t v, Deadline deadline, Clock::duration limit = kSlice) {
  auto left = std::min<Clock::duration>(limit, kSlice);
  if (deadline) {
    const auto now = Clock::now();
    if (now >= *deadline) return false;
    left = std::min<Clock::duration>(left, *deadline - now);
  }
  sys::futex_wait(word, v, std::chrono::duration_cast<std::chrono::nanoseconds>(left));
  return true;
}

}  // namespace

class QueueCore {
 public:
  QueueCore(sys::UniqueFd fd, const QueueOptions* create) : fd_(std::move(fd)) {
    if (create) {
      sys::resize_file(fd_.get(), kHeaderBytes + round_capacity(create->buffer_bytes));
    } else if (sys::file_size(fd_.get()) < kHeaderBytes) {
      throw SerializationError("queue handle: not a queue");
    }
    maps_.emplace_back(fd_.get(), kHeaderBytes);
    h_ = reinterpret_cast<Header*>(maps_.back().data());
    if (create) {
      const std::uint64_t cap = round_capacity(create->buffer_bytes);
      new (h_) Header{};
      h_->magic = kMagic;
      h_->version = kVersion;
      h_->maxsize = create->maxsize;
      h_->max_capacity = std::max(cap, round_capacity(create->max_buffer_bytes));
      h_->capacity.store(cap);
      sys::robust_mutex_init(h_->put_lock, false);
      sys::robust_mutex_init(h_->get_lock, false);
    } else {
      // Everything in the segment can have been written by any process: check before use.
      const std::uint64_t cap = h_->capacity.load();
      if (h_->magic != kMagic || h_->version != kVersion || !is_pow2(h_->max_capacity) ||
          h_->max_capacity > kMaxCapacity || !is_pow2(cap) || cap < kMinCapacity || cap > h_->max_capacity) {
        throw SerializationError("queue handle: not a queue of this version");
      }
    }
    (void)ring_for(h_->capacity.load());
  }

  Header& h() const noexcept { return *h_; }
  int fd() const noexcept { return fd_.get(); }

  // The ring mapped for `capacity` bytes (mapping the file again if it has grown).
  std::byte* ring_for(std::uint64_t capacity) {
    if (mapped_capacity_.load(std::memory_order_acquire) >= capacity) return ring_.load(std::memory_order_acquire);
    std::lock_guard lock(map_mutex_);
    if (mapped_capacity_.load() >= capacity) return ring_.load();
    if (!is_pow2(capacity) || capacity > h_->max_capacity || sys::file_size(fd_.get()) < kHeaderBytes + capacity) {
      throw ProtocolError("Queue: corrupt shared state (capacity " + std::to_string(capacity) + ")");
    }
    maps_.emplace_back(fd_.get(), kHeaderBytes + capacity);
    ring_.store(maps_.back().data() + kHeaderBytes, std::memory_order_release);
    mapped_capacity_.store(capacity, std::memory_order_release);
    return maps_.back().data() + kHeaderBytes;
  }

  void check_open() const {
    if (closed_.load(std::memory_order_relaxed)) throw StateError("Queue: used after close()");
  }

  bool put(std::span<const std::byte> item, Deadline deadline);
  bool get(Writer& out, Deadline deadline);
  bool join(Deadline deadline);
  void task_done();

  std::atomic<bool> closed_{false};

 private:
  class PutLock;
  class GetLock;

  bool put_stream(std::span<const std::byte> item, Deadline deadline);
  // Free bytes for data records (the ABORT reserve excluded); `t` is the tail.
  std::uint64_t room(std::uint64_t cap, std::uint64_t t) const {
    const std::uint64_t used = t - h_->head.load(std::memory_order_seq_cst);
    return used + kAbortReserve >= cap ? 0 : cap - used - kAbortReserve;
  }
  bool count_allows() const {
    return h_->maxsize == 0 ||
           h_->puts.load(std::memory_order_seq_cst) - h_->gets.load(std::memory_order_seq_cst) < h_->maxsize;
  }
  void write_record(std::byte* ring, std::uint64_t cap, std::uint64_t pos, Kind kind,
                    std::span<const std::byte> payload) const;
  void commit_put(std::uint64_t new_tail, bool counts);
  void commit_get(std::uint64_t new_head, bool taken, bool lost);
  bool finish_abandoned_stream(Deadline deadline, bool may_wait);
  bool grow(std::uint64_t need, Deadline deadline);
  void check_stream_producer();
  void repair_put() noexcept;
  void repair_get() noexcept;

  sys::UniqueFd fd_;
  Header* h_ = nullptr;
  std::mutex map_mutex_;
  std::vector<sys::FileMapping> maps_;
  std::atomic<std::byte*> ring_{nullptr};
  std::atomic<std::uint64_t> mapped_capacity_{0};
};

namespace {

Deadline lock_deadline(Deadline deadline) {
  if (!deadline) return deadline;
  return std::max(*deadline, Clock::now() + kLockGrace);
}

// Locks a queue mutex; on a dead owner runs `repair` and marks it consistent. False on timeout.
template <class Repair>
bool lock_robust(pthread_mutex_t& m, Deadline deadline, Repair&& repair) {
  const auto r = deadline ? sys::robust_mutex_lock_until(m, *deadline) : sys::robust_mutex_lock(m);
  switch (r) {
    case sys::MutexLockResult::acquired:
      return true;
    case sys::MutexLockResult::owner_died:
      repair();
      sys::robust_mutex_consistent(m);
      return true;
    case sys::MutexLockResult::busy:
    case sys::MutexLockResult::timed_out:
      return false;
    case sys::MutexLockResult::deadlock:
      throw StateError("Queue: a thread re-entered the queue it is using");
    case sys::MutexLockResult::not_recoverable:
      break;
  }
  throw ProtocolError("Queue: a lock was left unrecoverable");
}

}  // namespace

class QueueCore::PutLock {
 public:
  PutLock(QueueCore& q, Deadline deadline)
      : q_(q), held_(lock_robust(q.h().put_lock, lock_deadline(deadline), [&] { q.repair_put(); })) {}
  ~PutLock() { unlock(); }
  PutLock(const PutLock&) = delete;
  PutLock& operator=(const PutLock&) = delete;
  explicit operator bool() const noexcept { return held_; }
  void unlock() noexcept {
    if (held_) sys::robust_mutex_unlock(q_.h().put_lock);
    held_ = false;
  }

 private:
  QueueCore& q_;
  bool held_;
};

class QueueCore::GetLock {
 public:
  GetLock(QueueCore& q, Deadline deadline)
      : q_(q), held_(lock_robust(q.h().get_lock, lock_deadline(deadline), [&] { q.repair_get(); })) {}
  ~GetLock() { unlock(); }
  GetLock(const GetLock&) = delete;
  GetLock& operator=(const GetLock&) = delete;
  explicit operator bool() const noexcept { return held_; }
  void unlock() noexcept {
    if (held_) sys::robust_mutex_unlock(q_.h().get_lock);
    held_ = false;
  }

 private:
  QueueCore& q_;
  bool held_;
};

// A producer died holding put_lock: finish the counter update of a commit whose tail it stored.
void QueueCore::repair_put() noexcept {
  Header& h = *h_;
  h.put_repairs.fetch_add(1);
  if (h.put_pending.load()) {
    if (h.tail.load() == h.put_pending_tail) h.puts.store(h.put_pending_puts);
    h.put_pending.store(0);
  }
  // A stream it left unfinished is closed by finish_abandoned_stream(), which needs room.
}

// A consumer (or a producer growing the ring) died holding get_lock.
void QueueCore::repair_get() noexcept {
  Header& h = *h_;
  h.get_repairs.fetch_add(1);
  if (h.get_pending.load()) {
    if (h.head.load() == h.get_pending_head) {
      h.gets.store(h.get_pending_gets);
      h.lost.store(h.get_pending_lost);
    }
    h.get_pending.store(0);
  }
  // Pieces of an item it was taking are skipped by whoever reads next; a ring it was growing was
  // not committed (capacity is stored last) and is intact.
}

void QueueCore::write_record(std::byte* ring, std::uint64_t cap, std::uint64_t pos, Kind kind,
                             std::span<const std::byte> payload) const {
  const RecordHeader rh{static_cast<std::uint32_t>(kind), static_cast<std::uint32_t>(payload.size())};
  std::uint64_t i = pos & (cap - 1);
  std::memcpy(ring + i, &rh, sizeof rh);
  i = (i + kRecordHeader) & (cap - 1);
  const std::size_t first = std::min<std::uint64_t>(payload.size(), cap - i);
  if (first) std::memcpy(ring + i, payload.data(), first);
  if (payload.size() > first) std::memcpy(ring, payload.data() + first, payload.size() - first);
}

void QueueCore::commit_put(std::uint64_t new_tail, bool counts) {
  Header& h = *h_;
  if (counts) {
    h.put_pending_tail = new_tail;
    h.put_pending_puts = h.puts.load(std::memory_order_relaxed) + 1;
    h.put_pending.store(1, std::memory_order_release);
    h.tail.store(new_tail, std::memory_order_seq_cst);
    test_point("queue:put:published");
    h.puts.store(h.put_pending_puts, std::memory_order_seq_cst);
    h.put_pending.store(0, std::memory_order_release);
  } else {
    h.tail.store(new_tail, std::memory_order_seq_cst);
  }
  bump(h.data_seq);
}

void QueueCore::commit_get(std::uint64_t new_head, bool taken, bool lost) {
  Header& h = *h_;
  if (taken) {
    h.get_pending_head = new_head;
    h.get_pending_gets = h.gets.load(std::memory_order_relaxed) + 1;
    h.get_pending_lost = h.lost.load(std::memory_order_relaxed) + (lost ? 1 : 0);
    h.get_pending.store(1, std::memory_order_release);
    h.head.store(new_head, std::memory_order_seq_cst);
    test_point("queue:get:taken");
    h.gets.store(h.get_pending_gets, std::memory_order_seq_cst);
    if (lost) h.lost.store(h.get_pending_lost, std::memory_order_seq_cst);
    h.get_pending.store(0, std::memory_order_release);
  } else {
    h.head.store(new_head, std::memory_order_seq_cst);
  }
  bump(h.room_seq);
  if (lost) bump(h.join_seq);
}

// Under put_lock: if a producer left a stream unfinished, end it with an ABORT record.
bool QueueCore::finish_abandoned_stream(Deadline deadline, bool may_wait) {
  Header& h = *h_;
  while (h.streaming.load(std::memory_order_acquire)) {
    const std::uint64_t cap = h.capacity.load(std::memory_order_acquire);
    std::byte* ring = ring_for(cap);
    const std::uint64_t t = h.tail.load(std::memory_order_relaxed);
    if (cap - (t - h.head.load(std::memory_order_seq_cst)) >= kRecordHeader) {
      write_record(ring, cap, t, Kind::abort, {});
      commit_put(t + kRecordHeader, false);
      h.streaming.store(0, std::memory_order_release);
      h.aborts.fetch_add(1);
      return true;
    }
    if (!may_wait) return false;
    const std::uint32_t v = arm(h.room_seq);
    if (cap - (t - h.head.load(std::memory_order_seq_cst)) >= kRecordHeader) continue;
    if (!sleep_on(h.room_seq, v, deadline)) return false;
  }
  return true;
}

// Under put_lock: makes the ring large enough for `need` more bytes (or as large as allowed).
// False when get_lock could not be had before the deadline.
bool QueueCore::grow(std::uint64_t need, Deadline deadline) {
  Header& h = *h_;
  GetLock get(*this, deadline);
  if (!get) return false;
  const std::uint64_t cap = h.capacity.load(std::memory_order_relaxed);
  const std::uint64_t head = h.head.load(std::memory_order_relaxed);
  const std::uint64_t tail = h.tail.load(std::memory_order_relaxed);
  const std::uint64_t used = tail - head;
  std::uint64_t new_cap = cap;
  while (new_cap - used < need + kAbortReserve && new_cap < h.max_capacity) new_cap <<= 1;
  if (new_cap == cap) return true;
  if (sys::file_size(fd_.get()) < kHeaderBytes + new_cap) sys::resize_file(fd_.get(), kHeaderBytes + new_cap);
  std::byte* ring = ring_for(new_cap);
  // Bytes whose index differs under the new capacity move to the new upper part: the source is
  // below `cap`, every destination at or above it, so nothing is overwritten before it moves.
  for (std::uint64_t pos = head; pos < tail;) {
    const std::uint64_t from = pos & (cap - 1);
    const std::uint64_t to = pos & (new_cap - 1);
    const std::uint64_t n = std::min({tail - pos, cap - from, new_cap - to});
    if (from != to) {
      std::memcpy(ring + to, ring + from, n);
      test_point("queue:grow:moved");
    }
    pos += n;
  }
  h.capacity.store(new_cap, std::memory_order_release);
  return true;
}

bool QueueCore::put(std::span<const std::byte> item, Deadline deadline) {
  check_open();
  Header& h = *h_;
  const std::uint64_t need = kRecordHeader + align8(item.size());
  if (item.size() > kMaxRecordPayload || need + kAbortReserve > h.max_capacity) return put_stream(item, deadline);
  std::optional<Clock::time_point> full_since;
  for (;;) {
    PutLock lock(*this, deadline);
    if (!lock) return false;
    if (!finish_abandoned_stream(deadline, true)) return false;
    std::uint32_t v = 0;
    for (;;) {
      const std::uint64_t cap = h.capacity.load(std::memory_order_acquire);
      std::byte* ring = ring_for(cap);
      const std::uint64_t t = h.tail.load(std::memory_order_relaxed);
      const bool count_ok = count_allows();
      if (count_ok && room(cap, t) >= need) {
        write_record(ring, cap, t, Kind::whole, item);
        test_point("queue:put:written");
        commit_put(t + need, true);
        return true;
      }
      if (count_ok && cap < h.max_capacity) {
        // No room, but the ring may grow: after a grace for consumers to make room, or at once
        // when the caller will not wait that long.
        const auto now = Clock::now();
        if (!full_since) full_since = now;
        if (now - *full_since >= kGrowGrace || (deadline && *deadline <= *full_since + kGrowGrace)) {
          if (!grow(need, deadline)) return false;
          full_since.reset();
          continue;
        }
      }
      v = arm(h.room_seq);
      if (count_allows() && room(cap, h.tail.load(std::memory_order_relaxed)) >= need) continue;
      break;
    }
    lock.unlock();
    const auto limit = full_since ? *full_since + kGrowGrace - Clock::now() : Clock::duration(kSlice);
    if (!sleep_on(h.room_seq, v, deadline, std::max<Clock::duration>(limit, 100us))) return false;
  }
}

// An item larger than the largest ring: pieces of at most half the ring, under put_lock.
bool QueueCore::put_stream(std::span<const std::byte> item, Deadline deadline) {
  Header& h = *h_;
  std::optional<PutLock> lock;
  // Wait for the item count to allow one more (the lock is not held while waiting).
  for (;;) {
    lock.emplace(*this, deadline);
    if (!*lock) return false;
    if (!finish_abandoned_stream(deadline, true)) return false;
    const std::uint32_t v = arm(h.room_seq);
    if (count_allows()) break;
    lock.reset();
    if (!sleep_on(h.room_seq, v, deadline)) return false;
  }
  h.streaming.store(1, std::memory_order_release);
  std::size_t sent = 0;
  for (bool first = true;;) {
    const std::uint64_t cap = h.capacity.load(std::memory_order_acquire);
    std::byte* ring = ring_for(cap);
    const std::uint64_t t = h.tail.load(std::memory_order_relaxed);
    const std::uint64_t left = item.size() - sent;
    const std::uint64_t piece_max = cap / 2 - kRecordHeader;
    // Wait for room for a sizeable piece (half the ring, or what is left), not for a sliver.
    const std::uint64_t want = kRecordHeader + std::min(align8(left), piece_max);
    const std::uint64_t free = room(cap, t);
    if (free >= want) {
      std::uint64_t n = std::min<std::uint64_t>({left, (free - kRecordHeader) & ~std::uint64_t{7}, piece_max});
      const bool last = !first && n == left;
      if (first && n == left) n = left - 1;  // FIRST is never also the end (cannot happen: item > ring)
      write_record(ring, cap, t, first ? Kind::first : (last ? Kind::last : Kind::middle), item.subspan(sent, n));
      sent += n;
      commit_put(t + kRecordHeader + align8(n), last);
      if (!last) test_point("queue:put:piece");
      first = false;
      if (last) {
        h.streaming.store(0, std::memory_order_release);
        return true;
      }
      continue;
    }
    const std::uint32_t v = arm(h.room_seq);
    if (room(cap, t) >= want) continue;
    if (!sleep_on(h.room_seq, v, deadline)) {
      // Out of time: end the stream with an ABORT (its room is reserved) and report Full.
      write_record(ring, cap, t, Kind::abort, {});
      commit_put(t + kRecordHeader, false);
      h.streaming.store(0, std::memory_order_release);
      h.aborts.fetch_add(1);
      return false;
    }
  }
}

// Under get_lock, waiting for the next piece of a streamed item: if its producer is dead, end the
// stream for it.
void QueueCore::check_stream_producer() {
  const auto r = sys::robust_mutex_try_lock(h_->put_lock);
  if (r == sys::MutexLockResult::busy) return;  // its (live) producer is still at it
  if (r == sys::MutexLockResult::owner_died) {
    repair_put();
    finish_abandoned_stream(std::nullopt, false);
    sys::robust_mutex_consistent(h_->put_lock);
  } else if (r == sys::MutexLockResult::acquired) {
    finish_abandoned_stream(std::nullopt, false);
  } else {
    return;
  }
  sys::robust_mutex_unlock(h_->put_lock);
}

bool QueueCore::get(Writer& out, Deadline deadline) {
  check_open();
  Header& h = *h_;
  out.clear();
  bool in_stream = false;
  bool spun = false;
  for (;;) {
    GetLock lock(*this, deadline);
    if (!lock) return false;
    std::uint32_t v = 0;
    bool spin = false;
    std::uint64_t seen_tail = 0;
    for (;;) {
      const std::uint64_t cap = h.capacity.load(std::memory_order_acquire);
      std::byte* ring = ring_for(cap);
      const std::uint64_t head = h.head.load(std::memory_order_relaxed);
      const std::uint64_t tail = h.tail.load(std::memory_order_seq_cst);
      if (tail != head) {
        const std::uint64_t avail = tail - head;
        RecordHeader rh;
        std::memcpy(&rh, ring + (head & (cap - 1)), sizeof rh);
        const std::uint64_t size = kRecordHeader + align8(rh.length);
        if (avail > cap || avail % 8 != 0 || rh.kind < 1 || rh.kind > 5 || size > avail) {
          // Not something a producer of ours wrote. Drop what is there rather than read garbage.
          commit_get(tail, false, false);
          throw ProtocolError("Queue: corrupt record in shared memory; the queued items were dropped");
        }
        const auto kind = static_cast<Kind>(rh.kind);
        if (kind == Kind::whole || kind == Kind::first) {
          out.clear();  // a stream cut short without its ABORT (cannot happen, but never mix items)
          in_stream = false;
        }
        const bool keep = kind == Kind::whole || kind == Kind::first || in_stream;
        if (keep && kind != Kind::abort && rh.length) {
          std::byte* at = out.grow(rh.length);
          const std::uint64_t i = (head + kRecordHeader) & (cap - 1);
          const std::size_t first = std::min<std::uint64_t>(rh.length, cap - i);
          std::memcpy(at, ring + i, first);
          if (rh.length > first) std::memcpy(at + first, ring, rh.length - first);
        }
        test_point("queue:get:copied");
        switch (kind) {
          case Kind::whole:
            commit_get(head + size, true, false);
            return true;
          case Kind::last:
            // Without its start (its consumer died mid-item), the item is lost.
            commit_get(head + size, true, !in_stream);
            if (in_stream) return true;
            continue;
          case Kind::first:
            in_stream = true;
            break;
          case Kind::middle:
            break;
          case Kind::abort:
            out.clear();
            in_stream = false;
            break;
        }
        commit_get(head + size, false, false);
        if (in_stream) test_point("queue:get:piece");
        continue;
      }
      if (!in_stream && !spun) {
        spin = spun = true;
        seen_tail = tail;
        break;
      }
      v = arm(h.data_seq);
      if (h.tail.load(std::memory_order_seq_cst) != head) continue;
      if (!in_stream) break;
      // Mid-item: the rest comes from the producer holding put_lock. Keep get_lock (the pieces
      // must go to one consumer) and wait for it, whatever the deadline, while it lives.
      const auto slept_from = Clock::now();
      sys::futex_wait(h.data_seq, v, std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::duration(kSlice)));
      if (Clock::now() - slept_from >= kSlice / 2) check_stream_producer();
    }
    lock.unlock();
    if (spin) {
      // Once per get(), before sleeping: watch the tail for a moment, without the lock, so that an
      // item put within microseconds is taken without two wake-ups through the scheduler (see
      // pipe.cpp). Yielding, so that a producer waiting for this CPU runs meanwhile. Measured on 2
      // vCPUs: a request/reply over two queues takes 2 us instead of 47; 20 us of spinning did as
      // well there but took CPU from producers when processes outnumber CPUs, 5 us does not.
      auto until = Clock::now() + kSpin;
      if (deadline) until = std::min(until, *deadline);
      while (h.tail.load(std::memory_order_acquire) == seen_tail && Clock::now() < until) std::this_thread::yield();
      continue;
    }
    if (!sleep_on(h.data_seq, v, deadline)) return false;
  }
}

void QueueCore::task_done() {
  check_open();
  Header& h = *h_;
  std::uint64_t d = h.done.load(std::memory_order_seq_cst);
  for (;;) {
    if (d + h.lost.load(std::memory_order_seq_cst) >= h.gets.load(std::memory_order_seq_cst)) {
      throw StateError("JoinableQueue::task_done() called more times than items were taken");
    }
    if (h.done.compare_exchange_weak(d, d + 1, std::memory_order_seq_cst)) break;
  }
  bump(h.join_seq);
}

bool QueueCore::join(Deadline deadline) {
  check_open();
  Header& h = *h_;
  for (;;) {
    const std::uint32_t v = arm(h.join_seq);
    if (h.done.load(std::memory_order_seq_cst) + h.lost.load(std::memory_order_seq_cst) >=
        h.puts.load(std::memory_order_seq_cst)) {
      return true;
    }
    if (!sleep_on(h.join_seq, v, deadline)) return false;
  }
}

// ---- the functions queue.hpp declares ---------------------------------------------------------

std::shared_ptr<QueueCore> queue_create(const QueueOptions& options) {
  if (options.buffer_bytes > kMaxCapacity || options.max_buffer_bytes > kMaxCapacity) {
    throw InvalidArgument("Queue: buffer sizes are limited to 1 TiB");
  }
  return std::make_shared<QueueCore>(sys::memfd("multiproc-queue", 0), &options);
}

bool queue_put(QueueCore& q, std::span<const std::byte> item, Deadline deadline) { return q.put(item, deadline); }
bool queue_get(QueueCore& q, Writer& out, Deadline deadline) { return q.get(out, deadline); }

std::size_t queue_size(const QueueCore& q) noexcept {
  const Header& h = q.h();
  // A snapshot: `gets` unchanged around the read of `puts` means both held at that instant (read
  // one after the other, a get and a put in between would count an item twice).
  std::uint64_t gets = h.gets.load(std::memory_order_seq_cst);
  std::uint64_t puts = 0;
  for (int tries = 0; tries < 100; ++tries) {
    puts = h.puts.load(std::memory_order_seq_cst);
    const std::uint64_t again = h.gets.load(std::memory_order_seq_cst);
    if (again == gets) break;
    gets = again;
  }
  return puts > gets ? static_cast<std::size_t>(puts - gets) : 0;
}

QueueRepairCounts queue_repair_counts(const QueueCore& q) noexcept {
  const Header& h = q.h();
  return {h.put_repairs.load(), h.get_repairs.load(), h.aborts.load()};
}

std::size_t queue_maxsize(const QueueCore& q) noexcept { return static_cast<std::size_t>(q.h().maxsize); }
void queue_task_done(QueueCore& q) { q.task_done(); }
bool queue_join(QueueCore& q, Deadline deadline) { return q.join(deadline); }
void queue_close(QueueCore& q) noexcept { q.closed_.store(true); }
bool queue_closed(const QueueCore& q) noexcept { return q.closed_.load(); }

// The handle: a tag, then the pid of the encoding process and its descriptor of the memfd.
void queue_encode(const QueueCore* q, Writer& w) {
  if (!q) throw StateError("Queue: encoding a moved-from queue");
  w.write_value(std::uint8_t{1});
  w.write_value(static_cast<std::int32_t>(sys::current_pid()));
  w.write_value(static_cast<std::int32_t>(q->fd()));
}

std::shared_ptr<QueueCore> queue_decode(Reader& r) {
  const auto tag = r.read_value<std::uint8_t>();
  const auto pid = r.read_value<std::int32_t>();
  const auto fd = r.read_value<std::int32_t>();
  if (tag != 1 || pid <= 0 || fd < 0) throw SerializationError("corrupt queue handle");
  sys::UniqueFd mine = sys::descriptor_of(pid, fd);
  return std::make_shared<QueueCore>(std::move(mine), nullptr);
}

namespace {
constexpr std::size_t kKeptBufferBytes = std::size_t{4} << 20;
}

Writer& queue_put_buffer() noexcept {
  thread_local Writer w;
  return w;
}
Writer& queue_get_buffer() noexcept {
  thread_local Writer w;
  return w;
}
void trim_buffer(Writer& w) noexcept {
  // A buffer that held a large item gives its memory back; small ones are reused.
  if (w.size() > kKeptBufferBytes) w = Writer();
  w.clear();
}

Deadline queue_deadline(std::chrono::nanoseconds timeout) {
  // A negative timeout is zero: try once, do not wait.
  if (timeout > std::chrono::hours(24 * 365 * 100)) return std::nullopt;
  return Clock::now() + std::max(timeout, std::chrono::nanoseconds::zero());
}

}  // namespace multiproc::detail

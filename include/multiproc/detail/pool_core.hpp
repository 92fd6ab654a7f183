// The compiled half of Pool: worker processes, the supervisor thread, chunks and their results.
// Internal. The templates in pool.hpp encode requests into Chunks and decode Pieces.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <typeinfo>
#include <vector>

#include "multiproc/codec.hpp"

namespace multiproc {
struct PoolOptions;
}

namespace multiproc::detail {

/// Bytes of the frame header at the front of a chunk's request.
inline constexpr std::size_t kChunkHeaderBytes = 24;

/// Outcomes of a run of consecutive items of one call: `count` outcomes, in order, in `bytes`.
struct Piece {
  std::uint64_t first = 0;
  std::uint32_t count = 0;
  Writer bytes;
};

/// Told when a job is cancelled (the pool's supervisor, which then kills what still runs of it).
class JobListener {
 public:
  virtual void job_cancelled() noexcept = 0;
  /// Called by a thread about to sleep until `ready(context)`: the pool may have it fetch results
  /// itself for a short while (spinning while a core is free) instead. Returns when ready() holds
  /// or the pool would rather the thread slept; the caller then sleeps as usual.
  virtual void help_wait(bool (*ready)(void*), void* context) noexcept {
    (void)ready;
    (void)context;
  }

 protected:
  ~JobListener() = default;
};

/// One call's results (an apply, a map, an imap), filled by the supervisor piece by piece. A
/// worker's crash splits a chunk, so pieces can be smaller than the chunks that were sent; they
/// never overlap and together cover every item submitted.
/// Which call of its pool a job is, for error messages ("apply_async #17 (square(int))"). Plain data
/// set at submission; the function's name is looked up only when a message needs it.
struct CallInfo {
  const char* kind = "call";                 ///< "apply", "apply_async", "map", "imap", ...
  std::uint64_t number = 0;                  ///< the pool's n-th call, from 1
  bool single = true;                        ///< one task (apply) rather than items (map)
  const std::type_info* callable = nullptr;  ///< the callable's type
  const void* function = nullptr;            ///< a plain function's address (named by its symbol)
};

/// The callable's name for messages: a plain function's demangled symbol ("square(int)"), else its
/// demangled type (a lambda's or functor's).
std::string callable_name(const CallInfo& call);

class Job {
 public:
  Job() = default;
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;

  /// Supervisor side.
  void deliver(Piece piece);

  /// Waits for the piece that starts at `first` and takes it.
  Piece take_at(std::uint64_t first);
  /// Waits for any piece and takes the one with the lowest index.
  Piece take_any();
  /// Waits until `total` items have outcomes; false if the deadline passed first.
  bool wait_done(std::uint64_t total, std::optional<std::chrono::steady_clock::time_point> deadline);
  [[nodiscard]] bool done(std::uint64_t total);
  /// Every piece, in index order (after wait_done).
  std::vector<Piece> take_all();

  /// The caller will not read any more results: queued chunks of this job are dropped.
  void abandon() noexcept { abandoned_.store(true, std::memory_order_relaxed); }
  [[nodiscard]] bool abandoned() const noexcept { return abandoned_.load(std::memory_order_relaxed); }
  /// Abandons the job and has the pool kill the workers running its tasks; waiters wake up.
  void cancel() noexcept;
  [[nodiscard]] bool cancelled() const noexcept { return cancelled_.load(std::memory_order_acquire); }
  /// Set by the pool at submission.
  void set_listener(std::weak_ptr<JobListener> listener);

  /// Time limit for each task of this job; zero: the pool's task_timeout. Set before submission.
  std::chrono::nanoseconds timeout{0};
  /// Which call this is. Set before submission.
  CallInfo call;
  /// Names a task of this call for a message: "apply_async #17 (square(int))", or, for a call of
  /// several items, "map #3, item 12 (square(int))". The name is looked up once per job.
  std::string describe_task(std::uint64_t item);

 private:
  // Lets the pool fetch results in the waiting thread before it sleeps (see JobListener).
  template <class Pred>
  void help_until(Pred&& pred);

  std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<std::uint64_t> changes_{0};  // counts deliveries and cancels: spinning waiters watch it
  std::map<std::uint64_t, Piece> pieces_;
  std::uint64_t items_done_ = 0;
  std::atomic<bool> abandoned_{false};
  std::atomic<bool> cancelled_{false};
  std::weak_ptr<JobListener> listener_;
  std::once_flag named_;
  std::string callable_name_;
};

/// A request for a worker: consecutive items of one job, with the callable, encoded.
/// Layout of `request` after the frame header: u64 invoker id, u32 count, callable, items.
struct Chunk {
  std::shared_ptr<Job> job;
  std::uint64_t first = 0;
  std::uint32_t count = 0;
  Writer request;
  /// Offsets in `request` where each item starts, and where the items end; lets the pool split a
  /// chunk after a crash without decoding it. Items of one fixed size keep no offsets: they start
  /// at items_begin, item_size bytes apart.
  std::vector<std::size_t> item_offsets;
  std::size_t items_begin = 0;
  std::size_t items_end = 0;
  std::uint32_t item_size = 0;
  /// Merged from one-item chunks (batching): the worker answers each item on its own.
  bool answer_each = false;
  /// Bytes of the caller's that belong in the request but were not copied into it (a large
  /// argument of a call that waits for its result): `size` bytes at `data` go before request byte
  /// `at`. The pool streams them to the worker from where they lie; the caller keeps them alive
  /// and unchanged until settle_borrowed().
  struct Borrowed {
    std::size_t at = 0;
    const std::byte* data = nullptr;
    std::size_t size = 0;
  };
  std::vector<Borrowed> borrowed;
  std::size_t borrowed_bytes = 0;
};

/// The request's payload size (after the frame header), borrowed bytes included.
inline std::size_t payload_size(const Chunk& c) { return c.request.size() - kChunkHeaderBytes + c.borrowed_bytes; }
/// Copies a chunk's borrowed bytes into its request.
void materialize(Chunk& c);

/// From this size on, a top-level argument of a call that waits (apply, invoke_all) that is a
/// vector of numbers or a string is borrowed instead of copied into the request.
inline constexpr std::size_t kBorrowBytes = std::size_t{1} << 20;
template <class T>
struct is_borrowable : std::false_type {};
template <class T, class A>
struct is_borrowable<std::vector<T, A>>
    : std::bool_constant<(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) || std::is_same_v<T, std::byte>> {};
template <class Tr, class A>
struct is_borrowable<std::basic_string<char, Tr, A>> : std::true_type {};

/// Encodes a top-level argument into `c`, borrowing it when it is a large run of bytes (the same
/// bytes its Codec writes: the element count, then the elements).
template <class T>
void encode_borrowing(Chunk& c, const T& value) {
  if constexpr (is_borrowable<T>::value) {
    const std::size_t bytes = value.size() * sizeof(typename T::value_type);
    if (bytes >= kBorrowBytes) {
      c.request.write_value(static_cast<std::uint64_t>(value.size()));
      c.borrowed.push_back({c.request.size(), reinterpret_cast<const std::byte*>(value.data()), bytes});
      c.borrowed_bytes += bytes;
      return;
    }
  }
  encode(c.request, value);
}

/// One outcome, repeated for `count` items starting at `first`.
Piece repeated_outcome(std::uint64_t first, std::uint32_t count, std::span<const std::byte> outcome);
enum class PoolErrorKind : std::uint8_t;
/// Writes a pool error (cancelled, protocol, initializer, system, timeout) as one outcome.
void write_pool_error(Writer& w, PoolErrorKind kind, const std::string& message);

/// Starts a chunk: frame header room, the invoker id, a count to be patched by finish_chunk().
void begin_chunk(Chunk& c, std::uint64_t invoker_id);
/// Marks where the next item starts.
inline void mark_item(Chunk& c) { c.item_offsets.push_back(c.request.size()); }
/// Where item `i` of `c` starts; i == c.count: where its items end.
inline std::size_t item_begin(const Chunk& c, std::uint32_t i) {
  if (c.item_size != 0) return c.items_begin + std::size_t{i} * c.item_size;
  return i < c.count ? c.item_offsets[i] : c.items_end;
}
void finish_chunk(Chunk& c);

/// Where a Pool's chunks run, other than its own worker processes (the MPI backend): the same
/// Chunks in, the same Pieces delivered to their Jobs (cancel() through Job's listener).
class PoolBackend {
 public:
  virtual ~PoolBackend() = default;
  virtual void submit(std::vector<Chunk> chunks) = 0;
  virtual void close() = 0;
  virtual void terminate() noexcept = 0;
  virtual void join() = 0;
  [[nodiscard]] virtual int processes() const noexcept = 0;
  [[nodiscard]] virtual std::vector<pid_t> worker_pids() const = 0;
};

class PoolCore {
 public:
  explicit PoolCore(const PoolOptions& options);
  /// A pool whose chunks go to `backend` instead of worker processes of its own.
  explicit PoolCore(std::unique_ptr<PoolBackend> backend);
  ~PoolCore();
  PoolCore(const PoolCore&) = delete;
  PoolCore& operator=(const PoolCore&) = delete;

  /// Queues chunks; throws PoolClosed after close() or terminate().
  void submit(std::vector<Chunk> chunks);
  void submit(Chunk chunk);

  void close();
  void terminate() noexcept;
  void join();
  /// After a call that borrowed its arguments (Chunk::borrowed) has its results or gives up on
  /// them: abandons the job and returns once nothing of the pool reads the borrowed bytes.
  void settle_borrowed(Job& job) noexcept;

  [[nodiscard]] int processes() const noexcept;
  /// The pids of the workers running now.
  [[nodiscard]] std::vector<pid_t> worker_pids() const;
  /// Numbers the pool's calls, from 1 (CallInfo::number).
  std::uint64_t next_call_number() noexcept { return calls_.fetch_add(1, std::memory_order_relaxed) + 1; }

  struct Impl;

 private:
  std::atomic<std::uint64_t> calls_{0};
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<PoolBackend> backend_;
};

/// The jobs of a call that borrowed its arguments, settled (PoolCore::settle_borrowed) when the
/// call returns or throws.
struct SettleBorrowed {
  explicit SettleBorrowed(PoolCore* pool) noexcept : core(pool) {}
  PoolCore* core;
  std::vector<std::shared_ptr<Job>> jobs;
  SettleBorrowed(const SettleBorrowed&) = delete;
  SettleBorrowed& operator=(const SettleBorrowed&) = delete;
  ~SettleBorrowed();
};

}  // namespace multiproc::detail

// multiproc/pool.hpp — a pool of worker processes: Python's multiprocessing.Pool for C++, where a
// crash fails one task and nothing else.
//
//     int square(int x) { return x * x; }
//
//     multiproc::Pool pool{{.processes = 4}};                     // default: cpu_count()
//     std::vector<int> ys = pool.map(square, std::views::iota(0, 1000));
//     int y = pool.apply(square, 7);
//     multiproc::AsyncResult<int> r = pool.apply_async(square, 7);  // r.get(), r.wait_for(...)
//     for (int v : pool.imap(square, xs)) { ... }                   // lazy, ordered, bounded
//     auto [mean, hist] = pool.invoke_all(input, compute_mean, compute_hist);
//
// What a task can be: a function pointer, a captureless lambda, or a functor whose state the
// codec can encode; arguments and results are anything the codec encodes (see codec.hpp). A lambda
// with captures is refused at compile time: pass the data as an argument, or use Process.
//
// Faults. A task that throws comes back as the same standard exception type (std::runtime_error,
// std::invalid_argument, ...; see register_exception for your own types) or as TaskError, both
// carrying the type name, message and worker pid (multiproc::remote_info). A worker that dies in a
// task (SIGSEGV, abort, SIGKILL, exit) fails exactly that task with WorkerCrashed; the worker is
// replaced and every other task completes. If the crash happened inside a chunk of several items,
// the items of that chunk that ran before it run again (their results died with the worker): use
// chunksize 1 for tasks whose side effects must not repeat. The messages of WorkerCrashed and
// TaskTimeout name the call by its number in the pool, the item and the function, with the
// worker's pid: "worker 4242 killed by SIGSEGV while running apply_async #17 (parse(std::string))",
// "map #3, item 12 (square(int)) ran past its timeout of 500 ms; worker 4243 was killed". (A plain
// function is named by its symbol, a lambda or functor by its type.)
//
// Lifetime. The destructor terminates: workers are killed and unfinished AsyncResults fail with
// Cancelled. It never waits for tasks, so it can never hang on one; call close() and join() first
// to let queued work finish. (Python's `with Pool()` block terminates the same way.) An
// AsyncResult stays valid after its pool is gone; an imap range needs its pool alive.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <variant>
#include <vector>

#include "multiproc/codec.hpp"
#include "multiproc/detail/pool_core.hpp"
#include "multiproc/detail/task.hpp"
#include "multiproc/error.hpp"
#include "multiproc/start_method.hpp"

namespace multiproc {

/// What PoolOptions::initializer holds: any callable with no arguments. Under fork it runs as it
/// is (it may capture anything); under forkserver and spawn it must be sendable like a task (a
/// function pointer, a captureless lambda or an encodable functor), or the Pool refuses to start.
class Initializer {
 public:
  Initializer() = default;
  Initializer(std::nullptr_t) noexcept {}  // NOLINT: no initializer
  // clang-format off
  template <class F>
    requires(!std::same_as<std::remove_cvref_t<F>, Initializer> && !std::same_as<std::remove_cvref_t<F>, std::nullptr_t> &&
             std::invocable<std::decay_t<F>&>)
  Initializer(F&& f) : local_(f) {  // NOLINT: implicit, like std::function
    using Fn = std::decay_t<F>;
    if constexpr (detail::is_sendable_v<Fn>) {
      Writer w;
      detail::encode_call(w, static_cast<const Fn&>(f), std::tuple<>{});
      const auto b = w.bytes();
      request_ = std::make_shared<const std::vector<std::byte>>(b.begin(), b.end());
    }
  }
  // clang-format on

  explicit operator bool() const noexcept { return static_cast<bool>(local_); }
  void operator()() const { local_(); }
  /// The call request for a worker that does not inherit this process; null when not sendable.
  [[nodiscard]] const std::vector<std::byte>* request() const noexcept { return request_.get(); }

 private:
  std::function<void()> local_;
  std::shared_ptr<const std::vector<std::byte>> request_;
};

struct PoolOptions {
  /// Number of worker processes; default cpu_count(). Zero or negative: InvalidArgument.
  std::optional<int> processes{};
  /// Runs once in each worker when it starts. If it throws, every task of the pool fails with
  /// InitializerError.
  Initializer initializer{};
  /// A worker exits after this many chunks (tasks, in Python's sense) and is replaced; 0 = never.
  std::size_t max_tasks_per_child = 0;
  /// Upper bound for one request or one chunk's results, in bytes; larger fails that call with
  /// ProtocolError instead of exhausting memory.
  std::size_t max_message_bytes = std::size_t{1} << 34;
  /// A task (one item) running longer than this has its worker's process group SIGKILLed and
  /// fails with TaskTimeout; the worker is replaced and every other task goes on. 0: no limit.
  std::chrono::nanoseconds task_timeout{0};
  /// A worker whose resident memory exceeds this many bytes after a task exits and is replaced
  /// (chunks it was sent but had not started go to another); 0 = no limit.
  std::size_t max_memory_per_child = 0;
  /// A worker idle this long exits; the pool starts workers again when work comes (up to
  /// `processes`). Zero: workers stay.
  std::chrono::nanoseconds idle_timeout{0};
  /// How workers are started: fork, forkserver or spawn (start_method.hpp); default
  /// get_start_method(). Every Pool method, fault and error works the same under all three.
  std::optional<StartMethod> start_method{};
};

/// Options of one call (apply, apply_async, map, map_async, map_outcomes), given first.
struct CallOptions {
  /// Each task of the call running longer than this has its worker's process group SIGKILLed and
  /// fails with TaskTimeout (the worker is replaced); zero: the pool's task_timeout.
  std::chrono::nanoseconds timeout{0};
};

/// Registers an exception type so that a task throwing it is rethrown in the parent as that type
/// (built from its message), instead of as TaskError. The standard exception types are registered
/// already. `name` defaults to the demangled type name, which is what workers report.
// clang-format 14 mangles requires-clauses:
// clang-format off
template <class E>
  requires std::constructible_from<E, const std::string&>
void register_exception();
// clang-format on

namespace detail {
using ExceptionFactory = std::exception_ptr (*)(const std::string& type, const std::string& message, pid_t pid);
void register_exception_factory(const std::type_info& type, ExceptionFactory factory);

struct NoErrorBase {};

// Error is a base only when E is not a multiproc::Error already (else it would be ambiguous).
template <class E>
class Remote final : public E,
                     public std::conditional_t<std::is_base_of_v<Error, E>, NoErrorBase, Error>,
                     public RemoteErrorInfo {
 public:
  Remote(const std::string& type, const std::string& message, pid_t pid)
      : E(message), RemoteErrorInfo(type, message, pid) {}
  [[nodiscard]] const char* what() const noexcept override { return E::what(); }
};
}  // namespace detail

// clang-format off
template <class E>
  requires std::constructible_from<E, const std::string&>
void register_exception() {
  detail::register_exception_factory(typeid(E), [](const std::string& type, const std::string& message, pid_t pid) {
    return std::make_exception_ptr(detail::Remote<E>(type, message, pid));
  });
}
// clang-format on

/// A value or the error that took its place: what map_outcomes() returns for each element.
template <class R>
class Outcome {
 public:
  explicit Outcome(R value) : v_(std::in_place_index<0>, std::move(value)) {}
  explicit Outcome(std::exception_ptr error) : v_(std::in_place_index<1>, std::move(error)) {}

  [[nodiscard]] bool has_value() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }
  /// The value; rethrows the error if there is one.
  [[nodiscard]] const R& value() const& {
    if (!has_value()) std::rethrow_exception(std::get<1>(v_));
    return std::get<0>(v_);
  }
  [[nodiscard]] R value() && {
    if (!has_value()) std::rethrow_exception(std::get<1>(v_));
    return std::move(std::get<0>(v_));
  }
  /// The error, or nullptr.
  [[nodiscard]] std::exception_ptr error() const noexcept { return has_value() ? nullptr : std::get<1>(v_); }

 private:
  std::variant<R, std::exception_ptr> v_;
};

namespace detail {
template <class T>
using stored_t = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

/// A range an imap refers to (the caller keeps it alive while iterating).
template <class R>
class RangeRef {
 public:
  explicit RangeRef(R& r) noexcept : r_(&r) {}
  auto begin() const { return std::ranges::begin(*r_); }
  auto end() const { return std::ranges::end(*r_); }

 private:
  R* r_;
};

template <class R>
stored_t<R> decode_single(std::vector<Piece>& pieces) {
  Reader r(pieces.at(0).bytes.bytes());
  if constexpr (std::is_void_v<R>) {
    decode_outcome<void>(r);
    return {};
  } else {
    return decode_outcome<R>(r);
  }
}

template <class R>
std::vector<R> decode_vector(std::vector<Piece>& pieces) {
  std::vector<R> out;
  std::size_t n = 0;
  for (auto& p : pieces) n += p.count;
  out.reserve(n);
  for (auto& p : pieces) {
    Reader r(p.bytes.bytes());
    std::uint32_t i = 0;
    if constexpr (encodes_as_bytes_v<R>) {
      // Values one after the other, each behind its tag: read as such while they last.
      constexpr std::size_t step = 1 + sizeof(R);
      const std::byte* at = p.bytes.data();
      const std::size_t whole = std::min<std::size_t>(p.count, p.bytes.size() / step);
      for (; i < whole && at[0] == static_cast<std::byte>(OutcomeTag::value); ++i, at += step) {
        std::array<std::byte, sizeof(R)> raw;
        std::memcpy(raw.data(), at + 1, sizeof(R));
        out.push_back(std::bit_cast<R>(raw));
      }
      (void)r.take(i * step);
    }
    for (; i < p.count; ++i) out.push_back(decode_outcome<R>(r));
  }
  return out;
}

template <class R>
std::vector<Outcome<R>> decode_outcomes(std::vector<Piece>& pieces) {
  std::vector<Outcome<R>> out;
  for (auto& p : pieces) {
    Reader r(p.bytes.bytes());
    for (std::uint32_t i = 0; i < p.count; ++i) {
      const OutcomeTag tag = read_outcome_tag(r);
      if (tag == OutcomeTag::value) {
        out.emplace_back(decode<R>(r));
      } else {
        out.emplace_back(outcome_error(tag, r));
      }
    }
  }
  return out;
}
}  // namespace detail

/// The result of an asynchronous call (apply_async, map_async, ...). Python's AsyncResult.
template <class T>
class AsyncResult {
 public:
  using value_type = T;
  using Decoder = detail::stored_t<T> (*)(std::vector<detail::Piece>&);

  AsyncResult(std::shared_ptr<detail::Job> job, std::uint64_t total, Decoder decoder)
      : job_(std::move(job)), total_(total), decoder_(decoder) {}

  /// Waits for the result and returns it, or throws the task's error (the first one in order,
  /// for a map).
  decltype(auto) get() & {
    settle();
    if (error_) std::rethrow_exception(error_);
    if constexpr (std::is_void_v<T>) {
      return;
    } else {
      return static_cast<const T&>(*value_);
    }
  }
  T get() && {
    settle();
    if (error_) std::rethrow_exception(error_);
    if constexpr (!std::is_void_v<T>) return std::move(*value_);
  }
  /// Waits at most `timeout` for the result; throws multiproc::Timeout if it is not ready by
  /// then (the task goes on; Python's get(timeout)).
  template <class Rep, class Period>
  decltype(auto) get(std::chrono::duration<Rep, Period> timeout) & {
    if (!wait_for(timeout)) throw Timeout("AsyncResult::get: the result was not ready in time");
    return get();
  }
  /// Waits for the result without fetching it.
  void wait() { job_->wait_done(total_, std::nullopt); }
  /// Waits at most `timeout`; true if the result is ready. Does not stop the task.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> timeout) {
    // Beyond a century is forever (now + timeout would overflow into the past).
    if (timeout >= std::chrono::hours(24 * 365 * 100)) return job_->wait_done(total_, std::nullopt);
    return job_->wait_done(total_, std::chrono::steady_clock::now() +
                                       std::chrono::duration_cast<std::chrono::steady_clock::duration>(timeout));
  }
  /// True once every task has an outcome, or the call was cancelled.
  [[nodiscard]] bool ready() const { return job_->done(total_); }
  /// Cancels the call: its queued tasks never run, the workers running its tasks are killed
  /// (their process groups SIGKILLed) and replaced, and get() throws multiproc::Cancelled. False
  /// when it had already finished or been cancelled (then nothing changes).
  bool cancel() {
    if (job_->done(total_)) return false;
    job_->cancel();
    return true;
  }
  /// True after a cancel() that took effect.
  [[nodiscard]] bool cancelled() const noexcept { return job_->cancelled(); }
  /// True if ready and no task failed; StateError if not ready yet (as Python's ValueError).
  [[nodiscard]] bool successful() {
    if (!ready()) throw StateError("AsyncResult::successful() called before the result is ready");
    settle();
    return !error_;
  }

 private:
  void settle() {
    if (settled_) return;
    job_->wait_done(total_, std::nullopt);
    if (job_->cancelled()) {
      error_ = std::make_exception_ptr(Cancelled("the call was cancelled"));
      settled_ = true;
      return;
    }
    auto pieces = job_->take_all();
    try {
      value_.emplace(decoder_(pieces));
    } catch (...) {
      error_ = std::current_exception();
    }
    settled_ = true;
  }

  std::shared_ptr<detail::Job> job_;
  std::uint64_t total_;
  Decoder decoder_;
  bool settled_ = false;
  std::optional<detail::stored_t<T>> value_;
  std::exception_ptr error_;
};

namespace detail {
/// The outcome of an asynchronous call: waits, then its value or its error.
template <class T>
Outcome<stored_t<T>> outcome_of(AsyncResult<T>& r) {
  try {
    if constexpr (std::is_void_v<T>) {
      std::move(r).get();
      return Outcome<std::monostate>(std::monostate{});
    } else {
      return Outcome<T>(std::move(r).get());
    }
  } catch (...) {
    return Outcome<stored_t<T>>(std::current_exception());
  }
}
}  // namespace detail

class Pool;

/// The lazy result range of imap / imap_unordered: an input range, iterated once. Keeps a
/// bounded number of chunks in flight, submitting more as results are consumed, so it works on
/// endless inputs. An item whose task failed throws its error when dereferenced; iteration can go
/// on past it. Destroying the range drops the chunks not yet started. The pool must outlive it.
template <class V, class Fn, class Item, bool Star, bool Ordered>
class ImapRange {
 public:
  using result_type = detail::stored_t<detail::call_result_t<Star, Fn, Item>>;

  ImapRange(detail::PoolCore& core, V view, Fn f, std::size_t chunksize, std::size_t window,
            const detail::CallInfo& call)
      : core_(core),
        view_(std::move(view)),
        f_(std::move(f)),
        chunksize_(chunksize),
        window_(window),
        job_(std::make_shared<detail::Job>()) {
    job_->call = call;
  }
  ImapRange(const ImapRange&) = delete;
  ImapRange& operator=(const ImapRange&) = delete;
  /// Cancels what is still queued or running of it (see AsyncResult::cancel).
  ~ImapRange() { job_->cancel(); }

  class iterator {
   public:
    using value_type = result_type;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::input_iterator_tag;

    iterator() = default;
    explicit iterator(ImapRange* r) : r_(r) {}
    /// The current result; throws the task's error if it failed.
    const result_type& operator*() const { return r_->current(); }
    const result_type* operator->() const { return &r_->current(); }
    iterator& operator++() {
      r_->advance();
      return *this;
    }
    void operator++(int) { r_->advance(); }
    friend bool operator==(const iterator& it, std::default_sentinel_t) { return it.at_end(); }

   private:
    bool at_end() const noexcept { return r_->at_end(); }
    ImapRange* r_ = nullptr;
  };

  iterator begin() {
    if (started_) throw StateError("an imap range can be iterated only once");
    started_ = true;
    input_ = std::ranges::begin(view_);
    advance();
    return iterator(this);
  }
  std::default_sentinel_t end() const noexcept { return {}; }

 private:
  // Tops the window up in one batch once half of it has been consumed: one submission (one wake-up
  // of the supervisor) per window/2 chunks rather than per chunk.
  void refill() {
    if (input_done_ || submitted_chunks_ - consumed_chunks_ > window_ / 2) return;
    std::vector<detail::Chunk> batch;
    while (!input_done_ && submitted_chunks_ - consumed_chunks_ < window_) {
      detail::Chunk c;
      c.job = job_;
      c.first = next_index_;
      detail::begin_chunk(c, detail::Invoker<Fn, Item, Star>::id);
      detail::encode_function(c.request, f_);
      try {
        while (c.count < chunksize_ && *input_ != std::ranges::end(view_)) {
          const std::size_t at = c.request.size();
          detail::mark_item(c);
          try {
            if constexpr (std::is_same_v<std::remove_cvref_t<std::ranges::range_reference_t<V>>, Item>) {
              encode(c.request, **input_);
            } else {
              encode(c.request, static_cast<Item>(**input_));
            }
          } catch (...) {
            c.item_offsets.pop_back();  // the item that failed is not part of the chunk
            c.request.truncate(at);
            throw;
          }
          ++c.count;  // read and encoded: a failure of ++ below belongs to the next position
          ++*input_;
        }
        if (*input_ == std::ranges::end(view_)) input_done_ = true;
      } catch (...) {
        // The input failed (reading or encoding an element): the items before it still run and
        // come back; its exception takes the failing element's place; then the range ends.
        input_error_ = std::current_exception();
        input_done_ = true;
      }
      if (c.count == 0) break;
      next_index_ += c.count;
      detail::finish_chunk(c);
      batch.push_back(std::move(c));
      ++submitted_chunks_;
    }
    if (!batch.empty()) core_.submit(std::move(batch));
  }

  void advance() {
    value_.reset();
    error_ = nullptr;
    if (left_in_piece_ == 0) {
      refill();
      if (yielded_ == next_index_) {  // nothing left anywhere
        if (input_error_) {           // but the input's own failure, in its place: then the end
          error_ = std::exchange(input_error_, nullptr);
          return;
        }
        finished_ = true;
        return;
      }
      piece_ = Ordered ? job_->take_at(yielded_) : job_->take_any();
      reader_.emplace(piece_.bytes.bytes());
      left_in_piece_ = piece_.count;
      // A chunk split by a crash comes back in several pieces; a chunk counts as consumed when
      // its last item has come back, which is what the window bounds.
      consumed_items_ += piece_.count;
      consumed_chunks_ = consumed_items_ / chunksize_;
    }
    --left_in_piece_;
    ++yielded_;
    const detail::OutcomeTag tag = detail::read_outcome_tag(*reader_);
    if (tag == detail::OutcomeTag::value) {
      value_.emplace(decode<result_type>(*reader_));
    } else {
      error_ = detail::outcome_error(tag, *reader_);
    }
  }

  const result_type& current() const {
    if (error_) std::rethrow_exception(error_);
    return *value_;
  }
  bool at_end() const noexcept { return finished_; }

  detail::PoolCore& core_;
  V view_;
  Fn f_;
  std::size_t chunksize_;
  std::size_t window_;
  std::shared_ptr<detail::Job> job_;
  std::optional<std::ranges::iterator_t<V>> input_;
  bool started_ = false;
  bool input_done_ = false;
  std::exception_ptr input_error_;  // the input's exception, delivered after the items before it
  bool finished_ = false;
  std::uint64_t next_index_ = 0;  // items submitted
  std::uint64_t yielded_ = 0;     // items handed out
  std::uint64_t submitted_chunks_ = 0;
  std::uint64_t consumed_chunks_ = 0;
  std::uint64_t consumed_items_ = 0;
  detail::Piece piece_;
  std::optional<Reader> reader_;
  std::uint32_t left_in_piece_ = 0;
  std::optional<result_type> value_;
  std::exception_ptr error_;
};

class Pool {
 public:
  explicit Pool(PoolOptions options = {});
  /// A pool whose tasks run elsewhere (multiproc::mpi::make_pool): the same API over another engine.
  explicit Pool(std::unique_ptr<detail::PoolBackend> backend);
  /// Terminates: see "Lifetime" above.
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  Pool(Pool&&) noexcept;
  Pool& operator=(Pool&&) noexcept;

  // ---- one call ------------------------------------------------------------------------------
  /// Runs f(args...) in a worker; the future result.
  // clang-format off
  template <class F, class... Args>
    requires(!std::same_as<std::remove_cvref_t<F>, CallOptions>)
  auto apply_async(F&& f, Args&&... args) {
    return apply_async(CallOptions{}, std::forward<F>(f), std::forward<Args>(args)...);
  }
  // clang-format on
  /// The same, with options for this call (a time limit).
  template <class F, class... Args>
  auto apply_async(const CallOptions& options, F&& f, Args&&... args) {
    return submit_apply<false>("apply_async", options, f, nullptr, args...);
  }
  /// Runs f(args...) in a worker and waits for its result. An argument that is a large vector of
  /// numbers or a large string (1 MiB and more) is not copied first: it streams to the worker
  /// straight from where it lies, since it cannot change before this returns.
  // clang-format off
  template <class F, class... Args>
    requires(!std::same_as<std::remove_cvref_t<F>, CallOptions>)
  auto apply(F&& f, Args&&... args) {
    return apply(CallOptions{}, std::forward<F>(f), std::forward<Args>(args)...);
  }
  // clang-format on
  template <class F, class... Args>
  auto apply(const CallOptions& options, F&& f, Args&&... args) {
    detail::SettleBorrowed borrowed{&core()};
    return submit_apply<true>("apply", options, f, &borrowed, args...).get();
  }

  /// Several computations on one input, in parallel: (f1(input), f2(input), ...), each its own type.
  /// A large input streams to each worker from where it lies, as apply's arguments do. Returns once
  /// every computation has ended; if any failed, throws the error of the first failed one by
  /// position (as map throws its first failed element's), whichever failed first in time.
  template <class Input, class... Fs>
  auto invoke_all(const Input& input, Fs&&... fs) {
    detail::SettleBorrowed borrowed{&core()};
    auto results = std::make_tuple(submit_apply<true>("invoke_all", CallOptions{}, fs, &borrowed, input)...);
    std::apply([](auto&... r) { (r.wait(), ...); }, results);
    // A braced list evaluates left to right: the first error by position is the one thrown.
    return std::apply(
        [](auto&... r) {
          return std::tuple<typename std::remove_cvref_t<decltype(r)>::value_type...>{std::move(r).get()...};
        },
        results);
  }
  /// Like invoke_all, but every computation's outcome — value or error — instead of the first
  /// error: (Outcome<R1>, Outcome<R2>, ...).
  template <class Input, class... Fs>
  auto invoke_all_outcomes(const Input& input, Fs&&... fs) {
    detail::SettleBorrowed borrowed{&core()};
    auto results = std::make_tuple(submit_apply<true>("invoke_all", CallOptions{}, fs, &borrowed, input)...);
    return std::apply([](auto&... r) { return std::tuple{detail::outcome_of(r)...}; }, results);
  }

  // ---- maps ----------------------------------------------------------------------------------
  /// f over every element, in order; throws the first failed element's error (in input order)
  /// once all are done. `chunksize` 0: automatic (Python's rule, len / (4 × processes), rounded up).
  template <class F, std::ranges::input_range R>
  auto map(F&& f, R&& inputs, std::size_t chunksize = 0) {
    return map_async(CallOptions{}, std::forward<F>(f), std::forward<R>(inputs), chunksize).get();
  }
  template <class F, std::ranges::input_range R>
  auto map(const CallOptions& options, F&& f, R&& inputs, std::size_t chunksize = 0) {
    return map_async(options, std::forward<F>(f), std::forward<R>(inputs), chunksize).get();
  }
  template <class F, std::ranges::input_range R>
  auto map_async(F&& f, R&& inputs, std::size_t chunksize = 0) {
    return submit_map<false>(CallOptions{}, std::forward<F>(f), std::forward<R>(inputs), chunksize);
  }
  template <class F, std::ranges::input_range R>
  auto map_async(const CallOptions& options, F&& f, R&& inputs, std::size_t chunksize = 0) {
    return submit_map<false>(options, std::forward<F>(f), std::forward<R>(inputs), chunksize);
  }
  /// Like map, but every element's outcome — value or error — instead of the first error
  /// (asyncio.gather(return_exceptions=True)).
  template <class F, std::ranges::input_range R>
  auto map_outcomes(F&& f, R&& inputs, std::size_t chunksize = 0) {
    return map_outcomes(CallOptions{}, std::forward<F>(f), std::forward<R>(inputs), chunksize);
  }
  template <class F, std::ranges::input_range R>
  auto map_outcomes(const CallOptions& options, F&& f, R&& inputs, std::size_t chunksize = 0) {
    using Fn = std::decay_t<F>;
    using Item = std::ranges::range_value_t<R>;
    using Res = detail::stored_t<detail::call_result_t<false, Fn, Item>>;
    auto [job, total] = submit_chunks<false>(options, std::forward<F>(f), std::forward<R>(inputs), chunksize);
    return AsyncResult<std::vector<Outcome<Res>>>(job, total, &detail::decode_outcomes<Res>).get();
  }
  /// f(a, b, ...) for each tuple (a, b, ...) of the input.
  template <class F, std::ranges::input_range R>
  auto starmap(F&& f, R&& inputs, std::size_t chunksize = 0) {
    return starmap_async(std::forward<F>(f), std::forward<R>(inputs), chunksize).get();
  }
  template <class F, std::ranges::input_range R>
  auto starmap_async(F&& f, R&& inputs, std::size_t chunksize = 0) {
    return submit_map<true>(CallOptions{}, std::forward<F>(f), std::forward<R>(inputs), chunksize);
  }

  /// Lazy, ordered results; at most a few chunks per worker in flight. `chunksize` 1 by default,
  /// as in Python: raise it for small tasks.
  template <class F, std::ranges::input_range R>
  auto imap(F&& f, R&& inputs, std::size_t chunksize = 1) {
    return make_imap<true>(std::forward<F>(f), std::forward<R>(inputs), chunksize);
  }
  /// Lazy results in completion order.
  template <class F, std::ranges::input_range R>
  auto imap_unordered(F&& f, R&& inputs, std::size_t chunksize = 1) {
    return make_imap<false>(std::forward<F>(f), std::forward<R>(inputs), chunksize);
  }

  // ---- life cycle ----------------------------------------------------------------------------
  /// No more tasks; the workers exit once the queued ones are done.
  void close();
  /// Stops the workers now; tasks not finished fail with Cancelled.
  void terminate() noexcept;
  /// Waits for the workers to exit; only after close() or terminate() (StateError otherwise).
  void join();

  [[nodiscard]] int processes() const noexcept;
  /// The pids of the current workers (they change as workers are replaced).
  [[nodiscard]] std::vector<pid_t> worker_pids() const;

 private:
  detail::PoolCore& core() const;

  // A map's chunks are handed to the pool in batches of about this many encoded bytes.
  static constexpr std::size_t kSubmitBytes = 64 * 1024;
  // The most items in one chunk (a worker's position counts items in 31 bits).
  static constexpr std::size_t kMaxChunkItems = (std::size_t{1} << 31) - 1;

  // One call of f(args...). With Borrow, the caller waits for the result before `args` can
  // change or go: large ones are borrowed, and their job is settled by `borrowed` at the end.
  template <bool Borrow, class F, class... Args>
  auto submit_apply(const char* kind, const CallOptions& options, const F& f, detail::SettleBorrowed* borrowed,
                    const Args&... args) {
    using Fn = std::decay_t<F>;
    using Item = std::tuple<std::decay_t<Args>...>;
    detail::check_sendable<Fn>();
    using R = detail::call_result_t<true, Fn, Item>;
    auto job = make_job(options, call_info(kind, true, static_cast<const Fn&>(f)));
    detail::Chunk c;
    c.job = job;
    detail::begin_chunk(c, detail::Invoker<Fn, Item, true>::id);
    detail::encode_function(c.request, static_cast<const Fn&>(f));
    detail::mark_item(c);
    if constexpr (Borrow) {
      (detail::encode_borrowing(c, static_cast<const std::decay_t<Args>&>(args)), ...);
    } else {
      (void)borrowed;
      encode_all(c.request, args...);
    }
    c.count = 1;
    detail::finish_chunk(c);
    if constexpr (Borrow) {
      if (!c.borrowed.empty()) borrowed->jobs.push_back(job);
    }
    core().submit(std::move(c));
    return AsyncResult<R>(std::move(job), 1, &detail::decode_single<R>);
  }

  std::shared_ptr<detail::Job> make_job(const CallOptions& options, const detail::CallInfo& call) const {
    if (options.timeout.count() < 0) throw InvalidArgument("CallOptions::timeout must not be negative");
    auto job = std::make_shared<detail::Job>();
    job->timeout = options.timeout;
    job->call = call;
    return job;
  }

  // Names the call for error messages: its kind, its number in this pool, the callable.
  template <class Fn>
  detail::CallInfo call_info(const char* kind, bool single, const Fn& f) const {
    detail::CallInfo call;
    call.kind = kind;
    call.number = core().next_call_number();
    call.single = single;
    call.callable = &typeid(Fn);
    if constexpr (std::is_pointer_v<Fn> && std::is_function_v<std::remove_pointer_t<Fn>>) {
      call.function = reinterpret_cast<const void*>(f);
    }
    return call;
  }

  template <bool Star, class F, class R>
  std::pair<std::shared_ptr<detail::Job>, std::uint64_t> submit_chunks(const CallOptions& options, F&& f, R&& inputs,
                                                                       std::size_t chunksize) {
    using Fn = std::decay_t<F>;
    using Item = std::ranges::range_value_t<R>;
    // Items laid out as their own encoding (a vector of ints, say): a chunk's items are one copy.
    constexpr bool kAsBytes = std::ranges::contiguous_range<R> && detail::encodes_as_bytes_v<Item> &&
                              std::is_same_v<std::remove_cvref_t<std::ranges::range_reference_t<R>>, Item>;
    detail::check_sendable<Fn>();
    if constexpr (!std::ranges::sized_range<R>) {
      // Unknown length: gather the items first (a map's results take that memory anyway).
      std::vector<Item> items;
      for (auto&& x : inputs) items.push_back(static_cast<Item>(x));
      return submit_chunks<Star>(options, std::forward<F>(f), items, chunksize);
    } else {
      const std::size_t n = static_cast<std::size_t>(std::ranges::size(inputs));
      if (chunksize == 0) {
        const std::size_t per = static_cast<std::size_t>(processes()) * 4;
        chunksize = n / per + (n % per ? 1 : 0);
        if (chunksize == 0) chunksize = 1;
      }
      chunksize = std::min(chunksize, kMaxChunkItems);
      auto job = make_job(options, call_info(Star ? "starmap" : "map", false, static_cast<const Fn&>(f)));
      std::vector<detail::Chunk> chunks;
      // Chunks go to the pool as they are encoded, a few at a time, so that the workers start on
      // the first while the rest are encoded.
      const std::size_t start_with = static_cast<std::size_t>(processes());
      std::size_t pending_bytes = 0;
      bool started = false;
      auto it = std::ranges::begin(inputs);
      const auto end = std::ranges::end(inputs);
      std::uint64_t index = 0;
      // If encoding an item throws after some chunks were handed over, the call is cancelled:
      // nothing of a call that failed to start keeps running.
      struct CancelOnThrow {
        detail::Job* job;
        ~CancelOnThrow() {
          if (job) job->cancel();
        }
      } guard{job.get()};
      while (it != end) {
        detail::Chunk& c = chunks.emplace_back();
        c.job = job;
        c.first = index;
        const std::size_t items = std::min<std::size_t>(chunksize, n - static_cast<std::size_t>(index));
        if constexpr (!kAsBytes) c.item_offsets.reserve(items);
        if constexpr (std::is_trivially_copyable_v<Item>) c.request.reserve(64 + items * sizeof(Item));
        detail::begin_chunk(c, detail::Invoker<Fn, Item, Star>::id);
        detail::encode_function(c.request, static_cast<const Fn&>(f));
        if constexpr (kAsBytes) {
          c.items_begin = c.request.size();
          c.item_size = sizeof(Item);
          c.request.write_bytes(std::to_address(it), items * sizeof(Item));
          it += static_cast<std::ranges::range_difference_t<R>>(items);
          c.count = static_cast<std::uint32_t>(items);
        } else {
          for (; c.count < chunksize && it != end; ++it, ++c.count) {
            detail::mark_item(c);
            if constexpr (std::is_same_v<std::remove_cvref_t<std::ranges::range_reference_t<R>>, Item>) {
              encode(c.request, *it);
            } else {
              encode(c.request, static_cast<Item>(*it));
            }
          }
        }
        index += c.count;
        detail::finish_chunk(c);
        pending_bytes += c.request.size();
        if (started ? pending_bytes >= kSubmitBytes : chunks.size() >= start_with) {
          core().submit(std::exchange(chunks, {}));
          pending_bytes = 0;
          started = true;
        }
      }
      if (!chunks.empty()) core().submit(std::move(chunks));
      guard.job = nullptr;
      return {std::move(job), index};
    }
  }

  template <bool Star, class F, class R>
  auto submit_map(const CallOptions& options, F&& f, R&& inputs, std::size_t chunksize) {
    using Fn = std::decay_t<F>;
    using Item = std::ranges::range_value_t<R>;
    using Res = detail::stored_t<detail::call_result_t<Star, Fn, Item>>;
    auto [job, total] = submit_chunks<Star>(options, std::forward<F>(f), std::forward<R>(inputs), chunksize);
    return AsyncResult<std::vector<Res>>(std::move(job), total, &detail::decode_vector<Res>);
  }

  template <bool Ordered, class F, class R>
  auto make_imap(F&& f, R&& inputs, std::size_t chunksize) {
    using Fn = std::decay_t<F>;
    // An lvalue range is referred to, an rvalue one moved in. (Not std::views::all: clang before
    // 16 cannot compile libstdc++'s ref_view/owning_view.)
    using V = std::conditional_t<std::is_lvalue_reference_v<R>, detail::RangeRef<std::remove_reference_t<R>>,
                                 std::remove_cvref_t<R>>;
    using Item = std::ranges::range_value_t<R>;
    detail::check_sendable<Fn>();
    if (chunksize == 0) throw InvalidArgument("imap: chunksize must be at least 1");
    chunksize = std::min(chunksize, kMaxChunkItems);
    const std::size_t window = std::max<std::size_t>(static_cast<std::size_t>(processes()) * 8, 32);
    return ImapRange<V, Fn, Item, false, Ordered>(core(), V(std::forward<R>(inputs)), Fn(f), chunksize, window,
                                                  call_info(Ordered ? "imap" : "imap_unordered", false, Fn(f)));
  }

  std::unique_ptr<detail::PoolCore> core_;
};

}  // namespace multiproc

// How "which function to run, on what" reaches a worker, and how its outcome comes back.
// Internal: nothing here is part of the public API.
//
// A task names its code by an invoker id: a hash of the mangled name of the Invoker<...> type
// that decodes the arguments, calls, and encodes the outcome. Invokers register themselves at
// static initialization, through a static member that every submitting template odr-uses (so the
// linker cannot drop it). A worker looks a received id up in that registry and never jumps to an
// address it was sent; an unknown id is an error reply, not a crash.
//
// The callable travels with the task:
//   - a class type (captureless lambda, functor): nothing when it is empty, else its encoding;
//   - a function pointer: its module and offset, checked on arrival to fall inside executable
//     code of a module loaded in the worker (same build: the pool's workers are forked from it).
#pragma once

#include <unistd.h>

#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <variant>

#include "multiproc/codec.hpp"
#include "multiproc/error.hpp"

namespace multiproc::detail {

/// Where a worker is: the chunk (the low 32 bits of its frame id) and the item in it that it is
/// running, in one word, so that the parent can stop a worker at exactly the item it judged
/// (kHalted). Lives in memory shared with the parent, so the parent can read it after the
/// worker's death.
struct Progress {
  static constexpr std::uint64_t kHalted = std::uint64_t{1} << 31;  // set by the parent: go no further
  static constexpr std::uint64_t position_of(std::uint64_t chunk, std::uint32_t item) noexcept {
    return (chunk << 32) | (item & (kHalted - 1));
  }
  static constexpr std::uint32_t chunk_of(std::uint64_t position) noexcept {
    return static_cast<std::uint32_t>(position >> 32);
  }
  static constexpr std::uint32_t item_of(std::uint64_t position) noexcept {
    return static_cast<std::uint32_t>(position & (kHalted - 1));
  }

  std::atomic<std::uint64_t> position{0};
  std::atomic<std::uint32_t> initialized{0};  // set once the pool's initializer has returned
  std::atomic<std::int64_t> item_started{0};  // steady_clock ticks when the item began (timeouts)

  /// The worker moves on to `next`; if the parent halted where it was (it is being killed for
  /// that item's time limit), it goes no further. An exchange, so that a halt is never missed:
  /// used at a chunk's start and for each item of a chunk with a time limit (the only positions
  /// the parent halts).
  void move_to(std::uint64_t next) noexcept {
    if ((position.exchange(next, std::memory_order_acq_rel) & kHalted) != 0) wait_to_be_killed();
  }
  [[noreturn]] static void wait_to_be_killed() noexcept;
};

struct TaskContext {
  Progress* progress = nullptr;
  bool timed = false;       // the chunk has a time limit: stamp each item's start
  std::uint64_t chunk = 0;  // its frame id
  // When set, called after each item's outcome is written (a batch of one-item tasks: each is
  // answered as soon as it is done, so that a crash never runs a finished task again). It sends
  // what `reply` holds and leaves it ready for the next outcome.
  void (*item_done)(void* sink, Writer& reply) = nullptr;
  void* sink = nullptr;
  void after_item(Writer& reply) const {
    if (item_done) item_done(sink, reply);
  }
  void at_item(std::uint32_t i) const noexcept {
    if (!progress) return;
    if (timed) {
      progress->item_started.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                                   std::memory_order_relaxed);
      progress->move_to(Progress::position_of(chunk, i));
    } else {
      progress->position.store(Progress::position_of(chunk, i), std::memory_order_release);
    }
  }
};

using InvokeFn = void (*)(Reader& request, std::uint32_t count, Writer& reply, const TaskContext& ctx);

/// Registers `fn` under the hash of `mangled_name`; returns the id. Two different names with one
/// hash abort the program at start-up with a message (never a silent mix-up).
std::uint64_t register_invoker(const char* mangled_name, InvokeFn fn);
/// The invoker registered under `id`, or nullptr.
InvokeFn find_invoker(std::uint64_t id) noexcept;
/// The invoker registered under `id`; ProtocolError naming the id when there is none.
InvokeFn require_invoker(std::uint64_t id);

/// A function's address as (module index, offset in the module).
void encode_function_address(Writer& w, void (*fn)());
/// Rebuilds an address encoded by encode_function_address() and checks that it lies in an
/// executable segment of a loaded module; SerializationError if not.
void (*decode_function_address(Reader& r))();

/// The loaded modules' executable segments, as dl_iterate_phdr reports them now. glibc's
/// dl_iterate_phdr holds a loader lock that fork(2) leaves as it is: a child forked while another
/// thread iterates inherits it locked and would wait forever in its first call. A forking parent
/// takes a snapshot first; the child decodes function addresses from it (use_module_snapshot).
struct ModuleSnapshot;
std::shared_ptr<const ModuleSnapshot> snapshot_modules();
/// In a forked child: decode function addresses from `s` (kept alive by the parent's copy).
void use_module_snapshot(const ModuleSnapshot* s) noexcept;

// ---- outcomes --------------------------------------------------------------------------------
enum class OutcomeTag : std::uint8_t {
  value = 0,       // the encoded result follows
  exception = 1,   // type name, message, pid
  crashed = 2,     // exit status, pid, task index
  pool_error = 3,  // PoolErrorKind, message
};
enum class PoolErrorKind : std::uint8_t { cancelled = 0, protocol = 1, initializer = 2, system = 3, timeout = 4 };

/// Inside a catch block in a worker: writes the exception being handled as an outcome.
void encode_current_exception(Writer& w) noexcept;
/// Parent side: rebuilds and throws the error of an outcome whose tag is not `value`.
[[noreturn]] void throw_outcome_error(OutcomeTag tag, Reader& r);
/// Same, as an exception_ptr.
std::exception_ptr outcome_error(OutcomeTag tag, Reader& r);

inline OutcomeTag read_outcome_tag(Reader& r) {
  const auto t = r.read_value<std::uint8_t>();
  if (t > 3) throw SerializationError("corrupt outcome tag");
  return static_cast<OutcomeTag>(t);
}

/// Decodes one item's outcome: its value, or throws its error.
template <class R>
R decode_outcome(Reader& r) {
  const OutcomeTag tag = read_outcome_tag(r);
  if (tag != OutcomeTag::value) throw_outcome_error(tag, r);
  if constexpr (std::is_void_v<R>) {
    return;
  } else {
    return decode<R>(r);
  }
}

// ---- callables -------------------------------------------------------------------------------
template <class T>
struct always_false : std::false_type {};

template <class Fn>
inline constexpr bool is_function_pointer_v = std::is_pointer_v<Fn>&& std::is_function_v<std::remove_pointer_t<Fn>>;

/// Compile-time check that a callable can be sent to a worker, with a message that says what to
/// do instead.
template <class Fn>
constexpr void check_sendable() {
  if constexpr (is_function_pointer_v<Fn>) {
  } else if constexpr (std::is_class_v<Fn>) {
    static_assert(std::is_default_constructible_v<Fn>,
                  "multiproc::Pool cannot send this callable to a worker process: it is a lambda with "
                  "captures (or a functor with no default constructor), and a capture's address means "
                  "nothing in another process. Pass the captured data as an argument instead, use a functor "
                  "type whose state the codec can encode, or run the closure with multiproc::Process (one "
                  "fork per call, which inherits it).");
    static_assert(std::is_empty_v<Fn> || Encodable<Fn>,
                  "multiproc::Pool cannot send this functor: its state is not encodable. Give it a cereal "
                  "serialize(Archive&) or make it trivially copyable.");
  } else {
    static_assert(always_false<Fn>::value,
                  "multiproc::Pool can send function pointers, captureless lambdas and encodable functors");
  }
}

/// True for what can be sent to a process that did not inherit the caller's memory: function
/// pointers, and class types that are default-constructible and empty or encodable.
template <class Fn>
inline constexpr bool is_sendable_v = [] {
  if constexpr (is_function_pointer_v<Fn>) {
    return true;
  } else if constexpr (std::is_class_v<Fn>) {
    if constexpr (std::is_default_constructible_v<Fn>) {
      return std::is_empty_v<Fn> || Encodable<Fn>;
    } else {
      return false;
    }
  } else {
    return false;
  }
}();

template <class Fn>
void encode_function(Writer& w, const Fn& f) {
  if constexpr (is_function_pointer_v<Fn>) {
    encode_function_address(w, reinterpret_cast<void (*)()>(f));
  } else if constexpr (!std::is_empty_v<Fn>) {
    encode(w, f);
  }
}

template <class Fn>
Fn decode_function(Reader& r) {
  if constexpr (is_function_pointer_v<Fn>) {
    return reinterpret_cast<Fn>(decode_function_address(r));
  } else if constexpr (std::is_empty_v<Fn>) {
    return Fn{};
  } else {
    return decode<Fn>(r);
  }
}

/// Calls `f` with an item: as one argument, or (Star) with the item's tuple elements.
template <bool Star, class Fn, class Item>
decltype(auto) call_with(Fn& f, Item&& item) {
  if constexpr (Star) {
    return std::apply(f, std::forward<Item>(item));
  } else {
    return std::invoke(f, std::forward<Item>(item));
  }
}

template <bool Star, class Fn, class Item>
using call_result_t = std::decay_t<decltype(call_with<Star>(std::declval<Fn&>(), std::declval<Item&&>()))>;

/// Runs a chunk in a worker: decodes the callable once, then each item, calls, and writes one
/// outcome per item. An exception from the call or from encoding its result becomes that item's
/// outcome; a failure to decode the request fails the whole chunk (the parent sent it: a bug or a
/// corruption, reported as a fault).
template <class Fn, class Item, bool Star>
struct Invoker {
  static void invoke(Reader& request, std::uint32_t count, Writer& reply, const TaskContext& ctx) {
    Fn f = decode_function<Fn>(request);
    std::uint32_t i = 0;
    if constexpr (kInPlace) {
      if (!ctx.item_done) {
        while (i < count) {
          const std::uint32_t next = invoke_in_place(f, request, i, count, reply, ctx);
          if (next == i) break;  // a short request: the loop below reports it
          i = next;
        }
      }
    }
    for (; i < count; ++i) {
      ctx.at_item(i);
      Item item = decode<Item>(request);
      const std::size_t mark = reply.size();
      try {
        using R = call_result_t<Star, Fn, Item>;
        if constexpr (std::is_void_v<R>) {
          call_with<Star>(f, std::move(item));
          reply.write_value(static_cast<std::uint8_t>(OutcomeTag::value));
        } else {
          R result = call_with<Star>(f, std::move(item));
          reply.write_value(static_cast<std::uint8_t>(OutcomeTag::value));
          encode(reply, result);
        }
      } catch (...) {
        reply.truncate(mark);
        encode_current_exception(reply);
      }
      ctx.after_item(reply);
    }
  }
  static const std::uint64_t id;

 private:
  using Result = call_result_t<Star, Fn, Item>;
  static constexpr bool kInPlace = !Star && encodes_as_bytes_v<Item> && encodes_as_bytes_v<Result>;

  // Items and results that are their own bytes (a map over ints): read and written in place,
  // without the general loop's bookkeeping per item. Runs items [from, count) and returns where it
  // stopped: after an item whose call threw (its outcome written as the general loop does), or at
  // `from` if the request is too short to hold them.
  static std::uint32_t invoke_in_place(Fn& f, Reader& request, std::uint32_t from, std::uint32_t count, Writer& reply,
                                       const TaskContext& ctx) {
    constexpr std::size_t step = 1 + sizeof(Result);
    if (request.available() / sizeof(Item) < count - from) return from;
    const std::byte* in = request.take(0).data();
    const std::size_t mark = reply.size();
    std::byte* out = reply.grow(std::size_t{count - from} * step);
    std::uint32_t i = from;
    for (; i < count; ++i, in += sizeof(Item), out += step) {
      ctx.at_item(i);
      std::array<std::byte, sizeof(Item)> raw;
      std::memcpy(raw.data(), in, sizeof(Item));
      try {
        const Result result = call_with<Star>(f, std::bit_cast<Item>(raw));
        *out = static_cast<std::byte>(OutcomeTag::value);
        std::memcpy(out + 1, std::addressof(result), sizeof(Result));
      } catch (...) {
        reply.truncate(mark + std::size_t{i - from} * step);
        encode_current_exception(reply);
        ++i;
        break;
      }
    }
    (void)request.take(std::size_t{i - from} * sizeof(Item));
    return i;
  }
};

template <class Fn, class Item, bool Star>
const std::uint64_t Invoker<Fn, Item, Star>::id = register_invoker(typeid(Invoker).name(), &Invoker::invoke);

/// Runs a callable once on a tuple of arguments, discarding its result: a Process target or a
/// pool initializer sent to a spawned or forkserver child. The request is the callable and the
/// tuple; the reply one outcome (a value with nothing after it, or the exception).
template <class Fn, class Args>
struct CallInvoker {
  static void invoke(Reader& request, std::uint32_t, Writer& reply, const TaskContext&) {
    const std::size_t mark = reply.size();
    try {
      Fn f = decode_function<Fn>(request);
      Args args = decode<Args>(request);
      std::apply([&](auto&... a) { std::invoke(f, a...); }, args);
      reply.write_value(static_cast<std::uint8_t>(OutcomeTag::value));
    } catch (...) {
      reply.truncate(mark);
      encode_current_exception(reply);
    }
  }
  static const std::uint64_t id;
};

template <class Fn, class Args>
const std::uint64_t CallInvoker<Fn, Args>::id = register_invoker(typeid(CallInvoker).name(), &CallInvoker::invoke);

/// Writes a CallInvoker request: its id, the callable, the arguments.
template <class Fn, class Args>
void encode_call(Writer& w, const Fn& f, const Args& args) {
  w.write_value(CallInvoker<Fn, Args>::id);
  encode_function(w, f);
  encode(w, args);
}

/// Runs a request written by encode_call(); the outcome goes to `reply`. An unknown id is a
/// ProtocolError.
void run_call(Reader& request, Writer& reply);

}  // namespace multiproc::detail

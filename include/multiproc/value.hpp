// multiproc/value.hpp — a value or an array in shared memory, with its own lock: Python's
// multiprocessing.Value and Array.
//
//     multiproc::Value<long> counter;                        // 0, in shared memory
//     multiproc::Array<double> samples(1000);                 // zero-filled
//     multiproc::Process p{[&] {
//       counter.update([](long c) { return c + 1; });        // read-modify-write under the lock
//       samples[0] = 3.5;                                    // raw access, no lock
//     }};
//
//     void add(multiproc::Value<long> v) {                   // a Pool task: the same memory
//       std::lock_guard guard(v.get_lock());
//       v.set(v.get() + 1);                                  // the lock is recursive: no deadlock
//     }
//
// T must be trivially copyable (its bytes are its value in every process). Like SharedMemory and
// the objects of sync.hpp, a Value or Array is a handle: copies share the memory and the lock, a
// forked child inherits them, and one passed to a Pool task (or through any channel) arrives as
// the same memory, never copied. Data and lock live in one anonymous segment (one descriptor, one
// mapping), freed when the last handle anywhere is gone.
//
// The lock is an RLock, as in Python: get(), set(), update() and to_vector() take it, so they can
// be called by a thread that holds get_lock() already. If a process died holding it, they throw
// OwnerDied with the lock held by the caller (see sync.hpp): the value may be half-written;
// repair it through get_obj() or operator[], call get_lock().make_consistent(), then release.
// operator[], data() and get_obj() touch the memory without the lock (Python's get_obj()).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "multiproc/codec.hpp"
#include "multiproc/error.hpp"
#include "multiproc/shared_memory.hpp"
#include "multiproc/sync.hpp"

namespace multiproc {

namespace detail {

// The segment of a Value or Array: the RLock's state, this header, then the elements (on a cache
// line of their own).
struct SharedDataHeader {
  std::uint64_t magic;
  std::uint64_t type_fingerprint;  // the element type, so that a handle cannot be decoded as another
  std::uint64_t element_size;
  std::uint64_t count;
};
inline constexpr std::uint64_t kValueMagic = 0x6d7056616c756531;  // "mpValue1"
inline constexpr std::uint64_t kArrayMagic = 0x6d70417272617931;  // "mpArray1"

constexpr std::size_t align_up(std::size_t n, std::size_t a) noexcept { return (n + a - 1) / a * a; }

// FNV-1a of the type's name: the same in every process of one build.
template <class T>
std::uint64_t type_fingerprint() noexcept {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (const char* p = typeid(T).name(); *p; ++p) {
    h ^= static_cast<unsigned char>(*p);
    h *= 0x100000001b3ULL;
  }
  return h;
}

inline std::size_t shared_data_header_offset() noexcept {
  return align_up(mutex_state_size(), alignof(SharedDataHeader));
}

template <class T>
std::size_t shared_data_offset() noexcept {
  return align_up(shared_data_header_offset() + sizeof(SharedDataHeader), std::max<std::size_t>(alignof(T), 64));
}

// A new segment for `count` zero-filled Ts, with its header written (the lock is made by the
// RLock constructor).
template <class T>
SharedMemory make_shared_data(std::uint64_t magic, std::size_t count, const char* what) {
  const std::size_t offset = shared_data_offset<T>();
  if (count > (SIZE_MAX - offset) / sizeof(T)) throw InvalidArgument(std::string(what) + ": too many elements");
  SharedMemory memory(offset + count * sizeof(T));
  auto* header =
      reinterpret_cast<SharedDataHeader*>(static_cast<std::byte*>(memory.data()) + shared_data_header_offset());
  *header = SharedDataHeader{magic, type_fingerprint<T>(), sizeof(T), count};
  return memory;
}

// The elements of a received segment, after checking that it holds `magic` data of type T;
// SerializationError otherwise.
template <class T>
T* check_shared_data(const SharedMemory& memory, std::uint64_t magic, std::size_t& count, const char* what) {
  const std::size_t offset = shared_data_offset<T>();
  if (memory.size() < offset) throw SerializationError(std::string("not a multiproc::") + what + " handle");
  const auto* header = reinterpret_cast<const SharedDataHeader*>(static_cast<const std::byte*>(memory.data()) +
                                                                 shared_data_header_offset());
  if (header->magic != magic || header->type_fingerprint != type_fingerprint<T>() ||
      header->element_size != sizeof(T) || header->count > (memory.size() - offset) / sizeof(T)) {
    throw SerializationError(std::string("not a multiproc::") + what + " handle of this element type");
  }
  count = static_cast<std::size_t>(header->count);
  return reinterpret_cast<T*>(static_cast<std::byte*>(memory.data()) + offset);
}

}  // namespace detail

/// One T in shared memory with an RLock, Python's multiprocessing.Value.
template <class T>
class Value {
  static_assert(std::is_trivially_copyable_v<T>, "multiproc::Value<T> needs a trivially copyable T");

 public:
  using value_type = T;

  /// A new value, T{}.
  Value() : Value(T{}) {}
  explicit Value(const T& initial)
      : memory_(detail::make_shared_data<T>(detail::kValueMagic, 1, "Value")), lock_(memory_, true) {
    std::size_t n = 0;
    data_ = detail::check_shared_data<T>(memory_, detail::kValueMagic, n, "Value");
    std::memcpy(static_cast<void*>(data_), &initial, sizeof(T));
  }
  // Copies share the memory (so do moves: a moved-from handle still works).
  Value(const Value&) = default;
  Value& operator=(const Value&) = default;

  /// The value, read under the lock.
  [[nodiscard]] T get() const {
    std::lock_guard guard(lock_);
    return *data_;
  }
  /// Writes the value under the lock.
  void set(const T& value) {
    std::lock_guard guard(lock_);
    std::memcpy(static_cast<void*>(data_), &value, sizeof(T));
  }
  /// value = f(value) under the lock; returns the new value.
  template <class F>
  requires std::is_invocable_r_v<T, F&, const T&> T update(F f) {
    std::lock_guard guard(lock_);
    const T next = std::invoke(f, std::as_const(*data_));
    std::memcpy(static_cast<void*>(data_), &next, sizeof(T));
    return next;
  }
  /// The lock that get(), set() and update() take.
  [[nodiscard]] RLock& get_lock() const noexcept { return lock_; }
  /// The value itself, without the lock (Python's get_obj()).
  [[nodiscard]] T* get_obj() const noexcept { return data_; }

  void encode_handle(Writer& w) const { multiproc::encode(w, memory_); }
  static Value decode_handle(Reader& r) { return Value(multiproc::decode<SharedMemory>(r), Decoded{}); }

 private:
  struct Decoded {};
  Value(SharedMemory memory, Decoded) : memory_(std::move(memory)), lock_(memory_, false) {
    std::size_t n = 0;
    data_ = detail::check_shared_data<T>(memory_, detail::kValueMagic, n, "Value");
    if (n != 1) throw SerializationError("not a multiproc::Value handle");
  }

  SharedMemory memory_;
  mutable RLock lock_;
  T* data_ = nullptr;
};

/// A fixed number of Ts in shared memory with an RLock, Python's multiprocessing.Array.
template <class T>
class Array {
  static_assert(std::is_trivially_copyable_v<T>, "multiproc::Array<T> needs a trivially copyable T");

 public:
  using value_type = T;

  /// An empty array.
  Array() : Array(std::size_t{0}) {}
  /// `n` zero-filled elements.
  explicit Array(std::size_t n)
      : memory_(detail::make_shared_data<T>(detail::kArrayMagic, n, "Array")), lock_(memory_, true) {
    data_ = detail::check_shared_data<T>(memory_, detail::kArrayMagic, size_, "Array");
  }
  /// A copy of `values`.
  explicit Array(std::span<const T> values) : Array(values.size()) {
    if (!values.empty()) std::memcpy(static_cast<void*>(data_), values.data(), values.size_bytes());
  }
  explicit Array(const std::vector<T>& values) : Array(std::span<const T>(values)) {}
  Array(const Array&) = default;
  Array& operator=(const Array&) = default;

  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  /// Element `i`, without the lock and unchecked, like SharedArray.
  [[nodiscard]] T& operator[](std::size_t i) const noexcept { return data_[i]; }
  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] T* begin() const noexcept { return data_; }
  [[nodiscard]] T* end() const noexcept { return data_ + size_; }
  [[nodiscard]] std::span<T> span() const noexcept { return {data_, size_}; }

  /// Element `i` read under the lock; InvalidArgument if out of range.
  [[nodiscard]] T get(std::size_t i) const {
    check(i);
    std::lock_guard guard(lock_);
    return data_[i];
  }
  /// Writes element `i` under the lock; InvalidArgument if out of range.
  void set(std::size_t i, const T& value) {
    check(i);
    std::lock_guard guard(lock_);
    std::memcpy(static_cast<void*>(data_ + i), &value, sizeof(T));
  }
  /// A copy of every element, taken under the lock.
  [[nodiscard]] std::vector<T> to_vector() const {
    std::lock_guard guard(lock_);
    return std::vector<T>(data_, data_ + size_);
  }
  [[nodiscard]] RLock& get_lock() const noexcept { return lock_; }
  /// The elements without the lock (Python's get_obj()).
  [[nodiscard]] std::span<T> get_obj() const noexcept { return span(); }

  void encode_handle(Writer& w) const { multiproc::encode(w, memory_); }
  static Array decode_handle(Reader& r) { return Array(multiproc::decode<SharedMemory>(r), Decoded{}); }

 private:
  struct Decoded {};
  Array(SharedMemory memory, Decoded) : memory_(std::move(memory)), lock_(memory_, false) {
    data_ = detail::check_shared_data<T>(memory_, detail::kArrayMagic, size_, "Array");
  }
  void check(std::size_t i) const {
    if (i >= size_) {
      throw InvalidArgument("Array: index " + std::to_string(i) + " out of range (size " + std::to_string(size_) + ")");
    }
  }

  SharedMemory memory_;
  mutable RLock lock_;
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

template <class T>
struct Codec<Value<T>> {
  static void encode(Writer& w, const Value<T>& v) { v.encode_handle(w); }
  static void decode(Reader& r, Value<T>& out) { out = Value<T>::decode_handle(r); }
};
template <class T>
struct Codec<Array<T>> {
  static void encode(Writer& w, const Array<T>& a) { a.encode_handle(w); }
  static void decode(Reader& r, Array<T>& out) { out = Array<T>::decode_handle(r); }
};

}  // namespace multiproc

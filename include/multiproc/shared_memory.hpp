// multiproc/shared_memory.hpp — memory that several processes map at once.
//
//     multiproc::SharedMemory shm(1 << 20);                 // anonymous: nothing in /dev/shm
//     std::memcpy(shm.data(), "hi", 3);
//     multiproc::Process p{[&] { std::puts(static_cast<char*>(shm.data())); }};  // same memory
//
//     multiproc::SharedArray<double> a(1'000'000'000 / 8);  // 1 GB, zero-filled
//     pool.apply(fill, a);                                 // the worker maps the same memory: no copy
//     double first = a[0];                                 // the worker's write is visible here
//
// Anonymous segments are memfds: they have no name anywhere, and the memory is freed when the
// last process holding them ends, whatever way it ends, so nothing can leak after a crash. Named
// segments exist only when asked for (create/attach/unlink, created 0600, like Python's
// SharedMemory(name=...)), and then, as in Python, live until unlinked.
//
// A SharedMemory (and a SharedArray) is a handle: copies share the segment. A forked child
// (Process, or a Pool worker started after it) inherits it; passed as an argument to a Pool task
// or through any channel, it arrives as the same memory, mapped by the receiver, never copied.
// (An anonymous segment is reached through /proc/<pid>/fd of the process that sent it, which must
// keep its handle alive until the receiver has decoded it, as for any argument in flight.)
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <type_traits>

#include "multiproc/codec.hpp"
#include "multiproc/error.hpp"

namespace multiproc {

namespace detail {
struct SharedSegment;
}

class SharedMemory {
 public:
  /// An anonymous, zero-filled segment of `size` bytes (size 0 is allowed).
  explicit SharedMemory(std::size_t size);
  /// A new named segment ("/name" or "name"); SystemError(EEXIST) if it exists. A name that is not
  /// one shm_open(3) component (a NUL byte, a '/' past the first character, "." or "..", longer
  /// than NAME_MAX) is InvalidArgument, here and in attach().
  static SharedMemory create(const std::string& name, std::size_t size);
  /// An existing named segment, with its size.
  static SharedMemory attach(const std::string& name);

  SharedMemory() = default;  // no segment: data() is null, size() 0

  [[nodiscard]] void* data() const noexcept;
  [[nodiscard]] std::size_t size() const noexcept;
  [[nodiscard]] std::span<std::byte> bytes() const noexcept { return {static_cast<std::byte*>(data()), size()}; }
  /// The name of a named segment; empty for an anonymous one.
  [[nodiscard]] const std::string& name() const noexcept;
  /// Removes a named segment's name (the memory stays mapped where it is). StateError if
  /// anonymous.
  void unlink();
  [[nodiscard]] explicit operator bool() const noexcept { return seg_ != nullptr; }

  /// Codec support: how another process finds this segment.
  void encode_handle(Writer& w) const;
  static SharedMemory decode_handle(Reader& r);

 private:
  explicit SharedMemory(std::shared_ptr<detail::SharedSegment> seg) : seg_(std::move(seg)) {}
  std::shared_ptr<detail::SharedSegment> seg_;
};

template <>
struct Codec<SharedMemory> {
  static void encode(Writer& w, const SharedMemory& m) { m.encode_handle(w); }
  static void decode(Reader& r, SharedMemory& out) { out = SharedMemory::decode_handle(r); }
};

/// A fixed-size array of trivially copyable T in shared memory, zero-initialized. Passed to a
/// task, the worker maps the same elements: writes on either side are seen by the other.
template <class T>
class SharedArray {
  static_assert(std::is_trivially_copyable_v<T>, "SharedArray<T> needs a trivially copyable T");

 public:
  using value_type = T;
  SharedArray() = default;
  explicit SharedArray(std::size_t n) : memory_(n * sizeof(T)) {}
  explicit SharedArray(SharedMemory memory) : memory_(std::move(memory)) {}

  [[nodiscard]] T* data() const noexcept { return static_cast<T*>(memory_.data()); }
  [[nodiscard]] std::size_t size() const noexcept { return memory_.size() / sizeof(T); }
  [[nodiscard]] T& operator[](std::size_t i) const noexcept { return data()[i]; }
  [[nodiscard]] T* begin() const noexcept { return data(); }
  [[nodiscard]] T* end() const noexcept { return data() + size(); }
  [[nodiscard]] std::span<T> span() const noexcept { return {data(), size()}; }
  [[nodiscard]] const SharedMemory& memory() const noexcept { return memory_; }

 private:
  SharedMemory memory_;
};

template <class T>
struct Codec<SharedArray<T>> {
  static void encode(Writer& w, const SharedArray<T>& a) { multiproc::encode(w, a.memory()); }
  static void decode(Reader& r, SharedArray<T>& out) { out = SharedArray<T>(multiproc::decode<SharedMemory>(r)); }
};

}  // namespace multiproc

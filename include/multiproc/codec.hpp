// multiproc/codec.hpp — how a value crosses a process boundary.
//
//     std::vector<std::byte> bytes = multiproc::to_bytes(std::map<std::string, int>{{"a", 1}});
//     auto m = multiproc::from_bytes<std::map<std::string, int>>(bytes);
//
// Built in: arithmetic and enum types, std::string, vector, array, deque, list, map, multimap,
// unordered_map, set, unordered_set, optional, variant, monostate, tuple and pair, nested freely;
// trivially copyable structs travel as their bytes. A user type with a cereal `serialize`
// (or `save`/`load`) member or free function is encoded through cereal, unchanged:
//
//     struct Point {
//       double x, y; std::string label;
//       template <class Archive> void serialize(Archive& ar) { ar(x, y, label); }
//     };
//
// For full control, specialize `multiproc::Codec<T>` with `static void encode(Writer&, const T&)`
// and `static void decode(Reader&, T&)`.
//
// Decoding never reads past its input and never allocates more than a small multiple of the input
// size (plus at most 1 MiB of elements that encode to nothing, such as std::monostate), whatever a
// length field says: truncated or corrupt bytes throw SerializationError.
// The format is native-endian and meant for processes of one build on one machine, not storage.
// Trivially copyable structs and enums are copied byte for byte, unvalidated: from corrupt bytes a
// bool member or an enum can decode to a value outside its range. Types that must be checked give
// themselves a cereal serialize() (or a Codec) that validates.
#pragma once

// clang-format 14 reads C++20 requires-clauses as comparisons and mangles them: this file is
// formatted by hand, to the same style.
// clang-format off

#include <algorithm>
#include <array>
#include <cereal/cereal.hpp>
#include <cereal/types/array.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/memory.hpp>
#include <cereal/types/optional.hpp>
#include <cereal/types/set.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/tuple.hpp>
#include <cereal/types/unordered_map.hpp>
#include <cereal/types/utility.hpp>
#include <cereal/types/variant.hpp>
#include <cereal/types/vector.hpp>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "multiproc/error.hpp"

namespace multiproc {

/// A growable byte buffer that values are encoded into. Does not zero what it allocates.
class Writer {
 public:
  Writer() = default;
  explicit Writer(std::size_t capacity) { reserve(capacity); }
  /// A moved-from Writer is empty and can be written to again.
  Writer(Writer&& o) noexcept
      : data_(std::move(o.data_)), size_(std::exchange(o.size_, 0)), capacity_(std::exchange(o.capacity_, 0)) {}
  Writer& operator=(Writer&& o) noexcept {
    if (this != &o) {
      data_ = std::move(o.data_);
      size_ = std::exchange(o.size_, 0);
      capacity_ = std::exchange(o.capacity_, 0);
    }
    return *this;
  }

  void write_bytes(const void* data, std::size_t n) {
    if (n == 0) return;
    std::memcpy(grow(n), data, n);
  }
  template <class T>
    requires std::is_trivially_copyable_v<T>
  void write_value(const T& value) {
    write_bytes(std::addressof(value), sizeof(T));
  }
  /// Appends `n` uninitialized bytes and returns where they start.
  std::byte* grow(std::size_t n) {
    if (capacity_ - size_ < n) reallocate(size_ + n);
    std::byte* at = data_.get() + size_;
    size_ += n;
    return at;
  }
  void reserve(std::size_t capacity) {
    if (capacity > capacity_) reallocate(capacity);
  }
  void clear() noexcept { size_ = 0; }
  /// Drops everything after the first `n` bytes.
  void truncate(std::size_t n) noexcept {
    if (n < size_) size_ = n;
  }

  [[nodiscard]] std::byte* data() noexcept { return data_.get(); }
  [[nodiscard]] const std::byte* data() const noexcept { return data_.get(); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return {data_.get(), size_}; }

 private:
  void reallocate(std::size_t at_least);

  struct Release {
    void operator()(std::byte* p) const noexcept;
  };
  std::unique_ptr<std::byte[], Release> data_;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

/// A bounds-checked view of bytes that values are decoded from: one span, or an input that
/// arrives piece by piece from a Source (a large frame streamed through shared memory).
class Reader {
 public:
  /// Where a streamed Reader's pieces come from.
  class Source {
   public:
    /// The next piece of the input, not empty. The piece handed out before it may be gone: a
    /// Reader never returns to it.
    virtual std::span<const std::byte> next() = 0;
    /// Where take() assembles a run that spans pieces.
    Writer scratch;

   protected:
    ~Source() = default;
  };

  explicit Reader(std::span<const std::byte> bytes) noexcept : bytes_(bytes) {}
  /// `total` bytes, read from `source` piece by piece as decoding reaches them.
  Reader(Source& source, std::size_t total) noexcept : source_(&source), more_(total) {}

  void read_bytes(void* out, std::size_t n) {
    if (n > available()) [[unlikely]] {
      read_across(static_cast<std::byte*>(out), n);
      return;
    }
    if (n) std::memcpy(out, bytes_.data() + pos_, n);  // `out` may be null when n is 0
    pos_ += n;
  }
  template <class T>
    requires std::is_trivially_copyable_v<T>
  T read_value() {
    T value;
    read_bytes(std::addressof(value), sizeof(T));
    return value;
  }
  /// The next `n` bytes, without copying when they are in one piece. The span is valid until the
  /// next call on this Reader.
  std::span<const std::byte> take(std::size_t n) {
    if (n > available()) [[unlikely]] return take_across(n);
    auto out = bytes_.subspan(pos_, n);
    pos_ += n;
    return out;
  }
  /// The next `n` bytes as contiguous runs, in order, to `sink(std::span<const std::byte>)`: one
  /// run unless the input arrives in pieces. Nothing is copied on the way.
  template <class Sink>
  void read_runs(std::size_t n, Sink&& sink) {
    if (n > remaining()) short_input(n);
    while (n != 0) {
      if (available() == 0) next_piece();
      const std::size_t k = std::min(n, available());
      sink(bytes_.subspan(pos_, k));
      pos_ += k;
      n -= k;
    }
  }
  /// Reads an element count and checks it against what is left: every element takes at least
  /// `min_element_size` bytes, so a corrupt count cannot make the decoder allocate more than the
  /// input could hold. Elements that encode to nothing (std::monostate, std::tuple<>, arrays of
  /// them) are bounded by a budget instead, shared by the whole decode: at most kEmptyBudget bytes
  /// of them in memory (`element_bytes` each), however they nest.
  std::size_t read_length(std::size_t min_element_size, std::size_t element_bytes = 1);
  static constexpr std::size_t kEmptyBudget = std::size_t{1} << 20;

  /// Bytes left in the whole input.
  [[nodiscard]] std::size_t remaining() const noexcept { return available() + more_; }
  /// Bytes left that are contiguous from here (all of remaining() unless the input is streamed).
  [[nodiscard]] std::size_t available() const noexcept { return bytes_.size() - pos_; }
  /// Bytes read so far.
  [[nodiscard]] std::size_t position() const noexcept { return done_ + pos_; }

 private:
  [[noreturn]] void short_input(std::size_t wanted) const;
  void next_piece();
  void read_across(std::byte* out, std::size_t n);
  std::span<const std::byte> take_across(std::size_t n);

  std::span<const std::byte> bytes_;
  std::size_t pos_ = 0;
  Source* source_ = nullptr;
  std::size_t more_ = 0;  // bytes still to come from source_
  std::size_t done_ = 0;  // bytes of earlier pieces
  std::size_t empty_budget_ = kEmptyBudget;
};

/// The customization point. The primary template handles cereal-serializable types and
/// trivially copyable types; the standard library types are specialized below.
template <class T>
struct Codec;

namespace detail {

class CerealOutput : public cereal::OutputArchive<CerealOutput, cereal::AllowEmptyClassElision> {
 public:
  explicit CerealOutput(Writer& w) : OutputArchive(this), writer_(w) {}
  void save_binary(const void* data, std::size_t n) { writer_.write_bytes(data, n); }

 private:
  Writer& writer_;
};

class CerealInput : public cereal::InputArchive<CerealInput, cereal::AllowEmptyClassElision> {
 public:
  explicit CerealInput(Reader& r) : InputArchive(this), reader_(r) {}
  void load_binary(void* data, std::size_t n) { reader_.read_bytes(data, n); }
  std::size_t load_size() { return reader_.read_length(1); }

 private:
  Reader& reader_;
};

template <class T>
  requires std::is_arithmetic_v<T>
void CEREAL_SAVE_FUNCTION_NAME(CerealOutput& ar, const T& t) {
  ar.save_binary(std::addressof(t), sizeof(t));
}
template <class T>
  requires std::is_arithmetic_v<T>
void CEREAL_LOAD_FUNCTION_NAME(CerealInput& ar, T& t) {
  if constexpr (std::is_same_v<T, bool>) {
    unsigned char b;
    ar.load_binary(&b, 1);
    if (b > 1) throw SerializationError("corrupt bool");
    t = b != 0;
  } else {
    ar.load_binary(std::addressof(t), sizeof(t));
  }
}
template <class Archive, class T>
  requires(std::is_same_v<Archive, CerealOutput> || std::is_same_v<Archive, CerealInput>)
void CEREAL_SERIALIZE_FUNCTION_NAME(Archive& ar, cereal::NameValuePair<T>& t) {
  ar(t.value);
}
template <class T>
void CEREAL_SAVE_FUNCTION_NAME(CerealOutput& ar, const cereal::SizeTag<T>& t) {
  const std::uint64_t size = t.size;
  ar.save_binary(&size, sizeof size);
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(CerealInput& ar, cereal::SizeTag<T>& t) {
  t.size = static_cast<std::remove_reference_t<T>>(ar.load_size());
}
template <class T>
void CEREAL_SAVE_FUNCTION_NAME(CerealOutput& ar, const cereal::BinaryData<T>& bd) {
  ar.save_binary(bd.data, static_cast<std::size_t>(bd.size));
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(CerealInput& ar, cereal::BinaryData<T>& bd) {
  ar.load_binary(bd.data, static_cast<std::size_t>(bd.size));
}

template <class T>
inline constexpr bool is_cereal_serializable_v =
    std::is_class_v<T> && cereal::traits::is_output_serializable<T, CerealOutput>::value &&
    cereal::traits::is_input_serializable<T, CerealInput>::value;

[[noreturn]] void throw_serialization_error(const char* what, const char* detail = nullptr);

}  // namespace detail

/// True when multiproc knows how to send a T.
template <class T>
concept Encodable = requires(Writer& w, Reader& r, const std::remove_cvref_t<T>& cv, std::remove_cvref_t<T>& v) {
  Codec<std::remove_cvref_t<T>>::encode(w, cv);
  Codec<std::remove_cvref_t<T>>::decode(r, v);
};

#define MULTIPROC_NOT_ENCODABLE_MESSAGE                                                                  \
  "multiproc cannot encode this type: give it a cereal serialize(Archive&) member or free function, " \
  "make it trivially copyable, or specialize multiproc::Codec<T>. Pointers are never sent: their "     \
  "addresses mean nothing in another process."

template <class T>
void encode(Writer& w, const T& value) {
  static_assert(Encodable<T>, MULTIPROC_NOT_ENCODABLE_MESSAGE);
  Codec<std::remove_cvref_t<T>>::encode(w, value);
}
template <class T>
void decode(Reader& r, T& out) {
  static_assert(Encodable<T>, MULTIPROC_NOT_ENCODABLE_MESSAGE);
  Codec<std::remove_cvref_t<T>>::decode(r, out);
}
template <class T>
T decode(Reader& r) {
  static_assert(std::is_default_constructible_v<T>, "multiproc: a decoded type must be default constructible");
  T value{};
  decode(r, value);
  return value;
}

/// Encodes several values one after another.
template <class... Ts>
void encode_all(Writer& w, const Ts&... values) {
  (encode(w, values), ...);
}

/// One value to a fresh byte vector.
template <class T>
std::vector<std::byte> to_bytes(const T& value) {
  Writer w;
  encode(w, value);
  return {w.data(), w.data() + w.size()};
}
/// Bytes to one value; all of the input must be used.
template <class T>
T from_bytes(std::span<const std::byte> bytes) {
  Reader r(bytes);
  T value = decode<T>(r);
  if (r.remaining() != 0) detail::throw_serialization_error("trailing bytes after the value");
  return value;
}

// ---- the least number of bytes a T's encoding takes (bounds length fields) --------------------
namespace detail {
// 1 unless known: every encoding takes a byte, except the known-empty ones (monostate, tuple<>).
template <class T>
struct min_size : std::integral_constant<std::size_t, 1> {};
template <class T>
inline constexpr std::size_t min_size_v = min_size<std::remove_cvref_t<T>>::value;
}  // namespace detail

// ---- primary: cereal user types, then trivially copyable types --------------------------------
namespace detail {
// The standard templates multiproc encodes itself: when their elements are not encodable, the
// type is not either (cereal's traits would say yes, and fail later inside cereal).
template <class T>
struct is_std_handled : std::false_type {};
template <class... A>
struct is_std_handled<std::basic_string<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::vector<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::deque<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::list<A...>> : std::true_type {};
template <class T, std::size_t N>
struct is_std_handled<std::array<T, N>> : std::true_type {};
template <class... A>
struct is_std_handled<std::map<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::multimap<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::unordered_map<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::set<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::multiset<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::unordered_set<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::optional<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::variant<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::tuple<A...>> : std::true_type {};
template <class... A>
struct is_std_handled<std::pair<A...>> : std::true_type {};

template <class T>
inline constexpr bool primary_encodable_v =
    !is_std_handled<T>::value &&
    (is_cereal_serializable_v<T> ||
     (std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> && !std::is_member_pointer_v<T>));
}  // namespace detail

template <class T>
struct Codec {
  static void encode(Writer& w, const T& value)
    requires detail::primary_encodable_v<T>
  {
    if constexpr (detail::is_cereal_serializable_v<T>) {
      detail::CerealOutput ar(w);
      ar(value);
    } else {
      w.write_value(value);
    }
  }
  static void decode(Reader& r, T& out)
    requires detail::primary_encodable_v<T>
  {
    if constexpr (detail::is_cereal_serializable_v<T>) {
      try {
        detail::CerealInput ar(r);
        ar(out);
      } catch (const cereal::Exception& e) {
        detail::throw_serialization_error("cereal: ", e.what());
      }
    } else {
      r.read_bytes(std::addressof(out), sizeof(T));
    }
  }
};

template <class T>
  requires(std::is_trivially_copyable_v<T> && !detail::is_cereal_serializable_v<T>)
struct detail::min_size<T> : std::integral_constant<std::size_t, sizeof(T)> {};

// ---- bool: validated -------------------------------------------------------------------------
template <>
struct Codec<bool> {
  static void encode(Writer& w, bool v) { w.write_value(static_cast<unsigned char>(v ? 1 : 0)); }
  static void decode(Reader& r, bool& out) {
    const auto b = r.read_value<unsigned char>();
    if (b > 1) detail::throw_serialization_error("corrupt bool");
    out = b != 0;
  }
};

namespace detail {
// Types through which any byte may be read: a run of received bytes is an array of them, so a
// container of them is filled straight from the input, with no zeroing first.
template <class T>
inline constexpr bool is_byte_like_v =
    std::is_same_v<T, char> || std::is_same_v<T, unsigned char> || std::is_same_v<T, std::byte>;
}  // namespace detail

// ---- strings ---------------------------------------------------------------------------------
template <class C, class Tr, class A>
  requires std::is_trivially_copyable_v<C>
struct Codec<std::basic_string<C, Tr, A>> {
  static_assert(std::is_trivially_copyable_v<C>);
  static void encode(Writer& w, const std::basic_string<C, Tr, A>& s) {
    w.write_value(static_cast<std::uint64_t>(s.size()));
    w.write_bytes(s.data(), s.size() * sizeof(C));
  }
  static void decode(Reader& r, std::basic_string<C, Tr, A>& out) {
    const std::size_t n = r.read_length(sizeof(C));
    if constexpr (detail::is_byte_like_v<C>) {
      out.clear();
      out.reserve(n);
      r.read_runs(n, [&](std::span<const std::byte> run) {
        out.append(reinterpret_cast<const C*>(run.data()), run.size());
      });
    } else {
      out.resize(n);
      r.read_bytes(out.data(), n * sizeof(C));
    }
  }
};
template <class C, class Tr, class A>
struct detail::min_size<std::basic_string<C, Tr, A>> : std::integral_constant<std::size_t, 8> {};

// ---- sequences -------------------------------------------------------------------------------
namespace detail {
// Element types whose bytes are their value (every bit pattern valid): vectors of them are one
// memcpy.
template <class T>
inline constexpr bool is_bitwise_v = (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) ||
                                     (std::is_trivially_copyable_v<T> && std::is_class_v<T> &&
                                      !is_cereal_serializable_v<T>);

// From this size on, a buffer about to be filled is put on huge pages (prepare_bulk).
inline constexpr std::size_t kBulkBytes = std::size_t{4} << 20;
/// Asks for huge pages under [p, p + n), memory not touched yet that is about to be filled.
void prepare_bulk(void* p, std::size_t n) noexcept;

// Types whose encoding is exactly their sizeof(T) bytes (bitwise, and no codec of their own): a
// run of them encodes and decodes as one block.
template <class T>
inline constexpr bool encodes_as_bytes_v = is_bitwise_v<T> && !is_std_handled<T>::value;

template <class Seq>
void encode_sequence(Writer& w, const Seq& seq) {
  w.write_value(static_cast<std::uint64_t>(std::size(seq)));
  for (const auto& e : seq) multiproc::encode(w, e);
}
}  // namespace detail

template <class T, class A>
  requires Encodable<T>
struct Codec<std::vector<T, A>> {
  static void encode(Writer& w, const std::vector<T, A>& v) {
    if constexpr (detail::is_bitwise_v<T>) {
      w.write_value(static_cast<std::uint64_t>(v.size()));
      w.write_bytes(v.data(), v.size() * sizeof(T));
    } else {
      detail::encode_sequence(w, v);
    }
  }
  static void decode(Reader& r, std::vector<T, A>& out) {
    const std::size_t n = r.read_length(detail::min_size_v<T>, sizeof(T));
    if constexpr (detail::is_bitwise_v<T>) {
      const std::size_t bytes = n * sizeof(T);
      if (out.capacity() < n) {
        out = std::vector<T, A>(out.get_allocator());
        out.reserve(n);
        if (bytes >= detail::kBulkBytes) detail::prepare_bulk(out.data(), bytes);
      }
      if constexpr (detail::is_byte_like_v<T>) {
        // Appended run by run: each byte is written once (resize() would zero it first).
        out.clear();
        r.read_runs(bytes, [&](std::span<const std::byte> run) {
          const T* from = reinterpret_cast<const T*>(run.data());
          out.insert(out.end(), from, from + run.size());
        });
      } else {
        out.resize(n);
        r.read_bytes(out.data(), bytes);
      }
    } else {
      out.clear();
      // Reserve no more than a small multiple of the input in memory: a corrupt count of large
      // elements must not allocate before decoding fails.
      out.reserve(std::min(n, r.remaining() * 8 / sizeof(T) + 1));
      for (std::size_t i = 0; i < n; ++i) {
        if constexpr (std::is_same_v<T, bool>) {
          bool b;
          multiproc::decode(r, b);
          out.push_back(b);
        } else {
          multiproc::decode(r, out.emplace_back());
        }
      }
    }
  }
};

template <class T, class A>
  requires Encodable<T>
struct Codec<std::deque<T, A>> {
  static void encode(Writer& w, const std::deque<T, A>& v) { detail::encode_sequence(w, v); }
  static void decode(Reader& r, std::deque<T, A>& out) {
    const std::size_t n = r.read_length(detail::min_size_v<T>, sizeof(T));
    out.clear();
    for (std::size_t i = 0; i < n; ++i) multiproc::decode(r, out.emplace_back());
  }
};
template <class T, class A>
  requires Encodable<T>
struct Codec<std::list<T, A>> {
  static void encode(Writer& w, const std::list<T, A>& v) { detail::encode_sequence(w, v); }
  static void decode(Reader& r, std::list<T, A>& out) {
    const std::size_t n = r.read_length(detail::min_size_v<T>, sizeof(T));
    out.clear();
    for (std::size_t i = 0; i < n; ++i) multiproc::decode(r, out.emplace_back());
  }
};

template <class T, std::size_t N>
  requires Encodable<T>
struct Codec<std::array<T, N>> {
  static void encode(Writer& w, const std::array<T, N>& a) {
    if constexpr (detail::is_bitwise_v<T>) {
      w.write_bytes(a.data(), sizeof(T) * N);
    } else {
      for (const auto& e : a) multiproc::encode(w, e);
    }
  }
  static void decode(Reader& r, std::array<T, N>& out) {
    if constexpr (detail::is_bitwise_v<T>) {
      r.read_bytes(out.data(), sizeof(T) * N);
    } else {
      for (auto& e : out) multiproc::decode(r, e);
    }
  }
};

template <class T, class A>
struct detail::min_size<std::vector<T, A>> : std::integral_constant<std::size_t, 8> {};
template <class T, class A>
struct detail::min_size<std::deque<T, A>> : std::integral_constant<std::size_t, 8> {};
template <class T, class A>
struct detail::min_size<std::list<T, A>> : std::integral_constant<std::size_t, 8> {};
template <class T, std::size_t N>
struct detail::min_size<std::array<T, N>> : std::integral_constant<std::size_t, N * detail::min_size_v<T>> {};

// ---- associative containers -------------------------------------------------------------------
namespace detail {
template <class Map>
struct MapCodec {
  using K = typename Map::key_type;
  using V = typename Map::mapped_type;
  static void encode(Writer& w, const Map& m) {
    w.write_value(static_cast<std::uint64_t>(m.size()));
    for (const auto& [k, v] : m) {
      multiproc::encode(w, k);
      multiproc::encode(w, v);
    }
  }
  static void decode(Reader& r, Map& out) {
    const std::size_t n = r.read_length(min_size_v<K> + min_size_v<V>, sizeof(K) + sizeof(V));
    out.clear();
    for (std::size_t i = 0; i < n; ++i) {
      K k{};
      V v{};
      multiproc::decode(r, k);
      multiproc::decode(r, v);
      out.emplace(std::move(k), std::move(v));
    }
  }
};
template <class Set>
struct SetCodec {
  using K = typename Set::key_type;
  static void encode(Writer& w, const Set& s) { encode_sequence(w, s); }
  static void decode(Reader& r, Set& out) {
    const std::size_t n = r.read_length(min_size_v<K>, sizeof(K));
    out.clear();
    for (std::size_t i = 0; i < n; ++i) {
      K k{};
      multiproc::decode(r, k);
      out.insert(std::move(k));
    }
  }
};
}  // namespace detail

template <class K, class V, class C, class A>
  requires(Encodable<K> && Encodable<V>)
struct Codec<std::map<K, V, C, A>> : detail::MapCodec<std::map<K, V, C, A>> {};
template <class K, class V, class C, class A>
  requires(Encodable<K> && Encodable<V>)
struct Codec<std::multimap<K, V, C, A>> : detail::MapCodec<std::multimap<K, V, C, A>> {};
template <class K, class V, class H, class E, class A>
  requires(Encodable<K> && Encodable<V>)
struct Codec<std::unordered_map<K, V, H, E, A>> : detail::MapCodec<std::unordered_map<K, V, H, E, A>> {};
template <class K, class C, class A>
  requires Encodable<K>
struct Codec<std::set<K, C, A>> : detail::SetCodec<std::set<K, C, A>> {};
template <class K, class C, class A>
  requires Encodable<K>
struct Codec<std::multiset<K, C, A>> : detail::SetCodec<std::multiset<K, C, A>> {};
template <class K, class H, class E, class A>
  requires Encodable<K>
struct Codec<std::unordered_set<K, H, E, A>> : detail::SetCodec<std::unordered_set<K, H, E, A>> {};

template <class K, class V, class C, class A>
struct detail::min_size<std::map<K, V, C, A>> : std::integral_constant<std::size_t, 8> {};
template <class K, class V, class C, class A>
struct detail::min_size<std::multimap<K, V, C, A>> : std::integral_constant<std::size_t, 8> {};
template <class K, class V, class H, class E, class A>
struct detail::min_size<std::unordered_map<K, V, H, E, A>> : std::integral_constant<std::size_t, 8> {};
template <class K, class C, class A>
struct detail::min_size<std::set<K, C, A>> : std::integral_constant<std::size_t, 8> {};
template <class K, class C, class A>
struct detail::min_size<std::multiset<K, C, A>> : std::integral_constant<std::size_t, 8> {};
template <class K, class H, class E, class A>
struct detail::min_size<std::unordered_set<K, H, E, A>> : std::integral_constant<std::size_t, 8> {};

// ---- optional, variant, tuple, pair ----------------------------------------------------------
template <class T>
  requires Encodable<T>
struct Codec<std::optional<T>> {
  static void encode(Writer& w, const std::optional<T>& o) {
    multiproc::encode(w, o.has_value());
    if (o) multiproc::encode(w, *o);
  }
  static void decode(Reader& r, std::optional<T>& out) {
    bool has = false;
    multiproc::decode(r, has);
    if (!has) {
      out.reset();
      return;
    }
    multiproc::decode(r, out.emplace());
  }
};
template <class T>
struct detail::min_size<std::optional<T>> : std::integral_constant<std::size_t, 1> {};

template <>
struct Codec<std::monostate> {
  static void encode(Writer&, const std::monostate&) {}
  static void decode(Reader&, std::monostate&) {}
};
template <>
struct detail::min_size<std::monostate> : std::integral_constant<std::size_t, 0> {};

template <class... Ts>
  requires(Encodable<Ts> && ...)
struct Codec<std::variant<Ts...>> {
  using V = std::variant<Ts...>;
  static void encode(Writer& w, const V& v) {
    if (v.valueless_by_exception()) throw SerializationError("cannot encode a valueless variant");
    w.write_value(static_cast<std::uint32_t>(v.index()));
    std::visit([&](const auto& alt) { multiproc::encode(w, alt); }, v);
  }
  static void decode(Reader& r, V& out) {
    const auto index = r.read_value<std::uint32_t>();
    if (index >= sizeof...(Ts)) detail::throw_serialization_error("variant index out of range");
    decode_at(r, out, index, std::index_sequence_for<Ts...>{});
  }

 private:
  template <std::size_t... I>
  static void decode_at(Reader& r, V& out, std::uint32_t index, std::index_sequence<I...>) {
    (void)((I == index ? (multiproc::decode(r, out.template emplace<I>()), true) : false) || ...);
  }
};
template <class... Ts>
struct detail::min_size<std::variant<Ts...>> : std::integral_constant<std::size_t, 4> {};

template <class... Ts>
  requires(Encodable<Ts> && ...)
struct Codec<std::tuple<Ts...>> {
  static void encode(Writer& w, const std::tuple<Ts...>& t) {
    std::apply([&](const auto&... e) { (multiproc::encode(w, e), ...); }, t);
  }
  static void decode(Reader& r, std::tuple<Ts...>& out) {
    std::apply([&](auto&... e) { (multiproc::decode(r, e), ...); }, out);
  }
};
template <class... Ts>
struct detail::min_size<std::tuple<Ts...>>
    : std::integral_constant<std::size_t, (std::size_t{0} + ... + detail::min_size_v<Ts>)> {};

template <class A, class B>
  requires(Encodable<std::remove_const_t<A>> && Encodable<B>)
struct Codec<std::pair<A, B>> {
  static void encode(Writer& w, const std::pair<A, B>& p) {
    multiproc::encode(w, p.first);
    multiproc::encode(w, p.second);
  }
  static void decode(Reader& r, std::pair<A, B>& out) {
    // Map value types have a const key; decode through the non-const type.
    multiproc::decode(r, const_cast<std::remove_const_t<A>&>(out.first));
    multiproc::decode(r, out.second);
  }
};
template <class A, class B>
struct detail::min_size<std::pair<A, B>>
    : std::integral_constant<std::size_t, detail::min_size_v<A> + detail::min_size_v<B>> {};

}  // namespace multiproc

CEREAL_REGISTER_ARCHIVE(multiproc::detail::CerealOutput)
CEREAL_REGISTER_ARCHIVE(multiproc::detail::CerealInput)
CEREAL_SETUP_ARCHIVE_TRAITS(multiproc::detail::CerealInput, multiproc::detail::CerealOutput)
// clang-format on

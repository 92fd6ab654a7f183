// Codec: round trips for every built-in kind, cereal user types, and corrupt input.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <multiproc/codec.hpp>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "test_support.hpp"

// ---- allocation probe -----------------------------------------------------------------------
// Replacing the global operator new lets a test assert that decoding a huge length field does not
// even try to allocate what it says. Only the largest single request is recorded. ThreadSanitizer's
// runtime defines the operators itself (a second definition does not link), so under it the probe
// records nothing and the allocation check is left out (the exception and time checks remain).
#if defined(__SANITIZE_THREAD__)
#define CODECTEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CODECTEST_TSAN 1
#endif
#endif
#ifndef CODECTEST_TSAN
#define CODECTEST_TSAN 0
#endif

namespace {
std::atomic<std::size_t> g_largest_allocation{0};

#if !CODECTEST_TSAN
void record_allocation(std::size_t n) noexcept {
  std::size_t seen = g_largest_allocation.load(std::memory_order_relaxed);
  while (n > seen && !g_largest_allocation.compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
  }
}

void* allocate(std::size_t n) {
  record_allocation(n);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
#endif
}  // namespace

#if !CODECTEST_TSAN
void* operator new(std::size_t n) { return allocate(n); }
void* operator new[](std::size_t n) { return allocate(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  record_allocation(n);
  return std::malloc(n == 0 ? 1 : n);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  record_allocation(n);
  return std::malloc(n == 0 ? 1 : n);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#endif

namespace {

using multiproc::from_bytes;
using multiproc::SerializationError;
using multiproc::to_bytes;
using Bytes = std::vector<std::byte>;

template <class T>
T round_trip(const T& value) {
  const Bytes bytes = to_bytes(value);
  return from_bytes<T>(bytes);
}

template <class T>
void expect_round_trip(const T& value) {
  EXPECT_EQ(round_trip(value), value);
}

// ---- test types -----------------------------------------------------------------------------

enum class Color : std::uint8_t { red = 1, green = 2, blue = 200 };
enum Plain { plain_a = 0, plain_b = 1, plain_c = 2 };
enum class Wide : std::int64_t { low = std::numeric_limits<std::int64_t>::min(), high = 1LL << 40 };

struct Trivial {
  int a;
  double b;
  char c[5];
  Color color;
  friend bool operator==(const Trivial& x, const Trivial& y) {
    return x.a == y.a && x.b == y.b && std::memcmp(x.c, y.c, sizeof x.c) == 0 && x.color == y.color;
  }
};
static_assert(std::is_trivially_copyable_v<Trivial>);

// A cereal type with a serialize member, names through make_nvp, and std members.
struct Person {
  std::string name;
  int age = 0;
  std::vector<std::string> tags;
  std::map<std::string, std::vector<double>> scores;
  std::optional<int> lucky;
  std::variant<int, std::string> id;
  std::set<int> seen;

  template <class Archive>
  void serialize(Archive& ar) {
    ar(cereal::make_nvp("name", name), cereal::make_nvp("age", age), cereal::make_nvp("tags", tags), CEREAL_NVP(scores),
       CEREAL_NVP(lucky), CEREAL_NVP(id), CEREAL_NVP(seen));
  }
  friend bool operator==(const Person&, const Person&) = default;
};

// A cereal type with save/load split: stored as a different representation than in memory.
class Celsius {
 public:
  Celsius() = default;
  explicit Celsius(double degrees) : degrees_(degrees) {}
  [[nodiscard]] double degrees() const { return degrees_; }

  template <class Archive>
  void save(Archive& ar) const {
    const std::int64_t milli = static_cast<std::int64_t>(degrees_ * 1000.0);
    ar(milli);
  }
  template <class Archive>
  void load(Archive& ar) {
    std::int64_t milli = 0;
    ar(milli);
    degrees_ = static_cast<double>(milli) / 1000.0;
    loaded_ = true;
  }
  [[nodiscard]] bool loaded() const { return loaded_; }
  friend bool operator==(const Celsius& a, const Celsius& b) { return a.degrees_ == b.degrees_; }

 private:
  double degrees_ = 0;
  bool loaded_ = false;
};

// Trivially copyable, but with a serialize member: cereal must win over the bitwise copy.
struct HalfSent {
  std::int32_t sent = 0;
  std::int32_t not_sent = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(sent);
  }
};
static_assert(std::is_trivially_copyable_v<HalfSent>);

// A cereal type holding a bool and a nested cereal type, to reach cereal's paths in corrupt input.
struct Team {
  std::string title;
  bool active = false;
  std::vector<Person> members;
  Celsius temperature;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(title, active, members, temperature);
  }
  friend bool operator==(const Team&, const Team&) = default;
};

struct NotSerializable {
  std::string s;  // not trivially copyable, no serialize
};

Person sample_person(int i) {
  Person p;
  p.name = "person-" + std::to_string(i);
  p.age = 30 + i;
  p.tags = {"a", "", std::string("nul\0inside", 10)};
  p.scores = {{"math", {1.5, 2.5}}, {"empty", {}}};
  p.lucky = i % 2 ? std::optional<int>(7 * i) : std::nullopt;
  p.id = i % 2 ? std::variant<int, std::string>(i) : std::variant<int, std::string>("id-" + std::to_string(i));
  p.seen = {i, i + 1, -i};
  return p;
}

using Nested = std::map<std::string, std::vector<std::optional<std::variant<int, std::string>>>>;

Nested sample_nested() {
  Nested n;
  n["alpha"] = {1, std::nullopt, std::string("x"), 42};
  n["beta"] = {};
  n[""] = {std::string(), std::nullopt};
  n["gamma"] = {std::string(300, 'g'), -5};
  return n;
}

// A bigger nested value for the corrupt-input tests: std containers, cereal types, bools, floats.
using Corruptible = std::tuple<Nested, std::vector<bool>, std::list<std::string>, std::set<int>,
                               std::unordered_map<int, double>, std::optional<Team>, std::pair<Color, std::string>,
                               std::deque<std::array<std::int16_t, 3>>, std::variant<std::monostate, double, Celsius>>;

Corruptible sample_corruptible() {
  Team team;
  team.title = "team";
  team.active = true;
  team.members = {sample_person(1), sample_person(2)};
  team.temperature = Celsius(21.5);
  return {sample_nested(),        {true, false, true},
          {"one", "", "three"},   {3, 1, 2},
          {{1, 1.5}, {2, -0.25}}, team,
          {Color::blue, "blue"},  {{{1, 2, 3}}, {{-1, -2, -3}}},
          Celsius(-3.25)};
}

// ---- arithmetic and enums ---------------------------------------------------------------------

template <class T>
void expect_limits_round_trip() {
  expect_round_trip<T>(T{});
  expect_round_trip<T>(std::numeric_limits<T>::min());
  expect_round_trip<T>(std::numeric_limits<T>::max());
  expect_round_trip<T>(std::numeric_limits<T>::lowest());
  EXPECT_EQ(to_bytes(T{}).size(), sizeof(T));
}

TEST(CodecTest, BoolRoundTripsAsOneByte) {
  expect_round_trip(true);
  expect_round_trip(false);
  EXPECT_EQ(to_bytes(true), Bytes{std::byte{1}});
  EXPECT_EQ(to_bytes(false), Bytes{std::byte{0}});
}

TEST(CodecTest, IntegerTypesRoundTripAtTheirLimits) {
  expect_limits_round_trip<char>();
  expect_limits_round_trip<signed char>();
  expect_limits_round_trip<unsigned char>();
  expect_limits_round_trip<char8_t>();
  expect_limits_round_trip<char16_t>();
  expect_limits_round_trip<char32_t>();
  expect_limits_round_trip<wchar_t>();
  expect_limits_round_trip<short>();
  expect_limits_round_trip<unsigned short>();
  expect_limits_round_trip<int>();
  expect_limits_round_trip<unsigned>();
  expect_limits_round_trip<long>();
  expect_limits_round_trip<unsigned long>();
  expect_limits_round_trip<long long>();
  expect_limits_round_trip<unsigned long long>();
  expect_limits_round_trip<std::int8_t>();
  expect_limits_round_trip<std::uint8_t>();
  expect_limits_round_trip<std::int16_t>();
  expect_limits_round_trip<std::uint16_t>();
  expect_limits_round_trip<std::int32_t>();
  expect_limits_round_trip<std::uint32_t>();
  expect_limits_round_trip<std::int64_t>();
  expect_limits_round_trip<std::uint64_t>();
  expect_round_trip<std::int64_t>(-1234567890123LL);
}

TEST(CodecTest, FloatingTypesRoundTripIncludingSpecialValues) {
  expect_limits_round_trip<float>();
  expect_limits_round_trip<double>();
  expect_limits_round_trip<long double>();
  expect_round_trip(3.25f);
  expect_round_trip(-0.1);
  expect_round_trip(1.0L / 3.0L);
  expect_round_trip(std::numeric_limits<double>::infinity());
  expect_round_trip(-std::numeric_limits<float>::infinity());
  expect_round_trip(std::numeric_limits<double>::denorm_min());
  // -0.0 == 0.0, so check the sign survives too.
  EXPECT_TRUE(std::signbit(round_trip(-0.0)));
  EXPECT_TRUE(std::isnan(round_trip(std::numeric_limits<double>::quiet_NaN())));
  EXPECT_TRUE(std::isnan(round_trip(std::numeric_limits<long double>::quiet_NaN())));
}

TEST(CodecTest, EnumsRoundTrip) {
  expect_round_trip(Color::red);
  expect_round_trip(Color::blue);
  expect_round_trip(plain_c);
  expect_round_trip(Wide::low);
  expect_round_trip(Wide::high);
  EXPECT_EQ(to_bytes(Color::green).size(), 1u);
  EXPECT_EQ(to_bytes(Wide::high).size(), 8u);
}

TEST(CodecTest, TriviallyCopyableStructRoundTripsAsItsBytes) {
  Trivial t{-7, 2.5, {'a', '\0', 'b', 'c', 'd'}, Color::green};
  expect_round_trip(t);
  EXPECT_EQ(to_bytes(t).size(), sizeof(Trivial));
  expect_round_trip(std::array<Trivial, 2>{t, Trivial{1, 0.0, {}, Color::red}});
}

// ---- strings ----------------------------------------------------------------------------------

TEST(CodecTest, EmptyStringRoundTrips) {
  expect_round_trip(std::string());
  EXPECT_EQ(to_bytes(std::string()).size(), 8u);  // the length alone
}

TEST(CodecTest, StringWithEmbeddedNulsRoundTrips) {
  const std::string s("a\0b\0\0c", 6);
  EXPECT_EQ(round_trip(s).size(), 6u);
  expect_round_trip(s);
  expect_round_trip(std::string(1, '\0'));
}

TEST(CodecTest, LargeStringRoundTrips) {
  std::string s(1 << 20, '\0');
  for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>(i * 131 + 7);
  expect_round_trip(s);
  EXPECT_EQ(to_bytes(s).size(), 8u + (1u << 20));
}

TEST(CodecTest, WideStringsRoundTrip) {
  expect_round_trip(std::u32string(U"h\u00e9llo \U0001F600"));
  expect_round_trip(std::wstring(L"wide"));
  expect_round_trip(std::u16string());
}

// ---- sequences --------------------------------------------------------------------------------

TEST(CodecTest, VectorOfIntsRoundTrips) {
  std::vector<int> v(1000);
  for (int i = 0; i < 1000; ++i) v[static_cast<std::size_t>(i)] = i * i - 500;
  expect_round_trip(v);
  EXPECT_EQ(to_bytes(v).size(), 8u + 1000 * sizeof(int));
}

TEST(CodecTest, EmptyVectorsRoundTrip) {
  expect_round_trip(std::vector<int>{});
  expect_round_trip(std::vector<std::string>{});
  expect_round_trip(std::vector<bool>{});
  expect_round_trip(std::vector<Person>{});
  EXPECT_EQ(to_bytes(std::vector<int>{}).size(), 8u);
}

TEST(CodecTest, VectorOfBoolRoundTrips) {
  std::vector<bool> v;
  for (int i = 0; i < 77; ++i) v.push_back(i % 3 == 0);
  expect_round_trip(v);
  expect_round_trip(std::vector<bool>{false});
}

TEST(CodecTest, VectorOfStringsRoundTrips) {
  expect_round_trip(std::vector<std::string>{"", "a", std::string(1000, 'z'), std::string("\0\0", 2)});
}

TEST(CodecTest, VectorOfTrivialStructsRoundTrips) {
  std::vector<Trivial> v;
  for (int i = 0; i < 50; ++i) v.push_back(Trivial{i, i / 3.0, {'x', 'y', 'z', 0, 0}, Color::blue});
  expect_round_trip(v);
  EXPECT_EQ(to_bytes(v).size(), 8u + 50 * sizeof(Trivial));
}

TEST(CodecTest, VectorOfStructsWithSerializeRoundTrips) {
  expect_round_trip(std::vector<Person>{sample_person(1), sample_person(2), Person{}});
}

TEST(CodecTest, ArraysRoundTrip) {
  expect_round_trip(std::array<int, 4>{1, -2, 3, -4});
  expect_round_trip(std::array<bool, 3>{true, false, true});
  expect_round_trip(std::array<std::string, 3>{"a", "", "ccc"});
  expect_round_trip(std::array<std::vector<int>, 2>{std::vector<int>{1}, std::vector<int>{}});
  EXPECT_EQ(to_bytes(std::array<std::int32_t, 4>{}).size(), 16u);  // no length prefix
}

TEST(CodecTest, ZeroLengthArrayRoundTrips) {
  expect_round_trip(std::array<int, 0>{});
  EXPECT_TRUE(to_bytes(std::array<int, 0>{}).empty());
}

TEST(CodecTest, DequeAndListRoundTrip) {
  expect_round_trip(std::deque<int>{5, 4, 3});
  expect_round_trip(std::deque<std::string>{"x", ""});
  expect_round_trip(std::deque<int>{});
  expect_round_trip(std::list<std::string>{"a", "b", ""});
  expect_round_trip(std::list<double>{});
  expect_round_trip(std::list<std::vector<int>>{{1, 2}, {}, {3}});
}

// ---- associative containers ---------------------------------------------------------------------

TEST(CodecTest, MapRoundTrips) {
  expect_round_trip(std::map<std::string, int>{{"a", 1}, {"b", 2}, {"", 0}});
  expect_round_trip(std::map<int, std::string>{});
  expect_round_trip(std::map<int, std::vector<std::string>>{{1, {"x"}}, {2, {}}});
}

TEST(CodecTest, MultimapKeepsDuplicateKeys) {
  const std::multimap<int, std::string> m{{1, "a"}, {1, "b"}, {2, "c"}, {1, "a"}};
  const auto back = round_trip(m);
  EXPECT_EQ(back, m);
  EXPECT_EQ(back.count(1), 3u);
}

TEST(CodecTest, UnorderedMapRoundTrips) {
  std::unordered_map<std::string, std::vector<int>> m;
  for (int i = 0; i < 100; ++i) m["k" + std::to_string(i)] = std::vector<int>(static_cast<std::size_t>(i % 5), i);
  expect_round_trip(m);
  expect_round_trip(std::unordered_map<int, int>{});
}

TEST(CodecTest, SetsRoundTrip) {
  expect_round_trip(std::set<std::string>{"b", "a", ""});
  expect_round_trip(std::set<int>{});
  const std::multiset<int> ms{1, 1, 2, 3, 3, 3};
  const auto back = round_trip(ms);
  EXPECT_EQ(back, ms);
  EXPECT_EQ(back.count(3), 3u);
  std::unordered_set<long> us;
  for (long i = -50; i < 50; ++i) us.insert(i * 7919);
  expect_round_trip(us);
}

// ---- optional, variant, tuple, pair -------------------------------------------------------------

TEST(CodecTest, OptionalRoundTripsEmptyAndFull) {
  expect_round_trip(std::optional<int>{});
  expect_round_trip(std::optional<int>{0});
  expect_round_trip(std::optional<std::string>{"full"});
  expect_round_trip(std::optional<std::string>{});
  expect_round_trip(std::optional<std::optional<int>>{std::optional<int>{}});
  EXPECT_EQ(to_bytes(std::optional<int>{}).size(), 1u);
  EXPECT_EQ(to_bytes(std::optional<int>{9}).size(), 5u);
}

TEST(CodecTest, VariantRoundTripsEveryAlternative) {
  using V = std::variant<std::monostate, int, std::string, std::vector<double>, bool>;
  const std::vector<V> values{V{}, V{42}, V{std::string("s")}, V{std::vector<double>{1.5}}, V{true}, V{false}};
  for (const V& v : values) {
    const V back = round_trip(v);
    EXPECT_EQ(back.index(), v.index());
    EXPECT_EQ(back, v);
  }
  // Repeated alternative types are told apart by index, not type.
  using Twice = std::variant<int, int>;
  const Twice second(std::in_place_index<1>, 5);
  EXPECT_EQ(round_trip(second).index(), 1u);
  EXPECT_EQ(std::get<1>(round_trip(second)), 5);
}

TEST(CodecTest, MonostateRoundTripsAsNothing) {
  expect_round_trip(std::monostate{});
  EXPECT_TRUE(to_bytes(std::monostate{}).empty());
}

// A sequence of values whose encoding is empty: the length field must still be honoured.
TEST(CodecTest, VectorOfMonostateRoundTrips) {
  expect_round_trip(std::vector<std::monostate>(3));
  expect_round_trip(std::list<std::tuple<>>(2));
}

TEST(CodecTest, TupleAndPairRoundTrip) {
  expect_round_trip(std::tuple<>{});
  expect_round_trip(std::tuple<int, std::string, bool, double>{1, "two", true, 4.0});
  expect_round_trip(std::pair<std::string, std::vector<int>>{"p", {1, 2}});
  expect_round_trip(std::tuple<std::pair<int, int>, std::tuple<char>>{{1, 2}, {'c'}});
}

TEST(CodecTest, NestedContainersRoundTrip) {
  expect_round_trip(sample_nested());
  using Deep = std::vector<std::map<int, std::set<std::tuple<std::string, std::optional<long>>>>>;
  Deep d{{{1, {{"a", 1L}, {"b", std::nullopt}}}}, {}, {{2, {}}}};
  expect_round_trip(d);
  expect_round_trip(std::deque<std::list<std::unordered_map<std::string, std::pair<bool, std::array<char, 2>>>>>{
      {{{"k", {true, {'x', 'y'}}}}, {}}, {}});
}

// ---- cereal user types --------------------------------------------------------------------------

TEST(CodecTest, CerealSerializeMemberRoundTrips) {
  expect_round_trip(sample_person(1));
  expect_round_trip(sample_person(2));
  expect_round_trip(Person{});
}

TEST(CodecTest, CerealSaveLoadSplitRoundTrips) {
  const Celsius back = round_trip(Celsius(36.625));
  EXPECT_TRUE(back.loaded());
  EXPECT_EQ(back.degrees(), 36.625);
  EXPECT_EQ(to_bytes(Celsius(1.0)).size(), sizeof(std::int64_t));  // the saved form, not the object
}

TEST(CodecTest, CerealSerializeWinsOverBitwiseCopy) {
  const HalfSent h{11, 22};
  EXPECT_EQ(to_bytes(h).size(), sizeof(std::int32_t));
  const HalfSent back = round_trip(h);
  EXPECT_EQ(back.sent, 11);
  EXPECT_EQ(back.not_sent, 0);
}

TEST(CodecTest, CerealTypesInsideStdContainersRoundTrip) {
  expect_round_trip(std::map<std::string, Person>{{"one", sample_person(1)}, {"two", sample_person(2)}});
  expect_round_trip(std::optional<Celsius>{Celsius(-40.0)});
  expect_round_trip(std::variant<int, Person>{sample_person(3)});
  expect_round_trip(std::tuple<Celsius, Person, int>{Celsius(1.5), sample_person(4), 9});
  expect_round_trip(std::list<std::vector<Celsius>>{{Celsius(1.0), Celsius(2.0)}, {}});
}

TEST(CodecTest, StdContainersInsideCerealTypesRoundTrip) {
  Team t;
  t.title = "nested";
  t.active = true;
  t.members = {sample_person(5), Person{}, sample_person(6)};
  t.temperature = Celsius(-0.5);
  expect_round_trip(t);
  expect_round_trip(std::vector<Team>{t, Team{}});
}

// ---- the Encodable concept ----------------------------------------------------------------------

TEST(CodecTest, EncodableIsTrueForSupportedTypes) {
  EXPECT_TRUE(multiproc::Encodable<int>);
  EXPECT_TRUE(multiproc::Encodable<bool>);
  EXPECT_TRUE(multiproc::Encodable<Color>);
  EXPECT_TRUE(multiproc::Encodable<Trivial>);
  EXPECT_TRUE(multiproc::Encodable<std::string>);
  EXPECT_TRUE(multiproc::Encodable<Nested>);
  EXPECT_TRUE(multiproc::Encodable<Person>);
  EXPECT_TRUE(multiproc::Encodable<Celsius>);
  EXPECT_TRUE((multiproc::Encodable<std::tuple<int, Person, std::vector<bool>>>));
}

// Later layers check Encodable<Args>... on forwarded argument types; cv and reference qualifiers
// must not change the answer (the concept already looks up Codec<remove_cvref_t<T>>).
TEST(CodecTest, EncodableIgnoresCvRefQualifiers) {
  EXPECT_TRUE(multiproc::Encodable<const std::string>);
  EXPECT_TRUE(multiproc::Encodable<std::string&>);
  EXPECT_TRUE(multiproc::Encodable<const std::string&>);
  EXPECT_TRUE(multiproc::Encodable<std::vector<int>&&>);
  EXPECT_TRUE(multiproc::Encodable<const Person&>);
}

// Encodable is how later layers (Pool, Queue) reject a type at compile time with a clear message;
// it must be false for what encode() would refuse with a static_assert.
TEST(CodecTest, EncodableIsFalseForUnsupportedTypes) {
  EXPECT_FALSE(multiproc::Encodable<int*>);
  EXPECT_FALSE(multiproc::Encodable<const char*>);
  EXPECT_FALSE(multiproc::Encodable<NotSerializable>);
  EXPECT_FALSE(multiproc::Encodable<int Trivial::*>);
}

TEST(CodecTest, EncodableIsFalseForContainersOfUnsupportedTypes) {
  EXPECT_FALSE(multiproc::Encodable<std::vector<int*>>);
  EXPECT_FALSE((multiproc::Encodable<std::map<std::string, NotSerializable>>));
  EXPECT_FALSE(multiproc::Encodable<std::optional<NotSerializable>>);
}

// ---- Writer / Reader ------------------------------------------------------------------------------

TEST(CodecTest, EncodeAllThenDecodeInOrder) {
  multiproc::Writer w;
  multiproc::encode_all(w, 1, std::string("two"), std::vector<int>{3}, sample_person(4));
  multiproc::Reader r(w.bytes());
  EXPECT_EQ(multiproc::decode<int>(r), 1);
  EXPECT_EQ(multiproc::decode<std::string>(r), "two");
  EXPECT_EQ(multiproc::decode<std::vector<int>>(r), std::vector<int>{3});
  EXPECT_EQ(multiproc::decode<Person>(r), sample_person(4));
  EXPECT_EQ(r.remaining(), 0u);
  EXPECT_THROW(multiproc::decode<int>(r), SerializationError);
}

TEST(CodecTest, WriterGrowsAndTruncates) {
  multiproc::Writer w;
  for (int i = 0; i < 10000; ++i) w.write_value(i);
  ASSERT_EQ(w.size(), 10000 * sizeof(int));
  int last = 0;
  std::memcpy(&last, w.data() + w.size() - sizeof(int), sizeof(int));
  EXPECT_EQ(last, 9999);
  w.truncate(8);
  EXPECT_EQ(w.size(), 8u);
  w.truncate(100);  // never grows
  EXPECT_EQ(w.size(), 8u);
  w.clear();
  EXPECT_EQ(w.size(), 0u);
}

// From 4 MiB on, a Writer's buffer and a decoded vector of plain values are put on huge pages
// before they are filled (another allocation path): contents survive growth and moves, and
// decoding into a vector that already holds something replaces it.
TEST(CodecTest, BulkBuffersKeepTheirContents) {
  multiproc::Writer w;
  constexpr int kInts = 3 << 20;  // 12 MiB, written in pieces across several reallocations
  for (int i = 0; i < kInts; ++i) w.write_value(i * 7);
  ASSERT_EQ(w.size(), kInts * sizeof(int));
  multiproc::Writer moved(std::move(w));
  for (int i : {0, 1, kInts / 2, kInts - 1}) {
    int v = 0;
    std::memcpy(&v, moved.data() + static_cast<std::size_t>(i) * sizeof(int), sizeof v);
    EXPECT_EQ(v, i * 7) << i;
  }
  w.write_value(5);  // the moved-from Writer starts over
  EXPECT_EQ(w.size(), sizeof(int));

  std::vector<char> bytes(9 << 20);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 131 + 7);
  expect_round_trip(bytes);
  std::vector<double> reals(1 << 20);
  for (std::size_t i = 0; i < reals.size(); ++i) reals[i] = static_cast<double>(i) / 3;
  const Bytes encoded = to_bytes(reals);
  std::vector<double> into{1.0, 2.0};
  multiproc::Reader r(encoded);
  multiproc::decode(r, into);
  EXPECT_EQ(into, reals);
}

TEST(CodecTest, DecodeIntoExistingContainersReplacesTheirContents) {
  const Bytes bytes = to_bytes(std::map<int, int>{{1, 1}});
  std::map<int, int> m{{5, 5}, {6, 6}};
  multiproc::Reader r(bytes);
  multiproc::decode(r, m);
  EXPECT_EQ(m, (std::map<int, int>{{1, 1}}));
  std::vector<std::string> v{"old", "old"};
  const Bytes vb = to_bytes(std::vector<std::string>{"new"});
  multiproc::Reader vr(vb);
  multiproc::decode(vr, v);
  EXPECT_EQ(v, std::vector<std::string>{"new"});
}

// ---- corrupt input ------------------------------------------------------------------------------

template <class T>
void expect_every_strict_prefix_throws(const T& value) {
  const Bytes bytes = to_bytes(value);
  ASSERT_GT(bytes.size(), 0u);
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    // A fresh allocation of exactly n bytes, so ASan sees any read past the prefix.
    std::unique_ptr<std::byte[]> prefix(new std::byte[n == 0 ? 1 : n]);
    if (n) std::memcpy(prefix.get(), bytes.data(), n);
    EXPECT_THROW((void)from_bytes<T>(std::span<const std::byte>(prefix.get(), n)), SerializationError)
        << "prefix of " << n << " of " << bytes.size() << " bytes";
  }
  EXPECT_EQ(from_bytes<T>(bytes), value);
}

TEST(CodecTest, EveryTruncationOfANestedValueThrowsSerializationError) {
  expect_every_strict_prefix_throws(sample_nested());
}

TEST(CodecTest, EveryTruncationOfCerealTypesThrowsSerializationError) {
  Team t;
  t.title = "t";
  t.active = true;
  t.members = {sample_person(1)};
  t.temperature = Celsius(2.0);
  expect_every_strict_prefix_throws(t);
  expect_every_strict_prefix_throws(std::vector<Person>{sample_person(7), sample_person(8)});
}

TEST(CodecTest, EveryTruncationOfAMixedValueThrowsSerializationError) {
  expect_every_strict_prefix_throws(sample_corruptible());
}

TEST(CodecTest, TrailingBytesThrow) {
  Bytes bytes = to_bytes(sample_nested());
  bytes.push_back(std::byte{0});
  EXPECT_THROW((void)from_bytes<Nested>(bytes), SerializationError);
  Bytes one = to_bytes(7);
  one.push_back(std::byte{7});
  EXPECT_THROW((void)from_bytes<int>(one), SerializationError);
  Bytes cer = to_bytes(sample_person(1));
  cer.push_back(std::byte{0});
  EXPECT_THROW((void)from_bytes<Person>(cer), SerializationError);
}

TEST(CodecTest, EmptyInputThrows) {
  EXPECT_THROW((void)from_bytes<int>({}), SerializationError);
  EXPECT_THROW((void)from_bytes<std::string>({}), SerializationError);
  EXPECT_THROW((void)from_bytes<Person>({}), SerializationError);
  EXPECT_NO_THROW((void)from_bytes<std::monostate>({}));
}

TEST(CodecTest, BoolByteOfTwoThrows) {
  EXPECT_THROW((void)from_bytes<bool>(Bytes{std::byte{2}}), SerializationError);
  EXPECT_THROW((void)from_bytes<bool>(Bytes{std::byte{0xFF}}), SerializationError);
  // Inside an optional's flag, a vector<bool>, and a cereal type's bool member.
  EXPECT_THROW((void)from_bytes<std::optional<int>>(Bytes{std::byte{2}, {}, {}, {}, {}}), SerializationError);
  Bytes vb = to_bytes(std::vector<bool>{true, false});
  vb.back() = std::byte{2};
  EXPECT_THROW((void)from_bytes<std::vector<bool>>(vb), SerializationError);
  Team t;
  t.title = "";
  t.active = true;
  Bytes tb = to_bytes(t);
  ASSERT_EQ(tb[8], std::byte{1});  // the title's length, then `active`
  tb[8] = std::byte{2};
  EXPECT_THROW((void)from_bytes<Team>(tb), SerializationError);
}

TEST(CodecTest, VariantIndexOutOfRangeThrows) {
  using V = std::variant<int, std::string>;
  Bytes bytes = to_bytes(V{5});
  for (std::uint32_t bad : {2u, 3u, 0xFFFFFFFFu, 0x80000000u}) {
    std::memcpy(bytes.data(), &bad, sizeof bad);
    EXPECT_THROW((void)from_bytes<V>(bytes), SerializationError) << bad;
  }
}

TEST(CodecTest, VariantIndexOutOfRangeInsideCerealTypeThrows) {
  Person p = sample_person(2);  // id holds the string alternative
  const Bytes bytes = to_bytes(p);
  // cereal writes the variant as an int32 index, then the alternative: here "id-2" with its
  // 8-byte length. Find the string's bytes and step back over both.
  const std::string needle = "id-2";
  auto it = std::search(bytes.begin(), bytes.end(), reinterpret_cast<const std::byte*>(needle.data()),
                        reinterpret_cast<const std::byte*>(needle.data()) + needle.size());
  ASSERT_NE(it, bytes.end());
  const std::size_t index_at = static_cast<std::size_t>(it - bytes.begin()) - 8 - 4;
  std::int32_t index = 0;
  std::memcpy(&index, bytes.data() + index_at, 4);
  ASSERT_EQ(index, 1);
  for (std::int32_t bad : {2, 100, -1, std::numeric_limits<std::int32_t>::min()}) {
    Bytes corrupt = bytes;
    std::memcpy(corrupt.data() + index_at, &bad, 4);
    EXPECT_THROW((void)from_bytes<Person>(corrupt), SerializationError) << bad;
  }
}

template <class T>
void expect_huge_length_throws_without_allocating(const T& value, std::size_t length_offset) {
  for (std::uint64_t huge :
       {std::uint64_t{1} << 63, std::uint64_t{0xFFFFFFFF}, ~std::uint64_t{0}, std::uint64_t{1} << 40}) {
    Bytes bytes = to_bytes(value);
    ASSERT_GE(bytes.size(), length_offset + 8);
    std::memcpy(bytes.data() + length_offset, &huge, sizeof huge);
    g_largest_allocation = 0;
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THROW((void)from_bytes<T>(bytes), SerializationError) << huge;
    const auto took = std::chrono::steady_clock::now() - start;
    // It gives up at once: no time spent on what the length claims (a bound against running on,
    // not a measure of speed).
    EXPECT_LT(took, test_support::generous(std::chrono::milliseconds(100))) << huge;
    // The error message is the biggest thing the decoder may allocate.
    if (!CODECTEST_TSAN) {
      EXPECT_LT(g_largest_allocation.load(), 4096u) << huge;
    }
  }
}

// Found by fuzz_codec (fuzz/regressions/codec/oom-nested-empty-elements): 200 inner vectors of
// 2^24 elements that encode to nothing each, from 1.6 KB. The budget for such elements is shared
// by the whole decode, so nesting cannot multiply it.
TEST(CodecTest, NestedEmptyElementsCannotMultiplyTheirBudget) {
  multiproc::Writer w;
  w.write_value(std::uint64_t{200});
  for (int i = 0; i < 200; ++i) w.write_value(std::uint64_t{1} << 24);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROW((void)from_bytes<std::vector<std::vector<std::monostate>>>(w.bytes()), SerializationError);
  EXPECT_LT(std::chrono::steady_clock::now() - start, test_support::generous(std::chrono::milliseconds(200)));
  // Large elements that encode to nothing are charged at their size.
  multiproc::Writer big;
  big.write_value(std::uint64_t{1} << 24);
  using Wide = std::vector<std::array<std::monostate, 256>>;
  EXPECT_THROW((void)from_bytes<Wide>(big.bytes()), SerializationError);
  // Reasonable counts still decode.
  expect_round_trip(std::vector<std::vector<std::monostate>>(10, std::vector<std::monostate>(1000)));
}

TEST(CodecTest, HugeLengthFieldThrowsWithoutAllocating) {
  expect_huge_length_throws_without_allocating(std::string("abc"), 0);
  expect_huge_length_throws_without_allocating(std::vector<int>{1, 2, 3}, 0);
  expect_huge_length_throws_without_allocating(std::vector<std::string>{"a", "b"}, 0);
  expect_huge_length_throws_without_allocating(std::vector<bool>{true}, 0);
  expect_huge_length_throws_without_allocating(std::vector<std::optional<int>>{1}, 0);
  expect_huge_length_throws_without_allocating(std::deque<int>{1}, 0);
  expect_huge_length_throws_without_allocating(std::list<std::string>{"x"}, 0);
  expect_huge_length_throws_without_allocating(std::map<int, std::string>{{1, "a"}}, 0);
  expect_huge_length_throws_without_allocating(std::unordered_map<int, int>{{1, 1}}, 0);
  expect_huge_length_throws_without_allocating(std::set<std::string>{"q"}, 0);
  expect_huge_length_throws_without_allocating(std::unordered_set<int>{1}, 0);
  expect_huge_length_throws_without_allocating(std::vector<Person>{Person{}}, 0);
  // Nested: the inner vector's length, after "alpha"'s 8 + 5 bytes and the outer count.
  Nested n;
  n["alpha"] = {1, 2};
  expect_huge_length_throws_without_allocating(n, 8 + 8 + 5);
  // Inside cereal types: Person's name is its first field.
  expect_huge_length_throws_without_allocating(sample_person(1), 0);
  Person p;
  p.name = "";
  p.tags = {"t"};
  expect_huge_length_throws_without_allocating(p, 8 + 4);  // name's length, age, then the tag count
}

// A value for the fuzz loop: every decode either succeeds or throws SerializationError; anything
// else (another exception, a crash, an ASan report) fails.
TEST(CodecTest, RandomMutationsDecodeOrThrowSerializationError) {
  const Bytes original = to_bytes(sample_corruptible());
  std::mt19937_64 rng(20240611);
  int decoded = 0;
  int rejected = 0;
  for (int round = 0; round < 10000; ++round) {
    Bytes bytes = original;
    const int kind = static_cast<int>(rng() % 8);
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      const std::size_t at = rng() % bytes.size();
      switch (kind) {
        case 0:  // one random byte
          bytes[at] = static_cast<std::byte>(rng());
          break;
        case 1:  // one bit
          bytes[at] ^= static_cast<std::byte>(1u << (rng() % 8));
          break;
        case 2: {  // a length-like field: 8 random bytes, or a small number
          const std::uint64_t v = rng() % 2 ? rng() : rng() % 64;
          if (at + 8 <= bytes.size()) std::memcpy(bytes.data() + at, &v, 8);
          break;
        }
        case 3:  // 0xFF runs
          for (std::size_t i = at; i < std::min(bytes.size(), at + 8); ++i) bytes[i] = std::byte{0xFF};
          break;
        case 4:  // delete a byte
          if (bytes.size() > 1) bytes.erase(bytes.begin() + static_cast<std::ptrdiff_t>(at));
          break;
        case 5:  // insert a byte
          bytes.insert(bytes.begin() + static_cast<std::ptrdiff_t>(at), static_cast<std::byte>(rng()));
          break;
        case 6:  // truncate somewhere
          bytes.resize(at);
          break;
        default:  // small integer overwrite (indices, bools, counts)
          bytes[at] = static_cast<std::byte>(rng() % 4);
          break;
      }
      if (bytes.empty()) break;
    }
    // Exactly sized heap copy so ASan catches any read past the end.
    std::unique_ptr<std::byte[]> copy(new std::byte[bytes.size() + 1]);
    std::memcpy(copy.get(), bytes.data(), bytes.size());
    try {
      (void)from_bytes<Corruptible>(std::span<const std::byte>(copy.get(), bytes.size()));
      ++decoded;
    } catch (const SerializationError&) {
      ++rejected;
    }
  }
  EXPECT_EQ(decoded + rejected, 10000);
  EXPECT_GT(rejected, 0);
}

// ---- streamed input -----------------------------------------------------------------------------
// A Reader can take its input piece by piece from a Reader::Source. The test source below copies
// each piece into a fresh allocation of exactly its size and, when the next piece is asked for,
// overwrites the previous one with 0xAA and frees it: a decoder that keeps a pointer into an earlier
// piece reads garbage (under ASan: a freed block), one that reads past a piece reads past an
// allocation, and one that asks for more than there is gets a ProtocolError, never a hang.

using multiproc::ProtocolError;

// How a PieceSource cuts its input: `sizes` over and over, or, when `seed` is not 0, sizes drawn
// uniformly from [1, max_random] by a generator seeded with it. A size of 0 serves an empty piece.
struct PiecePlan {
  std::string name;
  std::vector<std::size_t> sizes;
  std::uint64_t seed = 0;
  std::size_t max_random = 0;
};

PiecePlan fixed_pieces(std::size_t k) { return {"pieces of " + std::to_string(k) + " bytes", {k}}; }
PiecePlan listed_pieces(std::vector<std::size_t> sizes) {
  std::string name = "pieces of";
  for (std::size_t s : sizes) name += " " + std::to_string(s);
  return {name, std::move(sizes)};
}
PiecePlan random_pieces(std::uint64_t seed, std::size_t max) {
  return {"random pieces of 1.." + std::to_string(max) + " bytes, seed " + std::to_string(seed), {}, seed, max};
}

class PieceSource final : public multiproc::Reader::Source {
 public:
  PieceSource(std::span<const std::byte> input, PiecePlan plan)
      : input_(input), plan_(std::move(plan)), rng_(plan_.seed) {}
  PieceSource(const PieceSource&) = delete;
  PieceSource& operator=(const PieceSource&) = delete;
  ~PieceSource() { discard_piece(); }

  std::span<const std::byte> next() override {
    // A Reader must reject an empty piece; one that asks again instead could loop forever here.
    if (!sizes_.empty() && sizes_.back() == 0)
      throw std::logic_error("test source: the reader accepted an empty piece");
    discard_piece();
    if (served_ == input_.size()) {
      throw ProtocolError("test source: asked for a piece after all " + std::to_string(input_.size()) +
                          " bytes were served");
    }
    const std::size_t k = std::min(next_size(), input_.size() - served_);
    piece_.reset(new std::byte[k == 0 ? 1 : k]);  // exactly k bytes: ASan sees a read past it
    if (k) std::memcpy(piece_.get(), input_.data() + served_, k);
    piece_size_ = k;
    served_ += k;
    sizes_.push_back(k);
    return {piece_.get(), k};
  }

  /// The piece handed out last (empty once the source is done with it).
  [[nodiscard]] std::span<const std::byte> piece() const { return {piece_.get(), piece_size_}; }
  [[nodiscard]] std::size_t served() const { return served_; }
  [[nodiscard]] const std::vector<std::size_t>& sizes() const { return sizes_; }

 private:
  std::size_t next_size() {
    if (plan_.seed != 0) return std::uniform_int_distribution<std::size_t>(1, plan_.max_random)(rng_);
    return plan_.sizes[sizes_.size() % plan_.sizes.size()];
  }
  void discard_piece() {
    if (!piece_) return;
    std::memset(piece_.get(), 0xAA, piece_size_);
    piece_.reset();
    piece_size_ = 0;
  }

  std::span<const std::byte> input_;
  PiecePlan plan_;
  std::mt19937_64 rng_;
  std::unique_ptr<std::byte[]> piece_;
  std::size_t piece_size_ = 0;
  std::size_t served_ = 0;
  std::vector<std::size_t> sizes_;
};

// Every plan, for values of up to a few KiB.
std::vector<PiecePlan> all_plans() {
  return {fixed_pieces(1),      fixed_pieces(2),       fixed_pieces(3),         fixed_pieces(7),
          fixed_pieces(64),     fixed_pieces(4096),    fixed_pieces(256 << 10), listed_pieces({1, 8, 3, 4096, 5, 2}),
          random_pieces(1, 13), random_pieces(2, 300), random_pieces(3, 70000)};
}
// The plans for values of megabytes: no tiny pieces (millions of them would be slow, not better).
std::vector<PiecePlan> big_plans() {
  return {fixed_pieces(64),
          fixed_pieces(4093),
          fixed_pieces(4096),
          fixed_pieces(256 << 10),
          listed_pieces({1, 7, 65536, 3, 200000}),
          random_pieces(4, 70000),
          random_pieces(5, 1 << 20)};
}

template <class T>
void expect_streamed_round_trip(const T& value, const std::vector<PiecePlan>& plans) {
  const Bytes bytes = to_bytes(value);
  for (const PiecePlan& plan : plans) {
    SCOPED_TRACE(plan.name + ", " + std::to_string(bytes.size()) + " encoded bytes");
    PieceSource source(bytes, plan);
    multiproc::Reader r(source, bytes.size());
    EXPECT_EQ(r.remaining(), bytes.size());
    EXPECT_EQ(r.position(), 0u);
    T decoded{};
    multiproc::decode(r, decoded);
    if (bytes.size() <= 4096) {
      EXPECT_EQ(decoded, value);
    } else {
      EXPECT_TRUE(decoded == value);  // no multi-megabyte printout on failure
    }
    EXPECT_EQ(r.remaining(), 0u);
    EXPECT_EQ(r.available(), 0u);
    EXPECT_EQ(r.position(), bytes.size());
    EXPECT_EQ(source.served(), bytes.size());
  }
}

template <class T>
void expect_streamed_round_trip(const T& value) {
  expect_streamed_round_trip(value, all_plans());
}

template <class Byte>
std::vector<Byte> byte_pattern(std::size_t n, unsigned salt = 0) {
  std::vector<Byte> v(n);
  // Changes every byte and, through i >> 12, from page to page: pieces out of order do not match.
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<Byte>(i * 131 + (i >> 12) + salt);
  return v;
}
std::string string_pattern(std::size_t n, unsigned salt = 0) {
  const auto bytes = byte_pattern<char>(n, salt);
  return {bytes.begin(), bytes.end()};
}

// A cereal type with a vector of doubles and a string.
struct Reading {
  std::vector<double> values;
  std::string label;
  std::int32_t sensor = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(values, label, sensor);
  }
  friend bool operator==(const Reading&, const Reading&) = default;
};

TEST(CodecStreamTest, StringsRoundTripThroughPieces) {
  expect_streamed_round_trip(std::string());
  expect_streamed_round_trip(std::string("streamed"));
  static constexpr char kOdd[] = "nul\0inside and \xAA\xAA poison-like bytes";
  expect_streamed_round_trip(std::string(kOdd, sizeof kOdd - 1));
  expect_streamed_round_trip(string_pattern(5000));
  expect_streamed_round_trip(string_pattern(3 << 20, 1), big_plans());
  expect_streamed_round_trip(std::u16string());
  expect_streamed_round_trip(std::u16string(u"h\u00e9llo, w\u00f6rld \u2603"));
  std::u16string wide(1001, u'\0');
  for (std::size_t i = 0; i < wide.size(); ++i) wide[i] = static_cast<char16_t>(i * 40503u);
  expect_streamed_round_trip(wide);
}

TEST(CodecStreamTest, ByteVectorsRoundTripThroughPieces) {
  expect_streamed_round_trip(std::vector<char>());
  expect_streamed_round_trip(byte_pattern<char>(1000));
  expect_streamed_round_trip(std::vector<unsigned char>());
  expect_streamed_round_trip(byte_pattern<unsigned char>(777, 3));
  expect_streamed_round_trip(std::vector<std::byte>());
  expect_streamed_round_trip(byte_pattern<std::byte>(300, 5));
  // Over detail::kBulkBytes (4 MiB): the decoded vector takes the bulk allocation path.
  expect_streamed_round_trip(byte_pattern<char>(5 << 20, 7), big_plans());
  expect_streamed_round_trip(byte_pattern<unsigned char>((4 << 20) + 3, 9),
                             {fixed_pieces(4096), random_pieces(6, 70000)});
  expect_streamed_round_trip(byte_pattern<std::byte>((4 << 20) + 1, 11), {fixed_pieces(4093), random_pieces(7, 70000)});
}

TEST(CodecStreamTest, BitwiseVectorsRoundTripThroughPieces) {
  std::vector<double> reals(1001);
  for (std::size_t i = 0; i < reals.size(); ++i) reals[i] = static_cast<double>(i) / 3 - 100;
  expect_streamed_round_trip(reals);
  expect_streamed_round_trip(std::vector<double>());
  std::vector<std::int16_t> shorts(1001);  // odd: 2002 bytes, elements split by odd pieces
  for (std::size_t i = 0; i < shorts.size(); ++i) shorts[i] = static_cast<std::int16_t>(i * 7919);
  expect_streamed_round_trip(shorts);
  std::vector<std::int16_t> big_shorts(((4 << 20) + 2) / 2 + 1);  // over the bulk threshold, odd count
  for (std::size_t i = 0; i < big_shorts.size(); ++i) big_shorts[i] = static_cast<std::int16_t>(i * 7919 + (i >> 11));
  expect_streamed_round_trip(big_shorts, {fixed_pieces(4093), random_pieces(8, 70000)});
  expect_streamed_round_trip(
      std::vector<Trivial>{{1, 2.5, {'a', 'b', 'c', 'd', 'e'}, Color::blue}, {-7, -0.0, {0, 1, 2, 3, 4}, Color::red}});
}

TEST(CodecStreamTest, FixedSizeValuesRoundTripThroughPieces) {
  expect_streamed_round_trip(std::int64_t{-1234567890123});
  expect_streamed_round_trip(3.25);
  expect_streamed_round_trip(true);
  expect_streamed_round_trip(Color::green);
  expect_streamed_round_trip(Trivial{42, -1.5, {'x', 'y', '\0', 'z', '\xAA'}, Color::blue});
  expect_streamed_round_trip(std::array<int, 5>{1, -2, 3, -4, 0x7FFFFFFF});
  expect_streamed_round_trip(std::array<std::string, 3>{"a", "", "ccc"});
  expect_streamed_round_trip(std::monostate{});
}

TEST(CodecStreamTest, NestedValuesRoundTripThroughPieces) {
  std::map<std::string, std::vector<int>> m{{"", {}}, {"one", {1}}, {"many", {}}, {std::string(100, 'k'), {-1, 0, 1}}};
  for (int i = 0; i < 300; ++i) m["many"].push_back(i * i - 5000);
  expect_streamed_round_trip(m);
  expect_streamed_round_trip(std::optional<std::string>());
  expect_streamed_round_trip(std::optional<std::string>("present"));
  expect_streamed_round_trip(std::optional<std::vector<char>>(byte_pattern<char>(99)));
  using V = std::variant<int, std::string, std::vector<char>, std::monostate>;
  expect_streamed_round_trip(V(17));
  expect_streamed_round_trip(V(std::string("variant string")));
  expect_streamed_round_trip(V(byte_pattern<char>(123, 1)));
  expect_streamed_round_trip(V(std::monostate{}));
  using Tup = std::tuple<int, std::string, std::vector<char>>;
  expect_streamed_round_trip(Tup{-9, "tuple", byte_pattern<char>(211, 2)});
  expect_streamed_round_trip(Tup{0, "", {}});
  expect_streamed_round_trip(Tup{1, string_pattern(1 << 20, 3), byte_pattern<char>((4 << 20) + 5, 4)}, big_plans());
  expect_streamed_round_trip(sample_nested());
  expect_streamed_round_trip(sample_corruptible());
  expect_streamed_round_trip(std::vector<std::vector<char>>{byte_pattern<char>(5), {}, byte_pattern<char>(70, 1)});
}

TEST(CodecStreamTest, CerealTypesRoundTripThroughPieces) {
  Reading reading{{1.5, -2.25, 1e300, 0.0}, "temperature", 12};
  expect_streamed_round_trip(reading);
  expect_streamed_round_trip(Reading{});
  Reading big;
  big.values.resize(100000);
  for (std::size_t i = 0; i < big.values.size(); ++i) big.values[i] = static_cast<double>(i) * 0.5;
  big.label = string_pattern(100001, 9);
  big.sensor = -3;
  expect_streamed_round_trip(big,
                             {fixed_pieces(7), fixed_pieces(4096), random_pieces(9, 300), random_pieces(10, 70000)});
  expect_streamed_round_trip(sample_person(3));
  expect_streamed_round_trip(std::vector<Reading>{reading, Reading{}, reading});
}

// Bytes 0, 1, 2, ... as the raw input for take() and read_runs().
Bytes counting_bytes(std::size_t n) {
  Bytes b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::byte>(i);
  return b;
}

bool is_counting_from(std::span<const std::byte> run, std::size_t first) {
  for (std::size_t i = 0; i < run.size(); ++i) {
    if (run[i] != static_cast<std::byte>(first + i)) return false;
  }
  return true;
}

bool points_into(std::span<const std::byte> inner, std::span<const std::byte> outer) {
  return !inner.empty() && inner.data() >= outer.data() && inner.data() + inner.size() <= outer.data() + outer.size();
}

TEST(CodecStreamTest, FetchesAPieceOnlyWhenDecodingReachesIt) {
  multiproc::Writer w;
  multiproc::encode_all(w, std::int32_t{11}, std::int32_t{22}, std::int32_t{33});
  PieceSource source(w.bytes(), fixed_pieces(4));
  multiproc::Reader r(source, w.size());
  EXPECT_EQ(source.sizes().size(), 0u);
  EXPECT_EQ(multiproc::decode<std::int32_t>(r), 11);
  EXPECT_EQ(source.sizes().size(), 1u);
  EXPECT_EQ(r.available(), 0u);
  EXPECT_EQ(r.remaining(), 8u);
  EXPECT_EQ(r.position(), 4u);
  EXPECT_EQ(multiproc::decode<std::int32_t>(r), 22);
  EXPECT_EQ(source.sizes().size(), 2u);
  EXPECT_EQ(r.position(), 8u);
  EXPECT_EQ(multiproc::decode<std::int32_t>(r), 33);
  EXPECT_EQ(r.remaining(), 0u);
  EXPECT_EQ(r.position(), 12u);
  EXPECT_THROW((void)multiproc::decode<std::int32_t>(r), SerializationError);  // not a fetch past the end
  EXPECT_EQ(source.sizes().size(), 3u);
}

TEST(CodecStreamTest, TakeAcrossPieceBoundariesReturnsTheRightBytes) {
  const Bytes input = counting_bytes(200);
  PieceSource source(input, listed_pieces({10, 10, 30, 50, 100}));  // boundaries at 10, 20, 50, 100
  multiproc::Reader r(source, input.size());

  auto t = r.take(5);  // inside piece 0: not copied
  EXPECT_TRUE(is_counting_from(t, 0));
  EXPECT_EQ(t.size(), 5u);
  EXPECT_TRUE(points_into(t, source.piece()));
  EXPECT_EQ(r.position(), 5u);
  EXPECT_EQ(r.available(), 5u);

  t = r.take(10);  // 5..14 spans pieces 0 and 1: assembled in scratch
  ASSERT_EQ(t.size(), 10u);
  EXPECT_TRUE(is_counting_from(t, 5));
  EXPECT_EQ(t.data(), source.scratch.data());
  EXPECT_EQ(r.position(), 15u);
  EXPECT_EQ(r.remaining(), 185u);

  t = r.take(5);  // 15..19, the rest of piece 1: not copied
  EXPECT_TRUE(is_counting_from(t, 15));
  EXPECT_TRUE(points_into(t, source.piece()));
  EXPECT_EQ(r.available(), 0u);

  t = r.take(30);  // exactly piece 2, reached at a boundary: not copied
  ASSERT_EQ(t.size(), 30u);
  EXPECT_TRUE(is_counting_from(t, 20));
  EXPECT_TRUE(points_into(t, source.piece()));

  t = r.take(0);
  EXPECT_EQ(t.size(), 0u);
  EXPECT_EQ(r.position(), 50u);

  t = r.take(60);  // 50..109, starting at a boundary but longer than piece 3 (50..99)
  ASSERT_EQ(t.size(), 60u);
  EXPECT_TRUE(is_counting_from(t, 50));
  EXPECT_EQ(t.data(), source.scratch.data());
  EXPECT_EQ(r.position(), 110u);

  EXPECT_THROW((void)r.take(91), SerializationError);  // one more than is left
  t = r.take(90);                                      // the rest, inside the last piece
  EXPECT_TRUE(is_counting_from(t, 110));
  EXPECT_EQ(r.remaining(), 0u);
  EXPECT_EQ(r.position(), 200u);
  EXPECT_THROW((void)r.take(1), SerializationError);

  // A take over three pieces and more, then one right after that fits: each starts where the last ended.
  PieceSource tiny(input, fixed_pieces(3));
  multiproc::Reader tr(tiny, input.size());
  std::size_t at = 0;
  for (std::size_t n : {1u, 11u, 2u, 3u, 40u, 1u, 0u, 7u, 100u, 35u}) {
    t = tr.take(n);
    ASSERT_EQ(t.size(), n);
    EXPECT_TRUE(is_counting_from(t, at)) << "take(" << n << ") at " << at;
    at += n;
    EXPECT_EQ(tr.position(), at);
  }
  EXPECT_EQ(at, 200u);
  EXPECT_EQ(tr.remaining(), 0u);
}

TEST(CodecStreamTest, ReadRunsDeliversEachPieceInOrderWithoutCopying) {
  const Bytes input = counting_bytes(100);
  PieceSource source(input, listed_pieces({10, 10, 30, 50}));
  multiproc::Reader r(source, input.size());
  std::byte first[3];
  r.read_bytes(first, 3);
  EXPECT_TRUE(is_counting_from(first, 0));

  Bytes got;
  std::vector<std::size_t> runs;
  bool all_in_current_piece = true;
  r.read_runs(90, [&](std::span<const std::byte> run) {
    runs.push_back(run.size());
    all_in_current_piece = all_in_current_piece && points_into(run, source.piece());
    got.insert(got.end(), run.begin(), run.end());  // copied now: the piece goes at the next fetch
  });
  EXPECT_EQ(runs, (std::vector<std::size_t>{7, 10, 30, 43}));
  EXPECT_TRUE(all_in_current_piece);
  EXPECT_EQ(got.size(), 90u);
  EXPECT_TRUE(is_counting_from(got, 3));
  EXPECT_EQ(r.position(), 93u);
  EXPECT_EQ(r.remaining(), 7u);

  bool called = false;
  EXPECT_THROW(r.read_runs(8, [&](std::span<const std::byte>) { called = true; }), SerializationError);
  EXPECT_FALSE(called);  // checked before anything is handed out
  runs.clear();
  got.clear();
  r.read_runs(0, [&](std::span<const std::byte> run) { runs.push_back(run.size()); });
  EXPECT_TRUE(runs.empty());
  r.read_runs(7, [&](std::span<const std::byte> run) {
    runs.push_back(run.size());
    got.insert(got.end(), run.begin(), run.end());
  });
  EXPECT_EQ(runs, std::vector<std::size_t>{7});
  EXPECT_TRUE(is_counting_from(got, 93));
  EXPECT_EQ(r.remaining(), 0u);
  EXPECT_EQ(source.sizes(), (std::vector<std::size_t>{10, 10, 30, 50}));

  // Random pieces: the runs are the pieces.
  const Bytes long_input = counting_bytes(100000);
  PieceSource random(long_input, random_pieces(11, 3000));
  multiproc::Reader rr(random, long_input.size());
  runs.clear();
  got.clear();
  rr.read_runs(long_input.size(), [&](std::span<const std::byte> run) {
    runs.push_back(run.size());
    got.insert(got.end(), run.begin(), run.end());
  });
  EXPECT_EQ(runs, random.sizes());
  EXPECT_TRUE(got == long_input);

  // A plain Reader hands out one run.
  multiproc::Reader plain(input);
  runs.clear();
  plain.read_runs(100, [&](std::span<const std::byte> run) {
    runs.push_back(run.size());
    EXPECT_EQ(run.data(), input.data());
  });
  EXPECT_EQ(runs, std::vector<std::size_t>{100});
}

// Decodes a T from `input` served by `plan`, with the Reader told `total` bytes are coming. Returns
// "ok", "SerializationError" or "ProtocolError"; any other exception escapes and fails the test.
template <class T>
std::string streamed_outcome(std::span<const std::byte> input, std::size_t total, const PiecePlan& plan) {
  PieceSource source(input, plan);
  multiproc::Reader r(source, total);
  try {
    (void)multiproc::decode<T>(r);
    return "ok";
  } catch (const SerializationError&) {
    return "SerializationError";
  } catch (const ProtocolError&) {
    return "ProtocolError";
  }
}

template <class T>
void expect_short_sources_throw(const T& value, std::size_t step, const std::vector<PiecePlan>& plans) {
  const Bytes bytes = to_bytes(value);
  for (const PiecePlan& plan : plans) {
    for (std::size_t cut = 0; cut < bytes.size(); cut += step) {
      const auto start = std::chrono::steady_clock::now();
      const std::string outcome = streamed_outcome<T>(std::span(bytes).first(cut), bytes.size(), plan);
      EXPECT_NE(outcome, "ok") << plan.name << ", source cut at " << cut << " of " << bytes.size();
      // A short source ends the decode: it does not wait for more.
      EXPECT_LT(std::chrono::steady_clock::now() - start, test_support::generous(std::chrono::milliseconds(100)));
    }
  }
}

TEST(CodecStreamTest, SourceShorterThanTotalThrows) {
  const std::vector<PiecePlan> plans{fixed_pieces(1), fixed_pieces(7), fixed_pieces(64), random_pieces(12, 40)};
  expect_short_sources_throw(byte_pattern<char>(300), 1, plans);
  expect_short_sources_throw(string_pattern(300), 1, plans);
  expect_short_sources_throw(std::u16string(u"sixteen bit"), 1, plans);
  expect_short_sources_throw(std::vector<double>{1, 2, 3, 4, 5}, 1, plans);
  expect_short_sources_throw(std::tuple<int, std::string, std::vector<char>>{1, "two", byte_pattern<char>(30)}, 1,
                             plans);
  expect_short_sources_throw(sample_nested(), 1, plans);
  expect_short_sources_throw(sample_person(4), 1, plans);
  expect_short_sources_throw(sample_corruptible(), 5, plans);
  expect_short_sources_throw(byte_pattern<char>(5 << 20), (1 << 20) + 3,
                             {fixed_pieces(4096), random_pieces(13, 70000)});
  // A source with nothing at all.
  EXPECT_EQ(streamed_outcome<std::int64_t>({}, 8, fixed_pieces(4)), "ProtocolError");
}

TEST(CodecStreamTest, TotalShorterThanTheEncodingThrowsSerializationError) {
  // The source holds the whole encoding but the Reader is told fewer bytes: with pieces of one
  // byte no piece can overrun, so every total short of the encoding is a truncated input.
  const auto check = [](const auto& value) {
    using T = std::remove_cvref_t<decltype(value)>;
    const Bytes bytes = to_bytes(value);
    for (std::size_t total = 0; total < bytes.size(); ++total) {
      EXPECT_EQ(streamed_outcome<T>(bytes, total, fixed_pieces(1)), "SerializationError") << total;
      const std::string cut = streamed_outcome<T>(bytes, total, fixed_pieces(5));
      EXPECT_TRUE(cut == "SerializationError" || cut == "ProtocolError") << total << ": " << cut;
    }
    EXPECT_EQ(streamed_outcome<T>(bytes, bytes.size(), fixed_pieces(1)), "ok");
  };
  check(byte_pattern<char>(50));
  check(string_pattern(50));
  check(std::vector<std::int16_t>{1, 2, 3});
  check(sample_nested());
  check(sample_person(5));
}

TEST(CodecStreamTest, PieceLargerThanWhatRemainsThrowsProtocolError) {
  multiproc::Writer w;
  multiproc::encode_all(w, std::uint64_t{1}, std::uint64_t{2});
  // One piece of 16 bytes when 12 are announced.
  EXPECT_EQ(streamed_outcome<std::uint64_t>(w.bytes(), 12, fixed_pieces(16)), "ProtocolError");
  // The second piece overruns: the first value decodes, the second (which fits the 4 bytes
  // announced) meets a piece of 8.
  {
    PieceSource source(w.bytes(), fixed_pieces(8));
    multiproc::Reader r(source, 12);
    EXPECT_EQ(multiproc::decode<std::uint64_t>(r), 1u);
    EXPECT_THROW((void)multiproc::decode<std::uint32_t>(r), ProtocolError);
  }
  // Inside a byte vector's run: the source holds a byte more than the 108 announced, so after
  // pieces of 50 and 50 the last one is 9 bytes for the 8 still to come.
  Bytes vec = to_bytes(byte_pattern<char>(100));
  vec.push_back(std::byte{0x55});
  EXPECT_EQ(streamed_outcome<std::vector<char>>(vec, vec.size() - 1, fixed_pieces(50)), "ProtocolError");
  EXPECT_EQ(streamed_outcome<std::string>(vec, vec.size() - 1, fixed_pieces(50)), "ProtocolError");
  EXPECT_EQ(streamed_outcome<std::vector<char>>(vec, vec.size() - 1, fixed_pieces(54)), "ok");  // 54 + 54
  // Inside take() and read_runs().
  {
    PieceSource source(vec, fixed_pieces(60));
    multiproc::Reader r(source, 100);
    EXPECT_THROW((void)r.take(100), ProtocolError);
  }
  {
    PieceSource source(vec, fixed_pieces(60));
    multiproc::Reader r(source, 100);
    EXPECT_THROW(r.read_runs(100, [](std::span<const std::byte>) {}), ProtocolError);
  }
}

TEST(CodecStreamTest, EmptyPieceThrowsProtocolError) {
  const Bytes bytes = to_bytes(std::uint64_t{0x0123456789ABCDEF});
  EXPECT_EQ(streamed_outcome<std::uint64_t>(bytes, 8, fixed_pieces(0)), "ProtocolError");
  EXPECT_EQ(streamed_outcome<std::uint64_t>(bytes, 8, listed_pieces({4, 0, 4})), "ProtocolError");
  EXPECT_EQ(streamed_outcome<std::uint64_t>(bytes, 8, listed_pieces({4, 4})), "ok");
  const Bytes vec = to_bytes(byte_pattern<char>(100));
  EXPECT_EQ(streamed_outcome<std::vector<char>>(vec, vec.size(), listed_pieces({8, 50, 0, 50})), "ProtocolError");
  const Bytes str = to_bytes(string_pattern(100));
  EXPECT_EQ(streamed_outcome<std::string>(str, str.size(), listed_pieces({9, 0})), "ProtocolError");
  PieceSource source(vec, listed_pieces({5, 0}));
  multiproc::Reader r(source, vec.size());
  EXPECT_THROW((void)r.take(6), ProtocolError);
}

template <class T>
void expect_corrupt_count_throws_without_allocating(std::size_t element_size) {
  for (const std::uint64_t count : {std::uint64_t{0}, std::uint64_t{1} << 40, std::uint64_t{1} << 63, ~std::uint64_t{0},
                                    std::uint64_t{0xFFFFFFFF}}) {
    // The count, then 1000 bytes: total is 1008, so any count over 1000 / element_size is corrupt.
    multiproc::Writer w;
    const std::uint64_t bad = count == 0 ? 1000 / element_size + 1 : count;
    w.write_value(bad);
    const Bytes filler = counting_bytes(1000);
    w.write_bytes(filler.data(), filler.size());
    for (const PiecePlan& plan : {fixed_pieces(3), fixed_pieces(4096), random_pieces(14, 100)}) {
      g_largest_allocation = 0;
      const auto start = std::chrono::steady_clock::now();
      EXPECT_EQ(streamed_outcome<T>(w.bytes(), w.size(), plan), "SerializationError") << plan.name << ", count " << bad;
      // Refused at once, not after working through what the count claims.
      EXPECT_LT(std::chrono::steady_clock::now() - start, test_support::generous(std::chrono::milliseconds(100)));
      if (!CODECTEST_TSAN) {
        // The pieces themselves (at most 1008 bytes) and the error message, nothing near the count.
        EXPECT_LT(g_largest_allocation.load(), 4096u + 1008u) << plan.name << ", count " << bad;
      }
    }
  }
}

TEST(CodecStreamTest, CorruptLengthFieldThrowsSerializationErrorWithoutAllocating) {
  expect_corrupt_count_throws_without_allocating<std::vector<char>>(1);
  expect_corrupt_count_throws_without_allocating<std::vector<unsigned char>>(1);
  expect_corrupt_count_throws_without_allocating<std::vector<std::byte>>(1);
  expect_corrupt_count_throws_without_allocating<std::string>(1);
  expect_corrupt_count_throws_without_allocating<std::u16string>(2);
  expect_corrupt_count_throws_without_allocating<std::vector<std::int16_t>>(2);
  expect_corrupt_count_throws_without_allocating<std::vector<double>>(8);
  expect_corrupt_count_throws_without_allocating<std::vector<std::string>>(8);
  expect_corrupt_count_throws_without_allocating<Reading>(8);  // cereal: the vector's count comes first
}

// Decoding a byte vector into one that already has room reuses it: every size, up and down, must
// come out exact, with no byte left from the value before.
template <class Vec>
void expect_reused_decodes(bool streamed) {
  using Byte = typename Vec::value_type;
  Vec out;
  unsigned salt = 0;
  for (const std::size_t n : {std::size_t{1000}, std::size_t{10}, std::size_t{500}, std::size_t{0}, std::size_t{5000},
                              std::size_t{3}, std::size_t{4999}, std::size_t{5001}}) {
    Vec expected;
    const auto pattern = byte_pattern<Byte>(n, ++salt);
    expected.assign(pattern.begin(), pattern.end());
    const Bytes bytes = to_bytes(expected);
    const auto capacity_before = out.capacity();
    if (streamed) {
      PieceSource source(bytes, fixed_pieces(7));
      multiproc::Reader r(source, bytes.size());
      multiproc::decode(r, out);
      EXPECT_EQ(r.remaining(), 0u);
    } else {
      multiproc::Reader r(bytes);
      multiproc::decode(r, out);
      EXPECT_EQ(r.remaining(), 0u);
      EXPECT_EQ(r.position(), bytes.size());
    }
    EXPECT_EQ(out.size(), n);
    EXPECT_TRUE(out == expected) << n << " bytes into a capacity of " << capacity_before;
  }
}

TEST(CodecStreamTest, DecodingIntoAVectorWithCapacityReplacesItsContents) {
  expect_reused_decodes<std::vector<char>>(false);
  expect_reused_decodes<std::vector<unsigned char>>(false);
  expect_reused_decodes<std::vector<std::byte>>(false);
  expect_reused_decodes<std::string>(false);
  expect_reused_decodes<std::vector<char>>(true);
  expect_reused_decodes<std::string>(true);
  // Over the bulk threshold, then smaller but still over it, into the room the first one left.
  std::vector<char> out;
  for (const std::size_t n : {std::size_t{5} << 20, (std::size_t{9} << 19) + 1}) {
    const auto expected = byte_pattern<char>(n, static_cast<unsigned>(n));
    const Bytes bytes = to_bytes(expected);
    multiproc::Reader r(bytes);
    multiproc::decode(r, out);
    EXPECT_TRUE(out == expected) << n;
  }
  // Other bitwise vectors, shrinking and growing.
  std::vector<double> reals{9, 9, 9, 9, 9, 9};
  for (const std::size_t n : {2u, 5u, 0u, 40u}) {
    std::vector<double> expected(n);
    for (std::size_t i = 0; i < n; ++i) expected[i] = static_cast<double>(i) + 0.5;
    const Bytes bytes = to_bytes(expected);
    multiproc::Reader r(bytes);
    multiproc::decode(r, reals);
    EXPECT_EQ(reals, expected);
  }
}

}  // namespace

TEST(Writer, MovedFromWriterIsEmptyAndWritableAgain) {
  multiproc::Writer a;
  a.write_value(std::uint64_t{42});
  multiproc::Writer b(std::move(a));
  EXPECT_EQ(b.size(), sizeof(std::uint64_t));
  EXPECT_EQ(a.size(), 0u);  // NOLINT(bugprone-use-after-move): the documented moved-from state
  a.write_value(std::uint32_t{7});
  EXPECT_EQ(a.size(), sizeof(std::uint32_t));
  multiproc::Writer c;
  c = std::move(b);
  EXPECT_EQ(b.size(), 0u);  // NOLINT(bugprone-use-after-move)
  b.write_bytes("xyz", 3);
  EXPECT_EQ(b.size(), 3u);
  EXPECT_EQ(c.size(), sizeof(std::uint64_t));
}

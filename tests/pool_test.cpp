// Pool: every method over 1, 2 and 4 workers, with exact results, and exceptions of each kind
// coming back from a worker with their type, message and pid.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <list>
#include <map>
#include <new>
#include <ranges>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "pool_test_common.hpp"

namespace pooltest {

// Exceptions a task throws: one the parent knows nothing about, one it registers. (Outside the
// anonymous namespace so that their demangled names are plain.)
struct UnregisteredError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct RegisteredError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace {

// ---- tasks -----------------------------------------------------------------------------------

std::string describe(int i, std::string s, double d) { return s + ":" + std::to_string(i) + ":" + std::to_string(d); }
long long weighted_sum(int a, int b, int c) { return a + 10LL * b + 100LL * c; }

// A functor with encodable (trivially copyable) state.
struct AddK {
  int k = 0;
  int operator()(int x) const { return x + k; }
};

// A functor whose state goes through cereal.
struct Prefixer {
  std::string prefix;
  std::string operator()(const std::string& s) const { return prefix + s; }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(prefix);
  }
};

// A cereal user type as argument and result.
struct Point {
  int x = 0;
  int y = 0;
  std::string label;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(x, y, label);
  }
  bool operator==(const Point&) const = default;
};

Point moved(Point p, int dx, int dy) {
  p.x += dx;
  p.y += dy;
  p.label += "'";
  return p;
}

std::map<std::string, std::vector<int>> group_by_name(std::string sep, std::vector<int> values,
                                                      std::map<std::string, int> names) {
  std::map<std::string, std::vector<int>> out;
  for (int v : values) {
    for (const auto& [name, mod] : names) {
      if (v % mod == 0) out[name + sep].push_back(v);
    }
  }
  return out;
}

std::vector<std::string> split_words(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

// Appends "<x>\n" to the file at `path` (O_APPEND: lines from several workers never interleave).
void append_line(std::string path, int x) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) throw std::runtime_error("open failed");
  const std::string line = std::to_string(x) + "\n";
  const ssize_t n = ::write(fd, line.data(), line.size());
  ::close(fd);
  if (n != static_cast<ssize_t>(line.size())) throw std::runtime_error("short write");
}

std::vector<std::string> read_lines(const std::string& path) {
  std::vector<std::string> out;
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return out;
  char buf[256];
  while (std::fgets(buf, sizeof buf, f)) {
    std::string s(buf);
    if (!s.empty() && s.back() == '\n') s.pop_back();
    out.push_back(s);
  }
  std::fclose(f);
  return out;
}

struct TempFile {
  std::string path;
  TempFile() {
    char tmpl[] = "/tmp/multiproc-pool-test-XXXXXX";
    const int fd = ::mkstemp(tmpl);
    if (fd < 0) throw std::runtime_error("mkstemp failed");
    ::close(fd);
    path = tmpl;
  }
  ~TempFile() { ::unlink(path.c_str()); }
};

double mean_of(const std::vector<int>& v) {
  double s = 0;
  for (int x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}
std::vector<int> histogram_of(const std::vector<int>& v) {
  std::vector<int> h(10, 0);
  for (int x : v) ++h[static_cast<std::size_t>(x % 10)];
  return h;
}
std::size_t count_primes(const std::vector<int>& v) {
  std::size_t n = 0;
  for (int x : v) {
    if (x < 2) continue;
    bool prime = true;
    for (int d = 2; d * d <= x; ++d) {
      if (x % d == 0) {
        prime = false;
        break;
      }
    }
    n += prime;
  }
  return n;
}

int fails_on_multiples_of_7(int x) {
  if (x % 7 == 0) throw std::invalid_argument("multiple of 7: " + std::to_string(x));
  return x * 2;
}

int throw_runtime_error(int x) { throw std::runtime_error("runtime failure " + std::to_string(x)); }
int throw_invalid_argument(int x) { throw std::invalid_argument("invalid " + std::to_string(x)); }
int throw_out_of_range(int x) {
  std::vector<int> v{1, 2, 3};
  return v.at(static_cast<std::size_t>(x));
}
int throw_bad_alloc(int) { throw std::bad_alloc(); }
int throw_unregistered(int x) { throw UnregisteredError("unregistered " + std::to_string(x)); }
int throw_registered(int x) { throw RegisteredError("registered " + std::to_string(x)); }
int throw_int(int x) { throw x + 41; }

std::string local_what_of_at(std::size_t i) {
  std::vector<int> v{1, 2, 3};
  try {
    (void)v.at(i);
  } catch (const std::out_of_range& e) {
    return e.what();
  }
  return {};
}

// Asserts that calling `call` throws exactly E (not TaskError) carrying the remote info.
template <class E, class Call>
void expect_rethrown_as(Call call, const std::string& type, const std::string& message, const std::string& what,
                        const std::vector<pid_t>& pids) {
  try {
    call();
    ADD_FAILURE() << "no exception";
  } catch (const multiproc::TaskError& e) {
    ADD_FAILURE() << "came back as TaskError: " << e.what();
  } catch (const E& e) {
    EXPECT_EQ(std::string(e.what()), what);
    const auto* info = multiproc::remote_info(e);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->type_name(), type);
    EXPECT_EQ(info->message(), message);
    EXPECT_TRUE(contains(pids, info->worker_pid())) << info->worker_pid();
    EXPECT_NE(info->worker_pid(), ::getpid());
    EXPECT_NE(dynamic_cast<const multiproc::Error*>(&e), nullptr);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong type: " << multiproc::detail::demangle(typeid(e).name()) << ": " << e.what();
  } catch (...) {
    ADD_FAILURE() << "not a std::exception";
  }
}

class PoolTest : public WorkersTest {};
INSTANTIATE_TEST_SUITE_P(Workers, PoolTest, ::testing::Values(1, 2, 4), workers_name);

// ---- construction ------------------------------------------------------------------------------

TEST_P(PoolTest, HasTheRequestedNumberOfWorkers) {
  auto pool = make_pool();
  EXPECT_EQ(pool.processes(), workers());
  const auto pids = pool.worker_pids();
  EXPECT_EQ(pids.size(), static_cast<std::size_t>(workers()));
  EXPECT_EQ(std::set<pid_t>(pids.begin(), pids.end()).size(), pids.size());
  for (pid_t p : pids) {
    EXPECT_GT(p, 0);
    EXPECT_NE(p, ::getpid());
  }
}

TEST(PoolDefaults, ProcessesDefaultsToCpuCount) {
  multiproc::Pool pool;
  EXPECT_EQ(pool.processes(), multiproc::cpu_count());
  EXPECT_EQ(pool.worker_pids().size(), static_cast<std::size_t>(multiproc::cpu_count()));
}

// ---- map ---------------------------------------------------------------------------------------

TEST_P(PoolTest, MapVectorReturnsResultsInOrder) {
  auto pool = make_pool();
  const auto xs = iota_vector(1000);
  const std::vector<int> ys = pool.map(square, xs);
  EXPECT_EQ(ys, squares(1000));
}

#if POOLTEST_HAVE_VIEWS
TEST_P(PoolTest, MapIotaView) {
  auto pool = make_pool();
  EXPECT_EQ(pool.map(square, std::views::iota(0, 500)), squares(500));
}

TEST_P(PoolTest, MapNonSizedFilterView) {
  auto pool = make_pool();
  const auto xs = iota_vector(300);
  auto evens = xs | std::views::filter([](int x) { return x % 2 == 0; });
  static_assert(!std::ranges::sized_range<decltype(evens)>);
  const std::vector<int> ys = pool.map(square, evens);
  std::vector<int> expected;
  for (int x = 0; x < 300; x += 2) expected.push_back(x * x);
  EXPECT_EQ(ys, expected);
}
#endif

TEST_P(PoolTest, MapEmptyInputReturnsEmpty) {
  auto pool = make_pool();
  EXPECT_TRUE(pool.map(square, std::vector<int>{}).empty());
#if POOLTEST_HAVE_VIEWS
  EXPECT_TRUE(pool.map(square, std::views::iota(0, 0)).empty());
#endif
  EXPECT_TRUE(pool.map(square, std::vector<int>{}, 7).empty());
  EXPECT_TRUE(pool.map_outcomes(square, std::vector<int>{}).empty());
  EXPECT_TRUE(pool.starmap(add, std::vector<std::pair<int, int>>{}).empty());
  // The pool still works after an empty map.
  EXPECT_EQ(pool.apply(square, 12), 144);
}

TEST_P(PoolTest, MapGivesTheSameResultsForEveryChunksize) {
  auto pool = make_pool();
  const auto xs = iota_vector(103);  // not a multiple of any chunk size below
  for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{100}, std::size_t{1000}}) {
    EXPECT_EQ(pool.map(square, xs, chunksize), squares(103)) << "chunksize " << chunksize;
  }
}

// Items and results that travel as their own bytes (ints, doubles, plain structs) take a path of
// their own (one copy per chunk, answered in place): the same results as items that do not (a
// std::list's elements, encoded one by one), for every chunk size, with a throw in the middle.
struct Sample {
  std::int32_t id;
  double weight;
  char tag[3];  // and padding after it
  friend bool operator==(const Sample&, const Sample&) = default;
};
Sample heavier(Sample s) {
  if (s.id == 40) throw std::invalid_argument("sample 40");
  return Sample{s.id, s.weight * 2, {s.tag[2], s.tag[1], s.tag[0]}};
}
std::int64_t floor_of(double x) { return static_cast<std::int64_t>(x * 10); }

TEST_P(PoolTest, MapOfPlainValuesMatchesItemByItemEncoding) {
  auto pool = make_pool();
  std::vector<Sample> samples;
  for (int i = 0; i < 97; ++i) samples.push_back(Sample{i, i / 3.0, {'a', static_cast<char>('a' + i % 26), 'z'}});
  const std::list<Sample> listed(samples.begin(), samples.end());
  std::vector<double> reals;
  for (int i = 0; i < 97; ++i) reals.push_back(i * 0.75);
  for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{200}}) {
    const auto fast = pool.map_outcomes(heavier, samples, chunksize);
    const auto slow = pool.map_outcomes(heavier, listed, chunksize);
    ASSERT_EQ(fast.size(), samples.size());
    ASSERT_EQ(slow.size(), samples.size());
    for (std::size_t i = 0; i < samples.size(); ++i) {
      if (i == 40) {
        EXPECT_FALSE(fast[i].has_value());
        EXPECT_FALSE(slow[i].has_value());
        EXPECT_THROW((void)fast[i].value(), std::invalid_argument);
        continue;
      }
      ASSERT_TRUE(fast[i].has_value()) << i;
      ASSERT_TRUE(slow[i].has_value()) << i;
      EXPECT_EQ(fast[i].value(), heavier(samples[i])) << i;
      EXPECT_EQ(slow[i].value(), fast[i].value()) << i;
    }
    std::vector<std::int64_t> floors;
    for (double x : reals) floors.push_back(floor_of(x));
    EXPECT_EQ(pool.map(floor_of, reals, chunksize), floors) << "chunksize " << chunksize;
    EXPECT_THROW((void)pool.map(heavier, samples, chunksize), std::invalid_argument) << "chunksize " << chunksize;
  }
}

// Counts itself in `started`, then waits until `want` items have started (true) or gives up after
// a while (false): `want` items can only meet if they run at the same time, on different workers.
bool meet(multiproc::Value<int> started, int want) {
  started.update([](int n) { return n + 1; });
  return eventually([&] { return started.get() >= want; }, 10s);
}

TEST_P(PoolTest, MapAutoChunkingSplitsAcrossWorkers) {
  // Auto chunk size is len / (4 × workers): with 4 × workers items, each worker gets work at once,
  // so the first item of every worker runs at the same time as the others.
  auto pool = make_pool();
  if (workers() == 1) GTEST_SKIP() << "needs several workers";
  multiproc::Value<int> started;
  const std::vector<std::tuple<multiproc::Value<int>, int>> items(static_cast<std::size_t>(4 * workers()),
                                                                  {started, workers()});
  const auto met = pool.starmap(meet, items);
  EXPECT_EQ(met, std::vector<bool>(items.size(), true)) << "the items did not run on every worker at once";
  EXPECT_EQ(started.get(), 4 * workers());
}

TEST_P(PoolTest, MapAsyncGetWaitWaitForReadySuccessful) {
  auto pool = make_pool();
  const std::vector<int> xs(static_cast<std::size_t>(workers()), 300);
  auto r = pool.map_async(sleep_ms_then_return, xs, 1);
  static_assert(std::is_same_v<decltype(r), multiproc::AsyncResult<std::vector<int>>>);
  EXPECT_FALSE(r.ready());
  EXPECT_THROW((void)r.successful(), multiproc::StateError);
  EXPECT_FALSE(r.wait_for(20ms));
  EXPECT_FALSE(r.ready());
  r.wait();
  EXPECT_TRUE(r.ready());
  EXPECT_TRUE(r.wait_for(0ms));
  EXPECT_TRUE(r.successful());
  EXPECT_EQ(r.get(), xs);
  EXPECT_EQ(r.get(), xs);  // get() can be called again
  EXPECT_EQ(std::move(r).get(), xs);
}

TEST_P(PoolTest, MapAsyncUnsuccessfulWhenATaskThrows) {
  auto pool = make_pool();
  auto r = pool.map_async(fails_on_multiples_of_7, range_vector(1, 30), 3);
  EXPECT_TRUE(r.wait_for(scaled(5s)));
  EXPECT_TRUE(r.ready());
  EXPECT_FALSE(r.successful());
  // The first failing element in input order: 7.
  try {
    (void)r.get();
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "multiple of 7: 7");
  }
}

TEST_P(PoolTest, MapThrowsTheFirstErrorInInputOrder) {
  auto pool = make_pool();
  for (std::size_t chunksize : {std::size_t{1}, std::size_t{4}, std::size_t{0}}) {
    try {
      (void)pool.map(fails_on_multiples_of_7, range_vector(1, 60), chunksize);
      FAIL() << "no exception";
    } catch (const std::invalid_argument& e) {
      EXPECT_STREQ(e.what(), "multiple of 7: 7") << "chunksize " << chunksize;
    }
  }
}

// ---- starmap, apply ----------------------------------------------------------------------------

TEST_P(PoolTest, StarmapPairs) {
  auto pool = make_pool();
  std::vector<std::pair<int, int>> pairs;
  std::vector<int> expected;
  for (int i = 0; i < 200; ++i) {
    pairs.emplace_back(i, 3 * i + 1);
    expected.push_back(4 * i + 1);
  }
  EXPECT_EQ(pool.starmap(add, pairs), expected);
  EXPECT_EQ(pool.starmap(add, pairs, 1), expected);
  EXPECT_EQ(pool.starmap_async(add, pairs, 9).get(), expected);
}

TEST_P(PoolTest, StarmapTuplesOfMixedTypes) {
  auto pool = make_pool();
  std::vector<std::tuple<int, std::string, double>> items;
  std::vector<std::string> expected;
  for (int i = 0; i < 50; ++i) {
    items.emplace_back(i, std::string(static_cast<std::size_t>(i % 5), 'x') + "s", i * 0.5);
    expected.push_back(describe(i, std::string(static_cast<std::size_t>(i % 5), 'x') + "s", i * 0.5));
  }
  EXPECT_EQ(pool.starmap(describe, items), expected);
}

TEST_P(PoolTest, ApplyWithSeveralArguments) {
  auto pool = make_pool();
  EXPECT_EQ(pool.apply(square, 7), 49);
  EXPECT_EQ(pool.apply(add, 40, 2), 42);
  EXPECT_EQ(pool.apply(weighted_sum, 1, 2, 3), 321);
  EXPECT_EQ(pool.apply(describe, 5, std::string("five"), 2.5), describe(5, "five", 2.5));
}

TEST_P(PoolTest, ApplyAsyncWithSeveralArguments) {
  auto pool = make_pool();
  auto a = pool.apply_async(weighted_sum, 4, 5, 6);
  auto b = pool.apply_async(describe, 1, std::string("one"), 0.25);
  auto c = pool.apply_async(sleep_ms_then_return, 200);
  static_assert(std::is_same_v<decltype(a), multiproc::AsyncResult<long long>>);
  static_assert(std::is_same_v<decltype(b), multiproc::AsyncResult<std::string>>);
  EXPECT_FALSE(c.wait_for(10ms));
  EXPECT_EQ(a.get(), 654);
  EXPECT_EQ(b.get(), describe(1, "one", 0.25));
  EXPECT_EQ(c.get(), 200);
  EXPECT_TRUE(a.ready());
  EXPECT_TRUE(a.successful());
  EXPECT_TRUE(c.successful());
}

TEST_P(PoolTest, ManyConcurrentApplyAsync) {
  auto pool = make_pool();
  std::vector<multiproc::AsyncResult<int>> rs;
  for (int i = 0; i < 200; ++i) rs.push_back(pool.apply_async(square, i));
  for (int i = 0; i < 200; ++i) EXPECT_EQ(rs[static_cast<std::size_t>(i)].get(), i * i);
}

// ---- callables ---------------------------------------------------------------------------------

TEST_P(PoolTest, CapturelessLambda) {
  auto pool = make_pool();
  EXPECT_EQ(pool.map([](int x) { return x * 3; }, iota_vector(100)).at(33), 99);
  EXPECT_EQ(pool.apply([](int a, int b) { return a * b; }, 6, 7), 42);
  std::vector<int> expected;
  for (int i = 0; i < 100; ++i) expected.push_back(i - 1);
  EXPECT_EQ(pool.map([](int x) { return x - 1; }, iota_vector(100), 3), expected);
}

TEST_P(PoolTest, FunctorWithEncodableStateCarriesItsState) {
  auto pool = make_pool();
  std::vector<int> expected;
  for (int i = 0; i < 100; ++i) expected.push_back(i + 1000);
  EXPECT_EQ(pool.map(AddK{1000}, iota_vector(100)), expected);
  EXPECT_EQ(pool.apply(AddK{-5}, 5), 0);
  // Two functors of the same type with different state in flight at once.
  auto a = pool.map_async(AddK{1}, iota_vector(50), 5);
  auto b = pool.map_async(AddK{2}, iota_vector(50), 5);
  const auto ra = a.get();
  const auto rb = b.get();
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(ra[static_cast<std::size_t>(i)], i + 1);
    EXPECT_EQ(rb[static_cast<std::size_t>(i)], i + 2);
  }
}

TEST_P(PoolTest, FunctorWithCerealState) {
  auto pool = make_pool();
  const std::vector<std::string> words{"a", "bc", "", "def"};
  const std::vector<std::string> expected{">>a", ">>bc", ">>", ">>def"};
  EXPECT_EQ(pool.map(Prefixer{">>"}, words), expected);
}

// ---- argument and result types -----------------------------------------------------------------

TEST_P(PoolTest, StringVectorMapArgumentsAndResults) {
  auto pool = make_pool();
  const std::map<std::string, int> names{{"even", 2}, {"three", 3}};
  const auto got = pool.apply(group_by_name, std::string("!"), iota_vector(10), names);
  const std::map<std::string, std::vector<int>> expected{{"even!", {0, 2, 4, 6, 8}}, {"three!", {0, 3, 6, 9}}};
  EXPECT_EQ(got, expected);

  const std::vector<std::string> sentences{"the quick  brown fox", "", " jumps", std::string(5000, 'y') + " z"};
  const auto split = pool.map(split_words, sentences);
  ASSERT_EQ(split.size(), 4u);
  EXPECT_EQ(split[0], (std::vector<std::string>{"the", "quick", "brown", "fox"}));
  EXPECT_TRUE(split[1].empty());
  EXPECT_EQ(split[2], (std::vector<std::string>{"jumps"}));
  EXPECT_EQ(split[3], (std::vector<std::string>{std::string(5000, 'y'), "z"}));
}

TEST_P(PoolTest, CerealUserTypeArgumentsAndResults) {
  auto pool = make_pool();
  const Point p{1, 2, "p"};
  EXPECT_EQ(pool.apply(moved, p, 10, 20), (Point{11, 22, "p'"}));
  std::vector<std::tuple<Point, int, int>> items;
  std::vector<Point> expected;
  for (int i = 0; i < 40; ++i) {
    items.emplace_back(Point{i, -i, std::to_string(i)}, i, 1);
    expected.push_back(Point{2 * i, 1 - i, std::to_string(i) + "'"});
  }
  EXPECT_EQ(pool.starmap(moved, items, 3), expected);
}

TEST_P(PoolTest, LargeArgumentsAndResults) {
  auto pool = make_pool();
  const std::string big(3 << 20, 'q');  // larger than any socket buffer
  const auto r = pool.apply([](std::string s) { return s + s; }, big);
  ASSERT_EQ(r.size(), big.size() * 2);
  EXPECT_EQ(r, big + big);
}

TEST_P(PoolTest, VoidReturningTasksRun) {
  auto pool = make_pool();
  TempFile file;
  std::vector<std::pair<std::string, int>> items;
  for (int i = 0; i < 30; ++i) items.emplace_back(file.path, i);
  const auto results = pool.starmap(append_line, items, 4);
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(results)>, std::vector<std::monostate>>);
  EXPECT_EQ(results.size(), 30u);
  pool.apply(append_line, file.path, 100);
  auto r = pool.apply_async(append_line, file.path, 101);
  static_assert(std::is_same_v<decltype(r), multiproc::AsyncResult<void>>);
  r.get();
  EXPECT_TRUE(r.successful());
  auto lines = read_lines(file.path);
  std::multiset<int> got;
  for (const auto& l : lines) got.insert(std::stoi(l));
  std::multiset<int> expected;
  for (int i = 0; i < 30; ++i) expected.insert(i);
  expected.insert(100);
  expected.insert(101);
  EXPECT_EQ(got, expected);
}

// ---- imap ----------------------------------------------------------------------------------------
#if POOLTEST_HAVE_VIEWS

TEST_P(PoolTest, ImapIsOrdered) {
  auto pool = make_pool();
  for (std::size_t chunksize : {std::size_t{1}, std::size_t{7}}) {
    std::vector<int> got;
    for (int y : pool.imap(square, iota_vector(300), chunksize)) got.push_back(y);
    EXPECT_EQ(got, squares(300)) << "chunksize " << chunksize;
  }
}

TEST_P(PoolTest, ImapUnorderedGivesTheSameMultiset) {
  auto pool = make_pool();
  std::multiset<int> got;
  for (int y : pool.imap_unordered(square, std::views::iota(0, 300))) got.insert(y);
  const auto sq = squares(300);
  EXPECT_EQ(got, std::multiset<int>(sq.begin(), sq.end()));
  got.clear();
  for (int y : pool.imap_unordered(square, iota_vector(300), 11)) got.insert(y);
  EXPECT_EQ(got, std::multiset<int>(sq.begin(), sq.end()));
}

TEST_P(PoolTest, ImapUnorderedYieldsInCompletionOrder) {
  if (workers() == 1) GTEST_SKIP() << "needs several workers";
  auto pool = make_pool();
  // The first item sleeps (long enough for a slow worker to start and run the others); the others
  // finish first and come out first.
  const int slow = static_cast<int>(scaled(1s).count());
  std::vector<int> got;
  for (int y : pool.imap_unordered(sleep_ms_then_return, std::vector<int>{slow, 1, 2, 3})) got.push_back(y);
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got.back(), slow);
}

TEST_P(PoolTest, ImapOverEndlessIotaStoppedEarly) {
  auto pool = make_pool();
  std::vector<int> got;
  for (int y : pool.imap(square, std::views::iota(0))) {
    got.push_back(y);
    if (got.size() == 500) break;
  }
  EXPECT_EQ(got, squares(500));
  std::multiset<int> unordered;
  {
    auto range = pool.imap_unordered(square, std::views::iota(0), 3);
    for (int y : range) {
      unordered.insert(y);
      if (unordered.size() == 100) break;
    }
  }
  ASSERT_EQ(unordered.size(), 100u);
  const auto sq = squares(2000);
  const std::set<int> all_squares(sq.begin(), sq.end());
  for (int y : unordered) EXPECT_TRUE(all_squares.contains(y)) << y;
  EXPECT_EQ(std::set<int>(unordered.begin(), unordered.end()).size(), 100u);  // no item twice
  EXPECT_EQ(pool.apply(square, 3), 9);
}

// Counts itself in `ran`, then sleeps 5 ms.
int count_and_sleep(multiproc::Value<int> ran) {
  ran.update([](int n) { return n + 1; });
  return sleep_ms_then_return(5);
}

TEST_P(PoolTest, ImapRangeDestroyedEarlyThenPoolStillWorks) {
  auto pool = make_pool();
  multiproc::Value<int> ran;
  {
    auto range = pool.imap(count_and_sleep, std::vector<multiproc::Value<int>>(200, ran));
    int seen = 0;
    for (int y : range) {
      EXPECT_EQ(y, 5);
      if (++seen == 3) break;
    }
  }  // dropped with most of its items not run
  EXPECT_EQ(pool.map(square, iota_vector(100)), squares(100));
  EXPECT_EQ(pool.apply(add, 1, 2), 3);
  // An imap range never iterated, destroyed at once.
  { auto unused = pool.imap(square, iota_vector(10)); }
  EXPECT_EQ(pool.apply(square, 4), 16);
  pool.close();
  pool.join();  // anything of the dropped range still queued would run before this returns
  // The range had submitted a window of max(8 × workers, 32) items; dropping it cancelled those not
  // yet running, so fewer ran than were submitted.
  const int window = std::max(8 * workers(), 32);
  EXPECT_GE(ran.get(), 3);
  EXPECT_LT(ran.get(), window) << "the items of a dropped imap range ran after it was dropped";
  RecordProperty("dropped_range_items_run", ran.get());
}

TEST_P(PoolTest, ImapItemErrorThrowsOnDereferenceAndIterationGoesOn) {
  auto pool = make_pool();
  int values = 0;
  int errors = 0;
  auto range = pool.imap(fails_on_multiples_of_7, std::views::iota(1, 30), 2);
  for (auto it = range.begin(); it != range.end(); ++it) {
    try {
      const int y = *it;
      EXPECT_EQ(y % 2, 0);
      ++values;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("multiple of 7: ", 0), 0u);
      ++errors;
    }
  }
  EXPECT_EQ(errors, 4);  // 7, 14, 21, 28
  EXPECT_EQ(values, 25);
}

// 0, 1, 2, ... n - 1, except that reading element `bad` throws.
struct InputThatFailsAt {
  int n = 0;
  int bad = -1;
  struct iterator {
    using value_type = int;
    using difference_type = std::ptrdiff_t;
    const InputThatFailsAt* input = nullptr;
    int i = 0;
    int operator*() const {
      if (i == input->bad) throw std::runtime_error("input " + std::to_string(i) + " is unreadable");
      return i;
    }
    iterator& operator++() {
      ++i;
      return *this;
    }
    iterator operator++(int) {
      auto old = *this;
      ++i;
      return old;
    }
    bool operator==(const iterator& o) const { return i == o.i; }
  };
  [[nodiscard]] iterator begin() const { return {this, 0}; }
  [[nodiscard]] iterator end() const { return {this, n}; }
};
static_assert(std::ranges::input_range<InputThatFailsAt>);

// The input's own exception: every result before the failing element comes first, then the
// exception in its place, then the end. Nothing is lost and nothing hangs.
TEST_P(PoolTest, ImapInputThatThrowsDeliversWhatCameBeforeThenItsErrorThenEnds) {
  auto pool = make_pool();
  for (const auto& [n, bad] : {std::pair{10, 3}, std::pair{150, 130}, std::pair{5, 0}}) {
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{2}, std::size_t{7}}) {
      const InputThatFailsAt input{n, bad};
      std::vector<int> got;
      std::vector<std::string> errors;
      auto range = pool.imap(square, input, chunksize);
      for (auto it = range.begin(); it != range.end(); ++it) {
        try {
          got.push_back(*it);
        } catch (const std::runtime_error& e) {
          errors.emplace_back(e.what());
        }
      }
      EXPECT_EQ(got, squares(bad)) << "n " << n << ", chunksize " << chunksize;
      EXPECT_EQ(errors, std::vector<std::string>{"input " + std::to_string(bad) + " is unreadable"});
      std::multiset<int> unordered;
      bool failed = false;
      try {
        for (int y : pool.imap_unordered(square, input, chunksize)) unordered.insert(y);
      } catch (const std::runtime_error&) {
        failed = true;
      }
      EXPECT_TRUE(failed);
      const auto want = squares(bad);
      EXPECT_EQ(unordered, std::multiset<int>(want.begin(), want.end())) << "n " << n << ", chunksize " << chunksize;
    }
  }
  EXPECT_EQ(pool.apply(square, 9), 81);
}

TEST_P(PoolTest, ImapRangeIteratedTwiceThrowsStateError) {
  auto pool = make_pool();
  auto range = pool.imap(square, iota_vector(3));
  int n = 0;
  for (int y : range) n += y;
  EXPECT_EQ(n, 5);
  EXPECT_THROW((void)range.begin(), multiproc::StateError);
}

TEST_P(PoolTest, ImapChunksizeZeroIsInvalid) {
  auto pool = make_pool();
  EXPECT_THROW((void)pool.imap(square, iota_vector(3), 0), multiproc::InvalidArgument);
  EXPECT_THROW((void)pool.imap_unordered(square, iota_vector(3), 0), multiproc::InvalidArgument);
}

#else
TEST(PoolViews, ViewAndImapTestsNeedClang16OrGcc) {
  GTEST_SKIP() << "clang < 16 cannot compile libstdc++'s range views (llvm/llvm-project#52696)";
}
#endif

// ---- several calling threads ---------------------------------------------------------------------

TEST_P(PoolTest, SeveralThreadsShareOnePool) {
  auto pool = make_pool();
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pool, &ok, t] {
      bool good = true;
      for (int round = 0; round < 5; ++round) {
        good &= pool.map(AddK{t}, iota_vector(200), static_cast<std::size_t>(round + 1)) == [t] {
          std::vector<int> v;
          for (int i = 0; i < 200; ++i) v.push_back(i + t);
          return v;
        }();
        good &= pool.apply(add, t, round) == t + round;
        try {
          pool.apply(throw_runtime_error, t);
          good = false;
        } catch (const std::runtime_error& e) {
          good &= std::string(e.what()) == "runtime failure " + std::to_string(t);
        }
      }
      ok[static_cast<std::size_t>(t)] = good ? 1 : 0;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok, std::vector<int>(4, 1));
}

// ---- invoke_all --------------------------------------------------------------------------------

TEST_P(PoolTest, InvokeAllReturnsEachComputationsOwnType) {
  auto pool = make_pool();
  std::vector<int> input;
  for (int i = 0; i < 5000; ++i) input.push_back((i * 7919) % 1009);
  auto [mean, hist, primes] = pool.invoke_all(input, mean_of, histogram_of, count_primes);
  static_assert(std::is_same_v<decltype(mean), double>);
  static_assert(std::is_same_v<decltype(hist), std::vector<int>>);
  static_assert(std::is_same_v<decltype(primes), std::size_t>);
  EXPECT_EQ(mean, mean_of(input));
  EXPECT_EQ(hist, histogram_of(input));
  EXPECT_EQ(primes, count_primes(input));
  EXPECT_GT(primes, 0u);
}

// Second and third computations of the invoke_all tests below: the second fails late, the third
// at once, so that the first error in time is not the first by position.
int fails_late(const std::vector<int>& v) {
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  throw std::invalid_argument("second of " + std::to_string(v.size()));
}
std::string fails_at_once(const std::vector<int>& v) {
  throw std::runtime_error("third of " + std::to_string(v.size()));
}

TEST_P(PoolTest, InvokeAllThrowsTheFirstErrorByPositionOnceAllHaveEnded) {
  auto pool = make_pool();
  const std::vector<int> input = iota_vector(100);
  try {
    (void)pool.invoke_all(input, mean_of, fails_late, fails_at_once, count_primes);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "second of 100");
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not the second computation's error: " << e.what();
  }
  EXPECT_EQ(pool.apply(square, 3), 9);
}

TEST_P(PoolTest, InvokeAllOutcomesKeepsEveryValueAndEveryError) {
  auto pool = make_pool();
  const std::vector<int> input = iota_vector(100);
  auto [mean, second, third, primes] =
      pool.invoke_all_outcomes(input, mean_of, fails_late, fails_at_once, count_primes);
  static_assert(std::is_same_v<decltype(mean), multiproc::Outcome<double>>);
  static_assert(std::is_same_v<decltype(third), multiproc::Outcome<std::string>>);
  ASSERT_TRUE(mean.has_value());
  EXPECT_EQ(mean.value(), mean_of(input));
  ASSERT_TRUE(primes.has_value());
  EXPECT_EQ(primes.value(), count_primes(input));
  ASSERT_FALSE(second.has_value());
  EXPECT_THROW(std::rethrow_exception(second.error()), std::invalid_argument);
  ASSERT_FALSE(third.has_value());
  try {
    std::rethrow_exception(third.error());
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "third of 100");
  }
}

// ---- map_outcomes ------------------------------------------------------------------------------

TEST_P(PoolTest, MapOutcomesHoldsErrorsInPlace) {
  auto pool = make_pool();
  for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{5}}) {
    const auto out = pool.map_outcomes(fails_on_multiples_of_7, iota_vector(50), chunksize);
    static_assert(std::is_same_v<std::remove_cvref_t<decltype(out)>, std::vector<multiproc::Outcome<int>>>);
    ASSERT_EQ(out.size(), 50u);
    for (int i = 0; i < 50; ++i) {
      const auto& o = out[static_cast<std::size_t>(i)];
      if (i % 7 == 0) {
        EXPECT_FALSE(o.has_value()) << i;
        EXPECT_FALSE(static_cast<bool>(o));
        ASSERT_NE(o.error(), nullptr);
        try {
          (void)o.value();
          ADD_FAILURE() << "value() did not throw at " << i;
        } catch (const std::invalid_argument& e) {
          EXPECT_EQ(std::string(e.what()), "multiple of 7: " + std::to_string(i));
        }
      } else {
        ASSERT_TRUE(o.has_value()) << i;
        EXPECT_EQ(o.error(), nullptr);
        EXPECT_EQ(o.value(), 2 * i);
      }
    }
  }
}

// ---- exceptions --------------------------------------------------------------------------------

TEST_P(PoolTest, RuntimeErrorComesBackAsRuntimeError) {
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  expect_rethrown_as<std::runtime_error>([&] { pool.apply(throw_runtime_error, 5); }, "std::runtime_error",
                                         "runtime failure 5", "runtime failure 5", pids);
  expect_rethrown_as<std::runtime_error>([&] { pool.map(throw_runtime_error, std::vector<int>{6}); },
                                         "std::runtime_error", "runtime failure 6", "runtime failure 6", pids);
}

TEST_P(PoolTest, InvalidArgumentComesBackAsInvalidArgument) {
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  expect_rethrown_as<std::invalid_argument>([&] { pool.apply(throw_invalid_argument, 1); }, "std::invalid_argument",
                                            "invalid 1", "invalid 1", pids);
}

TEST_P(PoolTest, OutOfRangeFromVectorAtComesBackAsOutOfRange) {
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  const std::string what = local_what_of_at(5);
  ASSERT_FALSE(what.empty());
  expect_rethrown_as<std::out_of_range>([&] { pool.apply(throw_out_of_range, 5); }, "std::out_of_range", what, what,
                                        pids);
  EXPECT_EQ(pool.apply(throw_out_of_range, 2), 3);
}

TEST_P(PoolTest, BadAllocComesBackAsBadAlloc) {
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  expect_rethrown_as<std::bad_alloc>([&] { pool.apply(throw_bad_alloc, 0); }, "std::bad_alloc", "std::bad_alloc",
                                     "std::bad_alloc", pids);
}

TEST_P(PoolTest, UnregisteredTypeComesBackAsTaskError) {
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  try {
    pool.apply(throw_unregistered, 3);
    FAIL() << "no exception";
  } catch (const multiproc::TaskError& e) {
    EXPECT_EQ(e.type_name(), "pooltest::UnregisteredError");
    EXPECT_EQ(e.message(), "unregistered 3");
    EXPECT_TRUE(contains(pids, e.worker_pid())) << e.worker_pid();
    EXPECT_NE(e.worker_pid(), ::getpid());
    EXPECT_EQ(std::string(e.what()),
              "pooltest::UnregisteredError: unregistered 3 (in worker " + std::to_string(e.worker_pid()) + ")");
    EXPECT_EQ(multiproc::remote_info(e), static_cast<const multiproc::RemoteErrorInfo*>(&e));
  }
}

TEST_P(PoolTest, RegisteredTypeComesBackAsItself) {
  multiproc::register_exception<RegisteredError>();
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  expect_rethrown_as<RegisteredError>([&] { pool.apply(throw_registered, 8); }, "pooltest::RegisteredError",
                                      "registered 8", "registered 8", pids);
  // map_outcomes rebuilds it too.
  const auto out = pool.map_outcomes(throw_registered, std::vector<int>{1, 2});
  ASSERT_EQ(out.size(), 2u);
  EXPECT_THROW((void)out[1].value(), RegisteredError);
}

TEST_P(PoolTest, ThrownIntComesBackAsTaskErrorNamedInt) {
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  try {
    pool.apply(throw_int, 1);
    FAIL() << "no exception";
  } catch (const multiproc::TaskError& e) {
    EXPECT_EQ(e.type_name(), "int");
    EXPECT_EQ(e.message(), "");
    EXPECT_TRUE(contains(pids, e.worker_pid())) << e.worker_pid();
  }
}

TEST_P(PoolTest, ErrorsDoNotKillWorkers) {
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  for (int i = 0; i < 20; ++i) EXPECT_THROW(pool.apply(throw_runtime_error, i), std::runtime_error);
  EXPECT_EQ(pool.worker_pids(), pids);
  EXPECT_EQ(pool.apply(square, 11), 121);
}

TEST(PoolErrors, EveryPoolErrorIsAMultiprocError) {
  multiproc::Pool pool{{.processes = 1}};
  try {
    pool.apply(throw_int, 0);
  } catch (const multiproc::Error& e) {
    EXPECT_NE(std::string(e.what()).find("int"), std::string::npos);
  }
  try {
    pool.apply(throw_runtime_error, 0);
  } catch (const multiproc::Error& e) {
    EXPECT_STREQ(e.what(), "runtime failure 0");
  }
}

}  // namespace
}  // namespace pooltest

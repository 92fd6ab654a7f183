// Streamed requests: a single task's request larger than a worker's request ring goes through the
// ring in pieces that the worker decodes as they arrive, and apply/invoke_all stream a large
// vector-of-numbers or string argument straight from the caller's memory (borrowed, not copied).
// Arguments arrive intact and in order on both sides of the borrowing threshold; apply_async copies;
// a worker that dies, fails to decode or stalls mid-stream fails exactly that call (WorkerCrashed,
// the decoding error, TaskTimeout, Cancelled) and the pool goes on; a borrowed argument over
// max_message_bytes fails at once; and the rings are left right for the calls that follow.
//
// Every test runs under fork, forkserver and spawn (the Methods/ parameter, as in
// start_method_test and pool_chaos_test).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "pool_test_common.hpp"

namespace multiproc {
// gtest prints parameters with this (in CTest's test names too).
static void PrintTo(StartMethod m, std::ostream* os) { *os << to_string(m); }
}  // namespace multiproc

namespace {

namespace mp = multiproc;
using mp::StartMethod;
using namespace std::chrono_literals;

constexpr std::size_t KiB = 1024;
constexpr std::size_t MiB = 1024 * KiB;

// The test process's pid, set only where the tests run (never in a spawned worker, which does not
// run the tests; a forked worker inherits it and has another pid). The types below that kill or
// stall their decoder refuse to do so in this process.
pid_t g_test_process = 0;

class Environment : public ::testing::Environment {
 public:
  void SetUp() override {
    g_test_process = ::getpid();
    pooltest::disable_core_dumps();
  }
};
const auto* const environment = ::testing::AddGlobalTestEnvironment(new Environment);

bool in_test_process() { return g_test_process != 0 && ::getpid() == g_test_process; }

// ---- data and checksums -----------------------------------------------------------------------

// A position-dependent FNV-style hash over 8-byte words: a byte changed, moved, lost or duplicated
// changes it.
std::uint64_t checksum_of(const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint64_t h = 0xcbf29ce484222325ULL;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ULL;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h ^ (static_cast<std::uint64_t>(n) * 0x9e3779b97f4a7c15ULL);
}

// xorshift64 bytes: no run repeats with a period a piece boundary could hide.
void fill_pattern(void* data, std::size_t n, std::uint64_t seed) {
  auto* p = static_cast<unsigned char*>(data);
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
  for (; i < n; ++i) p[i] = static_cast<unsigned char>(i * 131 + seed);
}

std::vector<char> pattern_chars(std::size_t n, std::uint64_t seed) {
  std::vector<char> v(n);
  fill_pattern(v.data(), n, seed);
  return v;
}

std::string pattern_string(std::size_t n, std::uint64_t seed) {
  std::string s(n, '\0');
  fill_pattern(s.data(), n, seed);
  return s;
}

std::vector<double> pattern_doubles(std::size_t count, std::uint64_t seed) {
  std::vector<double> v(count);
  for (std::size_t i = 0; i < count; ++i) v[i] = static_cast<double>(i) * 0.5 + static_cast<double>(seed % 1000) / 7.0;
  return v;
}

std::uint64_t sum(const std::vector<char>& v) { return checksum_of(v.data(), v.size()); }
std::uint64_t sum(const std::string& s) { return checksum_of(s.data(), s.size()); }
std::uint64_t sum(const std::vector<double>& v) { return checksum_of(v.data(), v.size() * sizeof(double)); }
std::uint64_t sum(const std::vector<std::byte>& v) { return checksum_of(v.data(), v.size()); }

// ---- tasks (plain functions) ---------------------------------------------------------------

std::uint64_t checksum_chars(const std::vector<char>& v) { return sum(v); }
std::uint64_t checksum_string(const std::string& s) { return sum(s); }
std::uint64_t checksum_std_bytes(const std::vector<std::byte>& v) { return sum(v); }
pid_t worker_pid(int) { return ::getpid(); }

using MixedSummary = std::tuple<int, std::uint64_t, std::size_t, std::string, std::uint64_t, std::size_t, std::uint64_t,
                                std::size_t, int>;

// What it was given, in the order it was given: each argument, or its size and checksum.
MixedSummary summarize_mixed(int a, const std::vector<char>& big, const std::string& small, const std::string& big_text,
                             const std::vector<double>& numbers, int b) {
  return {a, sum(big), big.size(), small, sum(big_text), big_text.size(), sum(numbers), numbers.size(), b};
}

std::size_t count_zero_bytes(const std::vector<char>& v) {
  std::size_t n = 0;
  for (char c : v) n += c == 0 ? 1 : 0;
  return n;
}

std::string head_and_tail(const std::vector<char>& v) {
  if (v.size() < 32) return std::string(v.begin(), v.end());
  return std::string(v.begin(), v.begin() + 16) + std::string(v.end() - 16, v.end());
}

// A result too large for a worker's result ring (it goes over the socket), after a short pause.
std::string large_result_after(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return pattern_string(8 * MiB, 77);
}

// ---- argument types whose decoding fails, kills or stalls its decoder -------------------------
//
// Each saves `first` and then `rest`; its load reads `first`, misbehaves, then (if still there)
// reads `rest`: with several MiB in `rest`, the parent is still streaming when it misbehaves. Only
// a worker ever loads them; in the test process they throw std::logic_error instead.

enum class Misdeed { kill, fail, stall };
constexpr const char* kRefusal = "ThrowWhileLoading refuses to be decoded";

template <Misdeed M>
struct MisbehaveWhileLoading {
  int first = 0;
  std::vector<char> rest;
  template <class Archive>
  void save(Archive& ar) const {
    ar(first, rest);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(first);
    if constexpr (M == Misdeed::fail) {
      throw std::runtime_error(std::string(kRefusal) + " (first = " + std::to_string(first) + ")");
    } else {
      if (in_test_process()) throw std::logic_error("a misbehaving argument was decoded in the test process");
      if constexpr (M == Misdeed::kill) {
        ::raise(SIGKILL);
      } else {
        std::this_thread::sleep_for(300s);  // far longer than any limit: only a kill ends it
      }
      ar(rest);
    }
  }
};
using KillWhileLoading = MisbehaveWhileLoading<Misdeed::kill>;
using ThrowWhileLoading = MisbehaveWhileLoading<Misdeed::fail>;
using StallWhileLoading = MisbehaveWhileLoading<Misdeed::stall>;

int first_of_killer(const KillWhileLoading& k) { return k.first; }
std::uint64_t killer_and_vector(const KillWhileLoading& k, const std::vector<char>& v) { return sum(v) + k.first; }
int first_of_thrower(const ThrowWhileLoading& t) { return t.first; }
std::uint64_t thrower_and_vector(const ThrowWhileLoading& t, const std::vector<char>& v) { return sum(v) + t.first; }
int first_of_staller(const StallWhileLoading& s) { return s.first; }
std::uint64_t staller_and_vector(const StallWhileLoading& s, const std::vector<char>& v) { return sum(v) + s.first; }

// ---- fixtures -----------------------------------------------------------------------------------

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Runs `call`, which must throw an E (passed to `check`), and not hang: it takes about `expected` on
// a quiet machine, and must return within pooltest::generous(expected).
template <class E, class Call, class Check>
void expect_throw_within(std::chrono::milliseconds expected, Call&& call, Check&& check) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    (void)call();
    ADD_FAILURE() << "no exception";
  } catch (const E& e) {
    check(e);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not the expected type: " << e.what();
  }
  EXPECT_LT(ms_since(t0), pooltest::generous(expected).count());
}
// The same for an E whose message must contain `text`.
template <class E, class Call>
void expect_throw_within(std::chrono::milliseconds expected, Call&& call, const char* text) {
  expect_throw_within<E>(expected, std::forward<Call>(call), [&](const E& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  });
}

// Ends the test process with a message if the test has not ended after `seconds`: the failures looked
// for here are hangs, which this reports sooner and more clearly than CTest's timeout. (Generous:
// the sanitizer builds on CI run several times slower.) An alarm, not a thread: a thread of the
// test's own would make fork() warn, and would be forked into the workers.
class HangGuard {
 public:
  explicit HangGuard(const std::string& what, unsigned seconds = 30) {
    const int n =
        std::snprintf(message_, sizeof message_, "HANG: %s did not finish within %u s\n", what.c_str(), seconds);
    length_ = n < 0 ? 0 : std::min(static_cast<std::size_t>(n), sizeof message_ - 1);
    struct sigaction on_alarm {};
    on_alarm.sa_handler = [](int) {
      const ssize_t n = ::write(STDERR_FILENO, message_, length_);
      (void)n;
      ::_exit(1);
    };
    ::sigemptyset(&on_alarm.sa_mask);
    ::sigaction(SIGALRM, &on_alarm, &old_);
    ::alarm(seconds);
  }
  HangGuard(const HangGuard&) = delete;
  HangGuard& operator=(const HangGuard&) = delete;
  ~HangGuard() {
    ::alarm(0);
    ::sigaction(SIGALRM, &old_, nullptr);
  }

 private:
  static inline char message_[256] = {};  // static: the handler reads them
  static inline std::size_t length_ = 0;
  struct sigaction old_ {};
};

class StreamTest : public ::testing::TestWithParam<StartMethod> {
 protected:
  [[nodiscard]] mp::PoolOptions options(int processes) const {
    mp::PoolOptions o;
    o.processes = processes;
    o.start_method = GetParam();
    return o;
  }
  [[nodiscard]] mp::Pool make_pool(int processes) const { return mp::Pool{options(processes)}; }
  HangGuard guard_{::testing::UnitTest::GetInstance()->current_test_info()->name()};
};

std::string method_name(const ::testing::TestParamInfo<StartMethod>& info) { return mp::to_string(info.param); }

#define POOLSTREAM_SUITE(name)       \
  class name : public StreamTest {}; \
  INSTANTIATE_TEST_SUITE_P(          \
      Methods, name, ::testing::Values(StartMethod::fork, StartMethod::forkserver, StartMethod::spawn), method_name)

POOLSTREAM_SUITE(PoolStreamApply);
POOLSTREAM_SUITE(PoolStreamAsync);
POOLSTREAM_SUITE(PoolStreamInvokeAll);
POOLSTREAM_SUITE(PoolStreamCrash);
POOLSTREAM_SUITE(PoolStreamDecodeError);
POOLSTREAM_SUITE(PoolStreamStall);
POOLSTREAM_SUITE(PoolStreamLimit);
POOLSTREAM_SUITE(PoolStreamSequence);
POOLSTREAM_SUITE(PoolStreamPipelining);

// The pool still runs small and streamed calls, on every worker.
void expect_pool_goes_on(mp::Pool& pool, std::uint64_t seed) {
  EXPECT_EQ(pool.apply(pooltest::square, 12), 144);
  const auto big = pattern_chars(3 * MiB + 5, seed);
  EXPECT_EQ(pool.apply(checksum_chars, big), sum(big));
  EXPECT_EQ(pool.apply_async(checksum_chars, big).get(), sum(big));
  EXPECT_TRUE(pooltest::eventually([&] {
    return pool.worker_pids().size() == static_cast<std::size_t>(pool.processes());
  })) << pool.worker_pids().size();
}

// ---- 1. apply: contents, order, the borrowing threshold --------------------------------------

TEST_P(PoolStreamApply, LargeVectorArrivesIntact) {
  auto pool = make_pool(2);
  const auto big = pattern_chars(8 * MiB, 1);
  EXPECT_EQ(pool.apply(checksum_chars, big), sum(big));
  // The caller's vector is read, never written.
  EXPECT_EQ(sum(big), sum(pattern_chars(8 * MiB, 1)));
  // Other borrowable element types and a string.
  std::vector<std::byte> bytes(5 * MiB + 3);
  fill_pattern(bytes.data(), bytes.size(), 2);
  EXPECT_EQ(pool.apply(checksum_std_bytes, bytes), sum(bytes));
  const auto text = pattern_string(6 * MiB + 1, 3);
  EXPECT_EQ(pool.apply(checksum_string, text), sum(text));
}

// apply borrows: the parent's peak memory does not grow by a copy of the argument. (apply_async,
// which copies at submission, does: the control that the measure sees a copy.) The peak is reset
// before each call (/proc/self/clear_refs), so earlier tests in this process do not hide it.
std::size_t peak_growth_bytes(const std::function<void()>& call) {
  auto resident = [](const char* field) {
    std::FILE* f = std::fopen("/proc/self/status", "r");
    std::size_t kib = 0;
    char line[256];
    while (f && std::fgets(line, sizeof line, f)) {
      if (std::strncmp(line, field, std::strlen(field)) == 0)
        kib = std::strtoull(line + std::strlen(field), nullptr, 10);
    }
    if (f) std::fclose(f);
    return kib * 1024;
  };
  std::FILE* clear = std::fopen("/proc/self/clear_refs", "w");
  if (!clear) return 0;
  std::fputs("5", clear);
  std::fclose(clear);
  const std::size_t before = resident("VmRSS:");
  call();
  return resident("VmHWM:") - std::min(before, resident("VmHWM:"));
}

TEST_P(PoolStreamApply, ApplyMakesNoCopyOfABorrowedArgumentApplyAsyncDoes) {
  auto pool = make_pool(1);
  EXPECT_EQ(pool.apply(pooltest::square, 2), 4);
  constexpr std::size_t size = 128 * MiB;
  const auto big = pattern_chars(size, 5);
  const auto async_growth =
      peak_growth_bytes([&] { EXPECT_EQ(pool.apply_async(checksum_chars, big).get(), sum(big)); });
  if (async_growth < size * 3 / 4)
    GTEST_SKIP() << "the peak resident size cannot be measured here (" << async_growth << ")";
  const auto apply_growth = peak_growth_bytes([&] { EXPECT_EQ(pool.apply(checksum_chars, big), sum(big)); });
  // Relative to the control, not an absolute figure: a sanitizer's allocator adds tens of MiB to
  // either call. A copy would make apply's growth about as large as apply_async's.
  EXPECT_LT(apply_growth + size / 2, async_growth) << "apply copied its argument (peak growth " << apply_growth / MiB
                                                   << " MiB, apply_async's " << async_growth / MiB << " MiB)";
}

TEST_P(PoolStreamApply, MixedArgumentsArriveIntactAndInOrder) {
  auto pool = make_pool(2);
  const auto big = pattern_chars(4 * MiB + 17, 10);
  const std::string small = "small string, copied into the request";
  const auto big_text = pattern_string(2 * MiB + 3, 11);
  const auto numbers = pattern_doubles(3 * MiB / sizeof(double), 12);
  const MixedSummary expected{-7,           sum(big),       big.size(), small, sum(big_text), big_text.size(),
                              sum(numbers), numbers.size(), 123456789};
  EXPECT_EQ(pool.apply(summarize_mixed, -7, big, small, big_text, numbers, 123456789), expected);
  // The same through apply_async (copied, not borrowed): the same bytes arrive.
  EXPECT_EQ(pool.apply_async(summarize_mixed, -7, big, small, big_text, numbers, 123456789).get(), expected);
}

TEST_P(PoolStreamApply, VectorsAtTheBorrowingThreshold) {
  auto pool = make_pool(1);
  // 1 MiB and more is borrowed; 1 MiB - 1 is copied, and its request (too large for the ring)
  // streamed from the copy. A small one for comparison.
  for (const std::size_t n : {MiB - 1, MiB, MiB + 1, 64 * KiB, MiB - 1, MiB}) {
    const auto v = pattern_chars(n, n);
    EXPECT_EQ(pool.apply(checksum_chars, v), sum(v)) << n << " bytes";
    const auto s = pattern_string(n, n + 1);
    EXPECT_EQ(pool.apply(checksum_string, s), sum(s)) << n << " bytes of string";
  }
  // Doubles of exactly 1 MiB, and one element fewer.
  for (const std::size_t count : {MiB / sizeof(double), MiB / sizeof(double) - 1}) {
    const auto d = pattern_doubles(count, 5);
    EXPECT_EQ(pool.apply(summarize_mixed, 1, std::vector<char>{}, std::string{}, std::string{}, d, 2),
              (MixedSummary{1, sum(std::vector<char>{}), 0, "", sum(std::string{}), 0, sum(d), d.size(), 2}))
        << count << " doubles";
  }
}

// ---- 2. apply_async copies at submission ---------------------------------------------------------

TEST_P(PoolStreamAsync, CallerOverwritingItsVectorAfterSubmitDoesNotChangeWhatTheWorkerSees) {
  auto pool = make_pool(1);
  // The only worker is busy first, so the request is sent after the caller has changed its data.
  auto busy = pool.apply_async(pooltest::sleep_ms_then_return, 200);
  auto v = pattern_chars(4 * MiB, 20);
  const auto expected = sum(v);
  auto r = pool.apply_async(checksum_chars, v);
  std::fill(v.begin(), v.end(), 'x');
  v[12345] = 'y';
  {
    auto gone = pattern_chars(4 * MiB + 1, 21);
    const auto expected_gone = sum(gone);
    auto r2 = pool.apply_async(checksum_chars, gone);
    gone = std::vector<char>();  // freed (AddressSanitizer reports any read of it)
    EXPECT_EQ(r2.get(), expected_gone);
  }
  EXPECT_EQ(r.get(), expected);
  EXPECT_EQ(busy.get(), 200);
  EXPECT_EQ(pool.apply(checksum_chars, v), sum(v));  // and now the overwritten contents
}

// ---- 3. invoke_all ----------------------------------------------------------------------------------

TEST_P(PoolStreamInvokeAll, ThreeFunctionsOnOneLargeInput) {
  const auto input = [] {
    auto v = pattern_chars(6 * MiB, 30);
    for (std::size_t i = 0; i < v.size(); i += 4099) v[i] = 0;  // a known number of zero bytes at least
    return v;
  }();
  const auto expected = std::make_tuple(sum(input), count_zero_bytes(input), head_and_tail(input));
  for (int workers : {3, 1}) {
    auto pool = make_pool(workers);
    EXPECT_EQ(pool.invoke_all(input, checksum_chars, count_zero_bytes, head_and_tail), expected)
        << workers << " workers";
  }
}

// ---- 4. a worker that dies while its request streams -------------------------------------------------

void expect_killed(const mp::WorkerCrashed& e, const std::vector<pid_t>& pids) {
  EXPECT_EQ(e.status(), mp::ExitStatus::killed_by(SIGKILL)) << e.what();
  EXPECT_EQ(e.task_index(), 0u);
  EXPECT_TRUE(pooltest::contains(pids, e.worker_pid())) << e.worker_pid();
}

TEST_P(PoolStreamCrash, WorkerDyingWhileDecodingAStreamedRequestFailsThatCall) {
  auto pool = make_pool(1);
  const auto pids = pool.worker_pids();
  KillWhileLoading killer{7, pattern_chars(6 * MiB, 40)};  // copied into the request: streamed from the copy
  expect_throw_within<mp::WorkerCrashed>(
      500ms, [&] { return pool.apply(first_of_killer, killer); },
      [&](const mp::WorkerCrashed& e) { expect_killed(e, pids); });
  EXPECT_EQ(pool.apply(pooltest::square, 3), 9);
  expect_pool_goes_on(pool, 41);
}

TEST_P(PoolStreamCrash, WorkerDyingBeforeItsBorrowedArgumentIsConsumedFailsThatCall) {
  auto pool = make_pool(1);
  const auto pids = pool.worker_pids();
  const auto big = pattern_chars(64 * MiB, 42);  // borrowed: streamed from here
  const auto expected = sum(big);
  expect_throw_within<mp::WorkerCrashed>(
      500ms,
      [&] {
        return pool.apply(killer_and_vector, KillWhileLoading{3, {}}, big);
      },
      [&](const mp::WorkerCrashed& e) { expect_killed(e, pids); });
  EXPECT_EQ(sum(big), expected);  // untouched
  EXPECT_EQ(pool.apply(pooltest::square, 4), 16);
  expect_pool_goes_on(pool, 43);
}

TEST_P(PoolStreamCrash, ApplyAsyncWorkerDyingMidStreamFailsOnlyThatResult) {
  auto pool = make_pool(2);
  const auto before_big = pattern_chars(2 * MiB, 44);
  auto before = pool.apply_async(checksum_chars, before_big);
  auto crashed = pool.apply_async(first_of_killer, KillWhileLoading{9, pattern_chars(4 * MiB, 45)});
  auto after = pool.apply_async(checksum_chars, before_big);
  EXPECT_THROW((void)crashed.get(), mp::WorkerCrashed);
  EXPECT_EQ(before.get(), sum(before_big));
  EXPECT_EQ(after.get(), sum(before_big));
  expect_pool_goes_on(pool, 46);
}

// ---- 5. decoding fails mid-stream: the worker drains the rest, answers and stays ------------------

void expect_refusal(const std::exception& e) {
  EXPECT_NE(std::string(e.what()).find(kRefusal), std::string::npos) << e.what();
}

TEST_P(PoolStreamDecodeError, FailureInAStreamedCopyIsReportedAndTheWorkerStays) {
  auto pool = make_pool(1);
  const auto pids = pool.worker_pids();
  ASSERT_EQ(pids.size(), 1u);
  try {
    (void)pool.apply(first_of_thrower, ThrowWhileLoading{5, pattern_chars(6 * MiB, 50)});
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    expect_refusal(e);
    const auto* info = mp::remote_info(e);
    ASSERT_NE(info, nullptr) << "not an error from the worker: " << e.what();
    EXPECT_EQ(info->worker_pid(), pids[0]);
  }
  EXPECT_EQ(pool.worker_pids(), pids) << "the worker did not survive a failed decode";
  const auto big = pattern_chars(5 * MiB, 51);
  EXPECT_EQ(pool.apply(checksum_chars, big), sum(big));
  EXPECT_EQ(pool.apply(worker_pid, 0), pids[0]);
  EXPECT_EQ(pool.worker_pids(), pids);
}

TEST_P(PoolStreamDecodeError, FailureBeforeABorrowedArgumentIsReportedAndTheWorkerStays) {
  auto pool = make_pool(1);
  const auto pids = pool.worker_pids();
  ASSERT_EQ(pids.size(), 1u);
  const auto big = pattern_chars(8 * MiB, 52);
  for (int round = 0; round < 2; ++round) {
    try {
      (void)pool.apply(thrower_and_vector, ThrowWhileLoading{round, {}}, big);
      ADD_FAILURE() << "no exception";
    } catch (const std::runtime_error& e) {
      expect_refusal(e);
    }
    // The same worker reads the next request from the right place: the end of the drained one.
    EXPECT_EQ(pool.apply(checksum_chars, big), sum(big));
    EXPECT_EQ(pool.apply_async(checksum_chars, big).get(), sum(big));
    EXPECT_EQ(pool.apply(pooltest::square, 5), 25);
  }
  EXPECT_EQ(pool.worker_pids(), pids) << "the worker did not survive a failed decode";
}

// ---- 6. a time limit, a cancel, a terminate while the stream waits for room ------------------

// Waits until the pool's worker stalls in a StallWhileLoading's load (asleep mid-decode).
bool worker_stalls(mp::Pool& pool) {
  return pooltest::eventually([&] {
    const auto pids = pool.worker_pids();
    return pids.size() == 1 && test_support::is_in_sleep_call(pids[0]);
  });
}

TEST_P(PoolStreamStall, TimeLimitFiresWhileTheParentWaitsForRingRoom) {
  auto pool = make_pool(1);
  expect_throw_within<mp::TaskTimeout>(
      500ms,
      [&] {
        return pool.apply({.timeout = 300ms}, first_of_staller, StallWhileLoading{1, pattern_chars(4 * MiB, 60)});
      },
      "timeout of 300 ms");
  expect_pool_goes_on(pool, 61);
}

TEST_P(PoolStreamStall, TimeLimitFiresWhileABorrowedArgumentWaitsForRingRoom) {
  auto pool = make_pool(1);
  const auto big = pattern_chars(8 * MiB, 62);
  expect_throw_within<mp::TaskTimeout>(
      500ms,
      [&] {
        return pool.apply({.timeout = 300ms}, staller_and_vector, StallWhileLoading{2, {}}, big);
      },
      "timeout of 300 ms");
  expect_pool_goes_on(pool, 63);
}

TEST_P(PoolStreamStall, PoolTaskTimeoutFiresToo) {
  auto o = options(1);
  o.task_timeout = 300ms;
  mp::Pool pool{o};
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW((void)pool.apply(first_of_staller, StallWhileLoading{3, pattern_chars(4 * MiB, 64)}), mp::TaskTimeout);
  EXPECT_LT(ms_since(t0), pooltest::generous(500ms).count());
  expect_pool_goes_on(pool, 65);
}

TEST_P(PoolStreamStall, CancelWhileTheStreamWaitsForRingRoom) {
  auto pool = make_pool(1);
  auto r = pool.apply_async(first_of_staller, StallWhileLoading{4, pattern_chars(4 * MiB, 66)});
  ASSERT_TRUE(worker_stalls(pool));  // the parent then fills the ring and waits for room
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(r.cancel());
  EXPECT_THROW((void)r.get(), mp::Cancelled);
  EXPECT_EQ(pool.apply(pooltest::square, 6), 36);
  EXPECT_LT(ms_since(t0), pooltest::generous(500ms).count());
  expect_pool_goes_on(pool, 67);
}

TEST_P(PoolStreamStall, DestroyingThePoolDuringAStalledStreamDoesNotWait) {
  std::optional<mp::AsyncResult<int>> r;
  const auto big = pattern_chars(4 * MiB, 68);
  std::chrono::steady_clock::time_point t0;
  {
    auto pool = make_pool(1);
    r.emplace(pool.apply_async(first_of_staller, StallWhileLoading{5, big}));
    ASSERT_TRUE(worker_stalls(pool));
    t0 = std::chrono::steady_clock::now();
  }
  EXPECT_LT(ms_since(t0), pooltest::generous(500ms).count());
  EXPECT_THROW((void)r->get(), mp::Cancelled);
  EXPECT_TRUE(pooltest::eventually([] { return test_support::has_no_children(); }));
}

// ---- 7. a borrowed argument over max_message_bytes ------------------------------------------------

TEST_P(PoolStreamLimit, BorrowedArgumentOverMaxMessageBytesFailsAtOnce) {
  auto o = options(1);
  o.max_message_bytes = 2 * MiB;
  mp::Pool pool{o};
  const auto big = pattern_chars(3 * MiB, 70);
  expect_throw_within<mp::ProtocolError>(
      100ms, [&] { return pool.apply(checksum_chars, big); }, "exceeds max_message_bytes");
  // The same through apply_async (copied) and invoke_all (borrowed).
  EXPECT_THROW((void)pool.apply_async(checksum_chars, big).get(), mp::ProtocolError);
  EXPECT_THROW((void)pool.invoke_all(big, checksum_chars, count_zero_bytes), mp::ProtocolError);
  // The pool goes on, with borrowed and copied arguments under the limit.
  const auto fits = pattern_chars(MiB + MiB / 2, 71);
  EXPECT_EQ(pool.apply(checksum_chars, fits), sum(fits));
  EXPECT_EQ(pool.apply_async(checksum_chars, fits).get(), sum(fits));
  EXPECT_EQ(pool.apply(pooltest::square, 7), 49);
}

// ---- 8. many streams in a row ------------------------------------------------------------------------

TEST_P(PoolStreamSequence, TwentyLargeCallsAlternatingApplyAndApplyAsync) {
  auto pool = make_pool(2);
  std::vector<std::pair<mp::AsyncResult<std::uint64_t>, std::uint64_t>> pending;
  for (int i = 0; i < 20; ++i) {
    // Sizes not a multiple of anything, so that each stream ends at another place in the ring.
    const auto v = pattern_chars(2 * MiB + static_cast<std::size_t>(i) * 4099, 80 + static_cast<std::uint64_t>(i));
    if (i % 2 == 0) {
      EXPECT_EQ(pool.apply(checksum_chars, v), sum(v)) << "call " << i;
    } else {
      pending.emplace_back(pool.apply_async(checksum_chars, v), sum(v));
    }
    if (i % 5 == 4) {
      EXPECT_EQ(pool.apply(pooltest::square, i), i * i);  // a frame that fits the ring
    }
  }
  for (std::size_t k = 0; k < pending.size(); ++k) {
    EXPECT_EQ(pending[k].first.get(), pending[k].second) << "async " << k;
  }
  EXPECT_EQ(pool.map(pooltest::square, pooltest::iota_vector(200), 3), pooltest::squares(200));
}

// ---- a borrowed argument must not be streamed to a worker busy with something else --------------
//
// A frame too large for the ring goes only to a worker with nothing else to do, which is reading
// (pool.cpp, "Pipelining without deadlock"). A borrowed request is small in bytes copied, but its
// stream is as large as its argument.

TEST_P(PoolStreamPipelining, BorrowedArgumentBehindATaskWithALargeResult) {
  auto pool = make_pool(1);
  for (int i = 0; i < 20; ++i) ASSERT_EQ(pool.apply(pooltest::square, i), i * i);  // a quick worker
  auto large = pool.apply_async(large_result_after, 50);
  const auto big = pattern_chars(4 * MiB, 90);
  EXPECT_EQ(pool.apply(checksum_chars, big), sum(big));
  EXPECT_EQ(large.get(), pattern_string(8 * MiB, 77));
}

TEST_P(PoolStreamPipelining, BorrowedArgumentDoesNotHoldUpOtherWorkersResults) {
  auto pool = make_pool(2);
  for (int i = 0; i < 40; ++i) ASSERT_EQ(pool.apply(pooltest::square, i), i * i);  // quick workers
  auto slow = pool.apply_async(pooltest::sleep_ms_then_return, 60'000);
  auto quick = pool.apply_async(pooltest::sleep_ms_then_return, 100);
  const auto big = pattern_chars(4 * MiB, 91);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(pool.apply(checksum_chars, big), sum(big));
  // The free worker could run it after 100 ms; the worker sleeping for a minute could not.
  EXPECT_LT(ms_since(t0), pooltest::generous(200ms).count())
      << "the borrowed call waited for the worker running the long task";
  EXPECT_TRUE(quick.ready());
  EXPECT_EQ(quick.get(), 100);
  EXPECT_TRUE(slow.cancel());  // not waited for
  EXPECT_EQ(pool.apply(pooltest::square, 8), 64);
}

}  // namespace

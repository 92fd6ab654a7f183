// multiproc::mpi: the Pool API over MPI ranks. Run under mpirun with 3 or more ranks (tests/mpi.cmake):
// rank 0 runs the tests, the other ranks serve the tasks.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "multiproc/mpi.hpp"

namespace {

int square(int x) { return x * x; }
int add(int a, int b) { return a + b; }
long sum_vector(const std::vector<int>& v) {
  long s = 0;
  for (int x : v) s += x;
  return s;
}
std::size_t size_of(const std::vector<int>& v) { return v.size(); }
int fails(int x) {
  if (x == 3) throw std::runtime_error("three is not allowed");
  return x;
}
// The rank and pid that ran the task, after sleeping `ms`.
std::pair<int, int> where(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return {multiproc::mpi::rank(), static_cast<int>(getpid())};
}
// A task that runs a local pool of its own on its worker rank.
long local_sum_of_squares(int n) {
  multiproc::Pool local{{.processes = 2}};
  std::vector<int> xs;
  for (int i = 0; i < n; ++i) xs.push_back(i);
  long s = 0;
  for (int y : local.map(square, xs)) s += y;
  return s;
}

// The same under forkserver: the server is an exec of this program, which must stop in
// multiproc::mpi::init() (through multiproc::init()) before it reaches MPI.
long forkserver_sum_of_squares(int n) {
  multiproc::Pool local{{.processes = 2, .start_method = multiproc::StartMethod::forkserver}};
  std::vector<int> xs;
  for (int i = 0; i < n; ++i) xs.push_back(i);
  long s = 0;
  for (int y : local.map(square, xs)) s += y;
  return s;
}

std::vector<int> iota(int n) {
  std::vector<int> v;
  for (int i = 0; i < n; ++i) v.push_back(i);
  return v;
}

// The tests below need worker ranks; mpi.pool.single_rank runs this one alone with 1 rank.
TEST(MpiSingleRank, MakePoolSaysThereAreNoWorkerRanks) {
  if (multiproc::mpi::size() != 1) GTEST_SKIP() << "needs an MPI job of 1 rank";
  try {
    (void)multiproc::mpi::make_pool();
    FAIL() << "expected StateError";
  } catch (const multiproc::StateError& e) {
    EXPECT_NE(std::string(e.what()).find("no worker ranks"), std::string::npos) << e.what();
  }
}

TEST(MpiPool, RunsOnRankZeroWithWorkerRanks) {
  EXPECT_EQ(multiproc::mpi::rank(), 0);
  EXPECT_GE(multiproc::mpi::size(), 2);
  EXPECT_TRUE(multiproc::mpi::initialized());
  auto pool = multiproc::mpi::make_pool();
  EXPECT_EQ(pool.processes(), multiproc::mpi::size() - 1);
  EXPECT_EQ(pool.worker_pids().size(), static_cast<std::size_t>(multiproc::mpi::size() - 1));
}

TEST(MpiPool, Map) {
  auto pool = multiproc::mpi::make_pool();
  const auto xs = iota(1000);
  const auto ys = pool.map(square, xs);
  ASSERT_EQ(ys.size(), xs.size());
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(ys[static_cast<std::size_t>(i)], i * i);
  // chunksize 1 and an explicit larger one
  EXPECT_EQ(pool.map(square, iota(50), 1), pool.map(square, iota(50), 7));
  EXPECT_TRUE(pool.map(square, std::vector<int>{}).empty());
}

TEST(MpiPool, Imap) {
  auto pool = multiproc::mpi::make_pool();
  std::vector<int> got;
  for (int y : pool.imap(square, iota(300), 4)) got.push_back(y);
  ASSERT_EQ(got.size(), 300U);
  for (int i = 0; i < 300; ++i) EXPECT_EQ(got[static_cast<std::size_t>(i)], i * i);
}

TEST(MpiPool, ImapUnordered) {
  auto pool = multiproc::mpi::make_pool();
  std::multiset<int> got;
  for (int y : pool.imap_unordered(square, iota(300), 3)) got.insert(y);
  std::multiset<int> want;
  for (int i = 0; i < 300; ++i) want.insert(i * i);
  EXPECT_EQ(got, want);
}

TEST(MpiPool, Starmap) {
  auto pool = multiproc::mpi::make_pool();
  std::vector<std::tuple<int, int>> args;
  for (int i = 0; i < 100; ++i) args.emplace_back(i, 2 * i);
  const auto ys = pool.starmap(add, args);
  ASSERT_EQ(ys.size(), 100U);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(ys[static_cast<std::size_t>(i)], 3 * i);
}

TEST(MpiPool, ApplyAndApplyAsync) {
  auto pool = multiproc::mpi::make_pool();
  EXPECT_EQ(pool.apply(add, 2, 40), 42);
  EXPECT_EQ(pool.apply([](const std::string& s) { return s + "!"; }, std::string("hi")), "hi!");
  std::vector<multiproc::AsyncResult<int>> rs;
  for (int i = 0; i < 20; ++i) rs.push_back(pool.apply_async(square, i));
  for (int i = 0; i < 20; ++i) EXPECT_EQ(rs[static_cast<std::size_t>(i)].get(), i * i);
}

TEST(MpiPool, MapAsync) {
  auto pool = multiproc::mpi::make_pool();
  auto r = pool.map_async(square, iota(100));
  const auto& ys = r.get();
  ASSERT_EQ(ys.size(), 100U);
  EXPECT_EQ(ys[99], 99 * 99);
  EXPECT_TRUE(r.successful());
}

TEST(MpiPool, InvokeAll) {
  auto pool = multiproc::mpi::make_pool();
  const auto [sum, n] = pool.invoke_all(iota(101), sum_vector, size_of);
  EXPECT_EQ(sum, 5050);
  EXPECT_EQ(n, 101U);
}

TEST(MpiPool, TaskExceptionComesBackTyped) {
  auto pool = multiproc::mpi::make_pool();
  try {
    (void)pool.apply(fails, 3);
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "three is not allowed");
    const auto* info = multiproc::remote_info(e);
    ASSERT_NE(info, nullptr);
    EXPECT_NE(info->type_name().find("runtime_error"), std::string::npos) << info->type_name();
    EXPECT_NE(info->worker_pid(), getpid());
  }
  // In a map: the first failure is thrown; map_outcomes has every element's outcome.
  EXPECT_THROW((void)pool.map(fails, iota(10)), std::runtime_error);
  const auto outs = pool.map_outcomes(fails, iota(10));
  ASSERT_EQ(outs.size(), 10U);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(outs[static_cast<std::size_t>(i)].has_value(), i != 3) << i;
  // the pool still works
  EXPECT_EQ(pool.apply(square, 5), 25);
}

TEST(MpiPool, TwoPoolsInARowAndAtOnce) {
  {
    auto a = multiproc::mpi::make_pool();
    EXPECT_EQ(a.map(square, iota(10)).back(), 81);
    a.close();
    a.join();
  }
  {
    auto b = multiproc::mpi::make_pool({.in_flight_per_rank = 1});
    EXPECT_EQ(b.map(square, iota(10)).back(), 81);
  }
  auto c = multiproc::mpi::make_pool();
  auto d = multiproc::mpi::make_pool();
  auto rc = c.map_async(square, iota(200));
  EXPECT_TRUE(d.map(square, std::vector<int>{}).empty());
  EXPECT_EQ(d.apply(add, 1, 2), 3);
  EXPECT_EQ(rc.get().back(), 199 * 199);
}

TEST(MpiPool, LoadBalancesOverRanks) {
  auto pool = multiproc::mpi::make_pool();
  std::vector<int> sleeps;
  for (int i = 0; i < 24; ++i) sleeps.push_back(i % 3 == 0 ? 30 : 5);
  const auto where_ran = pool.map(where, sleeps, 1);
  std::set<int> ranks;
  std::set<int> pids;
  for (const auto& [r, pid] : where_ran) {
    EXPECT_GE(r, 1);
    ranks.insert(r);
    pids.insert(pid);
  }
  EXPECT_GT(ranks.size(), 1U);
  EXPECT_EQ(ranks.size(), pids.size());
  EXPECT_EQ(static_cast<int>(ranks.size()), multiproc::mpi::size() - 1);
}

TEST(MpiPool, HybridLocalPoolInsideATask) {
  auto pool = multiproc::mpi::make_pool();
  const auto sums = pool.map(local_sum_of_squares, std::vector<int>{10, 20, 30, 40}, 1);
  const std::vector<long> want{285, 2470, 8555, 20540};
  EXPECT_EQ(sums, want);
}

TEST(MpiPool, HybridForkserverPoolInsideATask) {
  auto pool = multiproc::mpi::make_pool();
  const auto sums = pool.map(forkserver_sum_of_squares, std::vector<int>{10, 20}, 1);
  const std::vector<long> want{285, 2470};
  EXPECT_EQ(sums, want);
}

TEST(MpiPool, CloseJoinTerminate) {
  auto pool = multiproc::mpi::make_pool();
  EXPECT_THROW(pool.join(), multiproc::StateError);
  auto r = pool.map_async(where, std::vector<int>(8, 20), 1);
  pool.terminate();
  EXPECT_TRUE(r.ready());
  EXPECT_THROW((void)pool.apply(square, 1), multiproc::PoolClosed);
  // a fresh pool still runs (the terminated tasks finish on their ranks and are discarded)
  auto again = multiproc::mpi::make_pool();
  EXPECT_EQ(again.apply(square, 9), 81);
}

TEST(MpiPool, CancelDropsQueuedWork) {
  auto pool = multiproc::mpi::make_pool({.in_flight_per_rank = 1});
  auto r = pool.map_async(where, std::vector<int>(40, 20), 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_TRUE(r.cancel());
  EXPECT_THROW((void)r.get(), multiproc::Cancelled);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(pool.apply(square, 4), 16);  // behind at most one running task per rank
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(500));
}

TEST(MpiPool, MakePoolErrors) {
  EXPECT_THROW((void)multiproc::mpi::make_pool({.in_flight_per_rank = 0}), multiproc::InvalidArgument);
}

}  // namespace

int main(int argc, char** argv) {
  // Worker ranks fork local pools while Open MPI's own threads run: say that fork is intended.
  multiproc::set_start_method(multiproc::StartMethod::fork);
  multiproc::mpi::init(argc, argv);  // worker ranks serve here until rank 0 exits
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}

// Pool life cycle: close/join/terminate, the destructor, wrong arguments, and what is left behind
// (no processes, no descriptors).
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pool_test_common.hpp"
#include "test_support.hpp"

namespace pooltest {
namespace {

using test_support::count_open_fds;
using test_support::has_no_children;

int segfault_at_3(int x) {
  if (x == 3) segfault_now();
  return x * x;
}

// True when no process with this pid exists any more (reaped: kill reports ESRCH).
bool process_gone(pid_t pid) {
  errno = 0;
  return ::kill(pid, 0) == -1 && errno == ESRCH;
}

template <class T>
void expect_cancelled(multiproc::AsyncResult<T>& r) {
  EXPECT_TRUE(r.ready());
  try {
    (void)r.get();
    ADD_FAILURE() << "no exception";
  } catch (const multiproc::Cancelled& e) {
    EXPECT_NE(std::string(e.what()).find("terminated"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not Cancelled: " << e.what();
  }
  EXPECT_FALSE(r.successful());
}

class Environment : public ::testing::Environment {
 public:
  void SetUp() override { disable_core_dumps(); }
};
const auto* const environment = ::testing::AddGlobalTestEnvironment(new Environment);

class PoolLifecycleTest : public WorkersTest {};
INSTANTIATE_TEST_SUITE_P(Workers, PoolLifecycleTest, ::testing::Values(1, 2, 4), workers_name);

// ---- wrong arguments -----------------------------------------------------------------------------

TEST(PoolArguments, ZeroProcessesThrowsInvalidArgument) {
  try {
    multiproc::Pool pool{{.processes = 0}};
    FAIL() << "no exception";
  } catch (const multiproc::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("processes"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(has_no_children());
}

TEST(PoolArguments, NegativeProcessesThrowsInvalidArgument) {
  EXPECT_THROW(multiproc::Pool({.processes = -1}), multiproc::InvalidArgument);
  // One family: also a std::invalid_argument and a multiproc::Error.
  EXPECT_THROW(multiproc::Pool({.processes = -1}), std::invalid_argument);
  EXPECT_THROW(multiproc::Pool({.processes = -5}), multiproc::Error);
  EXPECT_TRUE(has_no_children());
}

TEST(PoolArguments, TinyMaxMessageBytesThrowsInvalidArgument) {
  EXPECT_THROW(multiproc::Pool({.processes = 1, .max_message_bytes = 10}), multiproc::InvalidArgument);
}

TEST(PoolArguments, RequestOverMaxMessageBytesFailsThatCallOnly) {
  multiproc::Pool pool{{.processes = 1, .max_message_bytes = 1024}};
  const std::string big(4096, 'x');
  EXPECT_THROW((void)pool.apply([](std::string s) { return s.size(); }, big), multiproc::ProtocolError);
  EXPECT_EQ(pool.apply([](std::string s) { return s.size(); }, std::string(100, 'y')), 100u);
}

// An item whose encoding throws, far into a map: map() throws that error, the chunks already handed
// to the workers are cancelled (their results go nowhere), and the pool goes on.
struct Poisoned {
  int v = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    if (v < 0) throw std::runtime_error("cannot encode a poisoned item");
    ar(v);
  }
};
int unpoison(Poisoned p) { return p.v; }

TEST(PoolArguments, EncodingFailureLateInAMapThrowsAndThePoolGoesOn) {
  multiproc::Pool pool{{.processes = 2}};
  std::vector<Poisoned> items(50000);
  for (int i = 0; i < 50000; ++i) items[static_cast<std::size_t>(i)].v = i;
  items.back().v = -1;
  try {
    (void)pool.map(unpoison, items, 100);
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("poisoned"), std::string::npos) << e.what();
  }
  items.back().v = 7;
  const auto out = pool.map(unpoison, items, 100);
  ASSERT_EQ(out.size(), items.size());
  EXPECT_EQ(out[1234], 1234);
  EXPECT_EQ(out.back(), 7);
}

TEST(PoolArguments, ResultOverMaxMessageBytesFailsWithProtocolError) {
  // PoolOptions::max_message_bytes: "larger fails that call with ProtocolError".
  multiproc::Pool pool{{.processes = 1, .max_message_bytes = 1024}};
  try {
    (void)pool.apply([](int n) { return std::string(static_cast<std::size_t>(n), 'r'); }, 4096);
    FAIL() << "no exception";
  } catch (const multiproc::ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("1024"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not ProtocolError: " << multiproc::detail::demangle(typeid(e).name()) << ": " << e.what();
  }
  EXPECT_EQ(pool.apply([](int n) { return std::string(static_cast<std::size_t>(n), 'r'); }, 10), "rrrrrrrrrr");
}

// ---- close, join, terminate -----------------------------------------------------------------------

TEST_P(PoolLifecycleTest, EveryCallAfterCloseThrowsPoolClosed) {
  auto pool = make_pool();
  pool.close();
  EXPECT_THROW(pool.apply(square, 1), multiproc::PoolClosed);
  EXPECT_THROW((void)pool.apply_async(square, 1), multiproc::PoolClosed);
  EXPECT_THROW((void)pool.map(square, iota_vector(3)), multiproc::PoolClosed);
  EXPECT_THROW((void)pool.map_async(square, iota_vector(3)), multiproc::PoolClosed);
  EXPECT_THROW((void)pool.map_outcomes(square, iota_vector(3)), multiproc::PoolClosed);
  EXPECT_THROW((void)pool.starmap(add, std::vector<std::pair<int, int>>{{1, 2}}), multiproc::PoolClosed);
  EXPECT_THROW((void)pool.invoke_all(5, square, square), multiproc::PoolClosed);
#if POOLTEST_HAVE_VIEWS
  auto range = pool.imap(square, iota_vector(3));
  EXPECT_THROW((void)range.begin(), multiproc::PoolClosed);
#endif
  // PoolClosed is a StateError and a multiproc::Error.
  EXPECT_THROW(pool.apply(square, 1), multiproc::StateError);
  EXPECT_THROW(pool.apply(square, 1), multiproc::Error);
  pool.join();
  EXPECT_TRUE(has_no_children());
}

TEST_P(PoolLifecycleTest, ApplyAfterTerminateThrowsPoolClosed) {
  auto pool = make_pool();
  pool.terminate();
  EXPECT_THROW(pool.apply(square, 1), multiproc::PoolClosed);
  pool.join();  // allowed after terminate
  EXPECT_TRUE(has_no_children());
}

TEST_P(PoolLifecycleTest, JoinWithoutCloseThrowsStateError) {
  auto pool = make_pool();
  try {
    pool.join();
    FAIL() << "no exception";
  } catch (const multiproc::PoolClosed& e) {
    FAIL() << "PoolClosed instead of a plain StateError: " << e.what();
  } catch (const multiproc::StateError& e) {
    EXPECT_NE(std::string(e.what()).find("close"), std::string::npos) << e.what();
  }
  // The pool is unharmed.
  EXPECT_EQ(pool.apply(square, 6), 36);
}

TEST_P(PoolLifecycleTest, CloseThenJoinWaitsForQueuedWork) {
  auto pool = make_pool();
  std::vector<multiproc::AsyncResult<int>> rs;
  // Twice as many sleeping tasks as workers: half of them are still queued at close().
  for (int i = 0; i < 2 * workers(); ++i) rs.push_back(pool.apply_async(sleep_ms_then_return, 150 + i));
  auto m = pool.map_async(square, iota_vector(100), 3);
  const auto t0 = std::chrono::steady_clock::now();
  pool.close();
  pool.join();
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 250ms);
  for (int i = 0; i < 2 * workers(); ++i) {
    auto& r = rs[static_cast<std::size_t>(i)];
    EXPECT_TRUE(r.ready()) << i;
    EXPECT_TRUE(r.successful()) << i;
    EXPECT_EQ(r.get(), 150 + i);
  }
  EXPECT_TRUE(m.ready());
  EXPECT_EQ(m.get(), squares(100));
  EXPECT_TRUE(pool.worker_pids().empty());
  EXPECT_TRUE(has_no_children());
}

TEST_P(PoolLifecycleTest, CloseWithCrashesStillFinishesTheQueue) {
  auto pool = make_pool();
  auto r = pool.map_async(segfault_at_3, iota_vector(20), 1);
  pool.close();
  pool.join();
  ASSERT_TRUE(r.ready());
  try {
    (void)r.get();
    FAIL() << "no exception";
  } catch (const multiproc::WorkerCrashed& e) {
    EXPECT_EQ(e.status().signal(), SIGSEGV) << e.what();
    EXPECT_EQ(e.task_index(), 3u);
  }
  EXPECT_TRUE(has_no_children());
}

TEST_P(PoolLifecycleTest, JoinTwiceReturns) {
  auto pool = make_pool();
  EXPECT_EQ(pool.apply(square, 2), 4);
  pool.close();
  pool.join();
  pool.join();
  pool.close();  // closing a closed pool does nothing
  EXPECT_TRUE(has_no_children());
}

TEST_P(PoolLifecycleTest, TerminateCancelsOutstandingTasks) {
  const std::string path = temp_file();
  auto pool = make_pool();
  const auto pids = pool.worker_pids();
  std::vector<multiproc::AsyncResult<int>> running;
  for (int i = 0; i < workers(); ++i) running.push_back(pool.apply_async(append_line_then_sleep, path, 30000));
  auto queued = pool.apply_async(sleep_ms_then_return, 30000);  // no free worker for this one
  auto map = pool.map_async(sleep_ms_then_return, std::vector<int>(10, 30000));
  ASSERT_TRUE(eventually([&] { return lines_in(path) == static_cast<std::size_t>(workers()); }))
      << "the first tasks never started";
  ::unlink(path.c_str());
  const auto t0 = std::chrono::steady_clock::now();
  pool.terminate();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, generous(200ms));
  for (auto& r : running) expect_cancelled(r);
  expect_cancelled(queued);
  expect_cancelled(map);
  for (pid_t p : pids) EXPECT_TRUE(process_gone(p)) << "worker " << p;
  EXPECT_TRUE(pool.worker_pids().empty());
  EXPECT_TRUE(has_no_children());
  pool.join();
}

TEST_P(PoolLifecycleTest, DestructorWithLongTaskReturnsQuicklyAndLeavesNoWorker) {
  std::vector<pid_t> pids;
  std::optional<multiproc::AsyncResult<int>> r;
  std::chrono::steady_clock::duration destroy_time{};
  {
    auto pool = make_pool();
    pids = pool.worker_pids();
    ASSERT_EQ(pids.size(), static_cast<std::size_t>(workers()));
    const std::string path = temp_file();
    r.emplace(pool.apply_async(append_line_then_sleep, path, 30000));
    ASSERT_TRUE(eventually([&] { return lines_in(path) == 1; })) << "the task never started";
    ::unlink(path.c_str());
    const auto t0 = std::chrono::steady_clock::now();
    {
      multiproc::Pool gone = std::move(pool);  // destroyed at the end of this block
    }
    destroy_time = std::chrono::steady_clock::now() - t0;
  }
  EXPECT_LT(destroy_time, generous(200ms)) << "the destructor waited for the task";
  for (pid_t p : pids) EXPECT_TRUE(process_gone(p)) << "worker " << p << " is still there";
  EXPECT_TRUE(has_no_children());
  // The AsyncResult outlives its pool.
  expect_cancelled(*r);
}

TEST_P(PoolLifecycleTest, DestructorWithoutWorkIsQuick) {
  const auto t0 = std::chrono::steady_clock::now();
  { auto pool = make_pool(); }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, generous(200ms));
  EXPECT_TRUE(has_no_children());
}

// ---- what is left behind -------------------------------------------------------------------------

TEST_P(PoolLifecycleTest, NoDescriptorsOrChildrenLeftAfterDestruction) {
  ASSERT_TRUE(has_no_children());
  const int fds_before = count_open_fds();
  ASSERT_GT(fds_before, 0);
  {
    auto pool = make_pool();
    EXPECT_EQ(pool.map(square, iota_vector(100)), squares(100));
    // Replacing crashed workers must not leak their descriptors.
    const auto out = pool.map_outcomes(segfault_at_3, iota_vector(10), 1);
    EXPECT_FALSE(out[3].has_value());
#if POOLTEST_HAVE_VIEWS
    int n = 0;
    for (int y : pool.imap(square, std::views::iota(0))) {
      if (++n == 50) break;
      (void)y;
    }
#endif
    EXPECT_TRUE(eventually([&] { return pool.worker_pids().size() == static_cast<std::size_t>(workers()); }));
    EXPECT_GT(count_open_fds(), fds_before);
  }
  EXPECT_EQ(count_open_fds(), fds_before);
  EXPECT_TRUE(has_no_children());
}

TEST_P(PoolLifecycleTest, NoDescriptorsOrChildrenLeftAfterCloseAndJoin) {
  const int fds_before = count_open_fds();
  auto pool = make_pool();
  EXPECT_EQ(pool.map(square, iota_vector(100), 1), squares(100));
  pool.close();
  pool.join();
  EXPECT_TRUE(has_no_children());
  EXPECT_TRUE(pool.worker_pids().empty());
  { multiproc::Pool gone = std::move(pool); }
  EXPECT_EQ(count_open_fds(), fds_before);
}

TEST_P(PoolLifecycleTest, ManyPoolsInARowLeakNothing) {
  const int fds_before = count_open_fds();
  for (int i = 0; i < 10; ++i) {
    auto pool = make_pool();
    EXPECT_EQ(pool.apply(square, i), i * i);
  }
  EXPECT_EQ(count_open_fds(), fds_before);
  EXPECT_TRUE(has_no_children());
}

TEST(PoolLifecycle, WorkersDieWhenTheParentIsKilled) {
  test_support::Pipe pipe;
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    pipe.close_read();
    {
      multiproc::Pool pool{{.processes = 2}};
      (void)pool.apply(square, 2);  // the workers are up
      for (pid_t p : pool.worker_pids()) test_support::write_pid(pipe.write, p);
      ::raise(SIGKILL);  // no destructor runs
    }
    ::_exit(1);
  }
  pipe.close_write();
  const pid_t w1 = test_support::read_pid(pipe.read);
  const pid_t w2 = test_support::read_pid(pipe.read);
  const auto status = test_support::wait_exit(child);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFSIGNALED(*status) && WTERMSIG(*status) == SIGKILL);
  ASSERT_GT(w1, 0);
  ASSERT_GT(w2, 0);
  EXPECT_TRUE(test_support::wait_dead(w1, 3000ms)) << "worker " << w1 << " outlived its parent";
  EXPECT_TRUE(test_support::wait_dead(w2, 3000ms)) << "worker " << w2 << " outlived its parent";
}

// ---- moving ------------------------------------------------------------------------------------

TEST(PoolMove, MovedFromPoolThrowsStateError) {
  multiproc::Pool a{{.processes = 2}};
  const auto pids = a.worker_pids();
  multiproc::Pool b = std::move(a);
  EXPECT_EQ(b.worker_pids(), pids);
  EXPECT_EQ(b.apply(square, 5), 25);
  EXPECT_THROW(a.apply(square, 5), multiproc::StateError);  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(a.processes(), 0);
  a.terminate();  // harmless on a moved-from pool
}

TEST(PoolMove, MoveAssignmentTerminatesTheOldPool) {
  multiproc::Pool a{{.processes = 1}};
  multiproc::Pool b{{.processes = 2}};
  const auto old_pids = a.worker_pids();
  auto r = a.apply_async(sleep_ms_then_return, 30000);
  a = std::move(b);
  EXPECT_EQ(a.processes(), 2);
  EXPECT_EQ(a.apply(square, 3), 9);
  for (pid_t p : old_pids) EXPECT_TRUE(process_gone(p)) << p;
  expect_cancelled(r);
}

std::size_t byte_count(const std::vector<char>& v) { return v.size(); }

}  // namespace
}  // namespace pooltest

// A forked child has a copy of its parent's pool but neither its supervisor thread nor its
// workers: using it must fail at once with StateError instead of waiting forever, and destroying
// the copy must neither wait for a thread that is not there nor kill the parent's workers.
TEST(PoolForkedChild, UsingTheParentsPoolInAChildThrowsStateError) {
  auto pool = std::make_unique<multiproc::Pool>(multiproc::PoolOptions{.processes = 1});
  const auto workers = pool->worker_pids();
  // A forked child, explicitly: it is the inherited copy of the pool that is under test.
  multiproc::Process child{multiproc::ProcessOptions{.start_method = multiproc::StartMethod::fork}, [&pool] {
                             int code = 1;
                             try {
                               (void)pool->apply(pooltest::square, 3);
                             } catch (const multiproc::StateError&) {
                               code = 7;
                             }
                             // A large argument, which apply borrows: the same error, no wait.
                             try {
                               (void)pool->apply(pooltest::byte_count, std::vector<char>(std::size_t{2} << 20));
                               code = 1;
                             } catch (const multiproc::StateError&) {
                             }
                             pool.reset();  // the inherited copy's destructor
                             ::_exit(code);
                           }};
  child.start();
  ASSERT_TRUE(child.join_for(std::chrono::seconds(10)));
  EXPECT_EQ(child.exit_status(), multiproc::ExitStatus::exited_with(7));
  EXPECT_EQ(pool->apply(pooltest::square, 4), 16);  // the parent's pool is untouched
  EXPECT_EQ(pool->worker_pids(), workers);          // and so are its workers
}

TEST(PoolAsyncResult, WaitForTheMaximumDurationWaitsInsteadOfOverflowing) {
  multiproc::Pool pool{{.processes = 1}};
  auto r = pool.apply_async(pooltest::square, 9);
  EXPECT_TRUE(r.wait_for(std::chrono::nanoseconds::max()));
  EXPECT_EQ(r.get(std::chrono::hours::max()), 81);
}

// Pipe and Connection: messages both ways across processes, one-way pipes, EOF when the peer
// closes or dies, poll timeouts, multiproc::wait over connections and processes, connections passed
// to Pool tasks, corrupt frames, and what is left behind.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <multiproc/multiproc.hpp>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "test_support.hpp"

namespace mp = multiproc;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test_support::generous;
using test_support::scaled;

namespace {

// Waits for a child and returns its exit status; fails the test (and kills it) after `timeout`,
// scaled for slow builds.
mp::ExitStatus finish(mp::Process& p, std::chrono::milliseconds timeout = 30s) {
  if (!p.join_for(scaled(timeout))) {
    ADD_FAILURE() << p.name() << " did not finish in time";
    p.kill();
    p.join();
  }
  return p.exit_status();
}

}  // namespace

TEST(Pipe, SendsAndReceivesBothWaysAcrossProcesses) {
  mp::Connection<std::vector<std::string>> a, b;
  std::tie(a, b) = mp::Pipe<std::vector<std::string>>();
  mp::Process child{[&] {
    a.close();
    for (;;) {
      auto msg = b.recv();
      if (msg.empty()) return;
      std::reverse(msg.begin(), msg.end());
      b.send(msg);
    }
  }};
  child.start();
  b.close();
  for (int i = 0; i < 1000; ++i) {
    a.send({"x", std::to_string(i)});
    ASSERT_EQ(a.recv(), (std::vector<std::string>{std::to_string(i), "x"}));
  }
  a.send({});
  EXPECT_TRUE(finish(child).success());
  EXPECT_THROW((void)a.recv(), mp::EOFError);  // the child ended: its end closed with it
}

TEST(Pipe, LargeMessagesGoThroughWhileThePeerReads) {
  mp::Connection<std::vector<std::uint64_t>> a, b;
  std::tie(a, b) = mp::Pipe<std::vector<std::uint64_t>>();
  std::vector<std::uint64_t> big(2 * 1024 * 1024);  // 16 MiB, far more than a pipe holds
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = i * 0x9E3779B97F4A7C15ull;
  mp::Process child{[&] { b.send(b.recv()); }};
  child.start();
  b.close();
  a.send(big);
  EXPECT_TRUE(a.recv() == big);
  EXPECT_TRUE(finish(child).success());
}

TEST(Pipe, OneWayPipeReceivesOnTheFirstEndAndSendsOnTheSecond) {
  mp::Connection<int> reader, writer;
  std::tie(reader, writer) = mp::Pipe<int>(false);
  EXPECT_TRUE(reader.readable());
  EXPECT_FALSE(reader.writable());
  EXPECT_FALSE(writer.readable());
  EXPECT_TRUE(writer.writable());
  EXPECT_THROW(reader.send(1), mp::StateError);
  EXPECT_THROW((void)writer.recv(), mp::StateError);
  EXPECT_THROW((void)writer.poll(), mp::StateError);
  writer.send(42);
  EXPECT_TRUE(reader.poll());
  EXPECT_EQ(reader.recv(), 42);
  writer.close();
  EXPECT_TRUE(reader.poll());  // EOF is something recv() returns (by throwing)
  EXPECT_THROW((void)reader.recv(), mp::EOFError);
}

TEST(Pipe, RecvThrowsEOFErrorWhenThePeerProcessIsKilled) {
  mp::Connection<int> a, b;
  std::tie(a, b) = mp::Pipe<int>();
  mp::Process child{[&] {
    a.close();
    b.send(1);
    test_support::sleep_forever();
  }};
  child.start();
  b.close();
  EXPECT_EQ(a.recv(), 1);
  EXPECT_FALSE(a.poll(50ms));
  child.kill();
  const auto t0 = Clock::now();
  EXPECT_THROW((void)a.recv(), mp::EOFError);
  EXPECT_LT(Clock::now() - t0, scaled(5s));  // EOF once the peer is dead: no hang
  EXPECT_EQ(finish(child).signal(), SIGKILL);
}

TEST(Pipe, SendToAPeerThatIsGoneThrowsEPIPEAndDoesNotKillUs) {
  mp::Connection<std::string> a, b;
  std::tie(a, b) = mp::Pipe<std::string>();
  b.close();
  try {
    a.send("nobody listens");
    FAIL() << "send succeeded";
  } catch (const mp::SystemError& e) {
    EXPECT_EQ(e.code().value(), EPIPE);
  }
  // No SIGPIPE is left pending either.
  sigset_t pending;
  ::sigpending(&pending);
  EXPECT_FALSE(::sigismember(&pending, SIGPIPE));
}

TEST(Pipe, PollTimesOutWithinTolerance) {
  mp::Connection<int> a, b;
  std::tie(a, b) = mp::Pipe<int>();
  const auto t0 = Clock::now();
  EXPECT_FALSE(a.poll(200ms));
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 200ms);
  EXPECT_LT(took, 200ms + generous(150ms));  // it returned: the timeout fired
  EXPECT_FALSE(a.poll());
  b.send(3);
  EXPECT_TRUE(a.poll(1s));
  EXPECT_EQ(a.recv(), 3);
}

// A negative timeout is zero (the library's one rule, as in Python): poll and wait look once.
TEST(Pipe, NegativeTimeoutLooksOnce) {
  auto [a, b] = mp::Pipe<int>();
  const auto t0 = Clock::now();
  EXPECT_FALSE(a.poll(-1ms));
  EXPECT_TRUE(mp::wait({mp::Waitable(a)}, -1s).empty());
  b.send(5);
  EXPECT_TRUE(test_support::eventually([&a = a] { return a.poll(-1ms); }));
  EXPECT_EQ(mp::wait({mp::Waitable(a)}, -1ms), std::vector<std::size_t>{0});
  EXPECT_EQ(a.recv(), 5);
  EXPECT_LT(Clock::now() - t0, test_support::generous(100ms));
}

TEST(Pipe, ClosedConnectionRefusesUse) {
  mp::Connection<int> a, b;
  std::tie(a, b) = mp::Pipe<int>();
  a.close();
  a.close();  // idempotent
  EXPECT_TRUE(a.closed());
  EXPECT_THROW(a.send(1), mp::StateError);
  EXPECT_THROW((void)a.recv(), mp::StateError);
  EXPECT_THROW((void)a.fileno(), mp::StateError);
  mp::Connection<int> none;
  EXPECT_TRUE(none.closed());
  EXPECT_THROW(none.send(1), mp::StateError);
}

TEST(Pipe, CorruptFrameIsAProtocolError) {
  const char junk[16] = "not a frame....";
  // Bytes written straight into the pipe, behind the sending end's back.
  mp::Connection<int> r, w;
  std::tie(r, w) = mp::Pipe<int>(false);
  ASSERT_EQ(::write(w.fileno(), junk, sizeof junk), static_cast<ssize_t>(sizeof junk));
  EXPECT_THROW((void)r.recv(), mp::ProtocolError);
}

TEST(Wait, ReturnsTheReadyOnesAmongConnectionsAndProcesses) {
  mp::Connection<int> a1, b1;
  std::tie(a1, b1) = mp::Pipe<int>();
  mp::Connection<int> a2, b2;
  std::tie(a2, b2) = mp::Pipe<int>();
  test_support::Pipe go;
  mp::Process sender{[&] {
    std::this_thread::sleep_for(100ms);
    b2.send(2);
    test_support::sleep_forever();
  }};
  // Ends 300 ms after it is told to go: never before the sender's message was seen.
  mp::Process sleeper{[&] {
    (void)test_support::read_pid(go.read, 60s);
    std::this_thread::sleep_for(300ms);
  }};
  auto t0 = Clock::now();  // before the sender starts: its message comes 100 ms after this at least
  sender.start();
  sleeper.start();
  b2.close();

  auto ready = mp::wait({a1, a2, sleeper}, scaled(5s));
  EXPECT_EQ(ready, std::vector<std::size_t>{1});
  EXPECT_GE(Clock::now() - t0, 90ms);
  EXPECT_EQ(a2.recv(), 2);

  t0 = Clock::now();
  test_support::write_pid(go.write, ::getpid());
  ready = mp::wait({a1, a2, sleeper}, scaled(5s));
  EXPECT_EQ(ready, std::vector<std::size_t>{2});
  EXPECT_GE(Clock::now() - t0, 300ms);
  EXPECT_TRUE(finish(sleeper).success());

  // Ended and reaped: still ready (at once).
  ready = mp::wait({a1, sleeper}, 5s);
  EXPECT_EQ(ready, std::vector<std::size_t>{1});

  b1.send(1);
  sender.kill();
  (void)finish(sender);
  ready = mp::wait({a1, a2}, 5s);
  EXPECT_EQ(ready, (std::vector<std::size_t>{0, 1}));  // a message, and EOF
  EXPECT_EQ(a1.recv(), 1);
  EXPECT_THROW((void)a2.recv(), mp::EOFError);
}

TEST(Wait, TimesOutWithinToleranceWhenNothingIsReady) {
  mp::Connection<int> a, b;
  std::tie(a, b) = mp::Pipe<int>();
  const auto t0 = Clock::now();
  EXPECT_TRUE(mp::wait({a}, 200ms).empty());
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 200ms);
  EXPECT_LT(took, 200ms + generous(150ms));  // it returned: the timeout fired
  std::vector<mp::Waitable> list{a, mp::Waitable::from_fd(b.fileno())};
  b.send(1);
  EXPECT_EQ(mp::wait(list, 1s), std::vector<std::size_t>{0});
}

TEST(Wait, RefusesWhatCannotBecomeReady) {
  mp::Connection<int> r, w;
  std::tie(r, w) = mp::Pipe<int>(false);
  EXPECT_THROW((void)mp::wait({w}, 0ms), mp::StateError);  // send-only
  mp::Process never{[] {}};
  EXPECT_THROW((void)mp::wait({never}, 0ms), mp::StateError);
  r.close();
  EXPECT_THROW((void)mp::wait({r}, 0ms), mp::StateError);
}

namespace {
int double_through(mp::Connection<int> c) {
  const int x = c.recv();
  c.send(2 * x);
  return x;
}
int send_pid(mp::Connection<int> c) {
  c.send(getpid());
  return 0;
}
}  // namespace

TEST(PipeHandles, PoolTasksGetTheSameConnection) {
  mp::Pool pool{{.processes = 2}};  // workers started before the pipe exists: nothing inherited
  mp::Connection<int> a, b;
  std::tie(a, b) = mp::Pipe<int>();
  auto r = pool.apply_async(double_through, b);
  a.send(21);
  EXPECT_EQ(a.recv(), 42);
  EXPECT_EQ(r.get(), 21);
  mp::Connection<int> reader, writer;
  std::tie(reader, writer) = mp::Pipe<int>(false);
  EXPECT_EQ(pool.apply(send_pid, writer), 0);
  EXPECT_NE(reader.recv(), getpid());
}

TEST(PipeResources, NoDescriptorsLeftBehind) {
  const int before = test_support::count_open_fds();
  {
    mp::Connection<int> a, b;
    std::tie(a, b) = mp::Pipe<int>();
    mp::Connection<int> r, w;
    std::tie(r, w) = mp::Pipe<int>(false);
    mp::Process child{[&] { b.send(b.recv() + 1); }};
    child.start();
    a.send(1);
    EXPECT_EQ(a.recv(), 2);
    EXPECT_TRUE(finish(child).success());
    w.send(5);
    EXPECT_EQ(r.recv(), 5);
  }
  EXPECT_EQ(test_support::count_open_fds(), before);
}

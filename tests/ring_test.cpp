// FrameRing: frames in order across the wrap, room accounting, the futex wake-ups between two
// processes, and a corrupt peer (indices, header, lengths) answered with ProtocolError.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <multiproc/multiproc.hpp>
#include <thread>
#include <vector>

#include "platform.hpp"
#include "ring.hpp"
#include "test_support.hpp"

namespace mpd = multiproc::detail;
using mpd::FrameHeader;
using mpd::FrameRing;
using mpd::FrameTag;

namespace {

// A ring in shared anonymous memory (so that a forked child shares it), formatted.
struct SharedRing {
  explicit SharedRing(std::size_t capacity, std::size_t max_payload = 1 << 20)
      : memory(FrameRing::bytes_for(capacity)), capacity(capacity), max_payload(max_payload) {
    FrameRing::format(memory.data());
  }
  FrameRing end() const { return FrameRing(memory.data(), capacity, max_payload); }
  mpd::RingControl& control() const { return *static_cast<mpd::RingControl*>(memory.data()); }
  std::byte* data() const { return static_cast<std::byte*>(memory.data()) + sizeof(mpd::RingControl); }

  mpd::sys::SharedMapping memory;
  std::size_t capacity;
  std::size_t max_payload;
};

// A frame whose payload is `n` bytes of a pattern that depends on `seed`.
multiproc::Writer frame_of(std::size_t n, std::uint32_t seed) {
  multiproc::Writer w;
  mpd::Channel::begin_frame(w);
  for (std::size_t i = 0; i < n; ++i) w.write_value(static_cast<std::uint8_t>((seed * 31 + i) & 0xFF));
  return w;
}

bool payload_matches(const multiproc::Writer& payload, std::size_t n, std::uint32_t seed) {
  if (payload.size() != n) return false;
  for (std::size_t i = 0; i < n; ++i) {
    if (payload.data()[i] != static_cast<std::byte>((seed * 31 + i) & 0xFF)) return false;
  }
  return true;
}

}  // namespace

TEST(FrameRing, FramesComeOutInOrderAcrossManyWraps) {
  SharedRing ring(4096);
  FrameRing producer = ring.end();
  FrameRing consumer = ring.end();
  FrameHeader h{};
  multiproc::Writer payload;
  // Sizes that do not divide the capacity, so frames straddle the wrap at every offset.
  for (std::uint32_t i = 0; i < 5000; ++i) {
    const std::size_t n = (i * 37) % 700;
    auto f = frame_of(n, i);
    ASSERT_TRUE(producer.try_send(FrameTag::result, i, f, static_cast<std::uint16_t>(i & 3)));
    ASSERT_TRUE(consumer.try_recv(h, payload));
    EXPECT_EQ(h.tag, static_cast<std::uint16_t>(FrameTag::result));
    EXPECT_EQ(h.id, i);
    EXPECT_EQ(h.reserved, i & 3);
    ASSERT_TRUE(payload_matches(payload, n, i)) << "frame " << i;
  }
  EXPECT_FALSE(consumer.try_recv(h, payload));
  EXPECT_FALSE(consumer.readable());
}

TEST(FrameRing, FullRingRefusesUntilTheConsumerFreesRoom) {
  SharedRing ring(1024);
  FrameRing producer = ring.end();
  FrameRing consumer = ring.end();
  const std::size_t each = FrameRing::footprint(100);  // 128 bytes
  ASSERT_EQ(1024 % each, 0u);
  std::uint64_t sent = 0;
  for (;;) {
    auto f = frame_of(100, static_cast<std::uint32_t>(sent));
    if (!producer.try_send(FrameTag::task, sent, f)) break;
    ++sent;
  }
  EXPECT_EQ(sent, 1024 / each);
  FrameHeader h{};
  multiproc::Writer payload;
  ASSERT_TRUE(consumer.try_recv(h, payload));
  EXPECT_EQ(h.id, 0u);
  auto f = frame_of(100, 99);
  EXPECT_TRUE(producer.try_send(FrameTag::task, 99, f));
  for (std::uint64_t i = 1; i < sent; ++i) {
    ASSERT_TRUE(consumer.try_recv(h, payload));
    EXPECT_EQ(h.id, i);
  }
  ASSERT_TRUE(consumer.try_recv(h, payload));
  EXPECT_EQ(h.id, 99u);
}

TEST(FrameRing, CouldFitTellsWhatMustGoAnotherWay) {
  SharedRing ring(1024);
  FrameRing producer = ring.end();
  EXPECT_TRUE(producer.could_fit(1024 - sizeof(FrameHeader)));
  EXPECT_FALSE(producer.could_fit(1024 - sizeof(FrameHeader) + 1));
  auto f = frame_of(1024 - sizeof(FrameHeader), 1);
  EXPECT_TRUE(producer.try_send(FrameTag::task, 1, f));  // a frame as large as the ring
  FrameRing consumer = ring.end();
  FrameHeader h{};
  multiproc::Writer payload;
  ASSERT_TRUE(consumer.try_recv(h, payload));
  EXPECT_TRUE(payload_matches(payload, 1024 - sizeof(FrameHeader), 1));
}

TEST(FrameRing, PayloadOverTheBoundIsRefusedOnBothSides) {
  SharedRing ring(4096, 64);
  FrameRing producer = ring.end();
  auto f = frame_of(65, 1);
  EXPECT_THROW(producer.try_send(FrameTag::task, 1, f), multiproc::ProtocolError);
  // A producer that ignores the bound: the consumer refuses the frame.
  FrameRing liberal(ring.memory.data(), ring.capacity, 1 << 20);
  ASSERT_TRUE(liberal.try_send(FrameTag::task, 1, f));
  FrameRing consumer = ring.end();
  FrameHeader h{};
  multiproc::Writer payload;
  try {
    (void)consumer.try_recv(h, payload);
    FAIL() << "no exception";
  } catch (const multiproc::ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("64"), std::string::npos) << e.what();
  }
}

TEST(FrameRing, CorruptPeerGetsProtocolErrorNeverAnOutOfBoundsRead) {
  FrameHeader h{};
  multiproc::Writer payload;
  {  // the producer's index runs past the capacity
    SharedRing ring(1024);
    FrameRing consumer = ring.end();
    ring.control().tail.store(5000);
    EXPECT_THROW((void)consumer.try_recv(h, payload), multiproc::ProtocolError);
  }
  {  // fewer bytes published than a header
    SharedRing ring(1024);
    FrameRing consumer = ring.end();
    ring.control().tail.store(8);
    EXPECT_THROW((void)consumer.try_recv(h, payload), multiproc::ProtocolError);
  }
  {  // a bad magic, an unknown tag, a length longer than what was published
    SharedRing ring(1024);
    FrameRing producer = ring.end();
    auto f = frame_of(16, 1);
    ASSERT_TRUE(producer.try_send(FrameTag::task, 1, f));
    FrameHeader bad{};
    std::memcpy(&bad, ring.data(), sizeof bad);
    FrameHeader magic = bad;
    magic.magic ^= 1;
    std::memcpy(ring.data(), &magic, sizeof magic);
    EXPECT_THROW((void)ring.end().try_recv(h, payload), multiproc::ProtocolError);
    FrameHeader tag = bad;
    tag.tag = 77;
    std::memcpy(ring.data(), &tag, sizeof tag);
    EXPECT_THROW((void)ring.end().try_recv(h, payload), multiproc::ProtocolError);
    FrameHeader longer = bad;
    longer.length = 900;  // within the bound, beyond what the producer published
    std::memcpy(ring.data(), &longer, sizeof longer);
    EXPECT_THROW((void)ring.end().try_recv(h, payload), multiproc::ProtocolError);
    std::memcpy(ring.data(), &bad, sizeof bad);
    ASSERT_TRUE(ring.end().try_recv(h, payload));
    EXPECT_TRUE(payload_matches(payload, 16, 1));
  }
  {  // the consumer's index runs past what the producer wrote
    SharedRing ring(1024);
    FrameRing producer = ring.end();
    ring.control().head.store(4000);
    auto f = frame_of(16, 1);
    EXPECT_THROW((void)producer.try_send(FrameTag::task, 1, f), multiproc::ProtocolError);
  }
}

TEST(FrameRing, WaitReadableTimesOutWhenNothingComes) {
  SharedRing ring(1024);
  FrameRing consumer = ring.end();
  const auto t0 = std::chrono::steady_clock::now();
  consumer.wait_readable(std::chrono::milliseconds(50));
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(waited, std::chrono::milliseconds(45));
  EXPECT_LT(waited, test_support::scaled(std::chrono::seconds(5)));  // it returned: no hang
}

// A forked producer streams 200,000 frames through a 4 KiB ring to a consumer in this process;
// both sides sleep on futexes when they must (the ring is full, or empty), so the wake-ups in both
// directions are exercised; every frame arrives once, in order, intact.
TEST(FrameRing, TwoProcessesStreamEveryFrameOnceInOrder) {
  SharedRing ring(4096);
  constexpr std::uint32_t kFrames = 200000;
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    FrameRing producer = ring.end();
    for (std::uint32_t i = 0; i < kFrames; ++i) {
      auto f = frame_of(i % 300, i);
      if (!producer.send(FrameTag::result, i, f, [] { return true; })) ::_exit(3);
      producer.wake_consumer();
      if (i % 50000 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the consumer sleeps
    }
    ::_exit(0);
  }
  FrameRing consumer = ring.end();
  FrameHeader h{};
  multiproc::Writer payload;
  std::uint32_t next = 0;
  int bad = 0;
  const auto give_up = std::chrono::steady_clock::now() + test_support::scaled(std::chrono::seconds(40));
  while (next < kFrames && std::chrono::steady_clock::now() < give_up) {
    if (!consumer.try_recv(h, payload)) {
      if (next % 7 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));  // the producer waits
      consumer.wait_readable(std::chrono::milliseconds(100));
      continue;
    }
    if (h.id != next || !payload_matches(payload, next % 300, next)) ++bad;
    ++next;
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_EQ(next, kFrames);
  EXPECT_EQ(bad, 0);
  EXPECT_FALSE(consumer.try_recv(h, payload));
}

// A frame sent from a span (try_send_bytes) and looked at where it lies (try_peek): the payload is
// the same bytes, split in two where it wraps; the producer cannot overwrite it until release().
TEST(FrameRing, PeekedFramesStayInPlaceUntilReleasedAcrossTheWrap) {
  SharedRing ring(1024);
  FrameRing producer = ring.end();
  FrameRing consumer = ring.end();
  std::vector<std::byte> bytes(300);
  FrameHeader h{};
  std::span<const std::byte> first;
  std::span<const std::byte> second;
  int wrapped = 0;
  for (std::uint32_t i = 0; i < 40; ++i) {
    for (std::size_t k = 0; k < bytes.size(); ++k) bytes[k] = static_cast<std::byte>((i * 7 + k) & 0xFF);
    const std::size_t n = 1 + (i * 37) % bytes.size();
    ASSERT_TRUE(producer.try_send_bytes(FrameTag::piece, i, std::span(bytes).first(n), 1));
    ASSERT_TRUE(consumer.try_peek(h, first, second));
    EXPECT_EQ(h.tag, static_cast<std::uint16_t>(FrameTag::piece));
    EXPECT_EQ(h.reserved, 1u);
    EXPECT_EQ(h.id, i);
    ASSERT_EQ(first.size() + second.size(), n);
    if (!second.empty()) ++wrapped;
    // While it is held, the ring has no room for what would overwrite it.
    std::vector<std::byte> filler(1024 - FrameRing::footprint(n) - sizeof(FrameHeader) + 8);
    EXPECT_FALSE(producer.try_send_bytes(FrameTag::piece, 99, filler));
    for (std::size_t k = 0; k < n; ++k) {
      const std::byte got = k < first.size() ? first[k] : second[k - first.size()];
      ASSERT_EQ(got, bytes[k]) << "frame " << i << " byte " << k;
    }
    consumer.release();
    EXPECT_FALSE(consumer.try_peek(h, first, second));
  }
  EXPECT_GT(wrapped, 0);
}

// Peeking takes nothing: the same frame comes again until released, and try_recv sees the same
// frames a peeking consumer does.
TEST(FrameRing, PeekWithoutReleaseSeesTheSameFrame) {
  SharedRing ring(4096);
  FrameRing producer = ring.end();
  FrameRing consumer = ring.end();
  const std::vector<std::byte> one(10, std::byte{1});
  const std::vector<std::byte> two(20, std::byte{2});
  ASSERT_TRUE(producer.try_send_bytes(FrameTag::piece, 1, one));
  ASSERT_TRUE(producer.try_send_bytes(FrameTag::piece, 2, two));
  FrameHeader h{};
  std::span<const std::byte> first;
  std::span<const std::byte> second;
  ASSERT_TRUE(consumer.try_peek(h, first, second));
  EXPECT_EQ(h.id, 1u);
  ASSERT_TRUE(consumer.try_peek(h, first, second));
  EXPECT_EQ(h.id, 1u);
  consumer.release();
  multiproc::Writer payload;
  ASSERT_TRUE(consumer.try_recv(h, payload));
  EXPECT_EQ(h.id, 2u);
  EXPECT_EQ(payload.size(), 20u);
  EXPECT_FALSE(consumer.try_peek(h, first, second));
}

// A peeked frame goes through the same checks as a received one.
TEST(FrameRing, PeekOfACorruptFrameIsAProtocolError) {
  SharedRing ring(1024, 512);
  FrameRing producer = ring.end();
  FrameRing consumer = ring.end();
  const std::vector<std::byte> bytes(100);
  ASSERT_TRUE(producer.try_send_bytes(FrameTag::piece, 1, bytes));
  FrameHeader h{};
  std::memcpy(&h, ring.data(), sizeof h);
  h.length = 4096;  // longer than the bound and than what was published
  std::memcpy(ring.data(), &h, sizeof h);
  std::span<const std::byte> first;
  std::span<const std::byte> second;
  EXPECT_THROW(consumer.try_peek(h, first, second), multiproc::ProtocolError);
  const std::vector<std::byte> too_big(513);
  EXPECT_THROW(producer.try_send_bytes(FrameTag::piece, 2, too_big), multiproc::ProtocolError);
}

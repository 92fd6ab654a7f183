// A frame ring: a single-producer single-consumer queue of frames in memory that two processes
// share (a Pool's parent and one of its workers).
//
// Frames are the channel's (FrameHeader + payload), laid end to end in a byte ring whose indices
// are 32-bit counters that wrap (the capacity is a power of two, so `tail - head` is the number of
// bytes queued even across the wrap). The producer writes a frame, then publishes it by storing
// `tail`; the consumer reads it, then frees its room by storing `head`. Each side keeps its own
// copy of its index and never trusts the other side's beyond bounds checks: a corrupt or hostile
// peer gets a ProtocolError, never an out-of-bounds read or an allocation as large as a length
// field says.
//
// Wake-ups are futexes on the index words, taken only when a side is about to sleep: the consumer
// sleeps on `tail` after setting `consumer_sleeping`, and the producer wakes it only when that flag
// is set (Dekker-style, both sides use sequentially consistent operations), so a frame sent to a
// consumer that is spinning costs no system call at all.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>

#include "channel.hpp"

namespace multiproc::detail {

/// Spins politely (the x86 pause instruction, or a compiler barrier elsewhere).
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

struct RingControl {
  alignas(64) std::atomic<std::uint32_t> tail{0};  // written by the producer
  std::atomic<std::uint32_t> consumer_sleeping{0};
  alignas(64) std::atomic<std::uint32_t> head{0};  // written by the consumer
  std::atomic<std::uint32_t> producer_sleeping{0};
};
static_assert(sizeof(RingControl) == 128);

class FrameRing {
 public:
  FrameRing() = default;
  /// A ring over `memory` (RingControl, then `capacity` bytes), which `format()` prepared. The
  /// capacity is a power of two; payloads are bounded by `max_payload`.
  FrameRing(void* memory, std::size_t capacity, std::size_t max_payload) noexcept;

  /// Bytes of shared memory a ring of `capacity` needs.
  static constexpr std::size_t bytes_for(std::size_t capacity) noexcept { return sizeof(RingControl) + capacity; }
  /// Writes an empty ring's control block into `memory`.
  static void format(void* memory) noexcept { new (memory) RingControl; }

  // ---- producer ----
  /// Bytes a frame of `payload` bytes takes in the ring.
  static constexpr std::size_t footprint(std::size_t payload) noexcept {
    return (sizeof(FrameHeader) + payload + 7) & ~std::size_t{7};
  }
  /// True when a frame of `payload` bytes could ever fit.
  [[nodiscard]] bool could_fit(std::size_t payload) const noexcept { return footprint(payload) <= capacity_; }
  /// Sends a frame built after Channel::begin_frame() if there is room now; false if not.
  /// `flags` go in the header's reserved field (kFrameTimed).
  bool try_send(FrameTag tag, std::uint64_t id, Writer& frame, std::uint16_t flags = 0);
  /// Sends a frame, waiting for room (the consumer wakes the producer when it frees some). The
  /// wait gives up, returning false, when `still_wanted()` says so between sleeps.
  template <class Still>
  bool send(FrameTag tag, std::uint64_t id, Writer& frame, Still&& still_wanted) {
    while (!try_send(tag, id, frame)) {
      if (!still_wanted()) return false;
      wait_for_room(footprint(frame.size() - sizeof(FrameHeader)));
    }
    return true;
  }
  /// The same for a frame whose payload is `payload` (no header room needed in front).
  bool try_send_bytes(FrameTag tag, std::uint64_t id, std::span<const std::byte> payload, std::uint16_t flags = 0);
  /// Wakes the consumer if it sleeps (after try_send; send() does it itself).
  void wake_consumer() noexcept;
  /// Sleeps until the consumer frees room for `need` bytes, at most `timeout`. Spurious returns
  /// are allowed.
  void wait_for_room(std::size_t need, std::chrono::nanoseconds timeout = std::chrono::milliseconds(100)) noexcept;

  // ---- consumer ----
  /// Takes the next frame if one is there; false if the ring is empty. Throws ProtocolError on a
  /// frame that is corrupt or exceeds the bound.
  bool try_recv(FrameHeader& header, Writer& payload);
  /// Looks at the next frame without taking it: its header, and its payload where it lies in the
  /// ring (`second` is not empty when the payload wraps around the ring's end). The payload stays
  /// there, untouched by the producer, until release(). False if the ring is empty; throws as
  /// try_recv() does.
  bool try_peek(FrameHeader& header, std::span<const std::byte>& first, std::span<const std::byte>& second);
  /// Frees the room of the frame try_peek() returned.
  void release() noexcept;
  /// True when a frame is queued (a hint: a corrupt ring also says true).
  [[nodiscard]] bool readable() const noexcept { return control_->tail.load(std::memory_order_acquire) != head_; }
  /// Sleeps until the producer publishes something, at most `timeout`; returns at once if there is
  /// something already. Spurious returns are allowed.
  void wait_readable(std::chrono::nanoseconds timeout) noexcept;

 private:
  std::uint32_t check_next(FrameHeader& header);
  void copy_in(std::uint32_t at, const std::byte* from, std::size_t n) noexcept;
  void copy_out(std::uint32_t at, std::byte* to, std::size_t n) const noexcept;

  RingControl* control_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::uint32_t mask_ = 0;
  std::size_t max_payload_ = 0;
  std::uint32_t head_ = 0;    // the consumer's own copy
  std::uint32_t tail_ = 0;    // the producer's own copy
  std::uint32_t peeked_ = 0;  // footprint of the frame try_peek() returned
};

}  // namespace multiproc::detail

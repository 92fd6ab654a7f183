#include "ring.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "platform.hpp"

namespace multiproc::detail {

FrameRing::FrameRing(void* memory, std::size_t capacity, std::size_t max_payload) noexcept
    : control_(static_cast<RingControl*>(memory)),
      data_(static_cast<std::byte*>(memory) + sizeof(RingControl)),
      capacity_(capacity),
      mask_(static_cast<std::uint32_t>(capacity - 1)),
      max_payload_(max_payload),
      head_(control_->head.load(std::memory_order_acquire)),
      tail_(control_->tail.load(std::memory_order_acquire)) {}

void FrameRing::copy_in(std::uint32_t at, const std::byte* from, std::size_t n) noexcept {
  const std::size_t offset = at & mask_;
  const std::size_t first = std::min(n, capacity_ - offset);
  std::memcpy(data_ + offset, from, first);
  if (first < n) std::memcpy(data_, from + first, n - first);
}

void FrameRing::copy_out(std::uint32_t at, std::byte* to, std::size_t n) const noexcept {
  if (n == 0) return;  // `to` may be null then
  const std::size_t offset = at & mask_;
  const std::size_t first = std::min(n, capacity_ - offset);
  std::memcpy(to, data_ + offset, first);
  if (first < n) std::memcpy(to + first, data_, n - first);
}

bool FrameRing::try_send(FrameTag tag, std::uint64_t id, Writer& frame, std::uint16_t flags) {
  if (frame.size() < sizeof(FrameHeader)) throw ProtocolError("frame built without begin_frame()");
  return try_send_bytes(tag, id, frame.bytes().subspan(sizeof(FrameHeader)), flags);
}

bool FrameRing::try_send_bytes(FrameTag tag, std::uint64_t id, std::span<const std::byte> payload,
                               std::uint16_t flags) {
  const std::size_t length = payload.size();
  check_payload_size(length, max_payload_);
  const std::size_t need = footprint(length);
  const std::uint32_t head = control_->head.load(std::memory_order_acquire);
  const std::uint32_t used = tail_ - head;
  if (used > capacity_) throw ProtocolError("frame ring corrupt: the consumer's index is out of range");
  if (capacity_ - used < need) return false;
  const FrameHeader h{kFrameMagic, static_cast<std::uint16_t>(tag), flags, id, length};
  copy_in(tail_, reinterpret_cast<const std::byte*>(&h), sizeof h);
  if (length) copy_in(tail_ + static_cast<std::uint32_t>(sizeof h), payload.data(), length);
  tail_ += static_cast<std::uint32_t>(need);
  control_->tail.store(tail_, std::memory_order_seq_cst);
  return true;
}

void FrameRing::wake_consumer() noexcept {
  if (control_->consumer_sleeping.load(std::memory_order_seq_cst) != 0) sys::futex_wake(control_->tail, 1);
}

void FrameRing::wait_for_room(std::size_t need, std::chrono::nanoseconds timeout) noexcept {
  control_->producer_sleeping.store(1, std::memory_order_seq_cst);
  const std::uint32_t head = control_->head.load(std::memory_order_seq_cst);
  if (capacity_ - (tail_ - head) < need) {
    try {
      (void)sys::futex_wait(control_->head, head, timeout);
    } catch (...) {  // an unexpected errno: the caller's loop checks again
    }
  }
  control_->producer_sleeping.store(0, std::memory_order_relaxed);
}

// The footprint of the next frame after validating its header; 0 if the ring is empty.
std::uint32_t FrameRing::check_next(FrameHeader& header) {
  const std::uint32_t tail = control_->tail.load(std::memory_order_acquire);
  if (tail == head_) return 0;
  const std::uint32_t queued = tail - head_;
  if (queued > capacity_ || queued < sizeof header) {
    throw ProtocolError("frame ring corrupt: the producer's index is out of range");
  }
  copy_out(head_, reinterpret_cast<std::byte*>(&header), sizeof header);
  check_frame_header(header, max_payload_);
  const std::size_t need = footprint(static_cast<std::size_t>(header.length));
  if (need > queued) throw ProtocolError("corrupt frame: longer than what the ring holds");
  return static_cast<std::uint32_t>(need);
}

bool FrameRing::try_recv(FrameHeader& header, Writer& payload) {
  const std::uint32_t need = check_next(header);
  if (need == 0) return false;
  const auto length = static_cast<std::size_t>(header.length);
  payload.clear();
  copy_out(head_ + static_cast<std::uint32_t>(sizeof header), payload.grow(length), length);
  peeked_ = need;
  release();
  return true;
}

bool FrameRing::try_peek(FrameHeader& header, std::span<const std::byte>& first, std::span<const std::byte>& second) {
  const std::uint32_t need = check_next(header);
  if (need == 0) return false;
  const auto length = static_cast<std::size_t>(header.length);
  const std::size_t offset = (head_ + static_cast<std::uint32_t>(sizeof header)) & mask_;
  const std::size_t before_end = std::min(length, capacity_ - offset);
  first = {data_ + offset, before_end};
  second = {data_, length - before_end};
  peeked_ = need;
  return true;
}

void FrameRing::release() noexcept {
  head_ += std::exchange(peeked_, 0);
  control_->head.store(head_, std::memory_order_seq_cst);
  if (control_->producer_sleeping.load(std::memory_order_seq_cst) != 0) sys::futex_wake(control_->head, 1);
}

void FrameRing::wait_readable(std::chrono::nanoseconds timeout) noexcept {
  control_->consumer_sleeping.store(1, std::memory_order_seq_cst);
  const std::uint32_t tail = control_->tail.load(std::memory_order_seq_cst);
  if (tail == head_) {
    try {
      (void)sys::futex_wait(control_->tail, tail, timeout);
    } catch (...) {  // an unexpected errno: the caller's loop checks again
    }
  }
  control_->consumer_sleeping.store(0, std::memory_order_relaxed);
}

}  // namespace multiproc::detail

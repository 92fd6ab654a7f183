#include "channel.hpp"

#include <algorithm>
#include <string>

namespace multiproc::detail {

void check_frame_header(const FrameHeader& h, std::size_t max_payload) {
  if (h.magic != kFrameMagic) throw ProtocolError("corrupt frame: bad magic");
  if (h.tag == 0 || h.tag > kMaxFrameTag) throw ProtocolError("corrupt frame: unknown tag " + std::to_string(h.tag));
  if (h.length > max_payload) {
    throw ProtocolError("frame of " + std::to_string(h.length) + " bytes exceeds the channel's limit of " +
                        std::to_string(max_payload) + " bytes");
  }
}

void check_payload_size(std::size_t length, std::size_t max_payload) {
  if (length > max_payload) {
    throw ProtocolError("message of " + std::to_string(length) + " bytes exceeds the channel's limit of " +
                        std::to_string(max_payload) + " bytes");
  }
}

void Channel::send(FrameTag tag, std::uint64_t id, Writer& frame, std::uint16_t flags) const {
  if (frame.size() < sizeof(FrameHeader)) throw ProtocolError("frame built without begin_frame()");
  const std::size_t length = frame.size() - sizeof(FrameHeader);
  check_payload_size(length, max_payload_);
  const FrameHeader h{kFrameMagic, static_cast<std::uint16_t>(tag), flags, id, length};
  std::memcpy(frame.data(), &h, sizeof h);
  sys::write_all(fd_.get(), frame.bytes());
}

bool Channel::fill() {
  if (!buffer_) buffer_ = std::unique_ptr<std::byte[]>(new std::byte[kBufferSize]);
  if (begin_ == end_) {
    begin_ = end_ = 0;
  } else if (end_ == kBufferSize) {
    std::memmove(buffer_.get(), buffer_.get() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  const std::size_t got = sys::read_some(fd_.get(), {buffer_.get() + end_, kBufferSize - end_});
  end_ += got;
  return got != 0;
}

bool Channel::has_buffered_frame() const noexcept {
  if (end_ - begin_ < sizeof(FrameHeader)) return false;
  FrameHeader h;
  std::memcpy(&h, buffer_.get() + begin_, sizeof h);
  // A bad header counts as a frame: recv() will report it without blocking.
  return h.magic != kFrameMagic || h.length > max_payload_ || end_ - begin_ - sizeof h >= h.length;
}

bool Channel::recv(FrameHeader& header, Writer& payload) {
  while (end_ - begin_ < sizeof header) {
    const bool had = end_ != begin_;
    if (!fill()) {
      if (had) throw ProtocolError("peer closed the channel in the middle of a frame");
      return false;
    }
  }
  std::memcpy(&header, buffer_.get() + begin_, sizeof header);
  begin_ += sizeof header;
  check_frame_header(header, max_payload_);
  const auto length = static_cast<std::size_t>(header.length);
  payload.clear();
  std::byte* at = payload.grow(length);
  const std::size_t buffered = std::min(length, end_ - begin_);
  if (buffered) std::memcpy(at, buffer_.get() + begin_, buffered);
  begin_ += buffered;
  // A large payload goes straight from the socket to its place.
  if (buffered < length && !sys::read_exact(fd_.get(), {at + buffered, length - buffered})) {
    throw ProtocolError("peer closed the channel in the middle of a frame");
  }
  return true;
}

}  // namespace multiproc::detail

#include "channel.hpp"

#include <string>

namespace multiproc::detail {

void Channel::send(FrameTag tag, std::uint64_t id, Writer& frame) const {
  if (frame.size() < sizeof(FrameHeader)) throw ProtocolError("frame built without begin_frame()");
  const std::size_t length = frame.size() - sizeof(FrameHeader);
  if (length > max_payload_) {
    throw ProtocolError("message of " + std::to_string(length) + " bytes exceeds the channel's limit of " +
                        std::to_string(max_payload_) + " bytes");
  }
  const FrameHeader h{kFrameMagic, static_cast<std::uint16_t>(tag), 0, id, length};
  std::memcpy(frame.data(), &h, sizeof h);
  sys::write_all(fd_.get(), frame.bytes());
}

bool Channel::recv(FrameHeader& header, Writer& payload) const {
  if (!sys::read_exact(fd_.get(), {reinterpret_cast<std::byte*>(&header), sizeof header})) return false;
  if (header.magic != kFrameMagic) throw ProtocolError("corrupt frame: bad magic");
  if (header.tag == 0 || header.tag > kMaxFrameTag) {
    throw ProtocolError("corrupt frame: unknown tag " + std::to_string(header.tag));
  }
  if (header.length > max_payload_) {
    throw ProtocolError("frame of " + std::to_string(header.length) + " bytes exceeds the channel's limit of " +
                        std::to_string(max_payload_) + " bytes");
  }
  payload.clear();
  std::byte* at = payload.grow(static_cast<std::size_t>(header.length));
  if (header.length && !sys::read_exact(fd_.get(), {at, static_cast<std::size_t>(header.length)})) {
    throw ProtocolError("peer closed the channel in the middle of a frame");
  }
  return true;
}

}  // namespace multiproc::detail

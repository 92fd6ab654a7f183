// A framed byte channel between two processes over a stream socket.
//
// A frame is a 24-byte header (magic, tag, id, payload length) and the payload. Everything read
// from the peer is validated before use: the magic, the tag, and the length against a bound, so a
// corrupt or hostile peer gets a ProtocolError, never an out-of-bounds read or an allocation as
// large as a length field says.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "multiproc/codec.hpp"
#include "platform.hpp"

namespace multiproc::detail {

enum class FrameTag : std::uint16_t {
  task = 1,         // parent -> worker: a chunk of items to run
  result = 2,       // worker -> parent: one outcome per item of the chunk
  fault = 3,        // worker -> parent: the chunk could not run at all (unknown task id, ...)
  init_failed = 4,  // worker -> parent: the initializer threw; payload is the exception
  boot = 5,         // parent -> spawned/forkserver child: build id, role, cwd, environment, config
  hello = 6,        // child -> parent: its build id, pid, and whether it accepts the boot frame
  retire = 7,       // worker -> parent: past max_memory_per_child, it exits after this frame
  on_socket = 8,    // in a frame ring: the frame with this id is too large for the ring and comes
                    // over the socket instead
  quit = 9,         // parent -> worker: leave (the pool is closing, or the worker idled too long)
  streamed = 10,    // in a frame ring: a task frame too large for the ring follows in `piece`
                    // frames of the same id; the payload is its length (u64)
  piece = 11,       // in a frame ring: the next bytes of a streamed frame's payload
};
inline constexpr std::uint16_t kMaxFrameTag = 11;

struct FrameHeader {
  std::uint32_t magic;
  std::uint16_t tag;
  std::uint16_t reserved;
  std::uint64_t id;
  std::uint64_t length;
};
static_assert(sizeof(FrameHeader) == 24);
inline constexpr std::uint32_t kFrameMagic = 0x3146504D;  // "MPF1"
/// In a task frame's reserved field: the chunk has a time limit, so the worker stamps the start of
/// each item (a clock read per item, which untimed chunks do without).
inline constexpr std::uint16_t kFrameTimed = 1;
/// In a task frame's reserved field: one result frame per item (a batch of one-item tasks).
inline constexpr std::uint16_t kFrameEach = 2;

/// Throws ProtocolError unless `h` is a frame header this side accepts: the magic, a known tag, a
/// payload within `max_payload`. Every frame read from a peer (socket or ring) goes through it.
void check_frame_header(const FrameHeader& h, std::size_t max_payload);
/// Throws ProtocolError when a payload of `length` bytes exceeds `max_payload` (before sending).
void check_payload_size(std::size_t length, std::size_t max_payload);

class Channel {
 public:
  Channel() = default;
  Channel(sys::UniqueFd fd, std::size_t max_payload) : fd_(std::move(fd)), max_payload_(max_payload) {}

  /// Clears `w` and leaves room for the header at its front; encode the payload after this.
  static void begin_frame(Writer& w) {
    w.clear();
    w.grow(sizeof(FrameHeader));
  }
  /// Fills in the header of a frame built after begin_frame() and sends it whole. `flags` go in
  /// the header's reserved field.
  void send(FrameTag tag, std::uint64_t id, Writer& frame, std::uint16_t flags = 0) const;
  /// Reads one frame; the payload replaces the contents of `payload`. False on a clean EOF
  /// before a frame starts. Throws ProtocolError on a bad frame or EOF inside one.
  /// Reads are buffered: one recv(2) can bring several small frames. A poll(2) on fd() does not
  /// see those, so after a recv, check has_buffered_frame() before polling again.
  bool recv(FrameHeader& header, Writer& payload);
  /// True when a whole frame is already buffered (recv() will not block).
  [[nodiscard]] bool has_buffered_frame() const noexcept;

  [[nodiscard]] int fd() const noexcept { return fd_.get(); }
  [[nodiscard]] sys::UniqueFd& handle() noexcept { return fd_; }
  [[nodiscard]] std::size_t max_payload() const noexcept { return max_payload_; }
  /// Changes the bound (after a handshake whose frames the user's bound does not cover).
  void set_max_payload(std::size_t n) noexcept { max_payload_ = n; }

 private:
  // Reads whatever the socket has (at least one byte, at most the buffer's room); false on EOF.
  bool fill();

  static constexpr std::size_t kBufferSize = 64 * 1024;
  sys::UniqueFd fd_;
  std::size_t max_payload_ = 0;
  std::unique_ptr<std::byte[]> buffer_;
  std::size_t begin_ = 0;  // unread bytes are buffer_[begin_, end_)
  std::size_t end_ = 0;
};

}  // namespace multiproc::detail

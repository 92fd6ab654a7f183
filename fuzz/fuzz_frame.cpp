// libFuzzer target: frame decoding by multiproc::detail::Channel.
//
// The input is the byte stream a peer sends: it goes into one end of a socket pair, the writing
// end is closed, and recv() reads frames from the other end until a clean EOF or a ProtocolError.
// Anything else (a crash, a sanitizer report, another exception, a leak, a hang, a frame that
// breaks the header invariants) is a bug.
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "channel.hpp"
#include "multiproc/codec.hpp"
#include "multiproc/error.hpp"
#include "platform.hpp"

namespace {

namespace mpd = multiproc::detail;

// Inputs are cut to this size: twice the channel's read buffer, so that refills that move a
// partial frame to the buffer's front are reached. Whatever the socket does not take without
// blocking is dropped (the stream then ends early, as when a peer dies).
constexpr std::size_t kMaxInput = 128 * 1024;
constexpr std::size_t kMaxPayload = 1024 * 1024;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_frame: %s\n", what);
  std::abort();
}

void write_without_blocking(int fd, const std::uint8_t* data, std::size_t size) {
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::send(fd, data + done, size - done, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // EAGAIN: the socket buffer is full
    }
    done += static_cast<std::size_t>(n);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  size = std::min(size, kMaxInput);
  auto [reader, writer] = mpd::sys::socket_pair();
  write_without_blocking(writer.get(), data, size);
  writer.reset();

  mpd::Channel channel(std::move(reader), kMaxPayload);
  mpd::FrameHeader header{};
  multiproc::Writer payload;
  std::size_t frames = 0;
  try {
    for (;;) {
      const bool buffered = channel.has_buffered_frame();
      if (!channel.recv(header, payload)) {
        if (buffered) fail("has_buffered_frame() was true, then recv() saw a clean EOF");
        break;
      }
      ++frames;
      if (header.magic != mpd::kFrameMagic) fail("recv() accepted a frame with a bad magic");
      if (header.tag == 0 || header.tag > mpd::kMaxFrameTag) fail("recv() accepted a frame with a bad tag");
      if (header.length > kMaxPayload) fail("recv() accepted a frame over the payload bound");
      if (payload.size() != header.length) fail("payload size differs from the header's length");
      // Every frame takes at least a header, and the stream is finite: recv must reach its end.
      if (frames * sizeof(mpd::FrameHeader) > size) fail("more frames than the input holds");
    }
  } catch (const multiproc::ProtocolError&) {
    // A corrupt or truncated stream: the expected outcome for most inputs.
  }
  return 0;
}

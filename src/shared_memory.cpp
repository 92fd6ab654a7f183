#include "multiproc/shared_memory.hpp"

#include <unistd.h>

#include <climits>
#include <string_view>

#include "platform.hpp"

namespace multiproc {

namespace detail {
struct SharedSegment {
  sys::UniqueFd fd;
  sys::FileMapping mapping;
  std::string name;
};

namespace {
// "/name" or "name", as shm_open(3) takes it: one path component of at most NAME_MAX bytes, with no
// NUL (a C string would end there, and another segment be named), no further '/', not "." or "..".
std::string normalized(const std::string& name) {
  if (name.empty() || name == "/") throw InvalidArgument("SharedMemory: empty name");
  const std::string n = name[0] == '/' ? name : "/" + name;
  const std::string_view rest = std::string_view(n).substr(1);
  if (rest.find('\0') != std::string_view::npos) throw InvalidArgument("SharedMemory: the name contains a NUL byte");
  if (rest.find('/') != std::string_view::npos)
    throw InvalidArgument("SharedMemory: the name '" + n + "' has a '/' after its first character");
  if (rest == "." || rest == "..") throw InvalidArgument("SharedMemory: '" + n + "' is not a name");
  if (rest.size() > NAME_MAX)
    throw InvalidArgument("SharedMemory: the name is longer than " + std::to_string(NAME_MAX) + " bytes");
  return n;
}

std::shared_ptr<SharedSegment> map_segment(sys::UniqueFd fd, std::string name) {
  auto seg = std::make_shared<SharedSegment>();
  const std::size_t size = sys::file_size(fd.get());
  seg->mapping = sys::FileMapping(fd.get(), size);
  seg->fd = std::move(fd);
  seg->name = std::move(name);
  return seg;
}
}  // namespace
}  // namespace detail

SharedMemory::SharedMemory(std::size_t size) : seg_(detail::map_segment(detail::sys::memfd("multiproc", size), {})) {}

SharedMemory SharedMemory::create(const std::string& name, std::size_t size) {
  const std::string n = detail::normalized(name);
  return SharedMemory(detail::map_segment(detail::sys::shm_open_named(n, true, size), n));
}

SharedMemory SharedMemory::attach(const std::string& name) {
  const std::string n = detail::normalized(name);
  return SharedMemory(detail::map_segment(detail::sys::shm_open_named(n, false, 0), n));
}

void* SharedMemory::data() const noexcept { return seg_ ? seg_->mapping.data() : nullptr; }
std::size_t SharedMemory::size() const noexcept { return seg_ ? seg_->mapping.size() : 0; }

const std::string& SharedMemory::name() const noexcept {
  static const std::string none;
  return seg_ ? seg_->name : none;
}

void SharedMemory::unlink() {
  if (!seg_ || seg_->name.empty()) throw StateError("SharedMemory::unlink: the segment has no name");
  detail::sys::shm_unlink_named(seg_->name);
}

// The handle: a flag, then the name (named) or the owner's pid and descriptor (anonymous).
void SharedMemory::encode_handle(Writer& w) const {
  if (!seg_) {
    w.write_value(std::uint8_t{0});
    return;
  }
  if (!seg_->name.empty()) {
    w.write_value(std::uint8_t{1});
    multiproc::encode(w, seg_->name);
    return;
  }
  w.write_value(std::uint8_t{2});
  w.write_value(static_cast<std::int32_t>(detail::sys::current_pid()));
  w.write_value(static_cast<std::int32_t>(seg_->fd.get()));
}

SharedMemory SharedMemory::decode_handle(Reader& r) {
  switch (r.read_value<std::uint8_t>()) {
    case 0:
      return SharedMemory();
    case 1:
      return attach(multiproc::decode<std::string>(r));
    case 2: {
      const auto pid = r.read_value<std::int32_t>();
      const auto fd = r.read_value<std::int32_t>();
      if (pid <= 0 || fd < 0) throw SerializationError("corrupt shared memory handle");
      return SharedMemory(detail::map_segment(detail::sys::descriptor_of(pid, fd), {}));
    }
    default:
      throw SerializationError("corrupt shared memory handle");
  }
}

}  // namespace multiproc

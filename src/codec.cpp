#include "multiproc/codec.hpp"

#include <string>

namespace multiproc {

void Writer::reallocate(std::size_t at_least) {
  std::size_t capacity = capacity_ < 64 ? 64 : capacity_ * 2;
  while (capacity < at_least) capacity *= 2;
  auto fresh = std::unique_ptr<std::byte[]>(new std::byte[capacity]);
  if (size_) std::memcpy(fresh.get(), data_.get(), size_);
  data_ = std::move(fresh);
  capacity_ = capacity;
}

std::size_t Reader::read_length(std::size_t min_element_size) {
  const auto n = read_value<std::uint64_t>();
  if (min_element_size == 0) {
    // Elements that encode to nothing (std::monostate, std::tuple<>): the input cannot bound the
    // count, so a fixed limit does.
    constexpr std::uint64_t kMaxEmptyElements = std::uint64_t{1} << 24;
    if (n > kMaxEmptyElements) {
      throw SerializationError("length field " + std::to_string(n) + " exceeds the limit of " +
                               std::to_string(kMaxEmptyElements) + " elements that encode to nothing");
    }
    return static_cast<std::size_t>(n);
  }
  if (n > remaining() / min_element_size) {
    throw SerializationError("length field " + std::to_string(n) + " exceeds the " + std::to_string(remaining()) +
                             " bytes left in the input");
  }
  return static_cast<std::size_t>(n);
}

void Reader::short_input(std::size_t wanted) const {
  throw SerializationError("truncated input: wanted " + std::to_string(wanted) + " bytes at offset " +
                           std::to_string(pos_) + ", " + std::to_string(remaining()) + " left");
}

namespace detail {
void throw_serialization_error(const char* what, const char* detail) {
  std::string msg = what;
  if (detail) msg += detail;
  throw SerializationError(msg);
}
}  // namespace detail

}  // namespace multiproc

#include "multiproc/codec.hpp"

#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "platform.hpp"

namespace multiproc {

void Writer::Release::operator()(std::byte* p) const noexcept { std::free(p); }

void Writer::reallocate(std::size_t at_least) {
  std::size_t capacity = capacity_ < 64 ? 64 : capacity_ * 2;
  while (capacity < at_least) capacity *= 2;
  // A large buffer (a big argument, a whole chunk) is filled once, right away: on huge pages that
  // is one fault per 2 MiB instead of 512. Its capacity is then a power of two times 64 bytes, a
  // multiple of the huge page.
  const bool large = capacity >= detail::kBulkBytes;
  void* p = large ? std::aligned_alloc(std::size_t{2} << 20, capacity) : std::malloc(capacity);
  if (!p) throw std::bad_alloc();
  if (large) detail::sys::advise_huge_pages(p, capacity);
  std::unique_ptr<std::byte[], Release> fresh(static_cast<std::byte*>(p));
  if (size_) std::memcpy(fresh.get(), data_.get(), size_);
  data_ = std::move(fresh);
  capacity_ = capacity;
}

namespace detail {
void prepare_bulk(void* p, std::size_t n) noexcept { sys::advise_huge_pages(p, n); }
}  // namespace detail

std::size_t Reader::read_length(std::size_t min_element_size, std::size_t element_bytes) {
  const auto n = read_value<std::uint64_t>();
  if (min_element_size == 0) {
    // Elements that encode to nothing: the input cannot bound the count, so the budget does,
    // charged in memory bytes across the whole decode (nesting cannot multiply it).
    const std::size_t each = element_bytes == 0 ? 1 : element_bytes;
    if (n > empty_budget_ / each) {
      throw SerializationError("length field " + std::to_string(n) + " of elements that encode to nothing exceeds " +
                               "what is left of the decode's budget for them (" + std::to_string(empty_budget_) +
                               " bytes)");
    }
    empty_budget_ -= static_cast<std::size_t>(n) * each;
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
                           std::to_string(position()) + ", " + std::to_string(remaining()) + " left");
}

void Reader::next_piece() {
  if (source_ == nullptr || more_ == 0) short_input(1);
  const auto piece = source_->next();
  if (piece.empty() || piece.size() > more_) {
    throw ProtocolError("a streamed input's piece of " + std::to_string(piece.size()) + " bytes does not fit the " +
                        std::to_string(more_) + " bytes still to come");
  }
  done_ += bytes_.size();
  more_ -= piece.size();
  bytes_ = piece;
  pos_ = 0;
}

void Reader::read_across(std::byte* out, std::size_t n) {
  read_runs(n, [&](std::span<const std::byte> run) {
    std::memcpy(out, run.data(), run.size());
    out += run.size();
  });
}

std::span<const std::byte> Reader::take_across(std::size_t n) {
  if (n > remaining()) short_input(n);
  if (available() == 0) {
    next_piece();
    if (n <= available()) return take(n);
  }
  Writer& scratch = source_->scratch;
  scratch.clear();
  std::byte* at = scratch.grow(n);
  read_across(at, n);
  return {at, n};
}

namespace detail {
void throw_serialization_error(const char* what, const char* detail) {
  std::string msg = what;
  if (detail) msg += detail;
  throw SerializationError(msg);
}
}  // namespace detail

}  // namespace multiproc

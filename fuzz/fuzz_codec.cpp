// libFuzzer target: decoding with multiproc::decode<T> and the task outcome format.
//
// The first input byte picks what to decode (see fuzz_types.hpp); the rest is the encoding.
// Bad bytes must end in a SerializationError (or a ProtocolError); anything else (a crash, a
// sanitizer report, another exception such as std::bad_alloc or std::length_error, a leak, a hang)
// is a bug. A value that does decode is checked once more: encoding it, decoding that and encoding
// again must give the same bytes (or an equal value, for unordered containers).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iterator>
#include <span>
#include <string>

#include "fuzz_types.hpp"
#include "multiproc/codec.hpp"
#include "multiproc/detail/task.hpp"
#include "multiproc/error.hpp"

namespace {

using namespace multiproc_fuzz;
namespace mpd = multiproc::detail;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_codec: %s\n", what);
  std::abort();
}

volatile std::size_t g_sink = 0;

template <class T>
void check(std::span<const std::byte> bytes) {
  T value{};
  try {
    multiproc::Reader r(bytes);
    multiproc::decode(r, value);
    if (r.position() > bytes.size()) fail("the reader moved past its input");
  } catch (const multiproc::SerializationError&) {
    return;
  } catch (const multiproc::ProtocolError&) {
    return;
  }

  multiproc::Writer first;
  multiproc::encode(first, value);
  T again{};
  try {
    again = multiproc::from_bytes<T>(first.bytes());
  } catch (const multiproc::Error& e) {
    std::fprintf(stderr, "fuzz_codec: re-encoded value does not decode: %s\n", e.what());
    std::abort();
  }
  if constexpr (std::is_same_v<T, HashMap>) {
    // Iteration order, so the encoding, depends on insertion history: compare the values.
    if (again != value) fail("decode(encode(v)) != v");
  } else {
    multiproc::Writer second;
    multiproc::encode(second, again);
    if (second.size() != first.size() || std::memcmp(second.data(), first.data(), first.size()) != 0) {
      fail("encode(decode(encode(v))) != encode(v)");
    }
  }
}

// A task's outcome: its tag, then the value (a string here) or the error, which must come back as
// an exception_ptr to a std::exception (the error a task had, not a decoding failure).
void check_outcome(std::span<const std::byte> bytes) {
  multiproc::Reader r(bytes);
  try {
    const mpd::OutcomeTag tag = mpd::read_outcome_tag(r);
    if (tag == mpd::OutcomeTag::value) {
      g_sink = g_sink + multiproc::decode<std::string>(r).size();
      return;
    }
    const std::exception_ptr error = mpd::outcome_error(tag, r);
    if (!error) fail("outcome_error returned a null exception_ptr");
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      g_sink = g_sink + std::strlen(e.what());
      if (const auto* info = multiproc::remote_info(e)) {
        g_sink = g_sink + info->type_name().size() + info->message().size();
      }
    } catch (...) {
      fail("outcome_error gave an exception that is not a std::exception");
    }
  } catch (const multiproc::SerializationError&) {
  } catch (const multiproc::ProtocolError&) {
  }
}

// One checker per Kind, in the enum's order.
using Checker = void (*)(std::span<const std::byte>);
constexpr Checker kCheckers[] = {
    check<Int>,           check<String>,      check<IntVector>, check<StringVector>, check<ScoreMap>,
    check<OptionalTuple>, check<Variant>,     check<Record>,    check_outcome,       check<BoolVector>,
    check<StringSet>,     check<HashMap>,     check<Nested>,    check<ArrayPair>,    check<VariantVector>,
    check<Point>,         check<EmptyNested>,
};
static_assert(std::size(kCheckers) == kKindCount);

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  kCheckers[data[0] % kKindCount](bytes);
  return 0;
}

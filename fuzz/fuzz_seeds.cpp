// Writes the fuzzers' seed corpus: valid frame streams and valid encodings.
//
//     fuzz_seeds DIR    # writes DIR/frame/seed-* and DIR/codec/seed-*
//
// Frames are sent through a real Channel and read back from the socket, so they are exactly what
// a peer sends. A codec seed is the kind byte of fuzz_types.hpp followed by an encoding.
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "channel.hpp"
#include "fuzz_types.hpp"
#include "multiproc/codec.hpp"
#include "multiproc/detail/task.hpp"
#include "multiproc/error.hpp"
#include "platform.hpp"

namespace {

using namespace multiproc_fuzz;
namespace mpd = multiproc::detail;
namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;

class SeedDir {
 public:
  explicit SeedDir(fs::path dir) : dir_(std::move(dir)) { fs::create_directories(dir_); }
  void write(const Bytes& bytes) {
    char name[32];
    std::snprintf(name, sizeof name, "seed-%03d", next_++);
    std::ofstream out(dir_ / name, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error("cannot write " + (dir_ / name).string());
  }

 private:
  fs::path dir_;
  int next_ = 0;
};

// ---- frames ----------------------------------------------------------------------------------
struct Frame {
  mpd::FrameTag tag;
  std::uint64_t id;
  Bytes payload;
};

// The bytes a Channel sends for `frames`, read back from the other end of a socket pair.
Bytes stream_of(const std::vector<Frame>& frames) {
  auto [reader, writer] = mpd::sys::socket_pair();
  Bytes stream;
  std::thread drain([&, fd = reader.get()] {
    std::byte buf[4096];
    while (const std::size_t n = mpd::sys::read_some(fd, buf)) stream.insert(stream.end(), buf, buf + n);
  });
  {
    mpd::Channel channel(std::move(writer), std::size_t{1} << 20);
    multiproc::Writer w;
    for (const Frame& f : frames) {
      mpd::Channel::begin_frame(w);
      w.write_bytes(f.payload.data(), f.payload.size());
      channel.send(f.tag, f.id, w);
    }
  }  // closes the writing end: the drain sees EOF
  drain.join();
  return stream;
}

template <class... Ts>
Bytes encoded(const Ts&... values) {
  multiproc::Writer w;
  multiproc::encode_all(w, values...);
  return {w.data(), w.data() + w.size()};
}

Bytes exception_outcome(const std::exception_ptr& error) {
  multiproc::Writer w;
  try {
    std::rethrow_exception(error);
  } catch (...) {
    mpd::encode_current_exception(w);
  }
  // The outcome ends with the worker's pid: a fixed one keeps the seeds the same from run to run.
  const std::int32_t pid = 4242;
  std::memcpy(w.data() + w.size() - sizeof pid, &pid, sizeof pid);
  return {w.data(), w.data() + w.size()};
}

// A Point with its padding zeroed (its encoding is its bytes, padding included).
Point point(double x, double y, std::int32_t id, Color color) {
  Point p;
  std::memset(&p, 0, sizeof p);
  p.x = x;
  p.y = y;
  p.id = id;
  p.color = color;
  return p;
}

void write_frame_seeds(SeedDir& dir) {
  Bytes result = encoded(std::uint8_t{0}, std::string("a result"));
  const Bytes error = exception_outcome(std::make_exception_ptr(std::runtime_error("boom")));
  result.insert(result.end(), error.begin(), error.end());

  dir.write(stream_of({}));
  dir.write(stream_of({{mpd::FrameTag::task, 1, encoded(std::uint64_t{0x1234}, std::vector<int>{1, 2, 3})}}));
  dir.write(stream_of({{mpd::FrameTag::result, 1, result}}));
  dir.write(stream_of({{mpd::FrameTag::hello, 0, encoded(std::string("build"), std::int32_t{42}, true)},
                       {mpd::FrameTag::boot, 0, encoded(std::vector<std::string>{"A=1", "B=2"})},
                       {mpd::FrameTag::fault, 7, encoded(std::string("unknown task id"))},
                       {mpd::FrameTag::init_failed, 0, error},
                       {mpd::FrameTag::retire, 0, {}}}));
  std::vector<Frame> many;
  for (std::uint64_t i = 0; i < 64; ++i) many.push_back({mpd::FrameTag::task, i, Bytes(i % 7)});
  dir.write(stream_of(many));
  // Payloads around the size of the channel's read buffer (64 KiB).
  dir.write(stream_of({{mpd::FrameTag::task, 2, Bytes(60 * 1024, std::byte{0x5a})},
                       {mpd::FrameTag::result, 2, Bytes(8 * 1024, std::byte{0xa5})}}));
}

// ---- codec -----------------------------------------------------------------------------------
template <class T>
Bytes codec_seed(Kind kind, const T& value) {
  Bytes out{static_cast<std::byte>(kind)};
  const Bytes body = encoded(value);
  out.insert(out.end(), body.begin(), body.end());
  return out;
}

Bytes outcome_seed(const Bytes& outcome) {
  Bytes out{static_cast<std::byte>(Kind::outcome)};
  out.insert(out.end(), outcome.begin(), outcome.end());
  return out;
}

Record sample_record() {
  Record r;
  r.name = "Ada";
  r.age = 36;
  r.active = true;
  r.tags = {"math", "engines"};
  r.scores = {{"x", {1.0, 2.5}}, {"y", {}}};
  r.lucky = 7;
  r.id = std::string("id-1");
  r.seen = {3, 1, 2};
  r.note = std::make_shared<std::string>("note");
  r.extra = std::make_unique<std::int32_t>(5);
  r.flags = {true, false, true};
  r.pair = {"p", 0.5f};
  return r;
}

void write_codec_seeds(SeedDir& dir) {
  dir.write(codec_seed(Kind::int_, Int{-42}));
  dir.write(codec_seed(Kind::string, String("hello, fuzzer")));
  dir.write(codec_seed(Kind::string, String()));
  dir.write(codec_seed(Kind::int_vector, IntVector{1, -2, 3, 1 << 30}));
  dir.write(codec_seed(Kind::string_vector, StringVector{"a", "", "ccc"}));
  dir.write(codec_seed(Kind::score_map, ScoreMap{{"alpha", {0.5, -1.0}}, {"beta", {}}}));
  dir.write(codec_seed(Kind::optional_tuple, OptionalTuple(std::tuple<int, std::string>{3, "three"})));
  dir.write(codec_seed(Kind::optional_tuple, OptionalTuple()));
  dir.write(codec_seed(Kind::variant, Variant(7)));
  dir.write(codec_seed(Kind::variant, Variant(std::string("seven"))));
  dir.write(codec_seed(Kind::variant, Variant(std::vector<std::uint8_t>{1, 2, 3})));
  dir.write(codec_seed(Kind::record, sample_record()));
  dir.write(codec_seed(Kind::record, Record{}));
  dir.write(codec_seed(Kind::bool_vector, BoolVector{true, false, false, true}));
  dir.write(codec_seed(Kind::string_set, StringSet{"x", "yy", "zzz"}));
  dir.write(codec_seed(Kind::hash_map, HashMap{{1, "one"}, {-2, "minus two"}}));
  dir.write(codec_seed(Kind::nested, Nested{{1, 2}, {}, {-3}}));
  dir.write(codec_seed(Kind::array_pair, ArrayPair{{"left", "right"}, false}));
  dir.write(codec_seed(Kind::variant_vector,
                       VariantVector{std::monostate{}, 2.5, std::string("s"), point(1, 2, 3, Color::blue)}));
  dir.write(codec_seed(Kind::point, point(-1.5, 4.0, 9, Color::green)));
  dir.write(codec_seed(Kind::empty_nested, EmptyNested{{std::monostate{}}, {}}));

  // Outcomes: a value, exceptions as a worker encodes them, a crash, and each pool error kind.
  dir.write(outcome_seed(encoded(std::uint8_t{0}, std::string("value"))));
  dir.write(outcome_seed(exception_outcome(std::make_exception_ptr(std::out_of_range("index 9")))));
  dir.write(outcome_seed(exception_outcome(std::make_exception_ptr(multiproc::ProtocolError("bad frame")))));
  dir.write(outcome_seed(exception_outcome(std::make_exception_ptr(std::bad_alloc()))));
  dir.write(outcome_seed(exception_outcome(std::make_exception_ptr(42))));
  dir.write(outcome_seed(
      encoded(std::uint8_t{2}, std::int32_t{CLD_KILLED}, std::int32_t{SIGSEGV}, std::int32_t{1234}, std::uint64_t{5})));
  for (std::uint8_t kind = 0; kind <= 4; ++kind) {
    dir.write(outcome_seed(encoded(std::uint8_t{3}, kind, std::string("pool error"))));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR (writes DIR/frame/seed-* and DIR/codec/seed-*)\n", argv[0]);
    return 2;
  }
  try {
    const fs::path root(argv[1]);
    SeedDir frames(root / "frame");
    write_frame_seeds(frames);
    SeedDir codec(root / "codec");
    write_codec_seeds(codec);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}

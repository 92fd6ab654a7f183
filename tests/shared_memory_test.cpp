// SharedMemory and SharedArray: the same memory in every process, passed to tasks without a copy,
// and nothing left behind.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <multiproc/multiproc.hpp>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using multiproc::SharedArray;
using multiproc::SharedMemory;

std::size_t write_ends(SharedArray<double> a) {
  a[0] = 42.0;
  a[a.size() - 1] = 7.0;
  return a.size();
}

std::size_t count_maps_of(const std::string& what) {
  std::ifstream maps("/proc/self/maps");
  std::size_t n = 0;
  for (std::string line; std::getline(maps, line);) n += line.find(what) != std::string::npos;
  return n;
}

std::size_t dev_shm_entries() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/dev/shm")) ++n;
  return n;
}

TEST(SharedMemoryTest, ForkedChildWritesAreSeenByTheParent) {
  SharedMemory shm(64);
  std::strcpy(static_cast<char*>(shm.data()), "parent");
  multiproc::Process child{[&] { std::strcpy(static_cast<char*>(shm.data()), "child"); }};
  child.start();
  child.join();
  EXPECT_STREQ(static_cast<const char*>(shm.data()), "child");
}

// The zero-copy case: 1 GiB passed to a Pool task; the worker maps the same memory. The
// call is compared with a copy of the same memory timed in the same run: it must take less.
TEST(SharedMemoryTest, GiBSharedArrayPassedToATaskIsNotCopied) {
  constexpr std::size_t kBytes = std::size_t{1} << 30;
  SharedArray<double> a(kBytes / sizeof(double));
  multiproc::Pool pool{{.processes = 1}};
  (void)pool.apply(write_ends, SharedArray<double>(16));  // worker started and warm
  // The fastest of a few calls: a call that maps the memory is quick every time and one that
  // copies it never is, while a busy machine may delay any one of them.
  auto call = std::chrono::steady_clock::duration::max();
  for (int i = 0; i < 3; ++i) {
    a[0] = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
    const std::size_t n = pool.apply(write_ends, a);
    call = std::min(call, std::chrono::steady_clock::now() - t0);
    EXPECT_EQ(n, a.size());
    EXPECT_EQ(a[0], 42.0);  // written by the worker, into this memory
    EXPECT_EQ(a[a.size() - 1], 7.0);
  }

  std::vector<char> src(kBytes / 4, 1), dst(kBytes / 4);
  const auto c0 = std::chrono::steady_clock::now();
  std::memcpy(dst.data(), src.data(), src.size());
  const auto quarter_copy = std::chrono::steady_clock::now() - c0;
  EXPECT_EQ(dst[dst.size() - 1], 1);
  // A copy of the whole GiB takes about 4 quarter copies, and a call that sent the GiB would make
  // more than one (into the message, through the socket, out of it): the call must take less than
  // one whole copy.
  EXPECT_LT(call, 4 * quarter_copy) << "call " << std::chrono::duration<double, std::milli>(call).count()
                                    << " ms, copying a quarter of it "
                                    << std::chrono::duration<double, std::milli>(quarter_copy).count() << " ms";
}

TEST(SharedMemoryTest, NamedSegmentCreateAttachUnlink) {
  const std::string name = "/multiproc-test-" + std::to_string(::getpid());
  {
    SharedMemory a = SharedMemory::create(name, 4096);
    struct stat st {};
    ASSERT_EQ(::stat(("/dev/shm" + name).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_THROW(SharedMemory::create(name, 4096), multiproc::SystemError);  // exists
    SharedMemory b = SharedMemory::attach(name);
    EXPECT_EQ(b.size(), 4096u);
    std::strcpy(static_cast<char*>(a.data()), "named");
    EXPECT_STREQ(static_cast<const char*>(b.data()), "named");
    EXPECT_EQ(a.name(), name);
    a.unlink();
    EXPECT_NE(::stat(("/dev/shm" + name).c_str(), &st), 0);
    EXPECT_STREQ(static_cast<const char*>(b.data()), "named");  // still mapped
  }
  EXPECT_THROW(SharedMemory::attach(name), multiproc::SystemError);
  EXPECT_THROW(SharedMemory(16).unlink(), multiproc::StateError);
}

// A name with a NUL byte would be cut there by shm_open (attach("name\0a") would map "name", and
// its unlink() remove that other segment): every name that is not one shm_open component is refused.
TEST(SharedMemoryTest, InvalidNamesAreInvalidArgument) {
  const std::string name = "/multiproc-test-nul-" + std::to_string(::getpid());
  SharedMemory real = SharedMemory::create(name, 4096);
  const std::string with_nul = name + std::string("\0a", 2);
  EXPECT_THROW(SharedMemory::attach(with_nul), multiproc::InvalidArgument);
  EXPECT_THROW(SharedMemory::create(with_nul, 4096), multiproc::InvalidArgument);
  for (const std::string& bad : std::vector<std::string>{"", "/", "a/b", "/a/b", ".", "/..", std::string(300, 'x')}) {
    EXPECT_THROW(SharedMemory::create(bad, 4096), multiproc::InvalidArgument) << bad;
    EXPECT_THROW(SharedMemory::attach(bad), multiproc::InvalidArgument) << bad;
  }
  struct stat st {};
  EXPECT_EQ(::stat(("/dev/shm" + name).c_str(), &st), 0) << "the real segment is untouched";
  real.unlink();
}

TEST(SharedMemoryTest, CorruptHandleThrowsSerializationError) {
  multiproc::Writer w;
  w.write_value(std::uint8_t{9});
  multiproc::Reader r(w.bytes());
  EXPECT_THROW(multiproc::decode<SharedMemory>(r), multiproc::SerializationError);
}

TEST(SharedMemoryTest, NothingLeftAfterDestruction) {
  const int fds = test_support::count_open_fds();
  const std::size_t maps = count_maps_of("memfd:multiproc");
  const std::size_t shm_entries = dev_shm_entries();
  {
    SharedMemory a(1 << 20);
    SharedArray<int> b(1000);
    SharedMemory copy = a;
    multiproc::Pool pool{{.processes = 1}};
    EXPECT_EQ(pool.apply([](SharedArray<int> x) { return static_cast<int>(x.size()); }, b), 1000);
    EXPECT_GT(count_maps_of("memfd:multiproc"), maps);
  }
  EXPECT_EQ(test_support::count_open_fds(), fds);
  EXPECT_EQ(count_maps_of("memfd:multiproc"), maps);
  EXPECT_EQ(dev_shm_entries(), shm_entries);
}

}  // namespace

// imap keeps a bounded number of chunks in flight: 10^7 items go through in constant memory.
// (Its own binary: the peak-RSS measurement must not see other tests' allocations.)
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>

#include "pool_test_common.hpp"

#ifdef POOLTEST_ASAN
// ASan keeps freed blocks in a quarantine (256 MiB by default) that would count as growth.
extern "C" const char* __asan_default_options() { return "quarantine_size_mb=8"; }
#endif

namespace pooltest {
namespace {

#if POOLTEST_HAVE_VIEWS

std::int64_t times_three(std::int64_t x) { return 3 * x; }

// A field of /proc/self/status in KiB ("VmRSS", "VmHWM"), or -1.
long status_kib(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
  }
  return -1;
}

// Resets VmHWM (the peak) to the current RSS; false where the kernel does not allow it.
bool reset_peak_rss() {
  FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (!f) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

constexpr std::int64_t kItems = 10'000'000;
constexpr long kBoundKib = 50 * 1024;

template <class MakeRange>
void check_bounded(multiproc::Pool& pool, MakeRange make_range) {
  // Warm up, so that the allocator's arenas and the workers exist before the measurement.
  std::int64_t warm = 0;
  for (std::int64_t y : make_range(pool, 200'000)) warm += y;
  ASSERT_EQ(warm, 3 * (200'000LL * 199'999 / 2));

  const bool peak = reset_peak_rss();
  const long before = status_kib("VmRSS");
  ASSERT_GT(before, 0);
  std::int64_t sum = 0;
  std::int64_t n = 0;
  for (std::int64_t y : make_range(pool, kItems)) {
    sum += y;
    ++n;
  }
  const long after = peak ? status_kib("VmHWM") : status_kib("VmRSS");
  EXPECT_EQ(n, kItems);
  EXPECT_EQ(sum, 3 * (kItems * (kItems - 1) / 2));
  EXPECT_LT(after - before, kBoundKib) << (peak ? "peak" : "final") << " RSS grew from " << before << " KiB to "
                                       << after << " KiB";
}

TEST(PoolImapMemory, OrderedTenMillionItemsInBoundedMemory) {
  multiproc::Pool pool{{.processes = 2}};
  check_bounded(pool, [](multiproc::Pool& p, std::int64_t n) {
    return p.imap(times_three, std::views::iota(std::int64_t{0}, n), 10000);
  });
}

TEST(PoolImapMemory, UnorderedTenMillionItemsInBoundedMemory) {
  multiproc::Pool pool{{.processes = 2}};
  check_bounded(pool, [](multiproc::Pool& p, std::int64_t n) {
    return p.imap_unordered(times_three, std::views::iota(std::int64_t{0}, n), 10000);
  });
}
#else
TEST(PoolImapMemory, NeedsClang16OrGcc) {
  GTEST_SKIP() << "clang < 16 cannot compile libstdc++'s range views (llvm/llvm-project#52696)";
}
#endif

}  // namespace
}  // namespace pooltest

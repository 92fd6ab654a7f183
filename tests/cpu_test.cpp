// cpu_count(): the affinity mask, limited by a cgroup v2 CPU quota.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <multiproc/cpu.hpp>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

std::vector<int> affinity_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  EXPECT_EQ(::sched_getaffinity(0, sizeof set, &set), 0);
  std::vector<int> cpus;
  for (int i = 0; i < CPU_SETSIZE; ++i) {
    if (CPU_ISSET(i, &set)) cpus.push_back(i);
  }
  return cpus;
}

// The tightest cgroup v2 quota on the path from this process's cgroup to the root, rounded up;
// INT_MAX when there is none. Written independently of the library's reading of the same files.
int cgroup_v2_limit() {
  std::ifstream cg("/proc/self/cgroup");
  std::string line, path;
  while (std::getline(cg, line)) {
    if (line.starts_with("0::")) path = line.substr(3);
  }
  if (path.empty()) return INT_MAX;
  int limit = INT_MAX;
  for (;;) {
    std::ifstream f("/sys/fs/cgroup" + (path == "/" ? std::string() : path) + "/cpu.max");
    std::string quota;
    long long period = 0;
    if (f >> quota >> period && quota != "max" && period > 0) {
      const long long q = std::stoll(quota);
      limit = std::min<long long>(limit, (q + period - 1) / period);
    }
    if (path == "/") break;
    path = path.substr(0, path.find_last_of('/'));
    if (path.empty()) path = "/";
  }
  return limit;
}

// Runs `f` in a plain forked child (so affinity changes stay there) and returns its exit code.
template <class F>
int in_child(F f) {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(f());
  const auto status = test_support::wait_exit(pid);
  if (!status || !WIFEXITED(*status)) return -1;
  return WEXITSTATUS(*status);
}

TEST(CpuTest, CpuCountIsAtLeastOneAndAtMostTheAffinityCount) {
  const int n = multiproc::cpu_count();
  EXPECT_GE(n, 1);
  EXPECT_LE(n, static_cast<int>(affinity_cpus().size()));
  EXPECT_LE(n, static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN)));
}

TEST(CpuTest, CpuCountIsTheAffinityCountLimitedByTheCgroupQuota) {
  const int affinity = static_cast<int>(affinity_cpus().size());
  EXPECT_EQ(multiproc::cpu_count(), std::max(1, std::min(affinity, cgroup_v2_limit())));
}

TEST(CpuTest, CpuCountFollowsAnAffinityOfOneCpu) {
  const std::vector<int> cpus = affinity_cpus();
  ASSERT_FALSE(cpus.empty());
  const int r = in_child([&] {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpus.back(), &one);
    if (::sched_setaffinity(0, sizeof one, &one) != 0) return 2;
    return multiproc::cpu_count() == 1 ? 0 : 1;
  });
  EXPECT_EQ(r, 0);
  EXPECT_EQ(affinity_cpus(), cpus);  // the test process itself is unaffected
}

TEST(CpuTest, CpuCountFollowsAnAffinityOfTwoCpus) {
  const std::vector<int> cpus = affinity_cpus();
  if (cpus.size() < 2) GTEST_SKIP() << "only one CPU";
  const int expected = std::min(2, cgroup_v2_limit());
  const int r = in_child([&] {
    cpu_set_t two;
    CPU_ZERO(&two);
    CPU_SET(cpus[0], &two);
    CPU_SET(cpus[1], &two);
    if (::sched_setaffinity(0, sizeof two, &two) != 0) return 2;
    return multiproc::cpu_count() == expected ? 0 : 1;
  });
  EXPECT_EQ(r, 0);
}

TEST(CpuTest, CpuCountIsStable) {
  const int n = multiproc::cpu_count();
  for (int i = 0; i < 10; ++i) EXPECT_EQ(multiproc::cpu_count(), n);
}

}  // namespace

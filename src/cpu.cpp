#include "multiproc/cpu.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

namespace multiproc {

namespace {

int affinity_cpus() noexcept {
  // The mask can be larger than CPU_SETSIZE on big machines: grow until the kernel accepts it.
  for (int n = 1024; n <= (1 << 20); n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (!set) break;
    const std::size_t size = CPU_ALLOC_SIZE(n);
    CPU_ZERO_S(size, set);
    if (::sched_getaffinity(0, size, set) == 0) {
      const int count = CPU_COUNT_S(size, set);
      CPU_FREE(set);
      return count;
    }
    CPU_FREE(set);
    if (errno != EINVAL) break;
  }
  const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
  return online > 0 ? static_cast<int>(online) : 1;
}

// cgroup v2: "0::/some/path" in /proc/self/cgroup; limits in /sys/fs/cgroup/<path>/cpu.max as
// "max 100000" or "<quota> <period>". The tightest limit on the path to the root applies.
int cgroup_cpu_limit() noexcept {
  try {
    std::ifstream cg("/proc/self/cgroup");
    std::string line, path;
    while (std::getline(cg, line)) {
      if (line.rfind("0::", 0) == 0) {
        path = line.substr(3);
        break;
      }
    }
    if (path.empty()) return INT_MAX;
    int limit = INT_MAX;
    for (;;) {
      std::ifstream f("/sys/fs/cgroup" + (path == "/" ? std::string() : path) + "/cpu.max");
      std::string quota;
      long long period = 0;
      if (f >> quota >> period && quota != "max" && period > 0) {
        const long long q = std::stoll(quota);
        if (q > 0) limit = std::min<long long>(limit, (q + period - 1) / period);
      }
      if (path == "/" || path.empty()) break;
      const auto slash = path.find_last_of('/');
      path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
    }
    return limit;
  } catch (...) {
    return INT_MAX;
  }
}

}  // namespace

int cpu_count() noexcept {
  const int n = std::min(affinity_cpus(), cgroup_cpu_limit());
  return std::max(1, n);
}

}  // namespace multiproc

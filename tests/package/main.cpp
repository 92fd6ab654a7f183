// A consumer of an installed multiproc: includes the umbrella header, calls into the compiled
// library, and uses a header-only part (the codec). Exits non-zero if anything is off.
#include <cstdio>
#include <map>
#include <multiproc/multiproc.hpp>
#include <string>
#include <vector>

int square(int x) { return x * x; }

int main() {
  const int cpus = multiproc::cpu_count();
  std::printf("multiproc::cpu_count() = %d\n", cpus);
  if (cpus < 1) return 1;

  const std::map<std::string, int> sent{{"cpus", cpus}};
  const auto received = multiproc::from_bytes<std::map<std::string, int>>(multiproc::to_bytes(sent));
  if (received != sent) {
    std::puts("codec round trip failed");
    return 1;
  }
  std::puts("codec round trip ok");

  // A pool, as a user's first program has one: two workers, a map, an apply.
  multiproc::Pool pool{{.processes = 2}};
  const std::vector<int> squares = pool.map(square, std::vector<int>{1, 2, 3, 4});
  if (squares != std::vector<int>{1, 4, 9, 16} || pool.apply(square, 7) != 49) {
    std::puts("pool results wrong");
    return 1;
  }
  std::puts("pool ok");
  return 0;
}

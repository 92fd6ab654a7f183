// The "Using a pool of workers" example of Python's multiprocessing documentation, in multiproc.
//
// Python:
//     with Pool(processes=4) as pool:
//         print(pool.map(f, range(10)))
//         for i in pool.imap_unordered(f, range(10)): print(i)
//         res = pool.apply_async(f, (20,)); print(res.get(timeout=1))
//         res = pool.apply_async(os.getpid, ()); print(res.get(timeout=1))
//         multiple_results = [pool.apply_async(os.getpid, ()) for i in range(4)]
//         print([res.get(timeout=1) for res in multiple_results])
//         res = pool.apply_async(time.sleep, (10,))
//         try: print(res.get(timeout=1))
//         except TimeoutError: print("We lacked patience and got a multiprocessing.TimeoutError")
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <multiproc/multiproc.hpp>
#include <numeric>
#include <thread>
#include <vector>

namespace mp = multiproc;
using namespace std::chrono_literals;

int f(int x) { return x * x; }
int get_pid() { return static_cast<int>(::getpid()); }
void sleep_seconds(int s) { std::this_thread::sleep_for(std::chrono::seconds(s)); }

int main() {
  multiproc::init();  // first in main (see README: start methods)
  mp::Pool pool{{.processes = 4}};
  std::vector<int> range10(10);
  std::iota(range10.begin(), range10.end(), 0);  // Python's range(10)

  // print "[0, 1, 4,..., 81]"
  std::printf("[");
  for (int y : pool.map(f, range10)) std::printf("%d, ", y);
  std::printf("]\n");

  // print same numbers in arbitrary order
  for (int y : pool.imap_unordered(f, range10)) std::printf("%d\n", y);

  // evaluate "f(20)" asynchronously
  auto res = pool.apply_async(f, 20);  // runs in *only* one process
  std::printf("%d\n", res.get(1s));    // prints "400"

  // evaluate "getpid()" asynchronously
  auto pid = pool.apply_async(get_pid);
  std::printf("%d\n", pid.get(1s));  // prints the pid of that worker

  // launching multiple evaluations asynchronously *may* use more processes
  std::vector<mp::AsyncResult<int>> multiple;
  for (int i = 0; i < 4; ++i) multiple.push_back(pool.apply_async(get_pid));
  for (auto& r : multiple) std::printf("%d ", r.get(1s));
  std::printf("\n");

  // make a single worker sleep for 10 seconds
  auto slow = pool.apply_async(sleep_seconds, 10);
  try {
    slow.get(1s);
  } catch (const mp::Timeout&) {
    std::printf("We lacked patience and got a multiproc::Timeout\n");
  }

  std::printf("For the moment, the pool remains available for more work\n");
  // leaving the scope terminates the pool: the sleeping task is cancelled, nobody waits 10 s
}

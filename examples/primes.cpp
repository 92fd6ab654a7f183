// The ProcessPoolExecutor example of Python's concurrent.futures documentation, in multiproc.
//
// Python:
//     PRIMES = [112272535095293, 112582705942171, 112272535095293, 115280095190773,
//               115797848077099, 1099726899285419]
//     with concurrent.futures.ProcessPoolExecutor() as executor:
//         for number, prime in zip(PRIMES, executor.map(is_prime, PRIMES)):
//             print('%d is prime: %s' % (number, prime))
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <multiproc/multiproc.hpp>
#include <vector>

bool is_prime(std::int64_t n) {
  if (n < 2) return false;
  if (n == 2) return true;
  if (n % 2 == 0) return false;
  const auto limit = static_cast<std::int64_t>(std::sqrt(static_cast<double>(n)));
  for (std::int64_t i = 3; i <= limit; i += 2) {
    if (n % i == 0) return false;
  }
  return true;
}

int main() {
  multiproc::init();  // first in main (see README: start methods)
  const std::vector<std::int64_t> primes = {112272535095293, 112582705942171, 112272535095293,
                                            115280095190773, 115797848077099, 1099726899285419};
  multiproc::Pool pool;
  const std::vector<bool> results = pool.map(is_prime, primes, 1);
  for (std::size_t i = 0; i < primes.size(); ++i) {
    std::printf("%lld is prime: %s\n", static_cast<long long>(primes[i]), results[i] ? "True" : "False");
  }
}

// Positive control for capturing_lambda.cpp: the same program with a captureless lambda compiles,
// so the compile-fail test cannot pass for an unrelated reason (a missing include, a typo).
#include <multiproc/pool.hpp>

#include <vector>

int main() {
  multiproc::Pool pool{{.processes = 1}};
  std::vector<int> xs{1, 2, 3};
  auto ys = pool.map([](int x) { return x + 3; }, xs);
  return static_cast<int>(ys.size());
}

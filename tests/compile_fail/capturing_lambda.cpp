// Must NOT compile: a lambda with captures cannot be sent to a worker process, and the error
// must say so (checked by tests/compile_fail/check.cmake for "lambda with captures").
// Its twin captureless_lambda.cpp differs only in the lambda and must compile.
#include <multiproc/pool.hpp>

#include <vector>

int main() {
  multiproc::Pool pool{{.processes = 1}};
  std::vector<int> xs{1, 2, 3};
  int k = 3;
  auto ys = pool.map([k](int x) { return x + k; }, xs);
  return static_cast<int>(ys.size());
}

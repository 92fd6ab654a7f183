// Must NOT compile: under spawn (fixed at compile time by get_context<>) a Process target that is
// a closure cannot reach the child, and the error must say so. Its twin spawn_function_process.cpp
// differs only in the target and must compile.
#include <multiproc/context.hpp>

int main() {
  int code = 3;
  auto p = multiproc::get_context<multiproc::StartMethod::spawn>().process([&code] { (void)code; });
  p.start();
  p.join();
  return 0;
}

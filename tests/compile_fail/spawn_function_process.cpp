// Must compile: the positive control of spawn_closure_process.cpp (a function and an encodable
// argument instead of a closure).
#include <multiproc/context.hpp>

namespace {
void target(int code) { (void)code; }
}  // namespace

int main() {
  auto p = multiproc::get_context<multiproc::StartMethod::spawn>().process(target, 3);
  p.start();
  p.join();
  return 0;
}

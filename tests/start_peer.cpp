// A second program linked with multiproc: a different build than the test binaries, for the
// tests of a worker executable of another build. With MULTIPROC_PEER_SKIP_INIT set, its main()
// does not call multiproc::init(), like a program that forgot to.
#include <cstdio>
#include <cstdlib>

#include <multiproc/start_method.hpp>

int main() {
  if (!std::getenv("MULTIPROC_PEER_SKIP_INIT")) multiproc::init();
  std::puts("start_peer: an ordinary run of main()");
  return 0;
}

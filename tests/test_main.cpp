// The main() of every test binary: multiproc::init() first, so that the binary can be a spawned
// or forkserver child of itself, then GoogleTest.
#include <gtest/gtest.h>

#include <multiproc/start_method.hpp>

int main(int argc, char** argv) {
  multiproc::init();
  // Under forkserver (MULTIPROC_START_METHOD), the server and its descriptor exist before any test
  // counts children or descriptors.
  if (multiproc::get_start_method() == multiproc::StartMethod::forkserver) multiproc::start_fork_server();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}

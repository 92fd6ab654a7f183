#include <gtest/gtest.h>

#include <multiproc/multiproc.hpp>

TEST(Smoke, ProcessExitsWithCode) {
  multiproc::Process p{[] { std::exit(3); }};
  p.start();
  p.join();
  EXPECT_EQ(p.exit_status(), multiproc::ExitStatus::exited_with(3));
}

# Pool chaos and endurance: 20,000 tasks of which a seeded 5% segfault, abort, exit, SIGKILL
# themselves, throw or hang past the task timeout; 300 create/destroy cycles per start method; a
# parent SIGKILLed mid-map under fork, forkserver and spawn.
multiproc_add_test(test_pool_chaos SOURCES pool_chaos_test.cpp TIMEOUT 180)

# The long runs of the same tests (label chaos_full): 100,000 chaos tasks and 10,000 cycles per
# start method. Off by default, so that a plain `ctest` (CI) never runs them:
#   cmake -DMULTIPROC_CHAOS_FULL=ON .. && make test_pool_chaos && ctest -L chaos_full
option(MULTIPROC_CHAOS_FULL "Register the long Pool chaos and endurance runs (ctest label chaos_full)" OFF)
if(MULTIPROC_CHAOS_FULL)
  add_test(NAME PoolChaos.Full COMMAND test_pool_chaos --gtest_filter=PoolChaos.AllTasksAccountedFor)
  set_tests_properties(PoolChaos.Full PROPERTIES ENVIRONMENT "MULTIPROC_CHAOS_TASKS=100000" LABELS chaos_full
                                                 TIMEOUT 1200)
  add_test(NAME PoolLifecycleCycles.Full COMMAND test_pool_chaos --gtest_filter=Methods/PoolLifecycleCycles.*)
  set_tests_properties(PoolLifecycleCycles.Full PROPERTIES ENVIRONMENT "MULTIPROC_POOL_CYCLES=10000" LABELS
                                                           chaos_full TIMEOUT 1800)
endif()

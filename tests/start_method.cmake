# Start methods: fork, forkserver and spawn for Process and Pool, threads in the parent, unknown
# task ids, a worker of another build (start_peer), a child's environment and directory.
add_executable(start_peer start_peer.cpp)
target_link_libraries(start_peer PRIVATE multiproc::multiproc multiproc_build_flags)
multiproc_add_test(test_start_method SOURCES start_method_test.cpp TIMEOUT 120)
add_dependencies(test_start_method start_peer)

# The Pool suites again under forkserver and spawn (MULTIPROC_START_METHOD sets the default start
# method): every Pool method, fault and error must behave the same under all three.
foreach(_mp_method forkserver spawn)
  foreach(_mp_suite test_pool test_pool_fault test_pool_lifecycle test_pool_cancel)
    gtest_discover_tests(${_mp_suite} TEST_PREFIX "${_mp_method}:" DISCOVERY_TIMEOUT 60
                         PROPERTIES TIMEOUT 120 ENVIRONMENT "MULTIPROC_START_METHOD=${_mp_method}"
                                    LABELS "${_mp_method}")
  endforeach()
endforeach()

# A closure given to a Process under spawn (chosen at compile time) is refused with a message.
_mp_pool_compile_test(StartMethodCompileFail.SpawnClosureProcessIsRejectedWithAMessage spawn_closure_process.cpp fail
                      "under forkserver and spawn a Process target")
_mp_pool_compile_test(StartMethodCompileFail.SpawnFunctionProcessCompiles spawn_function_process.cpp pass)

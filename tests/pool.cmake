# Pool: every method over 1, 2 and 4 workers, exceptions, crashes, recycling, life cycle, leaks.
multiproc_add_test(test_pool SOURCES pool_test.cpp TIMEOUT 60)
# Crashes (segfault, abort, SIGKILL, exit) inside tasks, recycling, the initializer.
multiproc_add_test(test_pool_fault SOURCES pool_fault_test.cpp TIMEOUT 60)
# close/join/terminate, the destructor, wrong arguments, leftover processes and descriptors.
multiproc_add_test(test_pool_lifecycle SOURCES pool_lifecycle_test.cpp TIMEOUT 60)
# Streamed requests: large and borrowed arguments; a worker dying, failing or stalling mid-stream.
multiproc_add_test(test_pool_stream SOURCES pool_stream_test.cpp TIMEOUT 60)
# imap over 10^7 items in bounded memory (its own binary, so that nothing else moves the RSS).
multiproc_add_test(test_pool_memory SOURCES pool_memory_test.cpp TIMEOUT 120)

# Compile-fail tests: a capturing lambda (and a functor with unencodable state) must be rejected at
# compile time with a message that says what to do; the captureless twin must compile (positive
# control, so the failure cannot come from an unrelated error).
get_target_property(_mp_cereal_includes cereal::cereal INTERFACE_INCLUDE_DIRECTORIES)
set(_mp_cf_includes "${PROJECT_SOURCE_DIR}/include")
if(_mp_cereal_includes)
  list(APPEND _mp_cf_includes ${_mp_cereal_includes})
endif()
list(JOIN _mp_cf_includes "|" _mp_cf_includes)
set(_mp_cf_dir ${CMAKE_CURRENT_SOURCE_DIR}/compile_fail)
function(_mp_pool_compile_test name source expect)
  set(message_arg)
  if(ARGC GREATER 3)
    set(message_arg "-DMESSAGE=${ARGV3}")
  endif()
  add_test(NAME ${name}
           COMMAND ${CMAKE_COMMAND} -DCXX=${CMAKE_CXX_COMPILER} "-DINCLUDES=${_mp_cf_includes}"
                   -DSOURCE=${_mp_cf_dir}/${source} -DEXPECT=${expect} ${message_arg} -P ${_mp_cf_dir}/check.cmake)
  set_tests_properties(${name} PROPERTIES TIMEOUT 120 LABELS compile_fail)
endfunction()
_mp_pool_compile_test(PoolCompileFail.CapturingLambdaIsRejectedWithAMessage capturing_lambda.cpp fail
                      "lambda with captures")
_mp_pool_compile_test(PoolCompileFail.CapturelessLambdaCompiles captureless_lambda.cpp pass)
_mp_pool_compile_test(PoolCompileFail.UnencodableFunctorIsRejectedWithAMessage unencodable_functor.cpp fail
                      "state is not encodable")

# Cancellation (queued, running, a whole map, an imap dropped early) and per-call time limits.
multiproc_add_test(test_pool_cancel SOURCES pool_cancel_test.cpp TIMEOUT 60)

# Parent death takes the processes tasks started too; Ctrl-C with and without the program's handler.
multiproc_add_test(test_pool_signals SOURCES pool_signals_test.cpp TIMEOUT 60)

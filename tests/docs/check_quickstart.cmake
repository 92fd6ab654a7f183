# Runs the README's quickstart with its output to a pipe and checks it exactly: each process's line
# once (a line written twice would be a broken stdio contract), the exit status, the CPU count.
execute_process(COMMAND "${PROGRAM}" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the quickstart exited with ${rc}:\n${out}${err}")
endif()
string(REGEX REPLACE "[0-9]+ CPUs available" "N CPUs available" got "${out}")
set(want "sum = 5000000.0\nsum = 5000000.0\nexited with code 0\nN CPUs available\n")
if(NOT got STREQUAL want)
  message(FATAL_ERROR "the quickstart printed:\n${out}\nexpected (N: the CPU count):\n${want}")
endif()
message(STATUS "the README quickstart ran and printed what it says")

# Compiles one file with -fsyntax-only and checks the outcome:
#   cmake -DCXX=<compiler> -DINCLUDES=<dir|dir...> -DSOURCE=<file> -DEXPECT=fail|pass
#         [-DMESSAGE=<regular expression the diagnostics must match>] -P check.cmake
# EXPECT=fail succeeds only if the compile fails AND the diagnostics match MESSAGE, so the test
# cannot pass because of an unrelated error.
foreach(var CXX INCLUDES SOURCE EXPECT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check.cmake: ${var} is not set")
  endif()
endforeach()
string(REPLACE "|" ";" include_dirs "${INCLUDES}")
set(include_flags)
foreach(dir ${include_dirs})
  list(APPEND include_flags "-I${dir}")
endforeach()
execute_process(
  COMMAND ${CXX} -std=c++20 -fsyntax-only ${include_flags} ${SOURCE}
  RESULT_VARIABLE rc
  OUTPUT_VARIABLE out
  ERROR_VARIABLE err)
set(diagnostics "${out}${err}")
if(EXPECT STREQUAL "pass")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${SOURCE} should compile but does not (exit ${rc}):\n${diagnostics}")
  endif()
  message(STATUS "${SOURCE} compiles, as it should")
elseif(EXPECT STREQUAL "fail")
  if(rc EQUAL 0)
    message(FATAL_ERROR "${SOURCE} compiles but must not")
  endif()
  if(DEFINED MESSAGE)
    string(REGEX MATCH "${MESSAGE}" found "${diagnostics}")
    if(NOT found)
      message(FATAL_ERROR "${SOURCE} fails to compile, but its diagnostics do not say \"${MESSAGE}\":\n${diagnostics}")
    endif()
  endif()
  message(STATUS "${SOURCE} is rejected with \"${MESSAGE}\", as it should be")
else()
  message(FATAL_ERROR "check.cmake: EXPECT must be pass or fail, not ${EXPECT}")
endif()

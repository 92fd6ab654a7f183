# Docs are code: the README's quickstart (its first C++ block) is extracted at configure time — no
# hand copy — built like a user's program and run, its output checked line by line.
set(_mp_readme "${PROJECT_SOURCE_DIR}/README.md")
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_mp_readme}")
file(READ "${_mp_readme}" _mp_readme_text)
string(FIND "${_mp_readme_text}" "```cpp\n" _mp_begin)
if(_mp_begin EQUAL -1)
  message(FATAL_ERROR "README.md has no C++ block: the quickstart test has nothing to build")
endif()
math(EXPR _mp_begin "${_mp_begin} + 7")
string(SUBSTRING "${_mp_readme_text}" ${_mp_begin} -1 _mp_rest)
string(FIND "${_mp_rest}" "\n```" _mp_end)
string(SUBSTRING "${_mp_rest}" 0 ${_mp_end} _mp_quickstart)
set(_mp_quickstart_cpp "${CMAKE_CURRENT_BINARY_DIR}/readme_quickstart.cpp")
# Written only when it changed, so that an unrelated README edit rebuilds nothing.
set(_mp_old "")
if(EXISTS "${_mp_quickstart_cpp}")
  file(READ "${_mp_quickstart_cpp}" _mp_old)
endif()
if(NOT _mp_old STREQUAL "${_mp_quickstart}\n")
  file(WRITE "${_mp_quickstart_cpp}" "${_mp_quickstart}\n")
endif()

add_executable(readme_quickstart "${_mp_quickstart_cpp}")
target_link_libraries(readme_quickstart PRIVATE multiproc::multiproc multiproc_build_flags)
add_test(NAME docs.readme_quickstart_builds_and_runs
         COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:readme_quickstart>
                 -P ${CMAKE_CURRENT_SOURCE_DIR}/docs/check_quickstart.cmake)
set_tests_properties(docs.readme_quickstart_builds_and_runs PROPERTIES TIMEOUT 60 LABELS docs)

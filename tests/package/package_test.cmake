# The consumer-package test: installs this build into a scratch prefix, then builds and runs
# tests/package/ against it twice, through find_package(multiproc) and through pkg-config.
# Included from tests/CMakeLists.txt.

# In a user's build (no developer or sanitizer switch), multiproc is also built as a subproject of
# tests/package/subproject, in Release with default options: what add_subdirectory users get.
if(NOT MULTIPROC_DEVELOPER AND NOT MULTIPROC_SANITIZE AND NOT MULTIPROC_TSAN)
  add_test(NAME package.add_subdirectory_consumer
    COMMAND "${CMAKE_CURRENT_LIST_DIR}/run_subproject.sh"
            "${PROJECT_SOURCE_DIR}"
            "${CMAKE_CURRENT_BINARY_DIR}/subproject_test"
            "${CMAKE_CXX_COMPILER}")
  set_tests_properties(package.add_subdirectory_consumer PROPERTIES TIMEOUT 600 LABELS package)
endif()

if(NOT MULTIPROC_INSTALL)
  return()
endif()

# A sanitized library needs the sanitizer runtime in whatever links it.
set(_multiproc_consumer_flags "")
if(MULTIPROC_SANITIZE)
  set(_multiproc_consumer_flags "-fsanitize=address,undefined")
elseif(MULTIPROC_TSAN)
  set(_multiproc_consumer_flags "-fsanitize=thread")
endif()

add_test(NAME package.find_package_consumer
  COMMAND "${CMAKE_CURRENT_LIST_DIR}/run.sh"
          "${PROJECT_BINARY_DIR}"
          "${CMAKE_CURRENT_LIST_DIR}"
          "${CMAKE_CURRENT_BINARY_DIR}/package_test"
          "${CMAKE_CXX_COMPILER}"
          "${PROJECT_VERSION}"
          "$<CONFIG>"
          "${_multiproc_consumer_flags}")
set_tests_properties(package.find_package_consumer PROPERTIES
  TIMEOUT 300
  LABELS package)
unset(_multiproc_consumer_flags)

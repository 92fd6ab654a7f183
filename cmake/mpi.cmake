# multiproc::mpi — the Pool API over MPI ranks (include/multiproc/mpi.hpp). Optional: built when
# CMake finds an MPI implementation; the core library never depends on MPI.
# The C API is all it uses; the project enables only CXX, so FindMPI's CXX component provides it
# (without the deprecated C++ bindings).
# Off by default in sanitizer builds: Open MPI's own allocations and threads are not clean under
# LeakSanitizer or ThreadSanitizer, and say nothing about multiproc's code.
if(MULTIPROC_SANITIZE OR MULTIPROC_TSAN)
  set(_mp_mpi_default OFF)
else()
  set(_mp_mpi_default ON)
endif()
option(MULTIPROC_MPI "Build multiproc::mpi (the Pool API over MPI ranks) when MPI is found" ${_mp_mpi_default})
set(MULTIPROC_MPI_ENABLED OFF)
if(MULTIPROC_MPI)
  set(MPI_CXX_SKIP_MPICXX ON)
  find_package(MPI QUIET COMPONENTS CXX)
  if(MPI_CXX_FOUND)
    set(MULTIPROC_MPI_ENABLED ON)
  endif()
endif()

if(MULTIPROC_MPI_ENABLED)
  add_library(multiproc_mpi src/mpi/mpi_pool.cpp)
  add_library(multiproc::mpi ALIAS multiproc_mpi)
  set_target_properties(multiproc_mpi PROPERTIES CXX_EXTENSIONS OFF POSITION_INDEPENDENT_CODE ON
                                                 EXPORT_NAME mpi)
  target_include_directories(multiproc_mpi PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(multiproc_mpi PUBLIC multiproc::multiproc PRIVATE MPI::MPI_CXX
                                      $<BUILD_INTERFACE:multiproc_build_flags>)
  message(STATUS "multiproc: MPI found (${MPI_CXX_LIBRARIES}), building multiproc::mpi; mpiexec: ${MPIEXEC_EXECUTABLE}")

  if(MULTIPROC_BUILD_BENCH)
    add_executable(mpi_bench bench/mpi_bench.cpp)
    target_link_libraries(mpi_bench PRIVATE multiproc::mpi multiproc_build_flags)
  endif()
else()
  message(STATUS "multiproc: MPI not found or MULTIPROC_MPI is OFF, multiproc::mpi is not built")
endif()

# multiproc::mpi: the Pool API over MPI ranks. One test binary with its own main (worker ranks
# never reach GoogleTest), run as one CTest test under mpiexec with 3 ranks, and once with 1 rank
# (no worker ranks: make_pool() refuses).
if(TARGET multiproc_mpi AND MPIEXEC_EXECUTABLE)
  add_executable(test_mpi_pool ${CMAKE_CURRENT_SOURCE_DIR}/mpi/mpi_pool_test.cpp)
  target_link_libraries(test_mpi_pool PRIVATE multiproc::mpi GTest::gtest multiproc_build_flags)
  # --oversubscribe: more ranks than cores is fine here; --allow-run-as-root: containers run as
  # root; the shared-memory and TCP transports only (no InfiniBand probing).
  add_test(NAME mpi.pool
           COMMAND ${MPIEXEC_EXECUTABLE} --oversubscribe --allow-run-as-root --mca btl self,vader,tcp
                   -n 3 $<TARGET_FILE:test_mpi_pool>)
  set_tests_properties(mpi.pool PROPERTIES TIMEOUT 120 LABELS mpi
                       ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
  add_test(NAME mpi.pool.single_rank
           COMMAND ${MPIEXEC_EXECUTABLE} --oversubscribe --allow-run-as-root --mca btl self,vader,tcp
                   -n 1 $<TARGET_FILE:test_mpi_pool> --gtest_filter=MpiSingleRank.*)
  set_tests_properties(mpi.pool.single_rank PROPERTIES TIMEOUT 60 LABELS mpi
                       ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
  # Several hosts on one machine: one network namespace per host, ranks talking over veth only.
  # Skipped (exit 77) where namespaces cannot be made (not root, no ip netns).
  add_test(NAME mpi.pool.netns_hosts
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/mpi/netns_hosts.sh ${MPIEXEC_EXECUTABLE} $<TARGET_FILE:test_mpi_pool>)
  set_tests_properties(mpi.pool.netns_hosts PROPERTIES TIMEOUT 120 LABELS mpi SKIP_RETURN_CODE 77 RUN_SERIAL ON)
else()
  message(STATUS "multiproc: the MPI tests are skipped: no MPI found (or MULTIPROC_MPI is OFF); "
                 "install Open MPI (libopenmpi-dev openmpi-bin) to build multiproc::mpi and test it")
endif()

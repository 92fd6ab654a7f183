# Install rules: the library, its headers, a CMake package (find_package(multiproc)) and a
# pkg-config file. Included from the top-level CMakeLists.txt when MULTIPROC_INSTALL is ON.
#
#   cmake --install build --prefix /opt/multiproc
#
# gives
#   include/multiproc/*.hpp
#   lib/libmultiproc.a
#   lib/cmake/multiproc/multiproc{Config,ConfigVersion,Targets,Targets-<config>}.cmake
#   lib/pkgconfig/multiproc.pc
#
# Both the CMake package and the pkg-config file are relocatable: they locate the prefix from
# where they lie, so an installed tree can be moved or installed with a different --prefix.

include(CMakePackageConfigHelpers)

set(MULTIPROC_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/multiproc"
    CACHE STRING "Where multiprocConfig.cmake is installed, relative to the prefix")
set(MULTIPROC_INSTALL_PKGCONFIGDIR "${CMAKE_INSTALL_LIBDIR}/pkgconfig"
    CACHE STRING "Where multiproc.pc is installed, relative to the prefix")
mark_as_advanced(MULTIPROC_INSTALL_CMAKEDIR MULTIPROC_INSTALL_PKGCONFIGDIR)

# The library. Its private link to multiproc_build_flags is wrapped in $<BUILD_INTERFACE:...>,
# so the warning and sanitizer flags stay out of the exported target.
install(TARGETS multiproc
  EXPORT multiprocTargets
  ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}" COMPONENT multiproc_development
  LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}" COMPONENT multiproc_runtime
          NAMELINK_COMPONENT multiproc_development
  RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}" COMPONENT multiproc_runtime
  INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")

# The public headers: include/multiproc/ and everything under it (detail/ included).
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
  COMPONENT multiproc_development
  FILES_MATCHING PATTERN "*.hpp" PATTERN "*.h")

# multiprocTargets.cmake: the imported target multiproc::multiproc.
install(EXPORT multiprocTargets
  NAMESPACE multiproc::
  FILE multiprocTargets.cmake
  DESTINATION "${MULTIPROC_INSTALL_CMAKEDIR}"
  COMPONENT multiproc_development)

# multiprocConfig.cmake finds the target's public dependencies (Threads, cereal) first.
configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/multiprocConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/multiprocConfig.cmake"
  INSTALL_DESTINATION "${MULTIPROC_INSTALL_CMAKEDIR}")
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/multiprocConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  COMPATIBILITY SameMajorVersion)
install(FILES
  "${PROJECT_BINARY_DIR}/multiprocConfig.cmake"
  "${PROJECT_BINARY_DIR}/multiprocConfigVersion.cmake"
  DESTINATION "${MULTIPROC_INSTALL_CMAKEDIR}"
  COMPONENT multiproc_development)

# multiproc.pc. The prefix is written relative to the .pc file's own directory (pkg-config's
# ${pcfiledir}), so `cmake --install --prefix X` works without reconfiguring; absolute install
# directories are written as they are.
if(IS_ABSOLUTE "${MULTIPROC_INSTALL_PKGCONFIGDIR}")
  set(MULTIPROC_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  # From <prefix>/<pkgconfigdir> back up to <prefix>: one ".." per path component.
  set(MULTIPROC_PC_PREFIX "\${pcfiledir}")
  string(REPLACE "/" ";" _multiproc_pc_parts "${MULTIPROC_INSTALL_PKGCONFIGDIR}")
  foreach(_part IN LISTS _multiproc_pc_parts)
    if(_part STREQUAL "" OR _part STREQUAL ".")
      continue()
    endif()
    string(APPEND MULTIPROC_PC_PREFIX "/..")
  endforeach()
  unset(_part)
  unset(_multiproc_pc_parts)
endif()
foreach(_dir IN ITEMS LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${_dir}}")
    set(MULTIPROC_PC_${_dir} "${CMAKE_INSTALL_${_dir}}")
  else()
    set(MULTIPROC_PC_${_dir} "\${prefix}/${CMAKE_INSTALL_${_dir}}")
  endif()
endforeach()
unset(_dir)
configure_file("${PROJECT_SOURCE_DIR}/cmake/multiproc.pc.in" "${PROJECT_BINARY_DIR}/multiproc.pc" @ONLY)
install(FILES "${PROJECT_BINARY_DIR}/multiproc.pc"
  DESTINATION "${MULTIPROC_INSTALL_PKGCONFIGDIR}"
  COMPONENT multiproc_development)

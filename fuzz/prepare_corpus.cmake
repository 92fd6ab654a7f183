# cmake -DSEEDS=<fuzz/corpus> -DGENERATOR=<fuzz_seeds> -DSCRATCH=<dir> -P prepare_corpus.cmake
# Starts SCRATCH/corpus/<target> afresh from the checked-in seeds plus fuzz_seeds' output, so the
# fuzzers never write into the source tree. SCRATCH/artifacts/<target> (crashes) are kept.
foreach(var SEEDS GENERATOR SCRATCH)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "prepare_corpus.cmake: -D${var}=... is required")
  endif()
endforeach()

foreach(target frame codec)
  file(REMOVE_RECURSE ${SCRATCH}/corpus/${target})
  file(MAKE_DIRECTORY ${SCRATCH}/corpus/${target} ${SCRATCH}/artifacts/${target})
  file(GLOB seeds ${SEEDS}/${target}/*)
  if(seeds)
    file(COPY ${seeds} DESTINATION ${SCRATCH}/corpus/${target})
  endif()
endforeach()

execute_process(COMMAND ${GENERATOR} ${SCRATCH}/corpus RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "prepare_corpus.cmake: ${GENERATOR} failed (${rc})")
endif()

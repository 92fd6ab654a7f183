# Platform layer: checked calls, fault injection, descriptors, fork_process, signals, sockets.
multiproc_add_test(test_platform SOURCES platform_test.cpp TIMEOUT 60)

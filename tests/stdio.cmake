# The stdio contract: a program's lines are written exactly once whatever its workers and children
# do (recycled, crashed, timed out), to a pipe and to a file, under every start method.
multiproc_add_test(test_stdio SOURCES stdio_test.cpp TIMEOUT 120)

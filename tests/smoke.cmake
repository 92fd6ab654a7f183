multiproc_add_test(test_smoke SOURCES smoke_test.cpp)

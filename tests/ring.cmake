# Frame rings: the shared-memory transport between a Pool's parent and each worker.
multiproc_add_test(test_ring SOURCES ring_test.cpp TIMEOUT 60)

# Queue, JoinableQueue, SimpleQueue: stress over real processes, large items, producers and
# consumers SIGKILLed mid-operation, handles passed to children and Pool tasks, leaks.
multiproc_add_test(test_queue SOURCES queue_test.cpp TIMEOUT 120)
# Pipe and Connection: both directions, EOF on peer death, poll, wait() over mixed objects,
# connections passed to Pool tasks, leaks.
multiproc_add_test(test_pipe SOURCES pipe_test.cpp TIMEOUT 60)

# Lock, RLock, Semaphore, Event, Condition, Barrier, Value and Array between real processes: exclusion,
# timeouts, a holder or waiting party SIGKILLed, Pool tasks, and no descriptor or mapping left.
multiproc_add_test(test_sync SOURCES sync_test.cpp TIMEOUT 30)

# Process and ExitStatus: real exits, crashes and kills; parent death; zombies and descriptors.
multiproc_add_test(test_process SOURCES process_test.cpp TIMEOUT 120)

# cpu_count(): affinity and cgroup v2 quota.
multiproc_add_test(test_cpu SOURCES cpu_test.cpp TIMEOUT 30)

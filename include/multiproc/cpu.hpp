// multiproc/cpu.hpp — how many CPUs this process may really use.
#pragma once

namespace multiproc {

/// The number of CPUs this process can run on: the CPUs in its affinity mask, further limited by
/// a cgroup v2 CPU quota (`cpu.max` of its cgroup and every ancestor, rounded up). At least 1.
/// This is what `Pool` uses by default, so a container limited to 2 CPUs gets 2 workers, not 64.
int cpu_count() noexcept;

}  // namespace multiproc

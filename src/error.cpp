#include "multiproc/error.hpp"

#include <unistd.h>

#include <cxxabi.h>

#include <string>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <typeinfo>

namespace multiproc {

void report_error(const char* what) noexcept {
  // write(2) only: this may run in a forked child or during stack unwinding.
  const char prefix[] = "multiproc: ";
  ssize_t ignored = ::write(STDERR_FILENO, prefix, sizeof prefix - 1);
  ignored = ::write(STDERR_FILENO, what, std::strlen(what));
  ignored = ::write(STDERR_FILENO, "\n", 1);
  (void)ignored;
}

TaskError::TaskError(std::string type_name, std::string message, pid_t worker_pid)
    : BasicError(type_name + ": " + message + " (in worker " + std::to_string(worker_pid) + ")"),
      RemoteErrorInfo(std::move(type_name), std::move(message), worker_pid) {}

WorkerCrashed::WorkerCrashed(ExitStatus status, pid_t worker_pid, std::size_t task_index, const std::string& task)
    : BasicError("worker " + std::to_string(worker_pid) + " " + status.to_string() + " while running " +
                 (task.empty() ? "task " + std::to_string(task_index) : task)),
      status_(status),
      worker_pid_(worker_pid),
      task_index_(task_index) {}

namespace detail {

std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> out(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), &std::free);
  return status == 0 && out ? std::string(out.get()) : std::string(mangled);
}

std::string current_exception_type_name() {
  const std::type_info* t = abi::__cxa_current_exception_type();
  return t ? demangle(t->name()) : std::string("unknown");
}

}  // namespace detail

}  // namespace multiproc

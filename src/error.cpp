#include "multiproc/error.hpp"

#include <unistd.h>

#include <cxxabi.h>

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

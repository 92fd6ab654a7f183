#include "multiproc/exit_status.hpp"

#include <signal.h>
#include <string.h>
#include <sys/wait.h>

namespace multiproc {

ExitStatus ExitStatus::from_siginfo(int code, int status) noexcept {
  switch (code) {
    case CLD_EXITED:
      return exited_with(status);
    case CLD_DUMPED:
      return killed_by(status, true);
    default:
      return killed_by(status, false);  // CLD_KILLED
  }
}

ExitStatus ExitStatus::from_wait_status(int wstatus) noexcept {
  if (WIFEXITED(wstatus)) return exited_with(WEXITSTATUS(wstatus));
  return killed_by(WTERMSIG(wstatus), WCOREDUMP(wstatus));
}

std::string signal_name(int signal) {
  if (const char* abbrev = ::sigabbrev_np(signal)) return std::string("SIG") + abbrev;
  return "signal " + std::to_string(signal);
}

std::string ExitStatus::to_string() const {
  if (exited()) return "exited with code " + std::to_string(value_);
  std::string s = "killed by signal " + signal_name(value_);
  if (core_dumped_) s += " (core dumped)";
  return s;
}

}  // namespace multiproc

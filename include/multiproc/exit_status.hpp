// multiproc/exit_status.hpp — how a process ended.
//
//     multiproc::ExitStatus s = p.exit_status();
//     if (s.exited())        std::cout << "code " << s.code();
//     else if (s.signaled()) std::cout << "signal " << s.signal() << (s.core_dumped() ? " (core)" : "");
//     std::cout << s.to_string();   // "exited with code 3", "killed by signal SIGSEGV (core dumped)"
#pragma once

#include <compare>
#include <string>

namespace multiproc {

class ExitStatus {
 public:
  /// A normal exit with `code` (0..255).
  static constexpr ExitStatus exited_with(int code) noexcept { return ExitStatus(Kind::exited, code, false); }
  /// Death by `signal`, with or without a core dump.
  static constexpr ExitStatus killed_by(int signal, bool core_dumped = false) noexcept {
    return ExitStatus(Kind::signaled, signal, core_dumped);
  }
  /// From waitid's siginfo fields (si_code, si_status).
  static ExitStatus from_siginfo(int code, int status) noexcept;
  /// From a wait(2) status word.
  static ExitStatus from_wait_status(int wstatus) noexcept;

  /// A default-constructed status means "exited with code 0".
  constexpr ExitStatus() noexcept = default;

  [[nodiscard]] constexpr bool exited() const noexcept { return kind_ == Kind::exited; }
  [[nodiscard]] constexpr bool signaled() const noexcept { return kind_ == Kind::signaled; }
  [[nodiscard]] constexpr bool success() const noexcept { return exited() && value_ == 0; }
  /// The exit code; -1 when killed by a signal.
  [[nodiscard]] constexpr int code() const noexcept { return exited() ? value_ : -1; }
  /// The signal number; 0 when the process exited normally.
  [[nodiscard]] constexpr int signal() const noexcept { return signaled() ? value_ : 0; }
  [[nodiscard]] constexpr bool core_dumped() const noexcept { return core_dumped_; }
  /// Python's `Process.exitcode` convention: the code, or minus the signal number.
  [[nodiscard]] constexpr int python_exitcode() const noexcept { return exited() ? value_ : -value_; }

  /// "exited with code 3", "killed by signal SIGKILL", "killed by signal SIGSEGV (core dumped)".
  [[nodiscard]] std::string to_string() const;

  friend constexpr bool operator==(const ExitStatus&, const ExitStatus&) noexcept = default;

 private:
  enum class Kind : unsigned char { exited, signaled };
  constexpr ExitStatus(Kind kind, int value, bool core) noexcept : kind_(kind), value_(value), core_dumped_(core) {}

  Kind kind_ = Kind::exited;
  int value_ = 0;
  bool core_dumped_ = false;
};

/// "SIGSEGV" for 11; "signal 77" for numbers without a name.
std::string signal_name(int signal);

}  // namespace multiproc

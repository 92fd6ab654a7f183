// multiproc/error.hpp — the exception family.
//
// Every exception multiproc throws is a `multiproc::Error`, so one handler catches them all:
//
//     try { pool.map(f, xs); }
//     catch (const multiproc::WorkerCrashed& e) { ... e.status() ... }
//     catch (const multiproc::Error& e) { std::cerr << e.what(); }
//
// `Error` is a mixin rather than a `std::exception` of its own: each concrete error also derives
// from the standard exception that fits it (`SystemError` is a `std::system_error`, the others
// `std::runtime_error` or `std::logic_error`), so code that only knows the standard hierarchy keeps
// working, and `catch (const std::exception&)` is never ambiguous.
#pragma once

#include <stdexcept>
#include <string>
#include <system_error>

namespace multiproc {

/// The base of every multiproc exception.
class Error {
 public:
  virtual ~Error() = default;
  /// The message, as `std::exception::what()` gives it.
  [[nodiscard]] virtual const char* what() const noexcept = 0;

 protected:
  Error() = default;
  Error(const Error&) = default;
  Error& operator=(const Error&) = default;
};

namespace detail {
template <class Std>
class BasicError : public Std, public Error {
 public:
  using Std::Std;
  [[nodiscard]] const char* what() const noexcept override { return Std::what(); }
};
}  // namespace detail

/// A system call failed. `code()` holds the errno; the message names the call.
class SystemError : public detail::BasicError<std::system_error> {
 public:
  SystemError(int errno_value, const std::string& call)
      : BasicError(errno_value, std::generic_category(), call) {}
};

/// Bytes that do not decode as the expected type: truncated, corrupt, or oversized.
class SerializationError : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

/// A frame on a channel broke the protocol (bad tag, length over the bound, unknown id), or the
/// peer went away mid-frame.
class ProtocolError : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

/// An object was used in a state that does not allow it (starting a Process twice, joining one
/// that was never started, ...). A programming error, like Python's ValueError/AssertionError.
class StateError : public detail::BasicError<std::logic_error> {
 public:
  using BasicError::BasicError;
};

/// A function was given an argument it cannot accept (zero processes, a negative timeout, ...).
class InvalidArgument : public detail::BasicError<std::invalid_argument> {
 public:
  using BasicError::BasicError;
};

namespace detail {
/// "std::runtime_error" for typeid(std::runtime_error).name().
std::string demangle(const char* mangled);
/// The demangled type of the exception being handled (inside a catch block), or "unknown".
std::string current_exception_type_name();
}  // namespace detail

/// Writes `what` and the system error to stderr without throwing: for destructors and for code
/// running in a child after fork, where an exception has nowhere to go.
void report_error(const char* what) noexcept;

}  // namespace multiproc

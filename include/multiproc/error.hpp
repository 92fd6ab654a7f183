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

#include <sys/types.h>
#include <stdexcept>
#include <string>

#include <cstddef>
#include <system_error>

#include "multiproc/exit_status.hpp"

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
  SystemError(int errno_value, const std::string& call) : BasicError(errno_value, std::generic_category(), call) {}
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

/// A child process could not be started by spawn or forkserver: it did not complete its handshake
/// (it died first, or its main() did not call multiproc::init()), or it refused the parent.
class StartError : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

/// The executable a worker was started from is a different build than the parent (their build ids
/// differ): the two would not agree on task ids or encodings, so the worker refuses to run.
class BuildMismatch final : public StartError {
 public:
  using StartError::StartError;
};

// ---- errors of tasks run by a Pool ------------------------------------------------------------

/// What every exception that came back from a worker carries: the type the task threw (demangled),
/// its message, and the pid of the worker that ran it. Both `TaskError` and the standard or
/// registered exception types rethrown as themselves (see `register_exception`) carry it; reach it
/// from any exception with `multiproc::remote_info(e)`.
class RemoteErrorInfo {
 public:
  RemoteErrorInfo(std::string type_name, std::string message, pid_t worker_pid)
      : type_name_(std::move(type_name)), message_(std::move(message)), worker_pid_(worker_pid) {}
  virtual ~RemoteErrorInfo() = default;
  [[nodiscard]] const std::string& type_name() const noexcept { return type_name_; }
  [[nodiscard]] const std::string& message() const noexcept { return message_; }
  [[nodiscard]] pid_t worker_pid() const noexcept { return worker_pid_; }

 private:
  std::string type_name_;
  std::string message_;
  pid_t worker_pid_;
};

/// A task threw an exception of a type the parent does not know how to rebuild.
/// what() reads "<type>: <message> (in worker <pid>)".
class TaskError : public detail::BasicError<std::runtime_error>, public RemoteErrorInfo {
 public:
  TaskError(std::string type_name, std::string message, pid_t worker_pid);
};

/// The info of an exception that came back from a worker, or nullptr for a local one.
inline const RemoteErrorInfo* remote_info(const std::exception& e) noexcept {
  return dynamic_cast<const RemoteErrorInfo*>(&e);
}

/// The worker running a task died before finishing it: a signal (SIGSEGV, SIGABRT, SIGKILL from
/// the OOM killer, ...) or an exit() inside the task. Only that task fails; the pool replaces the
/// worker and goes on.
class WorkerCrashed : public detail::BasicError<std::runtime_error> {
 public:
  /// `task` names the task for the message ("apply_async #17 (square(int))"); empty: "task N".
  WorkerCrashed(ExitStatus status, pid_t worker_pid, std::size_t task_index, const std::string& task = {});
  [[nodiscard]] ExitStatus status() const noexcept { return status_; }
  [[nodiscard]] pid_t worker_pid() const noexcept { return worker_pid_; }
  /// The index of the task in its call: the element of a map, 0 for apply.
  [[nodiscard]] std::size_t task_index() const noexcept { return task_index_; }

 private:
  ExitStatus status_;
  pid_t worker_pid_;
  std::size_t task_index_;
};

/// A pool was used after close() or terminate().
class PoolClosed : public StateError {
 public:
  using StateError::StateError;
};

/// The task will never run or finish: its pool was terminated (or destroyed) first.
class Cancelled : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

/// A task ran past the pool's task_timeout: its worker (with its whole process group) was
/// SIGKILLed and replaced; the other tasks go on.
class TaskTimeout : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

/// A wait ran out of time (AsyncResult::get with a timeout). What was waited for goes on.
class Timeout : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

// ---- errors of queues and pipes ---------------------------------------------------------------

/// Queue::put with a timeout found no room in time (the queue stayed at its maxsize). Python's
/// queue.Full.
class Full : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

/// Queue::get with a timeout found no item in time. Python's queue.Empty.
class Empty : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

/// Connection::recv found the end of the stream: every other holder of the other end closed it or
/// died, and no message is left (or the last one was cut off by its sender's death). Python's
/// EOFError.
class EOFError : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

/// The pool's initializer threw in a worker: no task can run, so every task fails with this
/// (instead of workers being restarted forever, as in Python).
class InitializerError : public detail::BasicError<std::runtime_error> {
 public:
  using BasicError::BasicError;
};

// ---- errors of the synchronization objects (sync.hpp) -----------------------------------------

/// A thread died holding a Lock or RLock (its process was killed, or exited). The caller now holds
/// the lock; what it guards may be half-updated. Repair it, call make_consistent(), and go on; a
/// release without make_consistent() makes the lock unusable (LockNotRecoverable).
class OwnerDied : public detail::BasicError<std::runtime_error> {
 public:
  OwnerDied(const std::string& message, pid_t owner_pid) : BasicError(message), owner_pid_(owner_pid) {}
  /// The process whose thread died holding the lock (0 if unknown).
  [[nodiscard]] pid_t owner_pid() const noexcept { return owner_pid_; }

 private:
  pid_t owner_pid_;
};

/// A lock whose owner died was released without make_consistent(): nobody can acquire it again.
class LockNotRecoverable : public StateError {
 public:
  using StateError::StateError;
};

/// A Barrier was broken (abort(), reset() while parties waited, a wait_for that timed out, or a
/// waiting party that died) while this party waited or arrived. Python's BrokenBarrierError.
class BrokenBarrier : public detail::BasicError<std::runtime_error> {
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

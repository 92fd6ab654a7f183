// multiproc/start_method.hpp — how child processes are made: fork, forkserver or spawn.
//
//     int main(int argc, char** argv) {
//       multiproc::init();  // first: a spawned or forkserver child runs its work here and exits
//       ...
//     }
//
//   - fork: the child is a copy of the parent, made by fork(2). Closures, references and
//     everything main() computed are inherited; start costs one fork. Unsafe when other threads
//     of the program hold locks at that moment (the child inherits them locked). The default.
//   - forkserver: a server process, started on first use by exec'ing this program (so from a
//     clean, single-threaded state whatever the parent is doing), forks the children on request.
//     Safe with threads; children see the program as static initialization left it.
//   - spawn: each child is a fresh exec of this program. Safest and slowest.
//
// Under forkserver and spawn nothing is inherited but what is sent: a task is a function pointer,
// a captureless lambda or an encodable functor, named by an id in a registry of invokers that
// every build of the program holds (never by an address it would jump to), and its arguments are
// encoded. Each child starts with a handshake: the parent sends the build id of its executable,
// and a child of a different build refuses with BuildMismatch. The child takes the parent's
// working directory and environment as they are when it starts.
#pragma once

#include <string>

namespace multiproc {

enum class StartMethod {
  fork,        ///< The child is a copy of the parent: closures and data are inherited.
  forkserver,  ///< A clean server process forks the children; only what is sent is seen.
  spawn,       ///< Each child is a fresh exec of the program; only what is sent is seen.
};

/// "fork", "forkserver" or "spawn".
const char* to_string(StartMethod method) noexcept;

/// The method Process and Pool use when their options name none. Initially fork, or what the
/// environment variable MULTIPROC_START_METHOD names; in a child started by spawn or forkserver,
/// the method that started it (as in Python, its own children start the same way). Choosing fork
/// here explicitly also silences the warning printed when fork(2) runs while other threads do.
void set_start_method(StartMethod method);
[[nodiscard]] StartMethod get_start_method();

/// The program that spawn and forkserver execute; default: this one (/proc/self/exe). Another
/// program must be the same build (else BuildMismatch) and call multiproc::init() first in main.
void set_executable(std::string path);
[[nodiscard]] std::string get_executable();

/// Starts the fork server now, if it is not running; it otherwise starts on the first use of
/// forkserver. For a program that wants that cost out of a timed region.
void start_fork_server();

/// Call first in main(). In a process started by spawn or forkserver it does that process's work
/// and exits, never returning; in any other process it returns at once. A program that uses spawn
/// or forkserver and does not call it gets StartError from start() or from the Pool (its children
/// refuse to run the program's main() instead).
void init();

}  // namespace multiproc

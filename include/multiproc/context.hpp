// multiproc/context.hpp — Python's multiprocessing.get_context(): Process and Pool bound to one
// start method.
//
//     auto ctx = multiproc::get_context<multiproc::StartMethod::spawn>();  // checked at compile time
//     multiproc::Process p = ctx.process(compute, 42);   // a closure here fails to compile
//     multiproc::Pool pool = ctx.pool({.processes = 4});
//
//     auto any = multiproc::get_context(method_from_config);             // chosen at run time
//     multiproc::Process q = any.process(compute, 42);   // a closure under spawn: InvalidArgument at start()
#pragma once

#include <type_traits>
#include <utility>

#include "multiproc/pool.hpp"
#include "multiproc/process.hpp"
#include "multiproc/start_method.hpp"

namespace multiproc {

/// Process and Pool with a start method chosen at run time.
class Context {
 public:
  constexpr explicit Context(StartMethod method) noexcept : method_(method) {}
  [[nodiscard]] constexpr StartMethod start_method() const noexcept { return method_; }

  template <class F, class... Args>
  [[nodiscard]] Process process(F&& target, Args&&... args) const {
    return process(ProcessOptions{}, std::forward<F>(target), std::forward<Args>(args)...);
  }
  template <class F, class... Args>
  [[nodiscard]] Process process(ProcessOptions options, F&& target, Args&&... args) const {
    options.start_method = method_;
    return Process(std::move(options), std::forward<F>(target), std::forward<Args>(args)...);
  }
  [[nodiscard]] Pool pool(PoolOptions options = {}) const {
    options.start_method = method_;
    return Pool(std::move(options));
  }

 private:
  StartMethod method_;
};

/// Process and Pool with a start method fixed at compile time: under forkserver and spawn, a
/// target that cannot be sent (a lambda with captures, a reference argument) does not compile.
template <StartMethod M>
class StaticContext : public Context {
 public:
  constexpr StaticContext() noexcept : Context(M) {}

  template <class F, class... Args>
  [[nodiscard]] Process process(F&& target, Args&&... args) const {
    return process(ProcessOptions{}, std::forward<F>(target), std::forward<Args>(args)...);
  }
  template <class F, class... Args>
  [[nodiscard]] Process process(ProcessOptions options, F&& target, Args&&... args) const {
    static_assert(M == StartMethod::fork || detail::is_sendable_target_v<std::decay_t<F>, std::decay_t<Args>...>,
                  "multiproc: under forkserver and spawn a Process target must be a function pointer, a captureless "
                  "lambda or an encodable functor, and its arguments encodable values: the child does not inherit "
                  "this process's memory, so a closure's captures or a reference would mean nothing there. Pass the "
                  "data as arguments, or use StartMethod::fork.");
    return Context::process(std::move(options), std::forward<F>(target), std::forward<Args>(args)...);
  }
};

/// The context of a start method chosen at run time.
[[nodiscard]] inline Context get_context(StartMethod method) noexcept { return Context(method); }
/// The context of a start method chosen at compile time.
template <StartMethod M>
[[nodiscard]] constexpr StaticContext<M> get_context() noexcept {
  return {};
}

}  // namespace multiproc

// The invoker registry, function addresses, and exceptions crossing from workers to the parent.
#include <link.h>
#include <pthread.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "multiproc/detail/task.hpp"
#include "multiproc/pool.hpp"
#include "platform.hpp"

namespace multiproc::detail {

// ---- invokers --------------------------------------------------------------------------------
namespace {

struct InvokerEntry {
  InvokeFn fn;
  const char* name;
};

struct InvokerRegistry {
  std::mutex mutex;
  std::unordered_map<std::uint64_t, InvokerEntry> entries;
};

InvokerRegistry& invokers();

// A forked child's copy of the lock may be held by a parent thread that does not exist in the
// child (one registering a plugin's tasks at that moment): the child starts with a fresh lock.
void reset_invoker_lock_in_child() noexcept { new (&invokers().mutex) std::mutex; }

InvokerRegistry& invokers() {
  static InvokerRegistry* r = [] {
    auto* r = new InvokerRegistry;  // never destroyed: workers use it to the end
    ::pthread_atfork(nullptr, nullptr, reset_invoker_lock_in_child);
    return r;
  }();
  return *r;
}

// FNV-1a: stable across builds and compilers for the same mangled name.
std::uint64_t stable_hash(const char* s) noexcept {
  std::uint64_t h = 14695981039346656037ull;
  for (; *s; ++s) {
    h ^= static_cast<unsigned char>(*s);
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

std::uint64_t register_invoker(const char* mangled_name, InvokeFn fn) {
  const std::uint64_t id = stable_hash(mangled_name);
  auto& r = invokers();
  std::lock_guard lock(r.mutex);
  auto [it, inserted] = r.entries.emplace(id, InvokerEntry{fn, mangled_name});
  if (!inserted && std::string_view(it->second.name) != mangled_name) {
    std::fprintf(stderr, "multiproc: task id collision between %s and %s; rename one of the types\n", it->second.name,
                 mangled_name);
    std::abort();
  }
  return id;
}

InvokeFn find_invoker(std::uint64_t id) noexcept {
  auto& r = invokers();
  std::lock_guard lock(r.mutex);
  auto it = r.entries.find(id);
  return it == r.entries.end() ? nullptr : it->second.fn;
}

InvokeFn require_invoker(std::uint64_t id) {
  if (const InvokeFn fn = find_invoker(id)) return fn;
  char hex[32];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(id));
  throw ProtocolError(std::string("unknown task id ") + hex +
                      ": this process has no such task (a different build, or a task of a library the parent "
                      "loaded after this process started)");
}

void run_call(Reader& request, Writer& reply) {
  const auto id = request.read_value<std::uint64_t>();
  require_invoker(id)(request, 1, reply, TaskContext{});
  if (request.remaining() != 0) throw ProtocolError("call request has trailing bytes");
}

// ---- function addresses ----------------------------------------------------------------------
namespace {

struct ModuleSearch {
  std::uintptr_t address;  // in: the address to find (encode) or the offset (decode)
  std::uint32_t index;     // in (decode) / out (encode)
  std::uint32_t current = 0;
  bool found = false;
  std::uintptr_t base = 0;
};

// Set in a forked pool worker: the modules as its parent saw them just before the fork.
const ModuleSnapshot* g_module_snapshot = nullptr;

// Calls fn(begin, end) for each executable segment of the module, offsets from its base; stops
// at the first call that returns true, and says whether one did.
template <class Fn>
bool any_code_segment(const dl_phdr_info* info, Fn fn) {
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X) && fn(ph.p_vaddr, ph.p_vaddr + ph.p_memsz)) return true;
  }
  return false;
}

bool in_executable_segment(const dl_phdr_info* info, std::uintptr_t offset) {
  return any_code_segment(info,
                          [&](std::uintptr_t begin, std::uintptr_t end) { return offset >= begin && offset < end; });
}

}  // namespace

void encode_function_address(Writer& w, void (*fn)()) {
  ModuleSearch s{reinterpret_cast<std::uintptr_t>(fn), 0};
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) -> int {
        auto& s = *static_cast<ModuleSearch*>(data);
        const std::uintptr_t offset = s.address - info->dlpi_addr;
        if (s.address >= info->dlpi_addr && in_executable_segment(info, offset)) {
          s.found = true;
          s.index = s.current;
          s.base = info->dlpi_addr;
          return 1;
        }
        ++s.current;
        return 0;
      },
      &s);
  if (!s.found)
    throw InvalidArgument("multiproc: a task's function pointer does not point into any loaded module's code");
  w.write_value(s.index);
  w.write_value(static_cast<std::uint64_t>(s.address - s.base));
}

struct ModuleSnapshot {
  struct Module {
    std::uintptr_t base;
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> code;  // executable segments, relative to base
  };
  std::vector<Module> modules;  // in dl_iterate_phdr's order: encode_function_address's indices
};

std::shared_ptr<const ModuleSnapshot> snapshot_modules() {
  auto s = std::make_shared<ModuleSnapshot>();
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) -> int {
        auto& modules = *static_cast<std::vector<ModuleSnapshot::Module>*>(data);
        ModuleSnapshot::Module m{info->dlpi_addr, {}};
        any_code_segment(info, [&](std::uintptr_t begin, std::uintptr_t end) {
          m.code.emplace_back(begin, end);
          return false;
        });
        modules.push_back(std::move(m));
        return 0;
      },
      &s->modules);
  return s;
}

void use_module_snapshot(const ModuleSnapshot* s) noexcept { g_module_snapshot = s; }

void (*decode_function_address(Reader& r))() {
  ModuleSearch s{0, 0};
  s.index = r.read_value<std::uint32_t>();
  s.address = static_cast<std::uintptr_t>(r.read_value<std::uint64_t>());
  if (const ModuleSnapshot* snapshot = g_module_snapshot; snapshot && s.index < snapshot->modules.size()) {
    const auto& m = snapshot->modules[s.index];
    for (const auto& [begin, end] : m.code) {
      if (s.address >= begin && s.address < end) return reinterpret_cast<void (*)()>(m.base + s.address);
    }
    throw SerializationError("a task's function address is not in executable code of a loaded module");
  }
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) -> int {
        auto& s = *static_cast<ModuleSearch*>(data);
        if (s.current++ != s.index) return 0;
        if (in_executable_segment(info, s.address)) {
          s.found = true;
          s.base = info->dlpi_addr;
        }
        return 1;
      },
      &s);
  if (!s.found) throw SerializationError("a task's function address is not in executable code of a loaded module");
  return reinterpret_cast<void (*)()>(s.base + s.address);
}

// ---- exceptions ------------------------------------------------------------------------------
namespace {

struct ExceptionRegistry {
  std::mutex mutex;
  std::unordered_map<std::string, ExceptionFactory> factories;
};

class RemoteBadAlloc final : public std::bad_alloc, public Error, public RemoteErrorInfo {
 public:
  RemoteBadAlloc(const std::string& type, const std::string& message, pid_t pid)
      : RemoteErrorInfo(type, message, pid) {}
  [[nodiscard]] const char* what() const noexcept override { return "std::bad_alloc"; }
};

template <class E>
void add_standard(std::unordered_map<std::string, ExceptionFactory>& f) {
  f[demangle(typeid(E).name())] = [](const std::string& type, const std::string& message, pid_t pid) {
    return std::make_exception_ptr(Remote<E>(type, message, pid));
  };
}

ExceptionRegistry& exceptions() {
  static ExceptionRegistry* r = [] {
    auto* r = new ExceptionRegistry;
    auto& f = r->factories;
    add_standard<std::logic_error>(f);
    add_standard<std::invalid_argument>(f);
    add_standard<std::domain_error>(f);
    add_standard<std::length_error>(f);
    add_standard<std::out_of_range>(f);
    add_standard<std::runtime_error>(f);
    add_standard<std::range_error>(f);
    add_standard<std::overflow_error>(f);
    add_standard<std::underflow_error>(f);
    add_standard<ProtocolError>(f);
    add_standard<SerializationError>(f);
    add_standard<InvalidArgument>(f);
    add_standard<StateError>(f);
    f[demangle(typeid(std::bad_alloc).name())] = [](const std::string& type, const std::string& message, pid_t pid) {
      return std::make_exception_ptr(RemoteBadAlloc(type, message, pid));
    };
    return r;
  }();
  return *r;
}

}  // namespace

void register_exception_factory(const std::type_info& type, ExceptionFactory factory) {
  auto& r = exceptions();
  std::lock_guard lock(r.mutex);
  r.factories[demangle(type.name())] = factory;
}

void encode_current_exception(Writer& w) noexcept {
  const std::size_t mark = w.size();
  try {
    std::string type = current_exception_type_name();
    std::string message;
    try {
      throw;
    } catch (const std::exception& e) {
      message = e.what();
    } catch (...) {
    }
    w.write_value(static_cast<std::uint8_t>(OutcomeTag::exception));
    encode(w, type);
    encode(w, message);
    w.write_value(static_cast<std::int32_t>(sys::current_pid()));
  } catch (...) {
    // Out of memory while describing the error: say so in the fewest bytes.
    w.truncate(mark);
    try {
      w.write_value(static_cast<std::uint8_t>(OutcomeTag::exception));
      encode(w, std::string("std::bad_alloc"));
      encode(w, std::string());
      w.write_value(static_cast<std::int32_t>(sys::current_pid()));
    } catch (...) {
      std::abort();  // no memory at all: the parent sees a crash of this worker
    }
  }
}

std::exception_ptr outcome_error(OutcomeTag tag, Reader& r) {
  switch (tag) {
    case OutcomeTag::exception: {
      const auto type = decode<std::string>(r);
      const auto message = decode<std::string>(r);
      const auto pid = r.read_value<std::int32_t>();
      ExceptionFactory factory = nullptr;
      {
        auto& reg = exceptions();
        std::lock_guard lock(reg.mutex);
        auto it = reg.factories.find(type);
        if (it != reg.factories.end()) factory = it->second;
      }
      if (factory) return factory(type, message, pid);
      return std::make_exception_ptr(TaskError(type, message, pid));
    }
    case OutcomeTag::crashed: {
      const auto code = r.read_value<std::int32_t>();
      const auto status = r.read_value<std::int32_t>();
      const auto pid = r.read_value<std::int32_t>();
      const auto index = r.read_value<std::uint64_t>();
      const auto task = decode<std::string>(r);
      return std::make_exception_ptr(
          WorkerCrashed(ExitStatus::from_siginfo(code, status), pid, static_cast<std::size_t>(index), task));
    }
    case OutcomeTag::pool_error: {
      const auto kind = static_cast<PoolErrorKind>(r.read_value<std::uint8_t>());
      const auto message = decode<std::string>(r);
      switch (kind) {
        case PoolErrorKind::cancelled:
          return std::make_exception_ptr(Cancelled(message));
        case PoolErrorKind::protocol:
          return std::make_exception_ptr(ProtocolError(message));
        case PoolErrorKind::initializer:
          return std::make_exception_ptr(InitializerError(message));
        case PoolErrorKind::system:
          return std::make_exception_ptr(SystemError(EAGAIN, message));
        case PoolErrorKind::timeout:
          return std::make_exception_ptr(TaskTimeout(message));
      }
      return std::make_exception_ptr(ProtocolError("corrupt pool error kind"));
    }
    case OutcomeTag::value:
      break;
  }
  return std::make_exception_ptr(ProtocolError("outcome_error called on a value"));
}

void throw_outcome_error(OutcomeTag tag, Reader& r) { std::rethrow_exception(outcome_error(tag, r)); }

}  // namespace multiproc::detail

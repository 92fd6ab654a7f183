// Pool's compiled half: worker processes, the supervisor thread, and the fault handling that makes
// a crash fail one task and nothing else.
//
// Threads and ownership. One supervisor thread per pool owns the workers: it forks them (so that
// PR_SET_PDEATHSIG is tied to a thread that lives as long as the pool), replaces them, enforces time
// limits and watches every worker's pidfd. The workers, their rings and dispatching are under the
// hub's state lock, which the supervisor holds except while it sleeps in poll(2); a user thread
// that submits or waits takes it with try_lock and dispatches or takes results itself (pump()), so
// a round trip needs no hop through the supervisor.
//
// Transport. Each worker has a request ring and a result ring in memory it shares with the parent
// (ring.hpp). A single item's request too large for the ring streams through it in pieces, which
// the worker decodes where they lie (stream(), PieceSource); other frames too large for a ring go
// over the worker's socket, announced in the ring.
// Workers sleep on a futex, and ring the supervisor's eventfd after publishing a result unless a
// parent thread spins for results. Nobody spins unless a core is free for it (PoolShared).
//
// Pipelining without deadlock. A worker whose chunks finish quickly is sent up to kMaxDepth chunks
// ahead, so it never waits for a round trip through the parent; but only while the requests in
// flight to it fit in kPipelineBytes, far below the ring's capacity. So a send to a worker either
// fits in its ring or goes to a worker with nothing else to do, which is reading: it never blocks on
// a worker that is itself blocked writing results nobody is reading. Slow chunks get no pipelining,
// so a free worker always takes the next one (load balancing).
#include "multiproc/pool.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <deque>
#include <future>
#include <string>
#include <thread>

#include "channel.hpp"
#include "launch.hpp"
#include "multiproc/cpu.hpp"
#include "platform.hpp"
#include "ring.hpp"

namespace multiproc {

namespace detail {

// ---- Job -------------------------------------------------------------------------------------

void Job::deliver(Piece piece) {
  {
    std::lock_guard lock(mutex_);
    items_done_ += piece.count;
    const auto first = piece.first;
    pieces_.emplace(first, std::move(piece));
  }
  changes_.fetch_add(1, std::memory_order_release);
  cv_.notify_all();
}

template <class Pred>
void Job::help_until(Pred&& pred) {
  std::shared_ptr<JobListener> listener;
  {
    std::lock_guard lock(mutex_);
    if (pred()) return;
    listener = listener_.lock();
  }
  if (!listener) return;
  struct Context {
    Job* job;
    std::remove_reference_t<Pred>* pred;
    std::uint64_t seen;
  } context{this, &pred, changes_.load(std::memory_order_acquire)};
  listener->help_wait(
      [](void* p) {
        auto& c = *static_cast<Context*>(p);
        const std::uint64_t now = c.job->changes_.load(std::memory_order_acquire);
        if (now == c.seen) return false;
        c.seen = now;
        std::lock_guard lock(c.job->mutex_);
        return (*c.pred)();
      },
      &context);
}

Piece Job::take_at(std::uint64_t first) {
  auto ready = [&] { return pieces_.contains(first); };
  help_until(ready);
  std::unique_lock lock(mutex_);
  cv_.wait(lock, ready);
  auto node = pieces_.extract(first);
  return std::move(node.mapped());
}

Piece Job::take_any() {
  auto ready = [&] { return !pieces_.empty(); };
  help_until(ready);
  std::unique_lock lock(mutex_);
  cv_.wait(lock, ready);
  auto node = pieces_.extract(pieces_.begin());
  return std::move(node.mapped());
}

std::string callable_name(const CallInfo& call) {
  if (call.function) {
    const std::string symbol = sys::symbol_name(call.function);
    if (!symbol.empty()) return demangle(symbol.c_str());
  }
  return call.callable ? demangle(call.callable->name()) : std::string("?");
}

std::string Job::describe_task(std::uint64_t item) {
  std::call_once(named_, [&] { callable_name_ = callable_name(call); });
  std::string out = call.kind;
  if (call.number) out += " #" + std::to_string(call.number);
  if (!call.single) out += ", item " + std::to_string(item);
  return out + " (" + callable_name_ + ")";
}

void Job::cancel() noexcept {
  std::shared_ptr<JobListener> listener;
  {
    std::lock_guard lock(mutex_);
    abandoned_.store(true, std::memory_order_relaxed);
    cancelled_.store(true, std::memory_order_release);
    listener = listener_.lock();
  }
  changes_.fetch_add(1, std::memory_order_release);
  cv_.notify_all();
  if (listener) listener->job_cancelled();
}

void Job::set_listener(std::weak_ptr<JobListener> listener) {
  std::lock_guard lock(mutex_);
  listener_ = std::move(listener);
}

bool Job::wait_done(std::uint64_t total, std::optional<std::chrono::steady_clock::time_point> deadline) {
  auto pred = [&] { return items_done_ >= total || cancelled_.load(std::memory_order_relaxed); };
  if (!deadline || *deadline > std::chrono::steady_clock::now()) help_until(pred);
  std::unique_lock lock(mutex_);
  if (!deadline) {
    cv_.wait(lock, pred);
    return true;
  }
  return cv_.wait_until(lock, *deadline, pred);
}

bool Job::done(std::uint64_t total) {
  std::lock_guard lock(mutex_);
  return items_done_ >= total || cancelled_.load(std::memory_order_relaxed);
}

std::vector<Piece> Job::take_all() {
  std::lock_guard lock(mutex_);
  std::vector<Piece> out;
  out.reserve(pieces_.size());
  for (auto& [first, piece] : pieces_) out.push_back(std::move(piece));
  pieces_.clear();
  return out;
}

// ---- chunks ----------------------------------------------------------------------------------

namespace {
constexpr std::size_t kIdOffset = sizeof(FrameHeader);
constexpr std::size_t kCountOffset = kIdOffset + sizeof(std::uint64_t);
}  // namespace

void begin_chunk(Chunk& c, std::uint64_t invoker_id) {
  Channel::begin_frame(c.request);
  c.request.write_value(invoker_id);
  c.request.write_value(std::uint32_t{0});
  c.item_offsets.clear();
  c.item_size = 0;
  c.count = 0;
}

void finish_chunk(Chunk& c) {
  std::memcpy(c.request.data() + kCountOffset, &c.count, sizeof c.count);
  c.items_end = c.request.size();
}

void materialize(Chunk& c) {
  if (c.borrowed.empty()) return;
  // Request offsets after a borrowed run move by its size.
  auto moved = [&](std::size_t offset) {
    std::size_t shift = 0;
    for (const auto& b : c.borrowed) {
      if (b.at <= offset) shift += b.size;
    }
    return offset + shift;
  };
  Writer full(c.request.size() + c.borrowed_bytes);
  std::size_t at = 0;
  for (const auto& b : c.borrowed) {
    full.write_bytes(c.request.data() + at, b.at - at);
    full.write_bytes(b.data, b.size);
    at = b.at;
  }
  full.write_bytes(c.request.data() + at, c.request.size() - at);
  for (auto& offset : c.item_offsets) offset = moved(offset);
  if (c.item_size == 0) {
    c.items_end = moved(c.items_end);
  } else {
    c.items_begin = moved(c.items_begin);
    c.items_end = moved(c.items_end);
  }
  c.request = std::move(full);
  c.borrowed.clear();
  c.borrowed_bytes = 0;
}

// A halted worker is about to be SIGKILLed by its parent; sleeping keeps it from starting
// anything the parent would have to account for.
void Progress::wait_to_be_killed() noexcept {
  for (;;) ::pause();
}

namespace {

// Items [from, to) of `c` as a chunk of their own.
Chunk sub_chunk(Chunk& c, std::uint32_t from, std::uint32_t to) {
  materialize(c);
  Chunk out;
  out.job = c.job;
  out.first = c.first + from;
  out.answer_each = c.answer_each;
  const std::byte* base = c.request.data();
  out.request.write_bytes(base, item_begin(c, 0));  // header room, id, count, callable
  out.items_begin = out.request.size();
  out.item_size = c.item_size;
  if (c.item_size == 0) {
    for (std::uint32_t i = from; i < to; ++i)
      out.item_offsets.push_back(c.item_offsets[i] - c.item_offsets[from] + out.items_begin);
  }
  out.request.write_bytes(base + item_begin(c, from), item_begin(c, to) - item_begin(c, from));
  out.count = to - from;
  finish_chunk(out);
  return out;
}

}  // namespace

Piece repeated_outcome(std::uint64_t first, std::uint32_t count, std::span<const std::byte> outcome) {
  Piece p;
  p.first = first;
  p.count = count;
  for (std::uint32_t i = 0; i < count; ++i) p.bytes.write_bytes(outcome.data(), outcome.size());
  return p;
}

void write_pool_error(Writer& w, PoolErrorKind kind, const std::string& message) {
  w.write_value(static_cast<std::uint8_t>(OutcomeTag::pool_error));
  w.write_value(static_cast<std::uint8_t>(kind));
  encode(w, message);
}

namespace {

void write_crashed(Writer& w, ExitStatus status, pid_t pid, std::uint64_t index, const std::string& task) {
  w.write_value(static_cast<std::uint8_t>(OutcomeTag::crashed));
  const std::int32_t code = status.exited() ? CLD_EXITED : (status.core_dumped() ? CLD_DUMPED : CLD_KILLED);
  const std::int32_t value = status.exited() ? status.code() : status.signal();
  w.write_value(code);
  w.write_value(value);
  w.write_value(static_cast<std::int32_t>(pid));
  w.write_value(index);
  encode(w, task);
}

// ---- memory the parent shares with its workers ----------------------------------------------

// One block per pool, shared with every worker: how many workers are running a chunk and how many
// threads spin, so that nobody spins when no core is free (spinning on an oversubscribed machine
// delays the process that would have answered by a whole scheduler time slice).
struct PoolShared {
  alignas(64) std::atomic<std::uint32_t> active{0};           // workers running a chunk
  std::atomic<std::uint32_t> spinners{0};                     // parent threads and workers spinning
  alignas(64) std::atomic<std::uint32_t> parent_spinners{0};  // parent threads spinning for results
  // Set by the worker that rings the supervisor's doorbell, cleared by the supervisor before it
  // takes results: one system call per wake-up of the supervisor, not one per result.
  std::atomic<std::uint32_t> bell_rung{0};
  std::uint32_t cpus = 1;

  // Counts the caller in as a spinner if that leaves no process waiting for a core. Unless one
  // of its threads spins, the parent needs a core of its own to take results.
  bool try_start_spin() noexcept {
    const std::uint32_t n = spinners.fetch_add(1, std::memory_order_seq_cst) + 1;
    const std::uint32_t parent = parent_spinners.load(std::memory_order_seq_cst) == 0 ? 1 : 0;
    if (active.load(std::memory_order_relaxed) + n + parent <= cpus) return true;
    spinners.fetch_sub(1, std::memory_order_relaxed);
    return false;
  }
  void end_spin() noexcept { spinners.fetch_sub(1, std::memory_order_relaxed); }
};
constexpr std::size_t kPoolSharedBytes = 4096;

// One block per worker: its progress (what it runs: timeouts and crash reports use it), whether it
// is counted as busy or spinning (so that the parent can take it out of the counts if it dies),
// and its two frame rings.
struct WorkerShared {
  Progress progress;
  alignas(64) std::atomic<std::uint32_t> busy{0};  // counted in PoolShared::active
  std::atomic<std::uint32_t> spinning{0};          // counted in PoolShared::spinners
};
constexpr std::size_t kRingCapacity = 1024 * 1024;
constexpr std::size_t kRequestRingOffset = 4096;
constexpr std::size_t kResultRingOffset = kRequestRingOffset + FrameRing::bytes_for(kRingCapacity);
constexpr std::size_t kWorkerSharedBytes = (kResultRingOffset + FrameRing::bytes_for(kRingCapacity) + 4095) & ~4095UL;
static_assert(sizeof(WorkerShared) <= kRequestRingOffset);

// How long a worker spins for its next request, and a parent thread for its results, before
// sleeping (only while a core is free). A round trip takes a few microseconds; these cover the
// time a caller needs between one call and the next.
constexpr auto kWorkerSpin = std::chrono::microseconds(100);
constexpr auto kParentSpin = std::chrono::microseconds(100);
// A streamed request goes in pieces of this size (a quarter of the ring: the worker decodes one
// while the parent writes the next ones), each side spinning this long for the other first.
constexpr std::size_t kPieceBytes = kRingCapacity / 4 - 64;
constexpr auto kStreamSpin = std::chrono::microseconds(100);

// How either end of a stream waits for the other: spin() says whether to spin once more (for
// kStreamSpin, reading the clock every 32 turns) or to sleep; after a sleep, it spins again.
class StreamWait {
 public:
  bool spin() noexcept {
    if ((++turns_ & 31) != 0 || std::chrono::steady_clock::now() < until_) {
      cpu_relax();
      return true;
    }
    until_ = std::chrono::steady_clock::now() + kStreamSpin;  // for after the sleep
    return false;
  }

 private:
  std::chrono::steady_clock::time_point until_ = std::chrono::steady_clock::now() + kStreamSpin;
  unsigned turns_ = 0;
};

// ---- the worker process ----------------------------------------------------------------------

struct WorkerConfig {
  pid_t parent = 0;  // whose death ends the worker's whole process group
  // Runs the pool's initializer; false with its exception's outcome written to `failure`.
  std::function<bool(Writer& failure)> initialize;
  std::size_t max_tasks;
  std::size_t max_payload;
  bool timed;
  std::size_t max_memory = 0;
};

// The worker's end of its link with the parent.
struct WorkerLink {
  Channel channel;  // frames too large for a ring; EOF when the parent goes
  WorkerShared* shared = nullptr;
  PoolShared* pool = nullptr;
  FrameRing requests;  // the worker consumes
  FrameRing results;   // the worker produces
  int doorbell = -1;   // an eventfd the parent's supervisor polls
  pid_t parent = 0;

  WorkerLink(Channel c, std::byte* memory, PoolShared* pool_shared, int bell, const WorkerConfig& config)
      : channel(std::move(c)),
        shared(reinterpret_cast<WorkerShared*>(memory)),
        pool(pool_shared),
        requests(memory + kRequestRingOffset, kRingCapacity, config.max_payload),
        results(memory + kResultRingOffset, kRingCapacity, config.max_payload),
        doorbell(bell),
        parent(config.parent),
        max_payload(config.max_payload) {}

  [[nodiscard]] bool parent_alive() const noexcept { return ::getppid() == parent; }

  // Rings the supervisor's doorbell unless a thread of the parent is spinning for results (it
  // will see this one; it rings the doorbell itself if it stops before).
  void ring_doorbell() const noexcept {
    if (pool->parent_spinners.load(std::memory_order_seq_cst) != 0) return;
    if (pool->bell_rung.exchange(1, std::memory_order_seq_cst) != 0) return;  // not taken yet
    try {
      sys::event_signal(doorbell);
    } catch (...) {
    }
  }

  // Sends a frame through the result ring, or over the socket (announced in the ring) when it is
  // too large for the ring.
  void send(FrameTag tag, std::uint64_t id, Writer& frame) {
    auto alive = [this] { return parent_alive(); };
    if (results.could_fit(frame.size() - sizeof(FrameHeader))) {
      if (!results.send(tag, id, frame, alive)) throw ProtocolError("the pool's process is gone");
      ring_doorbell();
      return;
    }
    Writer marker;
    Channel::begin_frame(marker);
    if (!results.send(FrameTag::on_socket, id, marker, alive)) throw ProtocolError("the pool's process is gone");
    ring_doorbell();
    channel.send(tag, id, frame);
  }

  void set_spinning(bool on) noexcept {
    if (on) {
      shared->spinning.store(1, std::memory_order_relaxed);
    } else {
      shared->spinning.store(0, std::memory_order_relaxed);
      pool->end_spin();
    }
  }

  // Waits for the next task; false when told to leave or when the parent is gone.
  bool next_task(FrameHeader& h, Writer& in) {
    bool spinning = false;
    bool tried_spin = false;
    std::chrono::steady_clock::time_point until{};
    for (unsigned n = 0;; ++n) {
      if (requests.try_recv(h, in)) break;
      if (!tried_spin) {
        tried_spin = true;
        spinning = pool->try_start_spin();
        if (spinning) {
          set_spinning(true);
          until = std::chrono::steady_clock::now() + kWorkerSpin;
        }
      }
      if (spinning) {
        if ((n & 31) != 0 || std::chrono::steady_clock::now() < until) {
          cpu_relax();
          continue;
        }
        spinning = false;
        set_spinning(false);
      }
      requests.wait_readable(std::chrono::seconds(1));
      if (!parent_alive()) return false;
    }
    if (spinning) set_spinning(false);
    if (h.tag == static_cast<std::uint16_t>(FrameTag::quit)) return false;
    if (h.tag == static_cast<std::uint16_t>(FrameTag::on_socket)) {
      const std::uint64_t id = h.id;
      if (!channel.recv(h, in) || h.id != id) throw ProtocolError("a frame announced in the ring did not come");
    }
    if (h.tag == static_cast<std::uint16_t>(FrameTag::streamed)) {
      if (in.size() != sizeof(std::uint64_t)) throw ProtocolError("a streamed task's announcement is malformed");
      std::uint64_t length = 0;
      std::memcpy(&length, in.data(), sizeof length);
      check_payload_size(length, max_payload);
      h.length = length;
      return true;
    }
    if (h.tag != static_cast<std::uint16_t>(FrameTag::task))
      throw ProtocolError("worker got a frame that is not a task");
    return true;
  }
  std::size_t max_payload = 0;
};

// The pieces of a streamed task, taken from the request ring where they lie: a piece stays there
// (the parent does not overwrite it) until the Reader moves on to the next.
class PieceSource final : public Reader::Source {
 public:
  PieceSource(WorkerLink& link, std::uint64_t id) noexcept : link_(link), id_(id) {}

  std::span<const std::byte> next() override {
    if (!second_.empty()) return std::exchange(second_, {});
    release();
    FrameHeader h{};
    std::span<const std::byte> first;
    for (StreamWait wait;;) {
      try {
        if (link_.requests.try_peek(h, first, second_)) break;
      } catch (...) {
        broken_ = true;
        throw;
      }
      if (wait.spin()) continue;
      link_.requests.wait_readable(std::chrono::seconds(1));
      if (!link_.parent_alive()) {
        broken_ = true;
        throw ProtocolError("the pool's process is gone");
      }
    }
    holding_ = true;
    if (h.tag != static_cast<std::uint16_t>(FrameTag::piece) || h.id != id_ || first.empty()) {
      broken_ = true;
      throw ProtocolError("a streamed task was cut short by another frame");
    }
    return first;
  }
  // Frees the piece last handed out.
  void release() noexcept {
    if (holding_) link_.requests.release();
    holding_ = false;
    second_ = {};
  }
  // The stream can no longer be followed: the worker must leave.
  [[nodiscard]] bool broken() const noexcept { return broken_; }

 private:
  WorkerLink& link_;
  std::uint64_t id_;
  std::span<const std::byte> second_;
  bool holding_ = false;
  bool broken_ = false;
};

[[noreturn]] void worker_main(WorkerLink& link, const WorkerConfig& config) noexcept {
  int code = 0;
  Progress* progress = &link.shared->progress;
  // A task's own children live in the worker's process group: they go when the parent does too.
  sys::kill_process_group_when_parent_dies(config.parent);
  try {
    Writer in;
    Writer out;
    if (config.initialize) {
      Writer failure;
      if (!config.initialize(failure)) {
        Channel::begin_frame(out);
        out.write_bytes(failure.data(), failure.size());
        link.send(FrameTag::init_failed, 0, out);
        sys::detail_fork::child_exit(3);
      }
    }
    progress->initialized.store(1, std::memory_order_relaxed);
    std::size_t done = 0;
    FrameHeader h{};
    while (link.next_task(h, in)) {
      const bool streamed = h.tag == static_cast<std::uint16_t>(FrameTag::streamed);
      PieceSource pieces(link, h.id);
      Reader r = streamed ? Reader(pieces, static_cast<std::size_t>(h.length)) : Reader(in.bytes());
      Channel::begin_frame(out);
      link.pool->active.fetch_add(1, std::memory_order_relaxed);
      link.shared->busy.store(1, std::memory_order_relaxed);
      // Items are stamped only where the parent set a time limit.
      TaskContext ctx{progress, config.timed && (h.reserved & kFrameTimed) != 0, h.id};
      const bool each = (h.reserved & kFrameEach) != 0;
      struct Sink {
        WorkerLink* link;
        std::uint64_t id;
      } sink{&link, h.id};
      if (each) {
        ctx.sink = &sink;
        ctx.item_done = [](void* p, Writer& reply) {
          auto& k = *static_cast<Sink*>(p);
          k.link->send(FrameTag::result, k.id, reply);
          Channel::begin_frame(reply);
        };
      }
      // Stamp first, publish the chunk last: the parent never pairs this chunk with a stale time.
      if (config.timed) {
        progress->item_started.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                                     std::memory_order_relaxed);
      }
      progress->move_to(Progress::position_of(h.id, 0));
      FrameTag reply = FrameTag::result;
      try {
        const auto id = r.read_value<std::uint64_t>();
        const auto count = r.read_value<std::uint32_t>();
        require_invoker(id)(r, count, out, ctx);
        if (r.remaining() != 0) throw ProtocolError("task request has trailing bytes");
      } catch (...) {
        if (pieces.broken()) throw;
        Channel::begin_frame(out);
        encode_current_exception(out);
        reply = FrameTag::fault;
      }
      if (streamed) {
        // What the task did not read (it failed to decode) is still coming: take it all before
        // anything else. Never the case for a request that decoded.
        r.read_runs(r.remaining(), [](std::span<const std::byte>) {});
        pieces.release();
      }
      link.shared->busy.store(0, std::memory_order_relaxed);
      link.pool->active.fetch_sub(1, std::memory_order_relaxed);
      // A batch is answered item by item; the failure of its rest, if any, comes as a fault.
      if (!each || reply != FrameTag::result) {
        const std::size_t length = out.size() - sizeof(FrameHeader);
        if (length > config.max_payload) {
          Channel::begin_frame(out);
          try {
            check_payload_size(length, config.max_payload);
          } catch (...) {
            encode_current_exception(out);
          }
          reply = FrameTag::fault;
        }
        link.send(reply, h.id, out);
      }
      if (config.max_tasks && ++done >= config.max_tasks) break;
      if (config.max_memory && sys::resident_bytes() > config.max_memory) {
        // Tell the parent first: chunks it already sent go to another worker, not to a crash.
        Channel::begin_frame(out);
        link.send(FrameTag::retire, 0, out);
        break;
      }
    }
  } catch (const std::exception& e) {
    // The parent is gone or spoke garbage: nothing to report to, just leave.
    code = 2;
  }
  sys::detail_fork::child_exit(code);
}

}  // namespace

// A Pool worker in a spawned or forkserver child: its settings and initializer come in the boot
// frame, its progress page is the memfd passed second.
void run_pool_worker_role(Channel& channel, Reader& boot, std::vector<sys::UniqueFd>& fds) noexcept {
  try {
    WorkerConfig config;
    config.parent = ::getppid();  // the pool's process, or the fork server (which dies with it)
    config.max_tasks = static_cast<std::size_t>(boot.read_value<std::uint64_t>());
    config.max_payload = static_cast<std::size_t>(boot.read_value<std::uint64_t>());
    config.timed = boot.read_value<std::uint8_t>() != 0;
    config.max_memory = static_cast<std::size_t>(boot.read_value<std::uint64_t>());
    if (boot.read_value<std::uint8_t>() != 0) {
      config.initialize = [request = decode<std::vector<std::byte>>(boot)](Writer& failure) {
        Reader r(std::span<const std::byte>(request.data(), request.size()));
        try {
          run_call(r, failure);
        } catch (...) {
          failure.clear();
          encode_current_exception(failure);
        }
        Reader outcome(failure.bytes());
        return read_outcome_tag(outcome) == OutcomeTag::value;
      };
    }
    // Its shared block and rings, the pool's shared block, and the supervisor's doorbell.
    if (fds.size() < 4 || sys::file_size(fds[1].get()) != kWorkerSharedBytes ||
        sys::file_size(fds[2].get()) != kPoolSharedBytes) {
      throw ProtocolError("the pool's shared memory did not come as expected");
    }
    static sys::FileMapping memory(fds[1].get(), kWorkerSharedBytes);
    static sys::FileMapping pool(fds[2].get(), kPoolSharedBytes);
    fds[1].reset();
    fds[2].reset();
    channel.set_max_payload(config.max_payload);
    static WorkerLink link(std::move(channel), memory.data(), reinterpret_cast<PoolShared*>(pool.data()), fds[3].get(),
                           config);
    worker_main(link, config);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "multiproc: a pool worker could not start: %s\n", e.what());
  }
  sys::detail_fork::child_exit(2);
}

// ---- the parent side -------------------------------------------------------------------------

constexpr std::size_t kMaxDepth = 4;
constexpr std::size_t kPipelineBytes = 32 * 1024;
constexpr auto kShortChunk = std::chrono::microseconds(500);
constexpr std::chrono::nanoseconds kBatchTime = std::chrono::microseconds(20);
constexpr std::size_t kBatchBytes = 8 * 1024;

struct PoolCore::Impl {
  struct InFlight {
    Chunk chunk;
    std::uint64_t seq;
    std::uint32_t answered = 0;  // items of an answer_each chunk already answered
    Piece batched;               // answers of this read not delivered yet (read_from)
  };
  // What of a chunk sent to a worker still needs an outcome.
  static Chunk rest_of(InFlight& f) {
    return f.answered == 0 ? std::move(f.chunk) : sub_chunk(f.chunk, f.answered, f.chunk.count);
  }
  struct Worker {
    pid_t pid = 0;
    Child child;
    Channel channel;                 // frames too large for the rings
    sys::SharedMapping memory_anon;  // fork: shared anonymous memory
    sys::FileMapping memory_file;    // forkserver, spawn: a memfd passed to the worker
    WorkerShared* shared = nullptr;  // its progress and flags, at the start of that memory
    FrameRing requests;              // the parent produces
    FrameRing results;               // the parent consumes
    std::deque<InFlight> inflight;   // sent, in order; the worker runs them in this order
    std::size_t inflight_bytes = 0;
    std::size_t chunks_sent = 0;  // with max_tasks_per_child, no chunk is sent that it won't run
    std::chrono::steady_clock::time_point last_result{};
    bool quick = false;                     // its last chunk took less than kShortChunk: pipeline to it
    std::chrono::nanoseconds item_time{0};  // per item, measured on its last chunk (batching)
    bool timed_out = false;                 // killed for running past task_timeout: its item fails with TaskTimeout
    std::uint64_t halted_at = 0;            // with timed_out: the Progress position it was stopped at
    bool cancel_killed = false;             // killed because the call of the task it ran was cancelled
    bool retiring = false;                  // said it will exit (max_memory_per_child) or was told to (idle)
    std::chrono::steady_clock::time_point idle_since = std::chrono::steady_clock::now();
    bool channel_open = true;  // false after a protocol error: only the pidfd matters now
    bool writable = true;      // false once a send failed: results already sent may still be read

    Progress* progress() const { return &shared->progress; }
    std::size_t depth() const { return quick ? kMaxDepth : 1; }
  };

  // Immutable after construction.
  int processes = 0;
  pid_t owner = sys::current_pid();  // a forked child's copy of the pool has no supervisor: it must not act
  Initializer initializer;
  StartMethod method = StartMethod::fork;
  std::size_t max_tasks = 0;
  std::size_t max_memory = 0;
  std::chrono::nanoseconds idle_timeout{0};
  std::size_t max_payload = 0;
  std::chrono::nanoseconds task_timeout{0};
  // What outlives the pool's state for as long as a job or a waiting thread may reach it: the
  // eventfd that wakes the supervisor (workers ring it too, as their doorbell), the lock over the
  // supervisor's state (so that a waiting thread can fetch results and dispatch work itself), and
  // the block shared with every worker.
  struct Hub final : JobListener {
    sys::UniqueFd fd = sys::event_fd();
    sys::UniqueFd shared_fd = sys::memfd("multiproc-pool", kPoolSharedBytes);
    sys::FileMapping shared_map{shared_fd.get(), kPoolSharedBytes};
    PoolShared* shared = new (shared_map.data()) PoolShared;
    std::mutex state;      // the workers, their rings and dispatching
    Impl* impl = nullptr;  // under `state`; null once the supervisor has ended

    void job_cancelled() noexcept override { signal(); }
    void signal() noexcept {
      try {
        sys::event_signal(fd.get());
      } catch (...) {
      }
    }
    // Under `state`: fetch results, send queued work.
    void pump_locked() noexcept {
      if (!impl) return;
      try {
        impl->pump(false);
      } catch (...) {
        signal();  // let the supervisor deal with it
      }
    }
    void help_wait(bool (*ready)(void*), void* context) noexcept override {
      shared->parent_spinners.fetch_add(1, std::memory_order_seq_cst);
      if (!shared->try_start_spin()) {
        shared->parent_spinners.fetch_sub(1, std::memory_order_seq_cst);
        take_missed_results();
        return;
      }
      const auto until = std::chrono::steady_clock::now() + kParentSpin;
      for (unsigned n = 0;; ++n) {
        if (state.try_lock()) {
          pump_locked();
          state.unlock();
        }
        if (ready(context)) break;
        if ((n & 15) == 0 && std::chrono::steady_clock::now() >= until) break;
        for (int i = 0; i < 8; ++i) cpu_relax();
      }
      shared->parent_spinners.fetch_sub(1, std::memory_order_seq_cst);
      shared->end_spin();
      take_missed_results();
    }
    // Results published while this thread counted as spinning rang no doorbell: fetch them now, or
    // have the supervisor do it.
    void take_missed_results() noexcept {
      if (state.try_lock()) {
        pump_locked();
        state.unlock();
      } else {
        signal();
      }
    }
  };
  std::shared_ptr<Hub> hub = std::make_shared<Hub>();
  const sys::UniqueFd& wakeup = hub->fd;

  // Shared with user threads, under `mutex`.
  mutable std::mutex mutex;
  std::deque<Chunk> queue;
  bool closing = false;
  bool terminating = false;
  std::optional<std::string> broken;  // why no task can run (the initializer failed, ...)
  std::vector<pid_t> pids;

  // The supervisor's own.
  std::thread supervisor;
  std::vector<Worker> workers;
  std::uint64_t next_seq = 1;
  int startup_deaths = 0;   // workers that died before their initializer returned, in a row
  bool sent_timed = false;  // a chunk with a time limit was sent since the supervisor set its timers
  Writer frame;             // the frame being read from a worker

  explicit Impl(const PoolOptions& o) {
    if (o.processes && *o.processes < 1) {
      throw InvalidArgument("Pool: processes must be at least 1, got " + std::to_string(*o.processes));
    }
    if (o.max_message_bytes < 64) throw InvalidArgument("Pool: max_message_bytes must be at least 64");
    processes = o.processes.value_or(cpu_count());
    initializer = o.initializer;
    method = resolve_start_method(o.start_method);
    if (method != StartMethod::fork && initializer && !initializer.request()) {
      throw InvalidArgument(std::string("Pool: under ") + to_string(method) +
                            " the initializer must be a function pointer, a captureless lambda or an encodable "
                            "functor (a closure cannot reach a worker that does not inherit this process's memory)");
    }
    max_tasks = o.max_tasks_per_child;
    max_payload = o.max_message_bytes;
    if (o.task_timeout.count() < 0) throw InvalidArgument("Pool: task_timeout must not be negative");
    task_timeout = o.task_timeout;
    max_memory = o.max_memory_per_child;
    if (o.idle_timeout.count() < 0) throw InvalidArgument("Pool: idle_timeout must not be negative");
    idle_timeout = o.idle_timeout;
    hub->shared->cpus = static_cast<std::uint32_t>(cpu_count());
    std::promise<void> started;
    auto ready = started.get_future();
    supervisor = std::thread([this, &started] { run(started); });
    try {
      ready.get();
    } catch (...) {
      supervisor.join();
      throw;
    }
  }

  void wake() { sys::event_signal(wakeup.get()); }

  // ---- user side ----
  void submit(std::vector<Chunk>& chunks) {
    std::unique_lock lock(mutex);
    if (closing || terminating) throw PoolClosed("Pool: cannot submit work after close() or terminate()");
    if (broken) {
      const std::string why = *broken;
      lock.unlock();
      for (auto& c : chunks) fail_chunk(c, PoolErrorKind::initializer, why);
      return;
    }
    const Job* listened = nullptr;
    for (auto& c : chunks) {
      if (c.job.get() != listened) {  // the chunks of one call share one job
        c.job->set_listener(hub);
        listened = c.job.get();
      }
      if (payload_size(c) > max_payload) {
        // Too large to send: fail it now rather than at the worker.
        lock.unlock();
        fail_chunk(c, PoolErrorKind::protocol,
                   "task request of " + std::to_string(payload_size(c) + sizeof(FrameHeader)) +
                       " bytes exceeds max_message_bytes (" + std::to_string(max_payload) + ")");
        lock.lock();
        continue;
      }
      queue.push_back(std::move(c));
    }
    lock.unlock();
    wake();
  }

  static void fail_chunk(const Chunk& c, PoolErrorKind kind, const std::string& why) {
    if (c.job->abandoned()) return;
    Writer one;
    write_pool_error(one, kind, why);
    c.job->deliver(repeated_outcome(c.first, c.count, one.bytes()));
  }

  // ---- supervisor ----
  void run(std::promise<void>& started) {
    sys::block_all_signals_in_this_thread();
    library_thread_started();
    struct Ended {
      ~Ended() { library_thread_ended(); }
    } ended;
    // The supervisor holds the state lock except while it sleeps in poll(2).
    std::unique_lock state(hub->state);
    hub->impl = this;
    try {
      workers.resize(static_cast<std::size_t>(processes));
      // Children started by exec answer their handshake in parallel: start them all, then wait.
      for (auto& w : workers) spawn(w, false);
      if (method != StartMethod::fork) {
        for (auto& w : workers) await_hello(w.channel, w.child, kHelloTimeout);
      }
      started.set_value();
    } catch (...) {
      kill_all();
      reap_all();
      hub->impl = nullptr;
      started.set_exception(std::current_exception());
      return;
    }
    try {
      loop(state);
    } catch (const std::exception& e) {
      // A failure of the supervisor itself (poll failing, out of memory): no task may hang, so
      // everything still outstanding fails.
      report_error(e.what());
      {
        std::lock_guard lock(mutex);
        broken = std::string("pool supervisor failed: ") + e.what();
        terminating = true;
      }
    }
    kill_all();
    reap_all();
    cancel_everything("the pool was terminated before the task finished");
    hub->impl = nullptr;
  }

  // Starts a worker into `w`. Under forkserver and spawn, waits for its handshake when
  // `wait_hello` (else the caller does: await_hello).
  void spawn(Worker& w, bool wait_hello = true) {
    auto ends = sys::socket_pair();
    sys::UniqueFd& parent_end = ends.first;
    sys::UniqueFd& child_end = ends.second;
    w = Worker{};
    // The worker's block and rings: it reads requests from one and writes results to the other.
    std::byte* memory = nullptr;
    sys::UniqueFd memory_fd;
    if (method == StartMethod::fork) {
      w.memory_anon = sys::SharedMapping(kWorkerSharedBytes);
      memory = static_cast<std::byte*>(w.memory_anon.data());
    } else {
      memory_fd = sys::memfd("multiproc-worker", kWorkerSharedBytes);
      w.memory_file = sys::FileMapping(memory_fd.get(), kWorkerSharedBytes);
      memory = w.memory_file.data();
    }
    w.shared = new (memory) WorkerShared;
    FrameRing::format(memory + kRequestRingOffset);
    FrameRing::format(memory + kResultRingOffset);
    w.requests = FrameRing(memory + kRequestRingOffset, kRingCapacity, max_payload);
    w.results = FrameRing(memory + kResultRingOffset, kRingCapacity, max_payload);
    if (method == StartMethod::fork) {
      const int keep[] = {child_end.get(), wakeup.get()};
      WorkerConfig config{sys::current_pid(), {}, max_tasks, max_payload, true, max_memory};
      if (initializer) {
        config.initialize = [this](Writer& failure) {
          try {
            initializer();
            return true;
          } catch (...) {
            encode_current_exception(failure);
            return false;
          }
        };
      }
      sys::ForkOptions fo;
      fo.keep_fds = keep;
      fo.clear_signal_mask = true;  // the supervisor blocks every signal; a worker must not
      check_fork_safety();
      PoolShared* pool_shared = hub->shared;
      const int bell = wakeup.get();
      // Taken here, where no lock is inherited: the worker decodes tasks' function pointers from it.
      const auto modules = snapshot_modules();
      const pid_t pid = sys::fork_process(fo, [&] {
        use_module_snapshot(modules.get());
        WorkerLink link(Channel(sys::UniqueFd(child_end.release()), max_payload), memory, pool_shared, bell, config);
        worker_main(link, config);
      });
      try {
        w.child = Child(pid, sys::pidfd_open(pid));
      } catch (...) {
        sys::kill_and_reap(pid);
        throw;
      }
    } else {
      const int fds[] = {child_end.get(), memory_fd.get(), hub->shared_fd.get(), wakeup.get()};
      w.child = launch(method, fds);
      child_end.reset();
      memory_fd.reset();
    }
    w.pid = w.child.pid();
    w.channel = Channel(std::move(parent_end), max_payload);
    if (method != StartMethod::fork) {
      Writer boot;
      begin_boot_frame(boot, BootRole::pool_worker);
      boot.write_value(static_cast<std::uint64_t>(max_tasks));
      boot.write_value(static_cast<std::uint64_t>(max_payload));
      boot.write_value(std::uint8_t{1});  // stamp item starts: any call may have a time limit
      boot.write_value(static_cast<std::uint64_t>(max_memory));
      const std::vector<std::byte>* init = initializer.request();
      boot.write_value(static_cast<std::uint8_t>(init != nullptr));
      if (init) encode(boot, *init);
      send_boot(w.channel, boot);
      if (wait_hello) {
        try {
          await_hello(w.channel, w.child, kHelloTimeout);
        } catch (...) {
          w.child.signal(SIGKILL, true);
          try {
            w.child.reap(false);
          } catch (...) {
          }
          w = Worker{};
          throw;
        }
      }
    }
    std::lock_guard lock(mutex);
    pids.push_back(w.pid);
  }

  // Under the state lock: takes every result the workers have published, then sends queued work
  // to free workers. The supervisor runs it on every wake-up, and a thread waiting for results
  // runs it while it spins. `by_supervisor` is false for the latter, which then wakes the
  // supervisor when what it did changes the supervisor's timers.
  void pump(bool by_supervisor) {
    bool took = false;
    for (auto& w : workers) {
      if (w.pid != 0 && w.channel_open && w.results.readable()) {
        read_from(w);
        took = true;
      }
    }
    dispatch();
    if (by_supervisor) {
      sent_timed = false;
      return;
    }
    bool look = std::exchange(sent_timed, false);
    if (took) {
      std::lock_guard lock(mutex);
      look = look || closing || idle_timeout.count() > 0;
    }
    if (look) wake();
  }

  void loop(std::unique_lock<std::mutex>& state) {
    std::vector<pollfd> fds;
    for (;;) {
      bool closing_now;
      {
        std::lock_guard lock(mutex);
        if (terminating) return;
        closing_now = closing;
      }
      pump(true);
      if (closing_now && idle_and_drained()) {
        shut_down_gracefully();
        return;
      }
      // A worker with no pidfd (sandboxed kernel) is polled for with a timeout instead.
      bool need_timeout = false;
      fds.clear();
      fds.push_back({wakeup.get(), POLLIN, 0});
      for (auto& w : workers) {
        if (w.pid == 0) continue;
        fds.push_back({w.child.watch_fd(), POLLIN, 0});
        if (w.child.watch_fd() < 0) need_timeout = true;
      }
      std::chrono::milliseconds wait(need_timeout ? 10 : -1);
      if (const auto next = next_wakeup()) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(*next - std::chrono::steady_clock::now());
        const auto bounded = std::max(left, std::chrono::milliseconds(0));
        if (wait.count() < 0 || bounded < wait) wait = bounded;
      }
      sent_timed = false;
      state.unlock();
      sys::poll_fds(fds.data(), fds.size(), wait);
      state.lock();
      if (fds[0].revents) sys::event_drain(wakeup.get());
      hub->shared->bell_rung.store(0, std::memory_order_seq_cst);  // before taking the results
      pump(true);
      std::size_t k = 1;
      for (auto& w : workers) {
        if (w.pid == 0) continue;
        const short died = fds[k++].revents;
        if (died || w.child.watch_fd() < 0) check_exit(w);
      }
      kill_overdue_workers();
      kill_cancelled_workers();
      retire_idle_workers();
      // Replace workers that are gone, unless the pool is winding down with nothing left to do.
      // With an idle timeout, only as many as the queued chunks need.
      std::size_t wanted = idle_timeout.count() > 0 ? queued_chunks() : workers.size();
      if (idle_timeout.count() > 0) {
        for (const auto& w : workers) {
          if (w.pid != 0 && w.writable && w.inflight.empty() && wanted > 0) --wanted;
        }
      }
      for (auto& w : workers) {
        if (w.pid == 0 && wanted > 0 && should_respawn()) {
          --wanted;
          try {
            spawn(w);
          } catch (const std::exception& e) {
            if (live_workers() == 0)
              fail_queue(PoolErrorKind::system, std::string("cannot start a worker: ") + e.what());
          }
        }
      }
    }
  }

  std::size_t queued_chunks() {
    std::lock_guard lock(mutex);
    return queue.size();
  }

  // An idle worker past idle_timeout is told to leave (EOF on its channel); its slot stays empty
  // until work needs it.
  bool idle_expired(const Worker& w, std::chrono::steady_clock::time_point now) const {
    return idle_timeout.count() > 0 && w.pid != 0 && w.inflight.empty() && w.writable && !w.retiring &&
           now - w.idle_since >= idle_timeout;
  }

  void retire_idle_workers() {
    if (idle_timeout.count() <= 0) return;
    const auto now = std::chrono::steady_clock::now();
    for (auto& w : workers) {
      if (!idle_expired(w, now) || queued_chunks() > 0) continue;
      w.retiring = true;
      w.writable = false;
      tell_to_leave(w);
    }
  }

  // Asks an idle worker to exit: a quit frame in its ring, and EOF on its socket.
  void tell_to_leave(Worker& w) {
    try {
      Writer quit;
      Channel::begin_frame(quit);
      if (w.requests.try_send(FrameTag::quit, 0, quit)) {
        w.requests.wake_consumer();
      } else {
        sys::send_signal(w.pid, SIGKILL, true);
      }
    } catch (const std::exception&) {
      sys::send_signal(w.pid, SIGKILL, true);
    }
    w.channel.handle().reset();
  }

  // The earliest of the next task deadline and the next idle expiry; soon, while a worker holds a
  // chunk of a cancelled call that it has not started yet (it is killed once it does).
  std::optional<std::chrono::steady_clock::time_point> next_wakeup() const {
    auto next = next_task_deadline();
    for (const auto& w : workers) {
      if (w.pid == 0 || w.cancel_killed || w.timed_out) continue;
      if (std::any_of(w.inflight.begin(), w.inflight.end(),
                      [](const InFlight& f) { return f.chunk.job->cancelled(); })) {
        const auto soon = std::chrono::steady_clock::now() + std::chrono::milliseconds(5);
        if (!next || soon < *next) next = soon;
      }
    }
    if (idle_timeout.count() > 0) {
      for (const auto& w : workers) {
        if (w.pid == 0 || !w.inflight.empty() || !w.writable || w.retiring) continue;
        const auto at = w.idle_since + std::chrono::duration_cast<std::chrono::steady_clock::duration>(idle_timeout);
        if (!next || at < *next) next = at;
      }
    }
    return next;
  }

  // The time limit of a chunk's tasks: its call's, else the pool's; zero: none.
  std::chrono::nanoseconds limit_of(const Chunk& c) const {
    return c.job->timeout.count() > 0 ? c.job->timeout : task_timeout;
  }

  // The unanswered chunk of ours that a worker's position names, if any.
  static const InFlight* chunk_at(const Worker& w, std::uint64_t position) {
    for (const auto& f : w.inflight) {
      if (static_cast<std::uint32_t>(f.seq) == Progress::chunk_of(position)) return &f;
    }
    return nullptr;  // between chunks: nothing of ours is running
  }

  // The chunk the worker is running, if it is one it was sent and has not answered.
  const InFlight* running_chunk(const Worker& w) const {
    if (w.pid == 0 || w.inflight.empty()) return nullptr;
    return chunk_at(w, w.progress()->position.load(std::memory_order_acquire));
  }

  // When the item a worker is running (if it is one of ours still unanswered) passes its limit;
  // `position` receives where the worker was seen.
  std::optional<std::chrono::steady_clock::time_point> task_deadline(const Worker& w,
                                                                     std::uint64_t* position = nullptr) const {
    if (w.timed_out || w.cancel_killed || w.pid == 0) return std::nullopt;
    const Progress& p = *w.progress();
    // Acquire: pairs with the worker's move_to, so item_started is at least this item's stamp.
    const std::uint64_t at = p.position.load(std::memory_order_acquire);
    const InFlight* f = chunk_at(w, at);
    if (!f) return std::nullopt;
    const auto limit = limit_of(f->chunk);
    if (limit.count() <= 0) return std::nullopt;
    if (position) *position = at;
    const std::int64_t started = p.item_started.load(std::memory_order_relaxed);
    if (started == 0) return std::nullopt;
    const std::chrono::steady_clock::time_point t{std::chrono::steady_clock::duration(started)};
    return t + std::chrono::duration_cast<std::chrono::steady_clock::duration>(limit);
  }

  // The next moment the supervisor must look at the clock: the earliest task deadline, or soon
  // when a worker holds limited chunks but has not stamped the start of one of them yet (nothing
  // else would wake the supervisor when it does).
  std::optional<std::chrono::steady_clock::time_point> next_task_deadline() const {
    std::optional<std::chrono::steady_clock::time_point> next;
    const auto recheck = std::chrono::steady_clock::now() + std::chrono::milliseconds(10);
    for (const auto& w : workers) {
      if (w.pid == 0 || w.inflight.empty() || w.timed_out || w.cancel_killed) continue;
      auto d = task_deadline(w);
      if (!d && std::any_of(w.inflight.begin(), w.inflight.end(),
                            [&](const InFlight& f) { return limit_of(f.chunk).count() > 0; })) {
        d = recheck;
      }
      if (d && (!next || *d < *next)) next = d;
    }
    return next;
  }

  // A task past its time: the worker is halted at that item (it may have finished it meanwhile,
  // but starts nothing more), then its whole process group is SIGKILLed; when its pidfd fires,
  // the item fails with TaskTimeout instead of WorkerCrashed, and the worker is replaced.
  void kill_overdue_workers() {
    const auto now = std::chrono::steady_clock::now();
    for (auto& w : workers) {
      std::uint64_t seen = 0;
      const auto d = task_deadline(w, &seen);
      if (!d || now < *d) continue;
      // It moved on since it was seen: its new item has a new start, judged on the next look.
      if (!w.progress()->position.compare_exchange_strong(seen, seen | Progress::kHalted)) continue;
      w.timed_out = true;
      w.halted_at = seen;
      sys::send_signal(w.pid, SIGKILL, true);
    }
  }

  // A worker running a task of a cancelled call is killed the same way; the call's results are
  // abandoned, so nothing is delivered for it, and the worker's other chunks go back to the queue.
  void kill_cancelled_workers() {
    for (auto& w : workers) {
      if (w.timed_out || w.cancel_killed) continue;
      const InFlight* f = running_chunk(w);
      if (!f || !f->chunk.job->cancelled()) continue;
      w.cancel_killed = true;
      sys::send_signal(w.pid, SIGKILL, true);
    }
  }

  bool should_respawn() {
    std::lock_guard lock(mutex);
    if (terminating || broken) return false;
    return !closing || !queue.empty();
  }

  int live_workers() const {
    return static_cast<int>(std::count_if(workers.begin(), workers.end(), [](const Worker& w) { return w.pid != 0; }));
  }

  bool idle_and_drained() {
    std::lock_guard lock(mutex);
    if (!queue.empty()) return false;
    return std::all_of(workers.begin(), workers.end(), [](const Worker& w) { return w.inflight.empty(); });
  }

  // Fills the workers round by round: every free worker gets a chunk before any gets a second.
  void dispatch() {
    if (queued_chunks() == 0) return;
    for (std::size_t round = 1; round <= kMaxDepth; ++round) {
      bool queue_empty = false;
      for (auto& w : workers) {
        if (w.pid == 0 || !w.channel_open || !w.writable || w.inflight.size() >= round || w.depth() < round ||
            (max_tasks && w.chunks_sent >= max_tasks)) {
          continue;
        }
        std::optional<Chunk> next;
        {
          std::lock_guard lock(mutex);
          while (!queue.empty() && queue.front().job->abandoned()) queue.pop_front();
          if (queue.empty()) {
            queue_empty = true;
            break;
          }
          const std::size_t bytes = payload_size(queue.front());  // borrowed bytes included
          if (!w.inflight.empty() && w.inflight_bytes + bytes > kPipelineBytes) continue;
          next.emplace(std::move(queue.front()));
          queue.pop_front();
          merge_following(w, *next);
        }
        send_chunk(w, std::move(*next));
      }
      if (queue_empty) return;
    }
  }

  // Batching of small tasks: a worker whose items take a few microseconds gets the queued chunks
  // that continue this one's call merged into one frame, as many as fit in about kBatchTime of its
  // measured time per item (and kBatchBytes). A crash or a time limit still fails only the item
  // concerned; with max_tasks_per_child, chunks are counted as sent, so none are merged. Under
  // `mutex`.
  void merge_following(const Worker& w, Chunk& chunk) {
    if (max_tasks || w.item_time.count() <= 0 || !w.quick || chunk.count != 1) return;
    const auto budget = static_cast<std::size_t>(std::max<std::int64_t>(kBatchTime / w.item_time, 1));
    while (chunk.count < budget && !queue.empty()) {
      Chunk& next = queue.front();
      if (next.job != chunk.job || next.first != chunk.first + chunk.count || next.count != 1 ||
          next.item_size != chunk.item_size || chunk.request.size() + next.request.size() > kBatchBytes) {
        return;
      }
      const std::size_t callable_end = item_begin(next, 0);
      const std::size_t shift = chunk.request.size() - callable_end;
      for (const std::size_t offset : next.item_offsets) chunk.item_offsets.push_back(offset + shift);
      chunk.request.write_bytes(next.request.data() + callable_end, next.items_end - callable_end);
      chunk.count += next.count;
      chunk.answer_each = true;
      finish_chunk(chunk);
      queue.pop_front();
    }
  }

  void send_chunk(Worker& w, Chunk chunk) {
    // Progress positions carry the low 32 bits of a frame id; zero is the "nothing yet" position.
    if (static_cast<std::uint32_t>(next_seq) == 0) ++next_seq;
    const std::uint64_t seq = next_seq++;
    ++w.chunks_sent;
    if (w.inflight.empty()) w.last_result = std::chrono::steady_clock::now();
    w.inflight_bytes += payload_size(chunk);
    const bool timed = limit_of(chunk).count() > 0;
    if (timed) sent_timed = true;
    const auto flags = static_cast<std::uint16_t>((timed ? kFrameTimed : 0) | (chunk.answer_each ? kFrameEach : 0));
    if (chunk.count != 1) materialize(chunk);  // only a single item's request is streamed
    w.inflight.push_back(InFlight{std::move(chunk), seq, 0, Piece{}});
    Chunk& sent = w.inflight.back().chunk;
    Writer& request = sent.request;
    try {
      // Pipelining keeps what is queued to a worker far below the ring's capacity, and a chunk
      // goes to a worker with nothing queued otherwise, so a frame that fits the ring finds room.
      const std::size_t length = payload_size(sent);
      if (!sent.borrowed.empty() || (!w.requests.could_fit(length) && sent.count == 1)) {
        stream(w, seq, sent, flags);
      } else if (w.requests.could_fit(length)) {
        if (!w.requests.try_send(FrameTag::task, seq, request, flags))
          throw ProtocolError("a worker's request ring is full");
        w.requests.wake_consumer();
      } else {
        // Too large for the ring: announce it there, then send it over the socket, which the
        // worker reads as soon as it sees the announcement (it has nothing else queued).
        Writer marker;
        Channel::begin_frame(marker);
        if (!w.requests.try_send(FrameTag::on_socket, seq, marker))
          throw ProtocolError("a worker's request ring is full");
        w.requests.wake_consumer();
        w.channel.send(FrameTag::task, seq, request, flags);
      }
    } catch (const std::exception&) {
      // The worker is gone (EPIPE: it exited, after max_tasks_per_child or a crash) or unreachable.
      // What it sent before is still read; its pidfd tells the rest.
      w.writable = false;
      sys::send_signal(w.pid, SIGKILL, true);
    }
  }

  // A single item's request too large for the ring: announced there, then its payload through the
  // ring in pieces, which the worker decodes as they come (it has nothing else queued), while this
  // thread copies the next ones in, straight from the caller's memory for borrowed bytes. The
  // worker has decoded its whole argument before it runs the task, so this takes as long as the
  // copy. While it waits for room, what the supervisor would do meanwhile is done here: time
  // limits and cancellations are enforced, and a worker that dies or a pool that terminates ends
  // the stream (a ProtocolError, which send_chunk handles as a worker gone).
  void stream(Worker& w, std::uint64_t seq, const Chunk& chunk, std::uint16_t flags) {
    const std::uint64_t length = payload_size(chunk);
    if (!w.requests.try_send_bytes(FrameTag::streamed, seq, std::as_bytes(std::span(&length, 1)), flags))
      throw ProtocolError("a worker's request ring is full");
    w.requests.wake_consumer();
    const std::byte* request = chunk.request.data();
    std::size_t at = sizeof(FrameHeader);
    for (const auto& b : chunk.borrowed) {
      stream_bytes(w, seq, {request + at, b.at - at});
      stream_bytes(w, seq, {b.data, b.size});
      at = b.at;
    }
    stream_bytes(w, seq, {request + at, chunk.request.size() - at});
  }

  void stream_bytes(Worker& w, std::uint64_t seq, std::span<const std::byte> bytes) {
    while (!bytes.empty()) {
      const auto piece = bytes.first(std::min(bytes.size(), kPieceBytes));
      for (StreamWait wait; !w.requests.try_send_bytes(FrameTag::piece, seq, piece);) {
        if (wait.spin()) continue;
        w.requests.wait_for_room(FrameRing::footprint(piece.size()), std::chrono::milliseconds(10));
        if (worker_gone(w)) throw ProtocolError("the worker left while its request was streamed to it");
        kill_overdue_workers();
        kill_cancelled_workers();
        bool ending = false;
        {
          std::lock_guard lock(mutex);
          ending = terminating;
        }
        if (ending) {
          // As for a cancelled call: the kill blames nothing, and termination cancels the item.
          w.cancel_killed = true;
          sys::send_signal(w.pid, SIGKILL, true);
        }
      }
      w.requests.wake_consumer();
      bytes = bytes.subspan(piece.size());
    }
  }

  // True once the worker has exited (its pidfd, or its end of the socket, says so).
  static bool worker_gone(const Worker& w) {
    pollfd fds[2] = {{w.channel.fd(), POLLRDHUP, 0}, {w.child.watch_fd(), POLLIN, 0}};
    const nfds_t n = fds[1].fd >= 0 ? 2 : 1;
    if (::poll(fds, n, 0) <= 0) return false;
    return (fds[0].revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0 || (n == 2 && fds[1].revents != 0);
  }

  // Takes every frame the worker has published. The answers to a batch's items that came in this
  // read are delivered together, as one piece.
  void read_from(Worker& w) {
    FrameHeader h{};
    while (w.channel_open) {
      try {
        if (!w.results.try_recv(h, frame)) break;
        if (h.tag == static_cast<std::uint16_t>(FrameTag::on_socket)) {
          const std::uint64_t id = h.id;
          if (!w.channel.recv(h, frame) || h.id != id)
            throw ProtocolError("a frame announced in the ring did not come");
        }
      } catch (const std::exception& e) {
        protocol_error(w, e);
        break;
      }
      handle_frame(w, h, frame);
    }
    if (!w.inflight.empty()) deliver_batched(w.inflight.front());
  }

  static void deliver_batched(InFlight& f) {
    if (f.batched.count == 0) return;
    Piece p = std::move(f.batched);
    f.batched = Piece{};
    f.chunk.job->deliver(std::move(p));
  }

  // A worker that breaks the protocol cannot be trusted with more work: kill it; its chunk is then
  // handled as a crash.
  void protocol_error(Worker& w, const std::exception& e) {
    report_error((std::string("worker ") + std::to_string(w.pid) + ": " + e.what()).c_str());
    w.channel_open = false;
    sys::send_signal(w.pid, SIGKILL, true);
  }

  void handle_frame(Worker& w, const FrameHeader& h, Writer& payload) {
    try {
      if (h.tag == static_cast<std::uint16_t>(FrameTag::init_failed)) {
        initializer_failed(w, payload);
        return;
      }
      if (h.tag == static_cast<std::uint16_t>(FrameTag::retire)) {
        w.retiring = true;
        w.writable = false;
        return;
      }
      if (w.inflight.empty() || h.id != w.inflight.front().seq) {
        throw ProtocolError("a worker answered a task it was not given");
      }
      const auto tag = static_cast<FrameTag>(h.tag);
      if (tag != FrameTag::result && tag != FrameTag::fault) throw ProtocolError("unexpected frame from a worker");
      InFlight& front = w.inflight.front();
      if (front.chunk.answer_each && tag == FrameTag::result) {
        // One item of a batch: kept with the others of this read, delivered by read_from().
        if (!front.chunk.job->abandoned()) {
          if (front.batched.count == 0) front.batched.first = front.chunk.first + front.answered;
          front.batched.bytes.write_bytes(payload.data(), payload.size());
          ++front.batched.count;
        }
        if (++front.answered < front.chunk.count) return;
      }
      deliver_batched(front);
      const std::uint32_t answered = front.answered;
      Chunk chunk = std::move(front.chunk);
      w.inflight.pop_front();
      w.inflight_bytes -= payload_size(chunk);
      const auto now = std::chrono::steady_clock::now();
      if (w.inflight.empty()) w.idle_since = now;
      const auto took = now - w.last_result;
      w.quick = took < kShortChunk;
      // Time per item, from a worker that had this chunk queued behind the previous one (or was
      // sent it while idle): what batching sizes its merges by.
      w.item_time =
          std::chrono::duration_cast<std::chrono::nanoseconds>(took) / std::max<std::uint32_t>(chunk.count, 1);
      w.last_result = now;
      if (chunk.job->abandoned() || answered == chunk.count) return;
      if (tag == FrameTag::result) {
        Piece p;
        p.first = chunk.first + answered;
        p.count = chunk.count - answered;
        p.bytes = std::move(payload);
        chunk.job->deliver(std::move(p));
      } else {
        chunk.job->deliver(repeated_outcome(chunk.first + answered, chunk.count - answered, payload.bytes()));
      }
    } catch (const std::exception& e) {
      protocol_error(w, e);
    }
  }

  // No task can run: the chunks already sent to this worker, the queued ones and all later ones
  // fail with InitializerError (workers that started fine finish what they hold).
  void initializer_failed(Worker& w, Writer& payload) {
    std::string why = "the pool's initializer failed";
    try {
      Reader r(payload.bytes());
      const OutcomeTag tag = read_outcome_tag(r);
      throw_outcome_error(tag, r);
    } catch (const std::exception& e) {
      why += ": ";
      why += e.what();
    }
    {
      std::lock_guard lock(mutex);
      broken = why;
    }
    fail_inflight(w, PoolErrorKind::initializer, why);
    fail_queue(PoolErrorKind::initializer, why);
  }

  void fail_inflight(Worker& w, PoolErrorKind kind, const std::string& why) {
    for (auto& f : w.inflight) fail_chunk(rest_of(f), kind, why);
    w.inflight.clear();
    w.inflight_bytes = 0;
  }

  void fail_queue(PoolErrorKind kind, const std::string& why) {
    std::deque<Chunk> doomed;
    {
      std::lock_guard lock(mutex);
      doomed.swap(queue);
    }
    for (auto& c : doomed) fail_chunk(c, kind, why);
  }

  void check_exit(Worker& w) {
    std::optional<ExitStatus> ended;
    try {
      ended = w.child.reap(true);
    } catch (const SystemError&) {
      // ECHILD: reaped behind our back (SIGCHLD set to SIG_IGN by the application).
      ended = ExitStatus::from_siginfo(CLD_KILLED, SIGKILL);
    }
    if (!ended) return;
    // Results published just before the exit are still in the ring: take them first.
    read_from(w);
    // A worker that died busy or spinning is still counted so: take it out of the counts.
    if (w.shared->busy.load(std::memory_order_relaxed) != 0)
      hub->shared->active.fetch_sub(1, std::memory_order_relaxed);
    if (w.shared->spinning.load(std::memory_order_relaxed) != 0) hub->shared->end_spin();
    const ExitStatus status = *ended;
    if (w.progress()->initialized.load(std::memory_order_relaxed) == 0) {
      // Died in its initializer (or before): if that happens again and again, stop, instead of
      // restarting workers forever as Python does.
      if (++startup_deaths >= 3 * processes) {
        const std::string why = "workers die before their initializer returns: " + status.to_string();
        std::lock_guard lock(mutex);
        if (!broken) broken = why;
      }
    } else {
      startup_deaths = 0;
    }
    if (w.retiring && status.exited() && status.code() == 0) {
      // It left on purpose: what it had not started goes back to the front of the queue, in order.
      std::lock_guard lock(mutex);
      for (auto it = w.inflight.rbegin(); it != w.inflight.rend(); ++it) {
        if (!it->chunk.job->abandoned()) queue.push_front(rest_of(*it));
      }
      w.inflight.clear();
    } else if (!w.inflight.empty()) {
      worker_crashed(w, status);
    }
    {
      std::optional<std::string> why;
      {
        std::lock_guard lock(mutex);
        why = broken;
      }
      if (why) fail_queue(PoolErrorKind::initializer, *why);
    }
    {
      std::lock_guard lock(mutex);
      std::erase(pids, w.pid);
    }
    w = Worker{};
  }

  // The chunk the worker had started loses the item it was running, which fails with
  // WorkerCrashed; its other items and the chunks it had not started go back to the front of the
  // queue, in order. (Items of that chunk that ran before the crash run again: their results
  // died with the worker.)
  void worker_crashed(Worker& w, ExitStatus status) {
    std::optional<std::string> why;
    {
      std::lock_guard lock(mutex);
      why = broken;
    }
    if (why) {  // nothing put back in the queue would ever run
      fail_inflight(w, PoolErrorKind::initializer, *why);
      return;
    }
    // Where it was: for a timeout, where the supervisor halted it (it may have answered that
    // item since and started nothing after it); otherwise as it last published.
    const std::uint64_t position = w.timed_out ? w.halted_at : w.progress()->position.load(std::memory_order_relaxed);
    const InFlight* running = w.cancel_killed ? nullptr : chunk_at(w, position);
    const std::uint32_t item = Progress::item_of(position);
    std::vector<Chunk> requeue;
    for (auto& f : w.inflight) {
      if (f.chunk.job->abandoned()) continue;
      // Not started, or already answered up to where the worker stopped (it died between two
      // items, or finished the halted one before the kill): nothing to blame, all to run again.
      // A worker killed for a cancelled call blames nothing of another call either.
      if (&f != running || item < f.answered) {
        requeue.push_back(rest_of(f));
        continue;
      }
      // Items of a batch already answered keep their outcomes; the crash is the next one's.
      Chunk chunk = rest_of(f);
      std::uint32_t at = item - f.answered;
      if (at >= chunk.count) at = chunk.count - 1;  // the worker's memory is not to be trusted
      Writer one;
      if (w.timed_out) {
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(limit_of(chunk)).count();
        write_pool_error(one, PoolErrorKind::timeout,
                         chunk.job->describe_task(chunk.first + at) + " ran past its timeout of " + std::to_string(ms) +
                             " ms; worker " + std::to_string(w.pid) + " was killed");
      } else {
        write_crashed(one, status, w.pid, chunk.first + at, chunk.job->describe_task(chunk.first + at));
      }
      chunk.job->deliver(repeated_outcome(chunk.first + at, 1, one.bytes()));
      if (at > 0) requeue.push_back(sub_chunk(chunk, 0, at));
      if (at + 1 < chunk.count) requeue.push_back(sub_chunk(chunk, at + 1, chunk.count));
    }
    w.inflight.clear();
    w.inflight_bytes = 0;
    std::lock_guard lock(mutex);
    for (auto it = requeue.rbegin(); it != requeue.rend(); ++it) queue.push_front(std::move(*it));
  }

  void shut_down_gracefully() {
    for (auto& w : workers) {
      if (w.pid) tell_to_leave(w);
    }
    for (auto& w : workers) {
      if (!w.pid) continue;
      try {
        w.child.reap(false);
      } catch (const SystemError&) {
      }
      w = Worker{};
    }
    std::lock_guard lock(mutex);
    pids.clear();
  }

  void kill_all() noexcept {
    for (auto& w : workers) {
      if (!w.pid) continue;
      try {
        sys::send_signal(w.pid, SIGKILL, true);
      } catch (...) {
      }
    }
  }

  void reap_all() noexcept {
    for (auto& w : workers) {
      if (!w.pid) continue;
      try {
        w.child.reap(false);
      } catch (...) {
      }
      for (auto& f : w.inflight)
        fail_chunk(rest_of(f), PoolErrorKind::cancelled, "the pool was terminated before the task finished");
      w = Worker{};
    }
    std::lock_guard lock(mutex);
    pids.clear();
  }

  void cancel_everything(const std::string& why) noexcept {
    try {
      fail_queue(PoolErrorKind::cancelled, why);
    } catch (...) {
    }
  }
};

PoolCore::PoolCore(const PoolOptions& options) : impl_(std::make_unique<Impl>(options)) {}

PoolCore::PoolCore(std::unique_ptr<PoolBackend> backend) : backend_(std::move(backend)) {
  if (!backend_) throw InvalidArgument("Pool: no backend");
}

namespace {
// A child forked from a process that owns a pool (a Process target, say) has a copy of the pool's
// memory but not its supervisor thread or its workers: using it would wait forever.
void check_owner(const PoolCore::Impl& impl) {
  if (impl.owner != sys::current_pid()) {
    throw StateError("this Pool belongs to process " + std::to_string(impl.owner) +
                     "; a forked child cannot use its parent's pool (make its own)");
  }
}
}  // namespace

PoolCore::~PoolCore() {
  if (backend_) {
    backend_->terminate();
    return;
  }
  if (impl_->owner != sys::current_pid()) {
    // The copy inherited by a forked child: its thread and workers are the parent's. Leave it.
    (void)impl_.release();
    return;
  }
  terminate();
}

void PoolCore::submit(std::vector<Chunk> chunks) {
  if (backend_) {
    for (auto& c : chunks) materialize(c);
    return backend_->submit(std::move(chunks));
  }
  check_owner(*impl_);
  impl_->submit(chunks);
}

void PoolCore::submit(Chunk chunk) {
  std::vector<Chunk> one;
  one.push_back(std::move(chunk));
  submit(std::move(one));
}

SettleBorrowed::~SettleBorrowed() {
  for (auto& job : jobs) core->settle_borrowed(*job);
}

void PoolCore::settle_borrowed(Job& job) noexcept {
  job.abandon();
  // A forked child's copy of the pool never streamed anything (it cannot submit), and its copy of
  // the lock may be held by a thread that does not exist in it.
  if (backend_ || impl_->owner != sys::current_pid()) return;
  // Streams run under the state lock: once it is taken, none reads the job's borrowed bytes, and
  // none will (an abandoned job's chunks are never sent).
  std::lock_guard lock(impl_->hub->state);
}

void PoolCore::close() {
  if (backend_) return backend_->close();
  check_owner(*impl_);
  {
    std::lock_guard lock(impl_->mutex);
    impl_->closing = true;
  }
  impl_->wake();
}

void PoolCore::terminate() noexcept {
  if (backend_) return backend_->terminate();
  if (impl_->owner != sys::current_pid()) return;
  {
    std::lock_guard lock(impl_->mutex);
    impl_->terminating = true;
  }
  try {
    impl_->wake();
  } catch (...) {
  }
  if (impl_->supervisor.joinable() && impl_->supervisor.get_id() != std::this_thread::get_id()) {
    impl_->supervisor.join();
  }
}

void PoolCore::join() {
  if (backend_) return backend_->join();
  check_owner(*impl_);
  {
    std::lock_guard lock(impl_->mutex);
    if (!impl_->closing && !impl_->terminating) throw StateError("Pool::join() needs close() or terminate() first");
  }
  if (impl_->supervisor.joinable()) impl_->supervisor.join();
}

int PoolCore::processes() const noexcept { return backend_ ? backend_->processes() : impl_->processes; }

std::vector<pid_t> PoolCore::worker_pids() const {
  if (backend_) return backend_->worker_pids();
  std::lock_guard lock(impl_->mutex);
  return impl_->pids;
}

}  // namespace detail

// ---- Pool ------------------------------------------------------------------------------------

Pool::Pool(PoolOptions options) : core_(std::make_unique<detail::PoolCore>(options)) {}
Pool::Pool(std::unique_ptr<detail::PoolBackend> backend)
    : core_(std::make_unique<detail::PoolCore>(std::move(backend))) {}
Pool::~Pool() = default;
Pool::Pool(Pool&&) noexcept = default;
Pool& Pool::operator=(Pool&&) noexcept = default;

detail::PoolCore& Pool::core() const {
  if (!core_) throw StateError("Pool: used after being moved from");
  return *core_;
}

void Pool::close() { core().close(); }
void Pool::terminate() noexcept {
  if (core_) core_->terminate();
}
void Pool::join() { core().join(); }
int Pool::processes() const noexcept { return core_ ? core_->processes() : 0; }
std::vector<pid_t> Pool::worker_pids() const { return core().worker_pids(); }

}  // namespace multiproc

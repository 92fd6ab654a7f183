// multiproc::mpi: a PoolBackend whose chunks run on MPI worker ranks (see multiproc/mpi.hpp).
//
// Messages, all on MPI_COMM_WORLD:
//   task     (0 -> worker): u64 sequence number, then the chunk's request after its frame header
//                           (u64 invoker id, u32 count, callable, items). Sent straight from the
//                           Chunk's buffer: the sequence number goes in the last 8 bytes of the
//                           header room.
//   result   (worker -> 0): u64 sequence number, u8 kind, then either one outcome per item
//                           (kind 0) or one outcome that stands for every item (kind 1: the chunk
//                           could not run, an unknown invoker id say).
//   shutdown (0 -> worker): empty; the worker finalizes MPI and exits 0.
#include "multiproc/mpi.hpp"

#include <mpi.h>
#include <sched.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "channel.hpp"
#include "multiproc/start_method.hpp"
#include "platform.hpp"

namespace multiproc::mpi {

namespace {

namespace sys = detail::sys;
using detail::Chunk;
using detail::OutcomeTag;
using detail::Piece;
using detail::PoolErrorKind;
using detail::repeated_outcome;
using detail::write_pool_error;

constexpr int kTagTask = 1;
constexpr int kTagShutdown = 2;
constexpr int kTagResult = 3;

constexpr std::size_t kSeqOffset = sizeof(detail::FrameHeader) - sizeof(std::uint64_t);
constexpr std::size_t kReplyHeader = sizeof(std::uint64_t) + 1;  // sequence number, kind
constexpr std::uint8_t kKindOutcomes = 0;
constexpr std::uint8_t kKindFault = 1;
constexpr std::size_t kMaxMessage = INT_MAX;
constexpr std::size_t kBuildIdBytes = 128;

// ---- small helpers ---------------------------------------------------------------------------

void fail_chunk(const Chunk& c, PoolErrorKind kind, const std::string& why) {
  Writer one;
  write_pool_error(one, kind, why);
  c.job->deliver(repeated_outcome(c.first, c.count, one.bytes()));
}

// Polls without sleeping (yielding the CPU) for the first 500 us after the last activity, so a
// quick request and reply costs tens of microseconds; then sleeps 20 us, doubling up to `cap`, so
// an idle rank costs next to no CPU.
class Backoff {
 public:
  explicit Backoff(std::chrono::microseconds cap) : cap_(cap) {}
  void reset() noexcept {
    active_ = std::chrono::steady_clock::now();
    sleep_ = std::chrono::microseconds(20);
  }
  [[nodiscard]] std::chrono::microseconds next() noexcept {
    if (std::chrono::steady_clock::now() - active_ < std::chrono::microseconds(500))
      return std::chrono::microseconds(0);
    const auto s = sleep_;
    sleep_ = std::min(sleep_ * 2, cap_);
    return s;
  }

 private:
  std::chrono::microseconds cap_;
  std::chrono::steady_clock::time_point active_ = std::chrono::steady_clock::now();
  std::chrono::microseconds sleep_{20};
};

// Short sleeps mean what they say: the default timer slack (50 us) would more than double them.
void tight_timer_slack() noexcept { (void)prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL); }

void pause_for(std::chrono::microseconds d) {
  if (d.count() == 0) {
    sched_yield();
  } else {
    std::this_thread::sleep_for(d);
  }
}

// ---- process-wide state ----------------------------------------------------------------------

std::atomic<bool> g_initialized{false};
std::atomic<bool> g_finalized{false};
int g_rank = -1;
int g_size = 0;
pid_t g_init_pid = 0;
std::vector<pid_t> g_pids;  // rank 0: the pid of every rank

// ---- rank 0: the hub that owns MPI traffic -----------------------------------------------------

// What a backend and the hub share about one pool.
struct PoolState {
  int in_flight_per_rank = 2;
  std::atomic<bool> terminated{false};
  bool closed = false;            // hub mutex
  std::uint64_t outstanding = 0;  // chunks queued or in flight; hub mutex
};

struct Queued {
  std::shared_ptr<PoolState> pool;
  Chunk chunk;
};

struct InFlight {
  std::shared_ptr<PoolState> pool;
  Chunk chunk;
  MPI_Request send = MPI_REQUEST_NULL;
  bool orphan = false;  // already failed (terminate, finalize): its result is discarded
};

class Hub {
 public:
  explicit Hub(int size) : inflight_(static_cast<std::size_t>(size)) {}

  void start() {
    thread_ = std::thread([this] { run(); });
  }

  void submit(const std::shared_ptr<PoolState>& pool, std::vector<Chunk> chunks) {
    std::vector<Chunk> refused;
    {
      std::lock_guard lock(mutex_);
      if (pool->closed || pool->terminated.load()) throw PoolClosed("the pool is closed");
      if (stopping_) throw StateError("multiproc::mpi: MPI was finalized; the pool cannot run tasks any more");
      for (auto& c : chunks) {
        if (c.count == 0) continue;
        if (c.request.size() - kSeqOffset > kMaxMessage) {
          refused.push_back(std::move(c));
          continue;
        }
        ++pool->outstanding;
        queue_.push_back(Queued{pool, std::move(c)});
      }
      ++generation_;
    }
    cv_.notify_all();
    for (auto& c : refused) {
      fail_chunk(c, PoolErrorKind::protocol,
                 "the request of " + std::to_string(c.count) + " item(s) is larger than MPI's 2 GiB message limit");
    }
  }

  void close(const std::shared_ptr<PoolState>& pool) {
    std::lock_guard lock(mutex_);
    pool->closed = true;
  }

  void terminate(const std::shared_ptr<PoolState>& pool) {
    std::unique_lock lock(mutex_);
    pool->terminated.store(true);
    pool->closed = true;
    ++generation_;
    cv_.notify_all();
    done_cv_.wait(lock, [&] { return pool->outstanding == 0; });
  }

  void join(const std::shared_ptr<PoolState>& pool) {
    std::unique_lock lock(mutex_);
    if (!pool->closed) throw StateError("Pool::join() needs close() or terminate() first");
    done_cv_.wait(lock, [&] { return pool->outstanding == 0; });
  }

  // Fails what is left, waits for the worker ranks' running tasks, tells them to shut down. The
  // caller then finalizes MPI.
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      ++generation_;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void finished(PoolState& pool) {
    {
      std::lock_guard lock(mutex_);
      --pool.outstanding;
    }
    done_cv_.notify_all();
  }

  [[nodiscard]] std::size_t in_flight_count() const noexcept {
    std::size_t n = 0;
    for (const auto& r : inflight_) n += r.size();
    return n;
  }

  // Under the mutex: drops queued chunks of terminated pools and abandoned jobs; picks chunks for
  // free ranks. The ranks are visited round robin from `next_rank_`, so equal work spreads.
  void take_work(std::vector<std::pair<int, Queued>>& out, std::vector<Queued>& dropped) {
    const int ranks = static_cast<int>(inflight_.size());
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (it->pool->terminated.load() || it->chunk.job->abandoned() || stopping_) {
        dropped.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    std::vector<int> planned(static_cast<std::size_t>(ranks), 0);
    bool progress = true;
    while (!queue_.empty() && progress) {
      progress = false;
      for (int k = 0; k < ranks - 1 && !queue_.empty(); ++k) {
        const int r = 1 + (next_rank_ - 1 + k) % (ranks - 1);
        const auto ur = static_cast<std::size_t>(r);
        const auto limit = static_cast<std::size_t>(queue_.front().pool->in_flight_per_rank);
        if (inflight_[ur].size() + static_cast<std::size_t>(planned[ur]) >= limit) continue;
        ++planned[ur];
        out.emplace_back(r, std::move(queue_.front()));
        queue_.pop_front();
        next_rank_ = r % (ranks - 1) + 1;
        progress = true;
      }
    }
  }

  void send(int rank, Queued q) {
    const std::uint64_t seq = next_seq_++;
    std::memcpy(q.chunk.request.data() + kSeqOffset, &seq, sizeof seq);
    InFlight& f = inflight_[static_cast<std::size_t>(rank)][seq];
    f.pool = std::move(q.pool);
    f.chunk = std::move(q.chunk);
    MPI_Isend(f.chunk.request.data() + kSeqOffset, static_cast<int>(f.chunk.request.size() - kSeqOffset), MPI_BYTE,
              rank, kTagTask, MPI_COMM_WORLD, &f.send);
  }

  // Receives every result that has arrived; true if there was one.
  bool receive() {
    bool any = false;
    for (;;) {
      int flag = 0;
      MPI_Status st;
      MPI_Iprobe(MPI_ANY_SOURCE, kTagResult, MPI_COMM_WORLD, &flag, &st);
      if (!flag) return any;
      any = true;
      int n = 0;
      MPI_Get_count(&st, MPI_BYTE, &n);
      buffer_.clear();
      buffer_.grow(static_cast<std::size_t>(std::max(n, 0)));
      MPI_Recv(buffer_.data(), n, MPI_BYTE, st.MPI_SOURCE, kTagResult, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      deliver(st.MPI_SOURCE, buffer_.bytes());
    }
  }

  void deliver(int source, std::span<const std::byte> reply) {
    if (source <= 0 || static_cast<std::size_t>(source) >= inflight_.size() || reply.size() < kReplyHeader) {
      std::fprintf(stderr, "multiproc::mpi: malformed reply from rank %d; aborting the MPI job\n", source);
      MPI_Abort(MPI_COMM_WORLD, 70);
    }
    std::uint64_t seq = 0;
    std::memcpy(&seq, reply.data(), sizeof seq);
    const auto kind = static_cast<std::uint8_t>(reply[sizeof seq]);
    auto& ranks = inflight_[static_cast<std::size_t>(source)];
    const auto it = ranks.find(seq);
    if (it == ranks.end()) {
      std::fprintf(stderr, "multiproc::mpi: reply from rank %d to an unknown chunk; aborting the MPI job\n", source);
      MPI_Abort(MPI_COMM_WORLD, 70);
    }
    InFlight f = std::move(it->second);
    ranks.erase(it);
    MPI_Wait(&f.send, MPI_STATUS_IGNORE);  // the reply proves the worker received it: at once
    if (f.orphan) return;
    const auto body = reply.subspan(kReplyHeader);
    if (!f.chunk.job->abandoned()) {
      if (kind == kKindOutcomes) {
        Piece p;
        p.first = f.chunk.first;
        p.count = f.chunk.count;
        p.bytes.write_bytes(body.data(), body.size());
        f.chunk.job->deliver(std::move(p));
      } else {
        f.chunk.job->deliver(repeated_outcome(f.chunk.first, f.chunk.count, body));
      }
    }
    finished(*f.pool);
  }

  // In-flight chunks of terminated pools (or of every pool, when stopping) fail now with
  // Cancelled; their results will be discarded.
  void orphan(bool all) {
    for (auto& r : inflight_) {
      for (auto& [seq, f] : r) {
        if (f.orphan || !(all || f.pool->terminated.load())) continue;
        f.orphan = true;
        fail_chunk(
            f.chunk, PoolErrorKind::cancelled,
            all ? "MPI was finalized before the task finished" : "the pool was terminated before the task finished");
        finished(*f.pool);
      }
    }
  }

  void run() {
    tight_timer_slack();
    Backoff backoff(std::chrono::microseconds(200));
    std::uint64_t seen_generation = 0;
    bool stopping = false;
    while (!stopping) {
      std::vector<std::pair<int, Queued>> work;
      std::vector<Queued> dropped;
      {
        std::unique_lock lock(mutex_);
        if (in_flight_count() == 0 && queue_.empty()) {
          cv_.wait(lock, [&] { return generation_ != seen_generation; });
        }
        seen_generation = generation_;
        stopping = stopping_;
        take_work(work, dropped);
      }
      for (auto& q : dropped) {
        if (q.pool->terminated.load() || stopping) {
          fail_chunk(
              q.chunk, PoolErrorKind::cancelled,
              stopping ? "MPI was finalized before the task ran" : "the pool was terminated before the task ran");
        }
        finished(*q.pool);
      }
      bool active = !work.empty();
      for (auto& [rank, q] : work) send(rank, std::move(q));
      active = receive() || active;
      orphan(stopping);
      if (stopping) break;
      if (active) {
        backoff.reset();
      } else if (in_flight_count() != 0) {
        const auto d = backoff.next();
        if (d.count() == 0) {
          sched_yield();
        } else {
          std::unique_lock lock(mutex_);
          cv_.wait_for(lock, d, [&] { return generation_ != seen_generation; });
        }
      }
    }
    drain_and_shut_down();
  }

  void drain_and_shut_down() {
    long seconds = 60;
    if (const char* s = std::getenv("MULTIPROC_MPI_SHUTDOWN_SECONDS")) seconds = std::max(0L, std::atol(s));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    Backoff backoff(std::chrono::microseconds(1000));
    while (in_flight_count() != 0) {
      if (receive()) {
        backoff.reset();
        continue;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        std::fprintf(stderr,
                     "multiproc::mpi: %zu task chunk(s) still running on worker ranks after %ld s at shutdown; "
                     "aborting the MPI job\n",
                     in_flight_count(), seconds);
        MPI_Abort(MPI_COMM_WORLD, 1);
      }
      pause_for(backoff.next());
    }
    for (int r = 1; r < static_cast<int>(inflight_.size()); ++r) {
      MPI_Send(nullptr, 0, MPI_BYTE, r, kTagShutdown, MPI_COMM_WORLD);
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;       // wakes the supervisor
  std::condition_variable done_cv_;  // wakes join() and terminate()
  std::deque<Queued> queue_;
  std::uint64_t generation_ = 0;  // bumped by every event the supervisor must see
  bool stopping_ = false;
  std::thread thread_;

  // The supervisor's own.
  std::vector<std::map<std::uint64_t, InFlight>> inflight_;  // by rank; rank 0 unused
  std::uint64_t next_seq_ = 1;
  int next_rank_ = 1;
  Writer buffer_;
};

std::mutex g_hub_mutex;
std::unique_ptr<Hub> g_hub;  // rank 0, from the first make_pool() to finalize()

class MpiBackend final : public detail::PoolBackend {
 public:
  MpiBackend(Hub& hub, int in_flight_per_rank) : hub_(hub), state_(std::make_shared<PoolState>()) {
    state_->in_flight_per_rank = in_flight_per_rank;
  }
  ~MpiBackend() override { MpiBackend::terminate(); }

  void submit(std::vector<Chunk> chunks) override { hub_.submit(state_, std::move(chunks)); }
  void close() override { hub_.close(state_); }
  void terminate() noexcept override {
    if (terminated_) return;
    terminated_ = true;
    try {
      hub_.terminate(state_);
    } catch (...) {
    }
  }
  void join() override { hub_.join(state_); }
  [[nodiscard]] int processes() const noexcept override { return g_size - 1; }
  [[nodiscard]] std::vector<pid_t> worker_pids() const override {
    return std::vector<pid_t>(g_pids.begin() + (g_pids.empty() ? 0 : 1), g_pids.end());
  }

 private:
  Hub& hub_;
  std::shared_ptr<PoolState> state_;
  bool terminated_ = false;
};

// ---- worker ranks ----------------------------------------------------------------------------

[[noreturn]] void worker_loop() {
  Writer in;
  Writer out;
  Backoff backoff(std::chrono::microseconds(200));
  const detail::TaskContext ctx{};
  tight_timer_slack();
  for (;;) {
    int flag = 0;
    MPI_Status st;
    MPI_Iprobe(0, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, &st);
    if (!flag) {
      pause_for(backoff.next());
      continue;
    }
    backoff.reset();
    if (st.MPI_TAG == kTagShutdown) {
      MPI_Recv(nullptr, 0, MPI_BYTE, 0, kTagShutdown, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      break;
    }
    int n = 0;
    MPI_Get_count(&st, MPI_BYTE, &n);
    in.clear();
    in.grow(static_cast<std::size_t>(std::max(n, 0)));
    MPI_Recv(in.data(), n, MPI_BYTE, 0, st.MPI_TAG, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    if (st.MPI_TAG != kTagTask || n < static_cast<int>(sizeof(std::uint64_t))) {
      std::fprintf(stderr, "multiproc::mpi: rank %d got an unexpected message (tag %d); aborting the MPI job\n", g_rank,
                   st.MPI_TAG);
      MPI_Abort(MPI_COMM_WORLD, 70);
    }
    out.clear();
    out.write_bytes(in.data(), sizeof(std::uint64_t));  // the sequence number
    out.write_value(kKindOutcomes);
    Reader r(in.bytes().subspan(sizeof(std::uint64_t)));
    try {
      const auto id = r.read_value<std::uint64_t>();
      const auto count = r.read_value<std::uint32_t>();
      detail::require_invoker(id)(r, count, out, ctx);
      if (r.remaining() != 0) throw ProtocolError("task request has trailing bytes");
      if (out.size() > kMaxMessage) {
        throw ProtocolError("the results of " + std::to_string(count) +
                            " item(s) are larger than MPI's 2 GiB message limit");
      }
    } catch (...) {
      out.truncate(kReplyHeader);
      out.data()[sizeof(std::uint64_t)] = static_cast<std::byte>(kKindFault);
      detail::encode_current_exception(out);
    }
    MPI_Send(out.data(), static_cast<int>(out.size()), MPI_BYTE, 0, kTagResult, MPI_COMM_WORLD);
  }
  MPI_Finalize();
  std::exit(0);
}

void at_exit() noexcept {
  if (g_init_pid == sys::current_pid()) finalize();
}

}  // namespace

// ---- public API ------------------------------------------------------------------------------

void init(int& argc, char**& argv) {
  // A spawned or forkserver child of this program (a local Pool inside a task) runs its work here
  // and exits: it never reaches MPI.
  multiproc::init();
  if (g_initialized.load() || g_finalized.load()) throw StateError("multiproc::mpi::init() called twice");
  int provided = 0;
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS) {
    throw StartError("multiproc::mpi: MPI_Init_thread failed");
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  if (provided < MPI_THREAD_SERIALIZED) {
    if (g_rank == 0) {
      std::fprintf(stderr,
                   "multiproc::mpi: this MPI library provides thread level %d; MPI_THREAD_SERIALIZED is needed\n",
                   provided);
    }
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  g_init_pid = sys::current_pid();

  // Every rank must run this build: tasks are named by invoker ids and function offsets.
  std::array<char, kBuildIdBytes> mine{};
  const std::string& id = sys::build_id();
  std::memcpy(mine.data(), id.data(), std::min(id.size(), kBuildIdBytes - 1));
  std::vector<char> all(g_rank == 0 ? kBuildIdBytes * static_cast<std::size_t>(g_size) : 0);
  MPI_Gather(mine.data(), static_cast<int>(kBuildIdBytes), MPI_CHAR, all.data(), static_cast<int>(kBuildIdBytes),
             MPI_CHAR, 0, MPI_COMM_WORLD);
  const std::int32_t pid = sys::current_pid();
  std::vector<std::int32_t> pids(g_rank == 0 ? static_cast<std::size_t>(g_size) : 0);
  MPI_Gather(&pid, 1, MPI_INT32_T, pids.data(), 1, MPI_INT32_T, 0, MPI_COMM_WORLD);
  std::string mismatch;
  int bad = 0;
  if (g_rank == 0) {
    for (int r = 1; r < g_size; ++r) {
      const char* theirs = all.data() + static_cast<std::size_t>(r) * kBuildIdBytes;
      if (std::memcmp(theirs, mine.data(), kBuildIdBytes) != 0) {
        bad = 1;
        mismatch +=
            "rank " + std::to_string(r) + " runs build " + std::string(theirs, strnlen(theirs, kBuildIdBytes)) + "; ";
      }
    }
    g_pids.assign(pids.begin(), pids.end());
  }
  MPI_Bcast(&bad, 1, MPI_INT, 0, MPI_COMM_WORLD);
  if (bad) {
    MPI_Finalize();
    g_finalized.store(true);
    if (g_rank != 0) std::exit(1);
    throw BuildMismatch("multiproc::mpi: every rank must run the same build of the program; rank 0 runs build " + id +
                        ", " + mismatch.substr(0, mismatch.size() - 2));
  }
  g_initialized.store(true);
  if (g_rank != 0) worker_loop();
  std::atexit(at_exit);
}

void finalize() noexcept {
  if (!g_initialized.load() || g_finalized.exchange(true)) return;
  if (g_rank != 0) return;  // worker ranks finalize in their loop
  // The hub stays allocated until static destruction: pools still alive refer to it, and it
  // refuses their work from now on.
  Hub* hub = nullptr;
  {
    std::lock_guard lock(g_hub_mutex);
    hub = g_hub.get();
  }
  try {
    if (hub) {
      hub->stop();
    } else {
      for (int r = 1; r < g_size; ++r) MPI_Send(nullptr, 0, MPI_BYTE, r, kTagShutdown, MPI_COMM_WORLD);
    }
  } catch (...) {
  }
  MPI_Finalize();
}

bool initialized() noexcept { return g_initialized.load() && !g_finalized.load(); }
int rank() noexcept { return g_rank; }
int size() noexcept { return g_size; }

Pool make_pool(PoolConfig config) {
  if (!initialized())
    throw StateError("multiproc::mpi::make_pool() needs multiproc::mpi::init() first (or MPI was finalized)");
  if (g_rank != 0) throw StateError("multiproc::mpi::make_pool() runs on rank 0 only");
  if (g_size < 2) {
    throw StateError(
        "multiproc::mpi::make_pool(): no worker ranks (the MPI job has 1 rank; run it with mpirun -n 2 or more)");
  }
  if (config.in_flight_per_rank < 1) throw InvalidArgument("mpi::PoolConfig::in_flight_per_rank must be at least 1");
  Hub* hub = nullptr;
  {
    std::lock_guard lock(g_hub_mutex);
    if (g_finalized.load()) throw StateError("multiproc::mpi::make_pool(): MPI was finalized");
    if (!g_hub) {
      g_hub = std::make_unique<Hub>(g_size);
      g_hub->start();
    }
    hub = g_hub.get();
  }
  return Pool(std::make_unique<MpiBackend>(*hub, config.in_flight_per_rank));
}

}  // namespace multiproc::mpi

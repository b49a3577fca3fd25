// cuemu: runs regext's CUDA device code (csrc/cuda/*.cu, unmodified) on the CPU,
// for tests on machines without a GPU. tests/cuda_emu/README.md says what it
// checks and what only a real GPU can show.
//
// Every CUDA thread of a block is a fiber on ONE OS thread; blocks run one
// after another. __syncthreads() and the *_sync warp intrinsics are real
// barriers (a thread waits until every participant arrives), so warp-uniform
// code such as `if (warp == 0) warp_sum(..)` works, and these are launch errors:
//   - a __syncthreads()/warp op reached by only some threads;
//   - lanes of one warp in different shuffles (file:line);
//   - a shuffle whose mask names a lane that exited or does not exist;
//   - more threads than the kernel's __launch_bounds__ (CUEMU_CHECK_LAUNCH_BOUNDS,
//     which the build inserts into every kernel), or than 1024;
//   - kernel parameters over CUDA's 32,764-byte limit.
// The order in which fibers run between barriers is CUEMU_SCHEDULE / set_schedule
// (forward | reverse | random:SEED): a missing __syncthreads shows up as results
// that differ between schedules. __shared__ is a function-scope `static`, so
// AddressSanitizer sees shared arrays as globals; ThreadSanitizer sees every
// CUDA thread as a fiber that only barriers and launch boundaries synchronize.
// There is no atomicAdd: regext's kernels use none, and a use fails to compile.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#else
#define CUEMU_ASAN 0
#endif
// ThreadSanitizer: every CUDA thread is a TSan fiber; switches carry no
// synchronization, only __syncthreads/warp ops/launch boundaries do, so a
// missing __syncthreads is reported as a data race on the __shared__ array
// whatever the schedule. The emulator's own bookkeeping is not instrumented.
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define CUEMU_TSAN 1
#define CUEMU_INTERNAL __attribute__((no_sanitize_thread, noinline))
#else
#define CUEMU_TSAN 0
#define CUEMU_INTERNAL
#endif

// ---- CUDA keywords ------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // one block at a time: a static is per-block storage
#define CUEMU 1

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 { unsigned x, y, z; };
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 719 };
constexpr int warpSize = 32;

// A minimal x86-64 context switch (callee-saved registers, MXCSR, x87 CW):
// glibc's swapcontext also makes a sigprocmask system call on every switch,
// which made it ~50x slower. Define CUEMU_UCONTEXT to use ucontext instead.
#if defined(__x86_64__) && !defined(CUEMU_UCONTEXT)
#define CUEMU_FAST_SWITCH 1
extern "C" void cuemu_switch(void** save_sp, void* load_sp);
__asm__(R"(
  .text
  .weak cuemu_switch
  .type cuemu_switch,@function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch,.-cuemu_switch
)");
#else
#define CUEMU_FAST_SWITCH 0
#endif

namespace cuemu {

enum class Wait { kRun, kSync, kWarp, kDone };
enum class WarpOp { kShfl, kShflXor, kShflDown, kShflUp, kBallot, kSyncWarp };

struct Fiber {
  ucontext_t ctx;
  void* sp = nullptr;
  char* stack = nullptr;  // usable part (a guard page lies below it)
  size_t stack_size = 0;
  void* asan_fake = nullptr;
  void* tsan_fiber = nullptr;
  unsigned bar_gen = 0, warp_gen = 0;
  uint3 tid{};
  unsigned linear = 0;
  Wait wait = Wait::kRun;
  // the pending warp op
  WarpOp op{};
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t in = 0, out = 0;
  const char* file = "";
  int line = 0;
};

struct Runtime {
  ucontext_t sched;
  void* sched_sp = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  void* sched_fake = nullptr;
  std::vector<std::unique_ptr<Fiber>> fibers;
  Fiber* cur = nullptr;
  dim3 grid, block;
  uint3 block_idx{}, grid_u3{}, block_u3{};
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;        // first error of the current launch
  std::string last_error;   // for cudaGetLastError / the launch check
  struct Launch { const void* kernel; uint64_t blocks; unsigned threads; size_t param_bytes; };
  std::vector<Launch> log;  // every launch since the last clear
  bool failed = false;
  std::mt19937 rng{12345};
  int mode = 0;             // 0 forward, 1 reverse, 2 random
  size_t stack_bytes = 256 * 1024;
  uint64_t launches = 0, switches = 0;
  void* tsan_main = nullptr;
  // happens-before objects (TSan): launch -> threads, threads -> end, barriers by parity
  char sync_launch = 0, sync_end = 0, sync_bar[2] = {0, 0}, sync_warp[32][2] = {};

  Runtime() {
    if (const char* s = std::getenv("CUEMU_SCHEDULE")) set_schedule(s);
    if (const char* s = std::getenv("CUEMU_STACK_KB")) stack_bytes = std::strtoul(s, nullptr, 10) * 1024;
  }
  void set_schedule(const std::string& s) {
    if (s == "reverse") mode = 1;
    else if (s.rfind("random", 0) == 0) {
      mode = 2;
      rng.seed(s.size() > 7 ? std::strtoul(s.c_str() + 7, nullptr, 10) : 1);
    } else mode = 0;
  }
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline void fail(const std::string& msg) {
  Runtime& r = rt();
  if (!r.failed) {
    r.failed = true;
    r.error = msg;
  }
}

// ---- fibers ---------------------------------------------------------------
CUEMU_INTERNAL inline void switch_to_scheduler(bool exiting) {
  Runtime& r = rt();
  Fiber* f = r.cur;
#if CUEMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake, r.sched_bottom, r.sched_size);
#else
  (void)exiting;
#endif
#if CUEMU_TSAN
  __tsan_switch_to_fiber(r.tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
#if CUEMU_FAST_SWITCH
  cuemu_switch(&f->sp, r.sched_sp);
#else
  swapcontext(&f->ctx, &r.sched);
#endif
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake, &r.sched_bottom, &r.sched_size);
#endif
}

CUEMU_INTERNAL inline void fiber_main() {
  Runtime& r = rt();
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_bottom, &r.sched_size);
#endif
#if CUEMU_TSAN
  __tsan_acquire(&r.sync_launch);
#endif
  r.body(r.body_arg);
#if CUEMU_TSAN
  __tsan_release(&r.sync_end);
#endif
  r.cur->wait = Wait::kDone;
  switch_to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

CUEMU_INTERNAL inline void run_fiber(Fiber* f) {
  Runtime& r = rt();
  r.cur = f;
  ++r.switches;
#if CUEMU_ASAN
  __sanitizer_start_switch_fiber(&r.sched_fake, f->stack, f->stack_size);
#endif
#if CUEMU_TSAN
  __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if CUEMU_FAST_SWITCH
  cuemu_switch(&r.sched_sp, f->sp);
#else
  swapcontext(&r.sched, &f->ctx);
#endif
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(r.sched_fake, nullptr, nullptr);
#endif
  r.cur = nullptr;
}

CUEMU_INTERNAL inline void ensure_fibers(size_t n) {
  Runtime& r = rt();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (r.fibers.size() < n) {
    auto f = std::make_unique<Fiber>();
    const size_t total = r.stack_bytes + page;
    void* mem = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) { std::perror("cuemu: mmap"); std::abort(); }
    mprotect(mem, page, PROT_NONE);  // guard page: a stack overflow faults at once
    f->stack = static_cast<char*>(mem) + page;
    f->stack_size = r.stack_bytes;
#if CUEMU_TSAN
    f->tsan_fiber = __tsan_create_fiber(0);
#endif
    r.fibers.push_back(std::move(f));
  }
}

inline std::string where(const Fiber& f) {
  char buf[256];
  switch (f.wait) {
    case Wait::kSync: std::snprintf(buf, sizeof buf, "__syncthreads"); break;
    case Wait::kWarp: std::snprintf(buf, sizeof buf, "warp op at %s:%d", f.file, f.line); break;
    case Wait::kDone: std::snprintf(buf, sizeof buf, "exited"); break;
    default: std::snprintf(buf, sizeof buf, "running"); break;
  }
  return buf;
}

// All lanes of each warp that wait in a warp op: complete the op when every lane
// of its mask has arrived. Returns true when some op completed.
CUEMU_INTERNAL inline bool resolve_warps(size_t n) {
  Runtime& r = rt();
  bool progress = false;
  for (size_t w0 = 0; w0 < n; w0 += 32) {
    const size_t lanes = std::min<size_t>(32, n - w0);
    unsigned handled = 0;
    for (size_t l0 = 0; l0 < lanes; ++l0) {
      Fiber* first = r.fibers[w0 + l0].get();
      if (first->wait != Wait::kWarp || (handled >> l0 & 1u)) continue;
      const unsigned mask = first->mask;
      handled |= mask;
      bool all_here = true;
      for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        if (l >= lanes) {
          fail("warp op at " + std::string(first->file) + ":" + std::to_string(first->line) +
               ": mask names lane " + std::to_string(l) + " of warp " + std::to_string(w0 / 32) +
               ", which does not exist (blockDim " + std::to_string(n) + ")");
          return false;
        }
        Fiber* f = r.fibers[w0 + l].get();
        if (f->wait != Wait::kWarp) { all_here = false; continue; }  // checked on deadlock
        if (f->mask != mask || f->op != first->op || f->line != first->line ||
            std::strcmp(f->file, first->file) != 0) {
          fail("warp " + std::to_string(w0 / 32) + ": lane " + std::to_string(l0) + " is in " +
               where(*first) + " (mask " + std::to_string(mask) + ") but lane " + std::to_string(l) +
               " is in " + where(*f) + " (mask " + std::to_string(f->mask) + ")");
          return false;
        }
      }
      if (!all_here) continue;
      uint64_t ballot = 0;
      for (unsigned l = 0; l < 32; ++l)
        if (mask >> l & 1u) ballot |= (r.fibers[w0 + l]->in != 0 ? 1ull : 0ull) << l;
      for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        Fiber* f = r.fibers[w0 + l].get();
        const int width = f->width;
        const int seg = static_cast<int>(l & ~static_cast<unsigned>(width - 1));
        const int me = static_cast<int>(l);
        int src = me;
        switch (f->op) {
          case WarpOp::kShfl: src = seg + (f->arg & (width - 1)); break;
          case WarpOp::kShflXor: { const int j = me ^ f->arg; src = j > seg + width - 1 ? me : j; break; }
          case WarpOp::kShflDown: { const int j = me + f->arg; src = j > seg + width - 1 ? me : j; break; }
          case WarpOp::kShflUp: { const int j = me - f->arg; src = j < seg ? me : j; break; }
          case WarpOp::kBallot: case WarpOp::kSyncWarp: break;
        }
        if (f->op == WarpOp::kBallot) {
          f->out = ballot;
        } else if (f->op != WarpOp::kSyncWarp) {
          if (src < 0 || src > 31 || !(mask >> src & 1u)) {
            fail("warp op at " + std::string(f->file) + ":" + std::to_string(f->line) + ": lane " +
                 std::to_string(l) + " reads lane " + std::to_string(src) + ", not in mask");
            return false;
          }
          f->out = r.fibers[w0 + src]->in;
        }
      }
      for (unsigned l = 0; l < 32; ++l)
        if (mask >> l & 1u) r.fibers[w0 + l]->wait = Wait::kRun;
      progress = true;
    }
  }
  return progress;
}

inline std::string describe_block(size_t n) {
  Runtime& r = rt();
  std::string s;
  for (size_t i = 0; i < n && s.size() < 600;) {
    size_t j = i;
    const std::string w = where(*r.fibers[i]);
    while (j + 1 < n && where(*r.fibers[j + 1]) == w) ++j;
    s += "\n  threads " + std::to_string(i) + "-" + std::to_string(j) + ": " + w;
    i = j + 1;
  }
  return s;
}

// Runs one block to completion (or to the first error).
CUEMU_INTERNAL inline void run_block(size_t n) {
  Runtime& r = rt();
#if CUEMU_TSAN
  r.tsan_main = __tsan_get_current_fiber();
  __tsan_release(&r.sync_launch);  // host writes -> this block's threads
#endif
  for (size_t i = 0; i < n; ++i) {
    Fiber* f = r.fibers[i].get();
    f->linear = static_cast<unsigned>(i);
    f->tid = uint3{static_cast<unsigned>(i % r.block.x),
                   static_cast<unsigned>(i / r.block.x % r.block.y),
                   static_cast<unsigned>(i / (r.block.x * r.block.y))};
    f->wait = Wait::kRun;
    f->bar_gen = f->warp_gen = 0;
#if CUEMU_FAST_SWITCH
    // A frame that cuemu_switch "returns" from into fiber_main, with the stack
    // aligned as after a call.
    auto* top = reinterpret_cast<uint64_t*>(
        (reinterpret_cast<uintptr_t>(f->stack + f->stack_size)) & ~uintptr_t{15});
    top[-1] = 0;                                           // fiber_main's return address
    top[-2] = reinterpret_cast<uint64_t>(&fiber_main);     // popped by ret
    for (int k = 3; k <= 8; ++k) top[-k] = 0;              // rbp rbx r12 r13 r14 r15
    top[-9] = 0x037Full << 32 | 0x1F80u;                   // MXCSR, x87 control word
    f->sp = top - 9;
#else
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack;
    f->ctx.uc_stack.ss_size = f->stack_size;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, fiber_main, 0);
#endif
  }
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = r.mode == 1 ? n - 1 - i : i;
  while (!r.failed) {
    if (r.mode == 2) std::shuffle(order.begin(), order.end(), r.rng);
    bool ran = false;
    for (size_t i : order) {
      if (r.failed) return;
      Fiber* f = r.fibers[i].get();
      if (f->wait != Wait::kRun) continue;
      run_fiber(f);
      ran = true;
    }
    if (r.failed) return;
    if (resolve_warps(n) || ran) continue;
    // Nothing can run and no warp op can complete.
    size_t done = 0, sync = 0;
    for (size_t i = 0; i < n; ++i) {
      done += r.fibers[i]->wait == Wait::kDone;
      sync += r.fibers[i]->wait == Wait::kSync;
    }
    if (done == n) {
#if CUEMU_TSAN
      __tsan_acquire(&r.sync_end);  // this block's writes -> host and later blocks
#endif
      return;
    }
    if (sync == n) {  // a complete __syncthreads
      for (size_t i = 0; i < n; ++i) r.fibers[i]->wait = Wait::kRun;
      continue;
    }
    fail("block (" + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + "," +
         std::to_string(r.block_idx.z) + ") cannot make progress (divergent __syncthreads or warp op):" +
         describe_block(n));
    return;
  }
}

template <typename Tuple, typename K>
struct Bound {
  K kernel;
  Tuple args;
  CUEMU_INTERNAL static void call(void* self) {
    auto* b = static_cast<Bound*>(self);
    std::apply(b->kernel, b->args);  // by-value parameters land on the fiber's stack
  }
};

// CUDA's kernel-parameter limit (CUDA 12.1+, sm_70+) and block-size limit.
constexpr size_t kMaxParamBytes = 32764;
constexpr unsigned kMaxThreadsPerBlock = 1024;

// Bytes of the kernel-parameter buffer: each parameter at its own alignment, in order.
template <typename... P>
constexpr size_t param_bytes() {
  size_t offset = 0;
  ((offset = (offset + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return offset;
}

// kernel<<<blocks, threads, 0, stream>>>(args...): runs every block to completion
// (or to the first error, which the next launch check reports).
template <typename... P, typename... A>
CUEMU_INTERNAL void launch(void (*kernel)(P...), int64_t blocks, int threads, cudaStream_t,
                           A&&... args) {
  Runtime& r = rt();
  r.failed = false;
  r.error.clear();
  ++r.launches;
  const size_t bytes = param_bytes<std::remove_cv_t<std::remove_reference_t<P>>...>();
  r.log.push_back({reinterpret_cast<const void*>(kernel), static_cast<uint64_t>(blocks),
                   static_cast<unsigned>(threads), bytes});
  if (bytes > kMaxParamBytes) {
    r.last_error = "kernel parameters take " + std::to_string(bytes) + " bytes, over CUDA's " +
                   std::to_string(kMaxParamBytes) + "-byte limit";
    return;
  }
  if (threads <= 0 || static_cast<unsigned>(threads) > kMaxThreadsPerBlock || blocks <= 0 ||
      blocks > 0x7fffffffLL) {
    r.last_error = "invalid launch configuration: " + std::to_string(blocks) + " blocks of " +
                   std::to_string(threads) + " threads";
    return;
  }
  using Tuple = std::tuple<std::remove_cv_t<std::remove_reference_t<P>>...>;
  using B = Bound<Tuple, void (*)(P...)>;
  auto bound = std::make_unique<B>(B{kernel, Tuple(std::forward<A>(args)...)});
  const size_t n = static_cast<size_t>(threads);
  ensure_fibers(n);
  r.grid = dim3(static_cast<unsigned>(blocks));
  r.block = dim3(static_cast<unsigned>(threads));
  r.grid_u3 = uint3{r.grid.x, 1, 1};
  r.block_u3 = uint3{r.block.x, 1, 1};
  r.body = &B::call;
  r.body_arg = bound.get();
  std::vector<uint64_t> order(static_cast<size_t>(blocks));
  for (uint64_t b = 0; b < order.size(); ++b) order[b] = r.mode == 1 ? order.size() - 1 - b : b;
  if (r.mode == 2) std::shuffle(order.begin(), order.end(), r.rng);
  for (uint64_t b : order) {
    r.block_idx = uint3{static_cast<unsigned>(b), 0, 0};
    run_block(n);
    if (r.failed) break;
  }
  if (r.failed && r.last_error.empty()) r.last_error = r.error;
}

// Returns and clears the last launch error ("" when none).
inline std::string take_error() {
  std::string e;
  std::swap(e, rt().last_error);
  return e;
}

// ---- device-side intrinsics ----------------------------------------------
CUEMU_INTERNAL inline void block_barrier() {
  Runtime& r = rt();
  Fiber* f = r.cur;
#if CUEMU_TSAN
  __tsan_release(&r.sync_bar[f->bar_gen & 1]);
#endif
  f->wait = Wait::kSync;
  switch_to_scheduler(false);
#if CUEMU_TSAN
  __tsan_acquire(&r.sync_bar[f->bar_gen & 1]);
#endif
  ++f->bar_gen;
}

template <typename T>
CUEMU_INTERNAL inline T warp_op(WarpOp op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "cuemu: warp op on a type > 8 bytes");
  Fiber* f = rt().cur;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("warp op: bad width");
  if (!(mask >> (f->linear % 32) & 1u)) fail("warp op at " + std::string(file) + ":" + std::to_string(line) + ": calling lane not in mask");
  f->op = op;
  f->mask = mask;
  f->arg = arg;
  f->width = width;
  f->in = 0;
  std::memcpy(&f->in, &v, sizeof(T));
  f->file = file;
  f->line = line;
  f->wait = Wait::kWarp;
#if CUEMU_TSAN
  char* sync = &rt().sync_warp[f->linear / 32][f->warp_gen & 1];
  __tsan_release(sync);
#endif
  switch_to_scheduler(false);
#if CUEMU_TSAN
  __tsan_acquire(sync);
#endif
  ++f->warp_gen;
  T out;
  std::memcpy(&out, &f->out, sizeof(T));
  return out;
}

}  // namespace cuemu

#define threadIdx (::cuemu::rt().cur->tid)
#define blockIdx (::cuemu::rt().block_idx)
#define blockDim (::cuemu::rt().block_u3)
#define gridDim (::cuemu::rt().grid_u3)

inline void __syncthreads() { ::cuemu::block_barrier(); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::cuemu::warp_op<int>(::cuemu::WarpOp::kSyncWarp, mask, 0, 0, 32, file, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return ::cuemu::warp_op(::cuemu::WarpOp::kShfl, mask, v, src, width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::warp_op(::cuemu::WarpOp::kShflXor, mask, v, lane_mask, width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::warp_op(::cuemu::WarpOp::kShflDown, mask, v, static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::warp_op(::cuemu::WarpOp::kShflUp, mask, v, static_cast<int>(delta), width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(::cuemu::warp_op<int>(::cuemu::WarpOp::kBallot, mask, pred != 0, 0, 32, file, line));
}
// CUDA's overloaded device min/max accept mixed integer types.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { using C = std::common_type_t<A, B>; return C(a) < C(b) ? C(a) : C(b); }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { using C = std::common_type_t<A, B>; return C(a) < C(b) ? C(b) : C(a); }

inline cudaError_t cudaGetLastError() { return ::cuemu::rt().last_error.empty() ? cudaSuccess : cudaErrorLaunchFailure; }

// Inserted by the build (tests/cuda_emu/build.py) as the first statement of every
// kernel declared __launch_bounds__(max_threads).
#define CUEMU_CHECK_LAUNCH_BOUNDS(max_threads)                                                   \
  do {                                                                                           \
    if (blockDim.x * blockDim.y * blockDim.z > static_cast<unsigned>(max_threads)) {             \
      ::cuemu::fail(std::string(__PRETTY_FUNCTION__) + ": launched with " +                      \
                    std::to_string(blockDim.x * blockDim.y * blockDim.z) +                       \
                    " threads per block, over its __launch_bounds__ of " +                       \
                    std::to_string(max_threads));                                                \
      return;                                                                                    \
    }                                                                                            \
  } while (0)

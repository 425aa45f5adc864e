// A small CUDA emulation for the host compiler, so that the real csrc/cuda/*_kernel.cu
// sources run (and are tested) on machines without a GPU. It is a test harness, not a
// simulator of timing: each thread block runs its threads as cooperative fibers on one OS
// thread, switching only at __syncthreads() and at warp shuffles, which is exactly where
// CUDA threads must agree. The scheduler always resumes the lowest (or, in "reverse"
// mode, the highest) runnable thread, so a warp runs as far ahead of the others as it
// legally can: a missing barrier makes it read shared memory the other warps have not
// written yet (or overwrite what they still read), and the result comes out wrong.
//
// What is covered: __global__/__device__/__host__/__forceinline__, __shared__ (a block's
// shared memory is a static: blocks run one after another), threadIdx/blockIdx/blockDim/
// gridDim, launches (the harness rewrites `k<<<grid, block, shmem, stream>>>(args)` into
// emu::launch), launch-configuration errors, __syncthreads, __shfl_down_sync,
// cudaGetLastError, cudaMemsetAsync, and the half/bfloat16 conversions (cuda_fp16.h and
// cuda_bf16.h in include/ beside this file).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

inline cudaError_t last_error = cudaSuccess;
// Grid clamp set by the tests: a kernel written with grid-stride loops must give the same
// result on a smaller grid, which exercises the strides without huge inputs.
inline unsigned max_grid[3] = {0x7fffffffu, 65535u, 65535u};
inline bool reverse_order = false;  // resume the highest runnable thread first
inline int64_t launches = 0, barriers = 0, shuffles = 0;

constexpr int kWarp = 32;
constexpr int kBlockBarrier = 1, kWarpBarrier = 2;
constexpr size_t kStack = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int waiting = 0;  // at a barrier: kBlockBarrier or kWarpBarrier
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  int n = 0;
  const std::function<void()>* body = nullptr;
  // Warp shuffle slots: one 8-byte value per thread.
  std::vector<unsigned char> slots;
};

inline Block& block() {
  static Block b;
  return b;
}

inline void set_thread(int i) {
  threadIdx.x = i % blockDim.x;
  threadIdx.y = (i / blockDim.x) % blockDim.y;
  threadIdx.z = i / (blockDim.x * blockDim.y);
}

inline void fiber_main(int i) {
  Block& b = block();
  (*b.body)();
  b.fibers[i].done = true;
  swapcontext(&b.fibers[i].ctx, &b.sched);
}

// Waits until every live thread of [lo, hi) has arrived at a barrier of the same kind
// (exited threads count as arrived, as on current GPUs; a thread waiting at the other
// kind has not arrived, so mismatched barriers deadlock and abort the test).
inline void barrier(int lo, int hi, int kind) {
  Block& b = block();
  const int me = b.current;
  b.fibers[me].waiting = kind;
  bool all = true;
  for (int j = lo; j < hi; ++j)
    if (!b.fibers[j].done && b.fibers[j].waiting != kind) all = false;
  if (all) {
    for (int j = lo; j < hi; ++j) b.fibers[j].waiting = 0;
    return;  // the last to arrive goes on; the others become runnable again
  }
  swapcontext(&b.fibers[me].ctx, &b.sched);
}

inline int thread_index() { return block().current; }

inline void run_block() {
  Block& b = block();
  const int n = b.n;
  if ((int)b.fibers.size() < n) b.fibers.resize(n);
  b.slots.assign((size_t)n * 8, 0xAB);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.done = false;
    f.waiting = 0;
    if (f.stack.empty()) f.stack.resize(kStack);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())fiber_main, 1, i);
  }
  for (;;) {
    int next = -1;
    if (reverse_order) {
      for (int i = n - 1; i >= 0 && next < 0; --i)
        if (!b.fibers[i].done && !b.fibers[i].waiting) next = i;
    } else {
      for (int i = 0; i < n && next < 0; ++i)
        if (!b.fibers[i].done && !b.fibers[i].waiting) next = i;
    }
    if (next < 0) break;
    b.current = next;
    set_thread(next);
    swapcontext(&b.sched, &b.fibers[next].ctx);
  }
  // Deadlock (a barrier some threads never reach): the launch fails; the stuck fibers
  // are abandoned (their stacks are reset by the next block).
  for (int i = 0; i < n; ++i)
    if (!b.fibers[i].done) last_error = cudaErrorLaunchFailure;
}

struct Config {
  dim3 grid, block;
  Config(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}
};

template <typename F>
void launch(const Config& c, F&& f) {
  ++launches;
  const uint64_t threads = (uint64_t)c.block.x * c.block.y * c.block.z;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || threads == 0 || threads > 1024 ||
      c.grid.y > 65535 || c.grid.z > 65535 || c.block.z > 64) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  gridDim = dim3(c.grid.x < max_grid[0] ? c.grid.x : max_grid[0],
                 c.grid.y < max_grid[1] ? c.grid.y : max_grid[1],
                 c.grid.z < max_grid[2] ? c.grid.z : max_grid[2]);
  blockDim = c.block;
  const std::function<void()> body = f;
  Block& b = block();
  b.body = &body;
  b.n = (int)threads;
  for (unsigned z = 0; z < gridDim.z; ++z)
    for (unsigned y = 0; y < gridDim.y; ++y)
      for (unsigned x = 0; x < gridDim.x; ++x) {
        blockIdx.x = x;
        blockIdx.y = y;
        blockIdx.z = z;
        run_block();
      }
}

}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t = nullptr) {
  std::memset(p, value, n);
  return cudaSuccess;
}

inline void __syncthreads() {
  ++emu::barriers;
  emu::barrier(0, emu::block().n, emu::kBlockBarrier);
}

// Lane i gets lane i + delta's value (its own when that lane is outside the warp).
template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta) {
  static_assert(sizeof(T) <= 8, "emulated shuffle of at most 8 bytes");
  ++emu::shuffles;
  emu::Block& b = emu::block();
  const int me = emu::thread_index();
  const int lo = me / emu::kWarp * emu::kWarp;
  const int hi = lo + emu::kWarp < b.n ? lo + emu::kWarp : b.n;
  std::memcpy(&b.slots[(size_t)me * 8], &v, sizeof(T));
  emu::barrier(lo, hi, emu::kWarpBarrier);  // every lane has published its value
  T r = v;
  const int src = me + (int)delta;
  if (src < hi) std::memcpy(&r, &b.slots[(size_t)src * 8], sizeof(T));
  emu::barrier(lo, hi, emu::kWarpBarrier);  // every lane has read before the slots are reused
  return r;
}

// The C API of lowrank_svd.h: checks the entries, spreads the adapters over threads, and runs the kernels of the
// best instruction set the CPU has (picked at the first call; one binary for every x86-64 machine, never
// -march=native). Adapters go to std::thread workers, started once and parked between calls: no OpenMP runtime is
// loaded beside torch's.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <pthread.h>
#endif

#include "kernels.h"
#include "lowrank_svd.h"

#if defined(__x86_64__) && defined(LF_HAVE_TARGET_ARCH)
#define LF_X86_CLONES 1
#endif

namespace lora_fast {
namespace {

using RunFn = int32_t (*)(const Job&, Scratch&);
struct Kernel {
  const char* name;
  RunFn run;
};

const Kernel kBaseline{"baseline", run_baseline};
#if LF_X86_CLONES
const Kernel kV3{"x86-64-v3", run_x86_64_v3};
const Kernel kV4{"x86-64-v4", run_x86_64_v4};
#endif

// The best kernel this CPU runs, or the best at most `cap` ("x86-64-v4", "x86-64-v3", "baseline") if given.
const Kernel* best_kernel(const char* cap) {
  const bool allow_v4 = cap == nullptr || std::strcmp(cap, "x86-64-v4") == 0;
  const bool allow_v3 = allow_v4 || std::strcmp(cap, "x86-64-v3") == 0;
#if LF_X86_CLONES
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (v4 && allow_v4) return &kV4;
  if (v3 && allow_v3) return &kV3;
#else
  (void)allow_v3;
#endif
  return &kBaseline;
}

std::atomic<const Kernel*> g_kernel{nullptr};

const Kernel& kernel() {
  const Kernel* k = g_kernel.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = best_kernel(nullptr);
    g_kernel.store(k, std::memory_order_release);
  }
  return *k;
}

// Relative costs: Gram FMAs + core work. Used to order jobs (largest first) and to decide how many threads pay.
double job_cost(int64_t r, int64_t m, int64_t n) {
  return static_cast<double>(m + n) * r * r / 2 + 40.0 * r * r * r;
}
// ~30 us of work per extra thread: waking a parked worker takes ~5-10 us, and a call shorter than that gains nothing.
constexpr double kCostPerThread = 3e5;

// Worker threads started at the first call that wants them and parked on a condition variable between calls
// (starting a thread per call cost ~15-30 us, as much as a whole call of 36 BERT-size adapters on one thread).
// A task is a function that any number of threads may run at once and again after it has ended (it takes jobs
// from a shared counter and returns when none is left): a worker that wakes late, or twice, does no harm, and the
// caller never waits for a thread, only for the jobs that threads took.
class Pool {
 public:
  using Task = std::shared_ptr<const std::function<void()>>;

  // Offers `task` to `helpers` workers, starting workers up to that many.
  void offer(Task task, int helpers) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (; size_ < helpers; ++size_) {
        try {
          std::thread([this]() { loop(); }).detach();
        } catch (const std::system_error&) {
          break;  // no more threads: the ones there share the work
        }
      }
      task_ = std::move(task);
      wanted_ = std::min(helpers, size_);
    }
    for (int i = 0; i < helpers; ++i) wake_.notify_one();
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this]() { return wanted_ > 0; });
      --wanted_;
      Task task = task_;
      lock.unlock();
      (*task)();
      task.reset();
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  Task task_;
  int wanted_ = 0, size_ = 0;
};

// Never destroyed: parked workers use it until the process ends. A forked child has none of the parent's threads
// (and maybe a mutex locked by one of them): it starts a pool of its own.
std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    static std::once_flag once;
    std::call_once(once, []() {
#if !defined(_WIN32)
      pthread_atfork(nullptr, nullptr, []() { g_pool.store(new Pool, std::memory_order_release); });
#endif
      g_pool.store(new Pool, std::memory_order_release);
    });
    p = g_pool.load(std::memory_order_acquire);
  }
  return *p;
}

// Per-thread buffers kept between calls (allocating and first touching them cost ~2 us per call at BERT size),
// unless they grew beyond this: one call on huge adapters should not hold their memory for the process's life.
constexpr size_t kKeptScratchBytes = size_t(16) << 20;

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

}  // namespace
}  // namespace lora_fast

using namespace lora_fast;

extern "C" {

LF_API int32_t lf_abi_version(void) { return LF_ABI_VERSION; }

LF_API const char* lf_isa(void) { return kernel().name; }

LF_API const char* lf_select_isa(const char* cap) {
  const Kernel* k = best_kernel(cap);
  g_kernel.store(k, std::memory_order_release);
  return k->name;
}

LF_API int32_t lf_lowrank_svdvals(int64_t count, const int64_t* entries, const double* params, double* sigma,
                                  int32_t num_threads, int64_t* bad) {
  try {
    std::vector<Job> jobs;
    int64_t max_r = 0, max_m = 0, max_n = 0;
    for (int64_t e = 0; e < count; ++e) {
      const int64_t* f = entries + e * LF_FIELDS;
      const double* p = params + e * LF_PARAMS;
      const int64_t batch = f[LF_BATCH], r = f[LF_R], m = f[LF_M], n = f[LF_N];
      const bool indirect = f[LF_INDIRECT] != 0;
      int64_t wrong = -1;
      if (f[LF_A_PTR] == 0) wrong = LF_A_PTR;
      if (f[LF_B_PTR] == 0) wrong = LF_B_PTR;
      if (f[LF_DTYPE] < LF_FLOAT32 || f[LF_DTYPE] > LF_FLOAT16) wrong = LF_DTYPE;
      if (batch < 0) wrong = LF_BATCH;
      if (r < 1 || r > std::min(m, n)) wrong = LF_R;
      if (f[LF_A_ROW_STRIDE] < n) wrong = LF_A_ROW_STRIDE;
      if (f[LF_B_ROW_STRIDE] < r) wrong = LF_B_ROW_STRIDE;
      if (f[LF_OUT_OFFSET] < 0) wrong = LF_OUT_OFFSET;
      if (f[LF_INDIRECT] != 0 && f[LF_INDIRECT] != 1) wrong = LF_INDIRECT;
      if (wrong >= 0) {
        bad[0] = e;
        bad[1] = wrong;
        return LF_BAD_ARGUMENT;
      }
      static constexpr int64_t kSize[] = {4, 8, 2, 2};
      const int64_t size = kSize[f[LF_DTYPE]];
      const int64_t* a_ptrs = reinterpret_cast<const int64_t*>(f[LF_A_PTR]);
      const int64_t* b_ptrs = reinterpret_cast<const int64_t*>(f[LF_B_PTR]);
      const double* scales = reinterpret_cast<const double*>(f[LF_SCALE_PTR]);
      max_r = std::max(max_r, r);
      max_m = std::max(max_m, m);
      max_n = std::max(max_n, n);
      for (int64_t i = 0; i < batch; ++i) {
        Job job;
        if (indirect) {
          job.a = reinterpret_cast<const char*>(a_ptrs[i]);
          job.b = reinterpret_cast<const char*>(b_ptrs[i]);
          if (job.a == nullptr || job.b == nullptr) {
            bad[0] = e;
            bad[1] = job.a == nullptr ? LF_A_PTR : LF_B_PTR;
            return LF_BAD_ARGUMENT;
          }
        } else {
          job.a = reinterpret_cast<const char*>(f[LF_A_PTR]) + i * f[LF_A_BATCH_STRIDE] * size;
          job.b = reinterpret_cast<const char*>(f[LF_B_PTR]) + i * f[LF_B_BATCH_STRIDE] * size;
        }
        job.dtype = static_cast<int>(f[LF_DTYPE]);
        job.r = r;
        job.m = m;
        job.n = n;
        job.lda = f[LF_A_ROW_STRIDE];
        job.ldb = f[LF_B_ROW_STRIDE];
        job.scaling = scales != nullptr ? scales[i] : p[LF_SCALING];
        job.max_ratio = p[LF_MAX_RATIO];
        job.sigma_tol = p[LF_SIGMA_TOL];
        job.sigma = sigma + f[LF_OUT_OFFSET] + i * r;
        job.entry = e;
        job.index = i;
        job.cost = job_cost(r, m, n);
        jobs.push_back(job);
      }
    }
    if (jobs.empty()) return LF_OK;
    // largest first, so the last jobs to start are short and the threads finish together
    std::stable_sort(jobs.begin(), jobs.end(), [](const Job& x, const Job& y) { return x.cost > y.cost; });
    double total = 0.0;
    for (const Job& job : jobs) total += job.cost;
    const int64_t useful = static_cast<int64_t>(total / kCostPerThread) + 1;
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({num_threads, useful, (int64_t)jobs.size()}));

    // The caller and the workers share the state through a shared_ptr: a worker may still hold it after the call.
    struct State {
      std::vector<Job> jobs;
      std::vector<int32_t> status;
      std::atomic<int64_t> next{0}, done{0};
      std::mutex mutex;
      std::condition_variable finished;
      const Kernel* kernel;
      int64_t max_r, max_m, max_n;
    };
    auto state = std::make_shared<State>();
    state->jobs = std::move(jobs);
    state->status.assign(state->jobs.size(), LF_OK);
    state->kernel = &kernel();
    state->max_r = max_r;
    state->max_m = max_m;
    state->max_n = max_n;
    const int64_t total_jobs = static_cast<int64_t>(state->jobs.size());
    // caller = true: the calling thread, which takes every job left, so that all of them end; a worker that
    // cannot get its buffers leaves its share to the others
    auto work = [](State& st, bool caller) {
      const int64_t size = static_cast<int64_t>(st.jobs.size());
      if (st.next.load() >= size) return;  // woke too late: nothing left
      Scratch& s = thread_scratch();
      bool ready = true;
      try {
        s.reserve(st.max_r, st.max_m, st.max_n);
      } catch (const std::bad_alloc&) {
        if (!caller) return;
        ready = false;
      }
      for (int64_t w; (w = st.next.fetch_add(1)) < size;) {
        try {
          st.status[w] = ready ? st.kernel->run(st.jobs[w], s) : LF_OUT_OF_MEMORY;
        } catch (const std::bad_alloc&) {  // a fallback's buffer could not grow
          st.status[w] = LF_OUT_OF_MEMORY;
        }
        if (st.done.fetch_add(1) + 1 == size) {
          std::lock_guard<std::mutex> lock(st.mutex);
          st.finished.notify_all();
        }
      }
      if (s.bytes() > kKeptScratchBytes) s = Scratch();
    };
    if (threads > 1)
      pool().offer(std::make_shared<const std::function<void()>>([state, work]() { work(*state, false); }),
                   static_cast<int>(threads - 1));
    work(*state, true);
    {
      // every job has been taken; wait until the ones other threads took have ended (they write into sigma)
      std::unique_lock<std::mutex> lock(state->mutex);
      state->finished.wait(lock, [&]() { return state->done.load() == total_jobs; });
    }
    const std::vector<Job>& jobs_ = state->jobs;
    const std::vector<int32_t>& status = state->status;
    for (int64_t w = 0; w < total_jobs; ++w)
      if (status[w] == LF_OUT_OF_MEMORY) return LF_OUT_OF_MEMORY;

    // report the first bad adapter in input order
    int64_t first = -1;
    for (int64_t w = 0; w < total_jobs; ++w) {
      if (status[w] != LF_OK && (first < 0 || jobs_[w].entry < jobs_[first].entry ||
                                 (jobs_[w].entry == jobs_[first].entry && jobs_[w].index < jobs_[first].index)))
        first = w;
    }
    if (first >= 0) {
      bad[0] = jobs_[first].entry;
      bad[1] = jobs_[first].index;
      return status[first];
    }
    return LF_OK;
  } catch (const std::bad_alloc&) {
    return LF_OUT_OF_MEMORY;
  }
}

}  // extern "C"

// The native kernels' worker threads: started once and kept, where each call used to start and join
// its own (a thread's start and join cost about 30 us on a 2-core VM; a group norm takes three
// rounds, and a 16-core machine would start 15 threads a round). Included by native.cpp only.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace sd_native {

class Pool {
 public:
  // Threads for workers 1 .. size - 1 (the caller is worker 0); they take no signals, which go to
  // the interpreter's threads as before.
  explicit Pool(int size) {
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &previous);  // the threads inherit the mask
    for (int w = 1; w < size; ++w) threads_.emplace_back([this, w] { serve(w); });
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  }

  // Runs body(worker) for workers 0 .. workers - 1, worker 0 on this thread, and returns when all
  // have returned; then throws the first exception a worker's body threw (a file that ended while
  // it was read), if any. False, with nothing run, while another call has the pool (a second
  // stream's thread, or a task that itself runs in parallel): the caller then works alone.
  bool run(int workers, const std::function<void(int)>& body) {
    std::unique_lock<std::mutex> own(owner_, std::try_to_lock);
    if (!own.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &body;
      workers_ = workers;
      pending_ = workers - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    guarded(body, 0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    return true;
  }

 private:
  void serve(int worker) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (worker >= workers_) continue;
      const std::function<void(int)>* body = body_;
      lock.unlock();
      guarded(*body, worker);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  void guarded(const std::function<void(int)>& body, int worker) {
    try {
      body(worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  std::mutex owner_;  // held by the call that has the pool
  std::mutex mutex_;  // guards what follows
  std::condition_variable wake_, done_;
  const std::function<void(int)>* body_ = nullptr;
  int workers_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
};

// The process's pool of `size` workers, started on first use and never destroyed: its threads wait
// until the process ends. A child made by fork() has none of its parent's threads (and may have
// inherited a mutex held by one of them), so its first call starts a pool of its own; MLX runs
// there on a new stream (its default stream's thread did not survive the fork either).
inline Pool& worker_pool(int size) {
  static std::mutex creating;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(creating);
  if (pool == nullptr || owner != getpid()) {  // the parent's pool, if any, is left as it was
    pool = new Pool(size);
    owner = getpid();
  }
  return *pool;
}

}  // namespace sd_native

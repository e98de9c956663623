// A bounded hand-off between threads that fill windows (read, decompress) and threads that
// write them. Fillers run ahead of the writes while a free window is left, and writers never
// wait for a decode while a filled window is queued: the CPU and the disk stay busy at once,
// and memory stays at `capacity` windows.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "io.h"

namespace qcow2img {

template <typename Item>
class WindowPipeline {
 public:
  WindowPipeline(size_t capacity, size_t windowSize, uint32_t fillers)
      : capacity_(capacity), windowSize_(windowSize), fillersLeft_(fillers) {}

  // A free window, allocated while fewer than `capacity` exist; nullptr once `stopping()`
  // holds or memory runs out. Stopping is polled: a cancel word is set without a notify.
  template <typename Stopping>
  uint8_t* acquire(Stopping stopping) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (stopping()) return nullptr;
      if (!free_.empty()) {
        uint8_t* window = free_.back();
        free_.pop_back();
        return window;
      }
      if (owned_.size() < capacity_) return allocate();
      windowFreed_.wait_for(lock, kPoll);
    }
  }

  void publish(Item item) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ready_.push_back(std::move(item));
    }
    windowFilled_.notify_one();
  }

  // The next filled window, in the order they were published; false once every filler is done
  // and the queue is empty, or when `stopping()` holds.
  template <typename Stopping>
  bool next(Item& item, Stopping stopping) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (stopping()) return false;
      if (!ready_.empty()) {
        item = std::move(ready_.front());
        ready_.pop_front();
        return true;
      }
      if (fillersLeft_ == 0) return false;
      windowFilled_.wait_for(lock, kPoll);
    }
  }

  void release(uint8_t* window) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(window);
    }
    windowFreed_.notify_one();
  }

  // Each filler calls it once when it stops, for whatever reason (see FillerDone).
  void fillerDone() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fillersLeft_--;
    }
    windowFilled_.notify_all();
  }

 private:
  static constexpr std::chrono::milliseconds kPoll{20};

  uint8_t* allocate() {
    auto buffer = std::make_unique<AlignedBuffer>(windowSize_);
    if (!buffer->data) return nullptr;
    owned_.push_back(std::move(buffer));
    return owned_.back()->data;
  }

  std::mutex mutex_;
  std::condition_variable windowFreed_;
  std::condition_variable windowFilled_;
  std::vector<std::unique_ptr<AlignedBuffer>> owned_;
  std::vector<uint8_t*> free_;
  std::deque<Item> ready_;
  size_t capacity_;
  size_t windowSize_;
  uint32_t fillersLeft_;
};

// Marks a filler done however its loop ends (return, failure, exception).
template <typename Pipeline>
class FillerDone {
 public:
  explicit FillerDone(Pipeline& pipeline) : pipeline_(pipeline) {}
  ~FillerDone() { pipeline_.fillerDone(); }
  FillerDone(const FillerDone&) = delete;
  FillerDone& operator=(const FillerDone&) = delete;

 private:
  Pipeline& pipeline_;
};

}  // namespace qcow2img

// Which GPU a launch runs on. The extension links its own (static) CUDA runtime, so the current
// device torch set is not necessarily ours: every binding takes the tensors' device, makes it
// current for the launch, and restores the caller's current device afterwards, so calling
// tapestry never moves torch's (or anyone's) current device.
#pragma once
#include <cuda_runtime.h>

namespace tapestry {

class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        err_ = cudaGetDevice(&prev_);
        if (err_ == cudaSuccess && prev_ != device) {
            err_ = cudaSetDevice(device);
            changed_ = err_ == cudaSuccess;
        }
    }
    ~DeviceGuard() {
        if (changed_) cudaSetDevice(prev_);
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;
    cudaError_t error() const { return err_; }

  private:
    int prev_ = -1;
    bool changed_ = false;
    cudaError_t err_;
};

// launch() (returning a cudaError_t) with `device` current; the guard's own error if it could
// not be made current.
template <class Launch>
cudaError_t on_device(int device, Launch&& launch) {
    const DeviceGuard guard(device);
    return guard.error() == cudaSuccess ? launch() : guard.error();
}

}  // namespace tapestry

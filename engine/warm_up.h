// Warm-up's timing plan: which UNet steps a worker times before it reports ready, and the step
// times it estimates for the batch sizes it had no time for. The admission policy (admission.h)
// needs one step's seconds at every batch size at the native size; measuring them all took more
// than 10 minutes for a 512 px model on two CPU cores. So a worker times the cheapest steps first
// and stops when the next one is predicted to end past `warm_up_budget_s`:
//  - on the CPU, one image at 64 px, doubling the size up to the native size, then each batch
//    size at the native size;
//  - on a GPU, each batch size at the native size (each resolution has its own CUDA graphs; a
//    batch size not timed is captured when a job first needs it).
// Each step is predicted from the last one measured: in proportion to images, and to the square
// of latent pixels (self-attention's cost, which dominates large images on the CPU: 256 -> 512 px
// took 14x on the tiny model, not 4x; an upper bound, so the budget holds). Each step time that
// was not measured is predicted the same way (images/s stays that of the last measured).
// Torch-free and pure: tested without a model.
#pragma once

#include <string>
#include <vector>

namespace sdserve::engine {

// One UNet step (with its unconditional rows) of `batch` square images of `size` px.
struct StepTiming {
  int size = 0;
  int batch = 0;
  double seconds = 0;     // measured, or estimated when !measured
  bool measured = false;  // timed at warm-up; else predicted from what was
};

// The steps warm-up may time, cheapest first (see above). `batch_sizes` ascending.
std::vector<StepTiming> warm_up_probes(int native_size, const std::vector<int>& batch_sizes,
                                       bool gpu);

// The seconds of a step of `batch` images of `size` px predicted from a measured step:
// proportional to images and to the square of latent pixels.
double predict_seconds(const StepTiming& from, int size, int batch);

// One entry per batch size at the native size: measured when `measured` holds it, else predicted
// from the last entry of `measured` (the most expensive step timed). Empty when nothing was.
std::vector<StepTiming> native_step_times(const std::vector<StepTiming>& measured, int native_size,
                                          const std::vector<int>& batch_sizes);

// "850.0 ms", "1.71 s": for the log.
std::string format_seconds(double seconds);
// "512 px x2: 1.71 s", with " (estimated)" when not measured: for the log.
std::string describe(const StepTiming& t);

}  // namespace sdserve::engine

// UniPC (diffusers' UniPCMultistepScheduler defaults: solver_order 2, bh2, predict_x0,
// lower_order_final, corrector on every step after the first, final_sigmas_type zero). Each step
// first corrects the previous prediction with the new model output (UniC), then predicts the
// next sample (UniP). Coefficients are float32 like diffusers' 0-dim tensors.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <memory>
#include <vector>

#include "pipeline/samplers/schedule.h"

namespace sdserve::pipeline::samplers {
namespace {

constexpr int kSolverOrder = 2;

// Solves the small dense system a x = b (row-major, n x n) by Gaussian elimination with partial
// pivoting in float64; diffusers solves it in float32 (torch.linalg.solve), which differs in the
// last bits only.
std::vector<float> solve(std::vector<double> a, std::vector<double> b) {
  const int n = static_cast<int>(b.size());
  for (int col = 0; col < n; ++col) {
    int pivot = col;
    for (int r = col + 1; r < n; ++r) {
      if (std::fabs(a[r * n + col]) > std::fabs(a[pivot * n + col])) pivot = r;
    }
    if (pivot != col) {
      for (int c = 0; c < n; ++c) std::swap(a[col * n + c], a[pivot * n + c]);
      std::swap(b[col], b[pivot]);
    }
    for (int r = col + 1; r < n; ++r) {
      const double f = a[r * n + col] / a[col * n + col];
      for (int c = col; c < n; ++c) a[r * n + c] -= f * a[col * n + c];
      b[r] -= f * b[col];
    }
  }
  std::vector<float> x(n);
  std::vector<double> xd(n);
  for (int r = n - 1; r >= 0; --r) {
    double s = b[r];
    for (int c = r + 1; c < n; ++c) s -= a[r * n + c] * xd[c];
    xd[r] = s / a[r * n + r];
    x[r] = static_cast<float>(xd[r]);
  }
  return x;
}

// The step's exponential-integrator coefficients for h (the log-SNR step) and `order`.
struct BhCoefficients {
  float h_phi_1;         // expm1(-h)
  float b_h;             // bh2: expm1(-h)
  std::vector<float> b;  // b_1..b_order
};

BhCoefficients bh_coefficients(float h, int order) {
  const float hh = -h;  // predict_x0
  BhCoefficients c;
  c.h_phi_1 = std::expm1(hh);
  c.b_h = std::expm1(hh);
  float h_phi_k = c.h_phi_1 / hh - 1.0f;
  double factorial = 1;
  for (int i = 1; i <= order; ++i) {
    c.b.push_back(h_phi_k * static_cast<float>(factorial) / c.b_h);
    factorial *= i + 1;
    h_phi_k = h_phi_k / hh - static_cast<float>(1.0 / factorial);
  }
  return c;
}

// R[r][c] = rks[c]^r for an n x n system.
std::vector<double> vandermonde(const std::vector<float>& rks, int n) {
  std::vector<double> r(n * n);
  for (int row = 0; row < n; ++row) {
    for (int col = 0; col < n; ++col) {
      r[row * n + col] = row == 0 ? 1.0f : row == 1 ? rks[col] : std::pow(rks[col], row);
    }
  }
  return r;
}

class UniPcSampler : public VpMultistepSampler {
 public:
  UniPcSampler(const SchedulerConfig& config, int steps, bool karras)
      : VpMultistepSampler(config, steps, karras) {}

  torch::Tensor step(const torch::Tensor& model_output, int eval_index, const torch::Tensor& sample,
                     at::Generator& /*generator*/) override {
    advance(eval_index);
    const int i = eval_index;
    const torch::Tensor denoised = predict_x0(model_output, i, sample);
    torch::Tensor x = sample;
    if (i > 0 && last_sample_.defined()) x = correct(denoised, last_sample_, this_order_, i);
    outputs_.push_back(denoised);
    if (static_cast<int>(outputs_.size()) > kSolverOrder) outputs_.pop_front();
    // lower_order_final, and a warm-up of one order per step.
    const int order = std::min(kSolverOrder, num_evals() - i);
    this_order_ = std::min(order, lower_order_nums_ + 1);
    last_sample_ = x;
    torch::Tensor prev = predict(x, this_order_, i);
    if (lower_order_nums_ < kSolverOrder) ++lower_order_nums_;
    return prev;
  }

 private:
  float lambda_at(int sigma_index) const { return vp_lambda(vp_alpha_sigma(sigmas_[sigma_index])); }
  // outputs_ counted from the newest: 0 is the newest.
  const torch::Tensor& output(int back) const { return outputs_[outputs_.size() - 1 - back]; }

  // UniP: from x at sigma_i to sigma_i+1, with this step's x0 prediction the newest output.
  torch::Tensor predict(const torch::Tensor& x, int order, int i) const {
    const AlphaSigma t = vp_alpha_sigma(sigmas_[i + 1]);
    const AlphaSigma s0 = vp_alpha_sigma(sigmas_[i]);
    const float lambda_s0 = vp_lambda(s0);
    const float h = vp_lambda(t) - lambda_s0;
    const torch::Tensor& m0 = output(0);
    std::vector<float> rks;
    std::vector<torch::Tensor> d1s;
    for (int k = 1; k < order; ++k) {
      const float rk = (lambda_at(i - k) - lambda_s0) / h;
      rks.push_back(rk);
      d1s.push_back((output(k) - m0) / rk);
    }
    rks.push_back(1.0f);
    const BhCoefficients c = bh_coefficients(h, order);
    const torch::Tensor base = (t.sigma / s0.sigma) * x - (t.alpha * c.h_phi_1) * m0;
    if (d1s.empty()) return base.to(x.scalar_type());
    std::vector<float> rhos;
    if (order == 2) {
      rhos = {0.5f};
    } else {
      const int n = order - 1;
      std::vector<double> r = vandermonde(rks, n);
      rhos = solve(r, std::vector<double>(c.b.begin(), c.b.begin() + n));
    }
    torch::Tensor res = round_to(rhos[0], x.scalar_type()) * d1s[0];
    for (size_t k = 1; k < d1s.size(); ++k) res = res + round_to(rhos[k], x.scalar_type()) * d1s[k];
    return (base - (t.alpha * c.b_h) * res).to(x.scalar_type());
  }

  // UniC: redoes the previous step (last_sample at sigma_i-1 to sigma_i) with this step's x0
  // prediction `model_t` added to the history (outputs_ not yet updated).
  torch::Tensor correct(const torch::Tensor& model_t, const torch::Tensor& last_sample, int order,
                        int i) const {
    const AlphaSigma t = vp_alpha_sigma(sigmas_[i]);
    const AlphaSigma s0 = vp_alpha_sigma(sigmas_[i - 1]);
    const float lambda_s0 = vp_lambda(s0);
    const float h = vp_lambda(t) - lambda_s0;
    const torch::Tensor& m0 = output(0);
    std::vector<float> rks;
    std::vector<torch::Tensor> d1s;
    for (int k = 1; k < order; ++k) {
      const float rk = (lambda_at(i - (k + 1)) - lambda_s0) / h;
      rks.push_back(rk);
      d1s.push_back((output(k) - m0) / rk);
    }
    rks.push_back(1.0f);
    const BhCoefficients c = bh_coefficients(h, order);
    const auto dtype = last_sample.scalar_type();
    std::vector<float> rhos =
        order == 1 ? std::vector<float>{0.5f}
                   : solve(vandermonde(rks, order), std::vector<double>(c.b.begin(), c.b.end()));
    for (auto& r : rhos) r = round_to(r, dtype);
    const torch::Tensor base = (t.sigma / s0.sigma) * last_sample - (t.alpha * c.h_phi_1) * m0;
    const torch::Tensor d1_t = model_t - m0;
    torch::Tensor corr = rhos.back() * d1_t;
    if (!d1s.empty()) {
      torch::Tensor res = rhos[0] * d1s[0];
      for (size_t k = 1; k < d1s.size(); ++k) res = res + rhos[k] * d1s[k];
      corr = res + corr;
    }
    return (base - (t.alpha * c.b_h) * corr).to(dtype);
  }

  std::deque<torch::Tensor> outputs_;  // x0 predictions, newest last
  torch::Tensor last_sample_;          // the sample the last prediction started from
  int this_order_ = 0;                 // the order of the last prediction
  int lower_order_nums_ = 0;
};

}  // namespace

std::unique_ptr<Sampler> make_uni_pc(const SchedulerConfig& config, int steps, bool karras) {
  return std::make_unique<UniPcSampler>(config, steps, karras);
}

}  // namespace sdserve::pipeline::samplers

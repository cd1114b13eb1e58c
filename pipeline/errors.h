// Error types the pipeline throws. Torch-free: the engine and the server catch these by type
// and turn them into user-facing messages.
#pragma once

#include <stdexcept>
#include <string>

namespace sdserve::pipeline {

// A model file or folder cannot be used: missing, corrupt, unsupported or mismatched.
// The message names the file or tensor and says what to do.
class ModelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A generation request is outside what the pipeline supports (unknown sampler, bad size...).
class RequestError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace sdserve::pipeline

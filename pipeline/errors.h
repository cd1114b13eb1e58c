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
// `field` names the request field at fault ("width", "preview.every"), or is empty when the
// caller misused the API rather than a user sending a bad value.
class RequestError : public std::invalid_argument {
 public:
  RequestError(std::string field, const std::string& message)
      : std::invalid_argument(message), field_(std::move(field)) {}
  const std::string& field() const { return field_; }

 private:
  std::string field_;
};

}  // namespace sdserve::pipeline

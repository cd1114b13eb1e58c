// CLIP's text transformer (transformers' CLIPTextModel, and CLIPTextModelWithProjection's
// text_projection), the conditioning encoder of Stable Diffusion 1.x / 2.x and both of SDXL's.
// Modules register under the checkpoint's names minus the "text_model." prefix, so load_weights
// fills them from a stripped WeightSource.
#pragma once

#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <string>

namespace sdserve::pipeline {

// text_encoder/config.json.
struct ClipTextConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_attention_heads = 0;
  int64_t num_hidden_layers = 0;
  int64_t max_position_embeddings = 0;
  double layer_norm_eps = 0.0;
  std::string hidden_act;  // "quick_gelu" (SD 1.x) or "gelu"
  // CLIPTextModelWithProjection (architectures names it): a bias-free text_projection from
  // hidden_size to projection_dim gives the pooled embedding (SDXL's second encoder). 0: none.
  int64_t projection_dim = 0;
  // The pooled embedding is read at the first end token; 2 means transformers' legacy rule
  // (the highest id's position), as published SDXL configs say.
  int64_t eos_token_id = 49407;

  // Throws ModelError naming a missing or invalid key.
  static ClipTextConfig from_json(const nlohmann::json& j);
};

class ClipEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit ClipEmbeddingsImpl(const ClipTextConfig& config);
  // Ids from vocab_size on read row (id - vocab_size) of `extra` (textual-inversion vectors,
  // (rows, hidden_size)) instead of the token embedding; undefined `extra`: none.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& extra = {});

 private:
  torch::nn::Embedding token_embedding_{nullptr};
  torch::nn::Embedding position_embedding_{nullptr};
};
TORCH_MODULE(ClipEmbeddings);

class ClipAttentionImpl : public torch::nn::Module {
 public:
  explicit ClipAttentionImpl(const ClipTextConfig& config);
  torch::Tensor forward(const torch::Tensor& x);  // causal self-attention

 private:
  int64_t heads_;
  torch::nn::Linear q_proj_{nullptr}, k_proj_{nullptr}, v_proj_{nullptr}, out_proj_{nullptr};
};
TORCH_MODULE(ClipAttention);

class ClipMlpImpl : public torch::nn::Module {
 public:
  explicit ClipMlpImpl(const ClipTextConfig& config);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  bool quick_gelu_;
  torch::nn::Linear fc1_{nullptr}, fc2_{nullptr};
};
TORCH_MODULE(ClipMlp);

// Pre-norm transformer block.
class ClipEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit ClipEncoderLayerImpl(const ClipTextConfig& config);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  ClipAttention self_attn_{nullptr};
  torch::nn::LayerNorm layer_norm1_{nullptr};
  ClipMlp mlp_{nullptr};
  torch::nn::LayerNorm layer_norm2_{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

class ClipEncoderImpl : public torch::nn::Module {
 public:
  explicit ClipEncoderImpl(const ClipTextConfig& config);
  // Runs the first `num_layers` layers.
  torch::Tensor forward(torch::Tensor x, int64_t num_layers);
  torch::Tensor forward_layer(const torch::Tensor& x, int64_t i);  // layer i alone
  int64_t size() const { return static_cast<int64_t>(layers_->size()); }

 private:
  torch::nn::ModuleList layers_{nullptr};
};
TORCH_MODULE(ClipEncoder);

class ClipTextModelImpl : public torch::nn::Module {
 public:
  explicit ClipTextModelImpl(const ClipTextConfig& config);

  // input_ids: (B, L) int64 with L <= max_position_embeddings. Returns (B, L, hidden_size) in
  // the weights' dtype. skip_layers is diffusers' clip_skip: 0 is the last layer's output, k the
  // output k layers before it (hidden_states[-(k+1)]; k = num_hidden_layers is the embeddings);
  // the final layer norm is applied in every case. Causal mask only, no padding mask, as SD uses
  // it. Throws RequestError for bad ids or skip_layers outside [0, num_hidden_layers].
  // `extra`: textual-inversion vectors, (rows, hidden_size), which ids from vocab_size on read
  // (ClipEmbeddings); undefined: the ids are the vocabulary's only.
  torch::Tensor forward(const torch::Tensor& input_ids, int skip_layers = 0,
                        const torch::Tensor& extra = {});

  // SDXL's use: the hidden state `skip_layers` layers before the last, without the final layer
  // norm, and (with a text_projection) the pooled embedding: the final-normed last layer at the
  // first end token, projected. Same argument checks as forward(). With `extra`, the legacy
  // pooling rule (highest id) reads its vectors' ids as A1111 does (as 0), so it still finds the
  // end token.
  struct Output {
    torch::Tensor hidden;  // (B, L, hidden_size)
    torch::Tensor pooled;  // (B, projection_dim), undefined without a projection
  };
  Output encode_unnormed(const torch::Tensor& input_ids, int skip_layers,
                         const torch::Tensor& extra = {});

  const ClipTextConfig& config() const { return config_; }

 private:
  ClipTextConfig config_;
  ClipEmbeddings embeddings_{nullptr};
  ClipEncoder encoder_{nullptr};
  torch::nn::LayerNorm final_layer_norm_{nullptr};
  torch::nn::Linear text_projection_{nullptr};

  torch::Tensor checked_ids(const torch::Tensor& input_ids, int skip_layers,
                            const torch::Tensor& extra) const;
};
TORCH_MODULE(ClipTextModel);

}  // namespace sdserve::pipeline

#include "pipeline/nn/clip.h"

#include <algorithm>
#include <string>

#include "pipeline/errors.h"
#include "pipeline/nn/attention.h"
#include "pipeline/nn/lora_hook.h"

namespace sdserve::pipeline {
namespace {

const nlohmann::json& require(const nlohmann::json& j, const char* key) {
  if (!j.is_object() || !j.contains(key)) {
    throw ModelError(std::string("text encoder config.json lacks the required key \"") + key +
                     "\"");
  }
  return j.at(key);
}

int64_t positive_int(const nlohmann::json& j, const char* key) {
  const auto& v = require(j, key);
  if (!v.is_number_integer() || v.get<int64_t>() <= 0) {
    throw ModelError(std::string("text encoder config.json: \"") + key +
                     "\" must be a positive integer, got " + v.dump());
  }
  return v.get<int64_t>();
}

torch::nn::LayerNorm layer_norm(const ClipTextConfig& c) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps));
}

}  // namespace

ClipTextConfig ClipTextConfig::from_json(const nlohmann::json& j) {
  ClipTextConfig c;
  c.vocab_size = positive_int(j, "vocab_size");
  c.hidden_size = positive_int(j, "hidden_size");
  c.intermediate_size = positive_int(j, "intermediate_size");
  c.num_attention_heads = positive_int(j, "num_attention_heads");
  c.num_hidden_layers = positive_int(j, "num_hidden_layers");
  c.max_position_embeddings = positive_int(j, "max_position_embeddings");
  const auto& eps = require(j, "layer_norm_eps");
  if (!eps.is_number() || eps.get<double>() <= 0.0) {
    throw ModelError(
        "text encoder config.json: \"layer_norm_eps\" must be a positive number, got " +
        eps.dump());
  }
  c.layer_norm_eps = eps.get<double>();
  const auto& act = require(j, "hidden_act");
  if (!act.is_string() || (act != "quick_gelu" && act != "gelu")) {
    throw ModelError("text encoder config.json: unsupported \"hidden_act\" " + act.dump() +
                     " (supported: \"quick_gelu\", \"gelu\")");
  }
  c.hidden_act = act.get<std::string>();
  const auto arch = j.find("architectures");
  const bool with_projection =
      arch != j.end() && arch->is_array() &&
      std::find(arch->begin(), arch->end(), "CLIPTextModelWithProjection") != arch->end();
  if (with_projection) c.projection_dim = positive_int(j, "projection_dim");
  const auto eos = j.find("eos_token_id");
  if (eos != j.end() && eos->is_number_integer()) c.eos_token_id = eos->get<int64_t>();
  if (c.hidden_size % c.num_attention_heads != 0) {
    throw ModelError("text encoder config.json: hidden_size " + std::to_string(c.hidden_size) +
                     " is not divisible by num_attention_heads " +
                     std::to_string(c.num_attention_heads));
  }
  return c;
}

ClipEmbeddingsImpl::ClipEmbeddingsImpl(const ClipTextConfig& c) {
  token_embedding_ =
      register_module("token_embedding", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  position_embedding_ = register_module(
      "position_embedding", torch::nn::Embedding(c.max_position_embeddings, c.hidden_size));
}

torch::Tensor ClipEmbeddingsImpl::forward(const torch::Tensor& input_ids,
                                          const torch::Tensor& extra) {
  // Positions are computed rather than stored: the checkpoint's position_ids buffer is optional.
  auto positions = torch::arange(
      input_ids.size(1), torch::TensorOptions().dtype(torch::kLong).device(input_ids.device()));
  auto tokens = token_embedding_->forward(
      extra.defined() ? input_ids.clamp_max(token_embedding_->weight.size(0) - 1) : input_ids);
  if (extra.defined()) {
    // Textual inversion: the marked places take the extra rows (A1111's EmbeddingsWithFixes).
    const auto vocab = token_embedding_->weight.size(0);
    const auto marked = input_ids >= vocab;
    const auto rows = torch::embedding(extra.to(tokens.device(), tokens.scalar_type()),
                                       (input_ids - vocab).clamp_min(0));
    tokens = torch::where(marked.unsqueeze(-1), rows, tokens);
  }
  return tokens + position_embedding_->forward(positions).unsqueeze(0);
}

ClipAttentionImpl::ClipAttentionImpl(const ClipTextConfig& c) : heads_(c.num_attention_heads) {
  auto linear = [&](const char* name) {
    return register_module(name, torch::nn::Linear(c.hidden_size, c.hidden_size));
  };
  q_proj_ = linear("q_proj");
  k_proj_ = linear("k_proj");
  v_proj_ = linear("v_proj");
  out_proj_ = linear("out_proj");
}

torch::Tensor ClipAttentionImpl::forward(const torch::Tensor& x) {
  const auto b = x.size(0), l = x.size(1), h = x.size(2);
  auto split = [&](const torch::Tensor& t) {
    return t.view({b, l, heads_, h / heads_}).transpose(1, 2);
  };
  const auto project = [&x](torch::nn::Linear p) { return with_lora(*p, x, p->forward(x)); };
  auto out = attention(split(project(q_proj_)), split(project(k_proj_)), split(project(v_proj_)),
                       /*causal=*/true);
  const auto joined = out.transpose(1, 2).reshape({b, l, h});
  return with_lora(*out_proj_, joined, out_proj_->forward(joined));
}

ClipMlpImpl::ClipMlpImpl(const ClipTextConfig& c) : quick_gelu_(c.hidden_act == "quick_gelu") {
  fc1_ = register_module("fc1", torch::nn::Linear(c.hidden_size, c.intermediate_size));
  fc2_ = register_module("fc2", torch::nn::Linear(c.intermediate_size, c.hidden_size));
}

torch::Tensor ClipMlpImpl::forward(const torch::Tensor& x) {
  auto h = with_lora(*fc1_, x, fc1_->forward(x));
  // quick_gelu is the sigmoid approximation OpenAI trained CLIP with; "gelu" is the exact erf form.
  h = quick_gelu_ ? h * torch::sigmoid(1.702 * h) : torch::gelu(h);
  return with_lora(*fc2_, h, fc2_->forward(h));
}

ClipEncoderLayerImpl::ClipEncoderLayerImpl(const ClipTextConfig& c) {
  self_attn_ = register_module("self_attn", ClipAttention(c));
  layer_norm1_ = register_module("layer_norm1", layer_norm(c));
  mlp_ = register_module("mlp", ClipMlp(c));
  layer_norm2_ = register_module("layer_norm2", layer_norm(c));
}

torch::Tensor ClipEncoderLayerImpl::forward(const torch::Tensor& x) {
  auto h = x + self_attn_->forward(layer_norm1_->forward(x));
  return h + mlp_->forward(layer_norm2_->forward(h));
}

ClipEncoderImpl::ClipEncoderImpl(const ClipTextConfig& c) {
  layers_ = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers_->push_back(ClipEncoderLayer(c));
}

torch::Tensor ClipEncoderImpl::forward_layer(const torch::Tensor& x, int64_t i) {
  return layers_[static_cast<size_t>(i)]->as<ClipEncoderLayer>()->forward(x);
}

torch::Tensor ClipEncoderImpl::forward(torch::Tensor x, int64_t num_layers) {
  for (int64_t i = 0; i < num_layers; ++i) {
    x = layers_[static_cast<size_t>(i)]->as<ClipEncoderLayer>()->forward(x);
  }
  return x;
}

ClipTextModelImpl::ClipTextModelImpl(const ClipTextConfig& c) : config_(c) {
  embeddings_ = register_module("embeddings", ClipEmbeddings(c));
  encoder_ = register_module("encoder", ClipEncoder(c));
  final_layer_norm_ = register_module("final_layer_norm", layer_norm(c));
  if (c.projection_dim > 0) {
    text_projection_ = register_module(
        "text_projection",
        torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.projection_dim).bias(false)));
  }
}

torch::Tensor ClipTextModelImpl::forward(const torch::Tensor& input_ids, int skip_layers,
                                         const torch::Tensor& extra) {
  auto h = embeddings_->forward(checked_ids(input_ids, skip_layers, extra), extra);
  h = encoder_->forward(h, config_.num_hidden_layers - skip_layers);
  return final_layer_norm_->forward(h);
}

ClipTextModelImpl::Output ClipTextModelImpl::encode_unnormed(const torch::Tensor& input_ids,
                                                             int skip_layers,
                                                             const torch::Tensor& extra) {
  const auto ids = checked_ids(input_ids, skip_layers, extra);
  Output out;
  auto h = embeddings_->forward(ids, extra);
  const int64_t keep = config_.num_hidden_layers - skip_layers;
  if (!text_projection_) {
    out.hidden = encoder_->forward(h, keep);
    return out;
  }
  // The pooled embedding needs every layer; the hidden state is the one after `keep` layers.
  if (keep == 0) out.hidden = h;
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    h = encoder_->forward_layer(h, i);
    if (i + 1 == keep) out.hidden = h;
  }
  const auto last = final_layer_norm_->forward(h);
  // transformers reads the first end token. Configs that say eos_token_id 2 (published SDXL
  // and SD 2.x ones) get its legacy rule instead: the position of the highest id, which is the
  // end token in CLIP's vocabulary (argmax picks the first of equal values in both cases).
  // Textual-inversion places (ids past the vocabulary) read as 0 there, as A1111 has them.
  const auto vocab_ids = extra.defined() ? ids.masked_fill(ids >= config_.vocab_size, 0) : ids;
  const auto eos = config_.eos_token_id == 2
                       ? vocab_ids.argmax(-1)
                       : vocab_ids.eq(config_.eos_token_id).to(torch::kInt).argmax(-1);
  const auto rows = torch::arange(ids.size(0), eos.options().dtype(torch::kLong));
  const auto at_eos = last.index({rows, eos});
  out.pooled = with_lora(*text_projection_, at_eos, text_projection_->forward(at_eos));
  return out;
}

torch::Tensor ClipTextModelImpl::checked_ids(const torch::Tensor& input_ids, int skip_layers,
                                             const torch::Tensor& extra) const {
  if (skip_layers < 0 || skip_layers > config_.num_hidden_layers) {
    throw RequestError("clip_skip", "clip skip " + std::to_string(skip_layers) +
                                        " is out of range: the text " + "encoder has " +
                                        std::to_string(config_.num_hidden_layers) +
                                        " layers, so it must be between 0 and " +
                                        std::to_string(config_.num_hidden_layers));
  }
  if (input_ids.dim() != 2 || input_ids.size(1) == 0 ||
      input_ids.size(1) > config_.max_position_embeddings) {
    throw RequestError("",
                       "text encoder input must be (batch, length) token ids with 1 <= length <= " +
                           std::to_string(config_.max_position_embeddings) + ", got " +
                           std::to_string(input_ids.dim()) + "-d input of length " +
                           std::to_string(input_ids.dim() == 2 ? input_ids.size(1) : -1));
  }
  if (extra.defined() && (extra.dim() != 2 || extra.size(1) != config_.hidden_size))
    throw RequestError("", "textual-inversion vectors for this text encoder must be (rows, " +
                               std::to_string(config_.hidden_size) + ")");
  const int64_t ids_end = config_.vocab_size + (extra.defined() ? extra.size(0) : 0);
  auto ids = input_ids.to(torch::kLong);
  // Checked where it is free: on the CPU before the copy (a check of device ids would cost a
  // synchronization per call). An out-of-range id on the device would be a device-side assert.
  if (!ids.is_cuda() && ids.numel() > 0 &&
      (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= ids_end)) {
    throw RequestError(
        "", "text encoder input has token ids outside [0, " + std::to_string(ids_end) + ")");
  }
  return ids.to(final_layer_norm_->weight.device());
}

}  // namespace sdserve::pipeline

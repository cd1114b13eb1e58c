#include "pipeline/io/openclip_convert.h"

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "pipeline/io/checkpoint_config.h"
#include "pipeline/io/names.h"

namespace sdserve::pipeline {
namespace {

using nlohmann::json;

int count_layers(const SafetensorsFile& file, const std::string& prefix) {
  std::set<int> layers;
  const std::string blocks = prefix + "transformer.resblocks.";
  for (auto it = file.tensors().lower_bound(blocks);
       it != file.tensors().end() && starts_with(it->first, blocks); ++it) {
    const std::string rest = it->first.substr(blocks.size());
    const std::string digits = rest.substr(0, rest.find('.'));
    if (!digits.empty() && digits.size() < 6 &&
        digits.find_first_not_of("0123456789") == std::string::npos)
      layers.insert(std::stoi(digits));
  }
  return static_cast<int>(layers.size());
}

// Rows [part * rows, (part + 1) * rows) of a row-major 2-D (or 1-D) view: q, k or v of a fused
// projection.
TensorView rows_of(const TensorView& fused, int part, const std::string& name,
                   const std::string& path) {
  if (fused.shape.empty() || fused.shape[0] % 3 != 0)
    throw ModelError("'" + path + "': tensor '" + name + "' has " +
                     std::to_string(fused.shape.empty() ? 0 : fused.shape[0]) +
                     " rows, not q, k and v stacked");
  TensorView v = fused;
  v.shape[0] = fused.shape[0] / 3;
  v.nbytes = fused.nbytes / 3;
  v.data = fused.data + static_cast<std::size_t>(part) * v.nbytes;
  return v;
}

}  // namespace

json infer_openclip_config(const SafetensorsFile& file, const OpenClipLayout& layout) {
  const std::string& p = layout.prefix;
  auto shape = [&](const std::string& name) -> const std::vector<int64_t>& {
    return require_tensor(file, p + name, "text encoder").shape;
  };
  const auto& tokens = shape("token_embedding.weight");
  const auto& positions = shape("positional_embedding");
  const auto& fc = shape("transformer.resblocks.0.mlp.c_fc.weight");
  if (tokens.size() != 2 || positions.size() != 2 || fc.size() != 2)
    refuse_unrecognised(file.path(), "its OpenCLIP text encoder's embeddings are not matrices");
  const int64_t width = tokens[1];
  if (width % 64 != 0 && layout.infer_heads)
    refuse_unrecognised(file.path(), "its OpenCLIP text encoder is " + std::to_string(width) +
                                         " wide, not a multiple of its 64-wide heads (pass a "
                                         "diffusers folder with its config to load it)");
  int layers = count_layers(file, p);
  if (layout.drop_last_layer) --layers;
  if (layers < 1) refuse_unrecognised(file.path(), "its OpenCLIP text encoder has no layers");
  json config = {
      {"architectures",
       json::array({layout.with_projection ? "CLIPTextModelWithProjection" : "CLIPTextModel"})},
      {"bos_token_id", 49406},
      {"eos_token_id", 49407},
      {"hidden_act", "gelu"},
      {"hidden_size", width},
      {"intermediate_size", fc[0]},
      {"layer_norm_eps", 1e-05},
      {"max_position_embeddings", positions[0]},
      {"model_type", "clip_text_model"},
      {"num_attention_heads", std::max<int64_t>(1, width / 64)},
      {"num_hidden_layers", layers},
      {"pad_token_id", 1},
      {"vocab_size", tokens[0]},
  };
  config["projection_dim"] = layout.with_projection ? shape("text_projection").at(1) : width;
  return config;
}

WeightSource openclip_weights(const std::shared_ptr<SafetensorsFile>& file,
                              const OpenClipLayout& layout, const json& config,
                              const std::string& component) {
  const std::string& p = layout.prefix;
  WeightSource source;
  source.component = component;
  source.origin = file->path();
  source.files = {file};
  auto take = [&](const std::string& target, const std::string& name) {
    source.tensors.emplace(target, require_tensor(*file, p + name, "text encoder"));
  };
  take("embeddings.token_embedding.weight", "token_embedding.weight");
  take("embeddings.position_embedding.weight", "positional_embedding");
  const int layers = config.at("num_hidden_layers").get<int>();
  for (int i = 0; i < layers; ++i) {
    const std::string s = "transformer.resblocks." + std::to_string(i) + ".";
    const std::string t = "encoder.layers." + std::to_string(i) + ".";
    for (const char* kind : {"weight", "bias"}) {
      const std::string k = kind;
      const std::string fused_name = s + "attn.in_proj_" + k;
      const TensorView fused = require_tensor(*file, p + fused_name, "text encoder");
      const char* parts[] = {"q_proj", "k_proj", "v_proj"};
      for (int part = 0; part < 3; ++part)
        source.tensors.emplace(t + "self_attn." + parts[part] + "." + k,
                               rows_of(fused, part, p + fused_name, file->path()));
      take(t + "self_attn.out_proj." + k, s + "attn.out_proj." + k);
      take(t + "layer_norm1." + k, s + "ln_1." + k);
      take(t + "layer_norm2." + k, s + "ln_2." + k);
      take(t + "mlp.fc1." + k, s + "mlp.c_fc." + k);
      take(t + "mlp.fc2." + k, s + "mlp.c_proj." + k);
    }
  }
  take("final_layer_norm.weight", "ln_final.weight");
  take("final_layer_norm.bias", "ln_final.bias");
  if (layout.with_projection) {
    TensorView projection = require_tensor(*file, p + "text_projection", "text encoder");
    if (projection.shape.size() != 2)
      refuse_unrecognised(file->path(), "its text_projection is not a matrix");
    std::swap(projection.shape[0], projection.shape[1]);
    projection.transposed = true;
    source.tensors.emplace("text_projection.weight", projection);
  }
  return source;
}

}  // namespace sdserve::pipeline

#include "pipeline/io/model_files.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "config/safe_json.h"
#include "pipeline/errors.h"
#include "pipeline/io/checkpoint_config.h"
#include "pipeline/io/checkpoint_convert.h"
#include "pipeline/io/file_io.h"
#include "pipeline/io/names.h"
#include "pipeline/io/safetensors.h"

namespace sdserve::pipeline {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// PyTorch's pickle-based formats. Loading them unpickles, which can execute arbitrary code.
bool has_pickle_extension(const std::string& path) {
  const std::string name = lower(fs::path(path).filename().string());
  for (const char* ext : {".ckpt", ".pt", ".pth", ".bin", ".pkl"})
    if (ends_with(name, ext)) return true;
  return false;
}

// torch.save writes a zip archive (since 1.6) or a bare pickle stream (protocol 2+) before that.
bool looks_like_pickle(const std::string& path) {
  int fd = -1;
  try {
    fd = open_regular_file(path);
  } catch (const ModelError&) {
    return false;
  }
  char magic[4] = {};
  const bool got = ::read(fd, magic, sizeof magic) == static_cast<ssize_t>(sizeof magic);
  ::close(fd);
  if (!got) return false;
  const bool zip = magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4;
  const bool pickle =
      static_cast<unsigned char>(magic[0]) == 0x80 && magic[1] >= 2 && magic[1] <= 5;
  return zip || pickle;
}

[[noreturn]] void refuse_pickle(const std::string& path, const std::string& how_to_convert) {
  throw ModelError("'" + path +
                   "' is a pickle checkpoint, which sdserve does not load: unpickling a file can "
                   "run arbitrary code. Convert it to .safetensors once, in an environment you "
                   "trust: " +
                   how_to_convert);
}

[[noreturn]] void refuse_single_pickle(const std::string& path) {
  refuse_pickle(path,
                "e.g. with diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py "
                "--checkpoint_path '" +
                    path +
                    "' --dump_path <folder> --to_safetensors (gives a diffusers folder), or in "
                    "Python: safetensors.torch.save_file(torch.load('" +
                    path + "', weights_only=True)[\"state_dict\"], \"model.safetensors\")");
}

json read_json(const fs::path& file) {
  constexpr std::size_t kMaxConfigBytes = 16 << 20;  // model configs are a few KB
  const std::string text = read_regular_file(file.string(), kMaxConfigBytes);
  json j;
  try {
    j = safe_json::parse(text);
  } catch (const safe_json::Error& e) {
    throw ModelError("'" + file.string() + "' is not valid JSON (" + e.what() +
                     "); restore it from the model's original download");
  }
  if (!j.is_object())
    throw ModelError("'" + file.string() +
                     "' is not a JSON object; restore it from the model's original download");
  return j;
}

enum class Field { kInt, kIntOrList, kIntList, kStringList };

bool is_positive_int(const json& j) {
  return j.is_number_integer() && j.get<int64_t>() > 0;
}

// Checks the fields the modules build themselves from, so a damaged config fails here with the
// file's name rather than deep inside a module constructor.
void require_fields(const json& cfg, const fs::path& file,
                    std::initializer_list<std::pair<const char*, Field>> fields) {
  for (const auto& [key, kind] : fields) {
    const json* value = cfg.contains(key) ? &cfg.at(key) : nullptr;
    bool ok = value != nullptr;
    const char* want = "a positive integer";
    if (ok) {
      const bool list = value->is_array() && !value->empty();
      switch (kind) {
        case Field::kInt:
          ok = is_positive_int(*value);
          break;
        case Field::kIntOrList:
          want = "a positive integer or a list of them";
          ok = is_positive_int(*value) ||
               (list && std::all_of(value->begin(), value->end(), is_positive_int));
          break;
        case Field::kIntList:
          want = "a list of positive integers";
          ok = list && std::all_of(value->begin(), value->end(), is_positive_int);
          break;
        case Field::kStringList:
          want = "a list of strings";
          ok = list && std::all_of(value->begin(), value->end(),
                                   [](const json& v) { return v.is_string(); });
          break;
      }
    }
    if (!ok)
      throw ModelError("'" + file.string() + "' is malformed: \"" + key + "\" is " +
                       (value ? "not " : "missing; it must be ") + want +
                       "; restore the file from the model's original download");
  }
}

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}
bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

[[noreturn]] void refuse_incomplete(const fs::path& folder, const std::string& what) {
  throw ModelError("the diffusers folder '" + folder.string() + "' lacks " + what +
                   "; a complete folder has model_index.json, unet/, vae/ and "
                   "text_encoder/ (each with config.json and .safetensors weights), tokenizer/ "
                   "(vocab.json, merges.txt) and scheduler/scheduler_config.json (SDXL adds "
                   "text_encoder_2/ and tokenizer_2/)");
}

// The component's weights file: the standard name, else its fp16 variant, else the folder's only
// .safetensors file (other variants such as .bf16). Pickle-only folders are refused.
fs::path find_weights(const fs::path& dir, const std::string& base) {
  for (const std::string& name : {base + ".safetensors", base + ".fp16.safetensors"})
    if (is_file(dir / name)) return dir / name;
  std::vector<fs::path> safetensors, pickles, indexes;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = lower(entry.path().filename().string());
    if (ends_with(name, ".safetensors"))
      safetensors.push_back(entry.path());
    else if (ends_with(name, ".safetensors.index.json"))
      indexes.push_back(entry.path());
    else if (has_pickle_extension(name))
      pickles.push_back(entry.path());
  }
  std::sort(safetensors.begin(), safetensors.end());
  std::sort(pickles.begin(), pickles.end());
  if (safetensors.size() == 1) return safetensors[0];
  if (safetensors.size() > 1) {
    std::string names;
    for (const auto& p : safetensors) names += (names.empty() ? "'" : ", '") + p.string() + "'";
    throw ModelError("'" + dir.string() + "' holds several weight files (" + names +
                     ") and none is named " + base + ".safetensors; keep or rename the one to use");
  }
  if (!indexes.empty())
    throw ModelError(
        "'" + dir.string() + "' holds sharded weights (" + indexes[0].filename().string() +
        "), which sdserve does not load; save the component as one " + base + ".safetensors file");
  if (!pickles.empty())
    refuse_pickle(pickles[0].string(),
                  "e.g. in Python, StableDiffusionPipeline.from_pretrained(folder)"
                  ".save_pretrained(folder, safe_serialization=True) writes .safetensors next "
                  "to it");
  refuse_incomplete(dir.parent_path(),
                    "weights in '" + dir.string() + "' (expected " + base + ".safetensors)");
}

WeightSource open_source(const fs::path& weights, const std::string& component) {
  WeightSource source;
  source.component = component;
  source.origin = weights.string();
  auto file = SafetensorsFile::open(weights.string());
  source.tensors = file->tensors();
  source.files = {file};
  return source;
}

// The text encoder module registers CLIPTextModel names without "text_model."; position_ids is
// a buffer some files carry that the module recomputes instead.
void normalise_text_encoder(WeightSource& source) {
  std::map<std::string, TensorView> renamed;
  for (auto& [name, view] : source.tensors) {
    std::string key = starts_with(name, "text_model.") ? name.substr(11) : name;
    if (key == "embeddings.position_ids") continue;
    renamed.emplace(std::move(key), std::move(view));
  }
  source.tensors = std::move(renamed);
}

// Folders saved by diffusers before 0.14 name the VAE mid-block attention query/key/value/
// proj_attn; some store those projections as 1x1 convolutions. Both become today's Linear names.
void normalise_vae(WeightSource& source) {
  static const std::pair<const char*, const char*> kLegacy[] = {{".query.", ".to_q."},
                                                                {".key.", ".to_k."},
                                                                {".value.", ".to_v."},
                                                                {".proj_attn.", ".to_out.0."}};
  std::map<std::string, TensorView> renamed;
  for (auto& [name, view] : source.tensors) {
    std::string key = name;
    const auto at = key.find("mid_block.attentions.0.");
    if (at != std::string::npos) {
      for (const auto& [from, to] : kLegacy) {
        const auto pos = key.find(from, at);
        if (pos != std::string::npos) key.replace(pos, std::string(from).size(), to);
      }
      const bool projection = key.find(".to_") != std::string::npos;
      if (projection && view.shape.size() == 4 && view.shape[2] == 1 && view.shape[3] == 1)
        view.shape.resize(2);
    }
    renamed.emplace(std::move(key), std::move(view));
  }
  source.tensors = std::move(renamed);
}

fs::path component_dir(const fs::path& folder, const std::string& name) {
  const fs::path dir = folder / name;
  if (!is_dir(dir)) refuse_incomplete(folder, "the " + name + "/ component folder");
  if (!is_file(dir / "config.json"))
    refuse_incomplete(folder, "'" + (dir / "config.json").string() + "'");
  return dir;
}

std::string family_display_name_of(const std::string& family) {
  if (family == "sd1") return "Stable Diffusion 1.x";
  if (family == "sd2") return "Stable Diffusion 2.x";
  return family == "sdxl" ? "Stable Diffusion XL" : family;
}

int64_t first_int(const json& j) {
  return j.is_array() ? j.at(0).get<int64_t>() : j.get<int64_t>();
}

// Families a folder reveals through model_index.json, before its components are read.
void detect_folder_family(const fs::path& folder, const json& index) {
  const std::string index_path = (folder / "model_index.json").string();
  const std::string cls = index.contains("_class_name") && index["_class_name"].is_string()
                              ? index["_class_name"].get<std::string>()
                              : "";
  if (cls.find("StableDiffusion3") != std::string::npos)
    refuse_family(index_path, kFamilySd3, "model_index.json names " + cls);
  if (cls.find("Flux") != std::string::npos)
    refuse_family(index_path, kFamilyFlux, "model_index.json names " + cls);
  if (cls.find("InstructPix2Pix") != std::string::npos)
    refuse_family(index_path, kFamilyPix2Pix, "model_index.json names " + cls);
  if (!index.contains("unet") && index.contains("transformer"))
    refuse_unrecognised(index_path, "its denoiser is a transformer/, not a unet/");
  const bool second = index.contains("text_encoder_2") || is_dir(folder / "text_encoder_2");
  const bool first = index.contains("text_encoder") ? !index["text_encoder"].is_array() ||
                                                          !index["text_encoder"].at(0).is_null()
                                                    : is_dir(folder / "text_encoder");
  if (second && !first)
    refuse_family(index_path, kFamilySdxlRefiner,
                  "it has text_encoder_2 without text_encoder; the refiner is an image-to-image "
                  "model, and sdserve generates from text");
}

// The padding token a tokenizer folder names (tokenizer_config.json, else
// special_tokens_map.json; a plain string or transformers' {"content": ...} form); empty when
// neither names one.
std::string pad_token_of(const fs::path& tokenizer_dir) {
  for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"}) {
    const fs::path file = tokenizer_dir / name;
    if (!is_file(file)) continue;
    const json j = read_json(file);
    const auto it = j.find("pad_token");
    if (it == j.end() || it->is_null()) continue;
    if (it->is_string()) return it->get<std::string>();
    if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
      return (*it)["content"].get<std::string>();
    throw ModelError("'" + file.string() +
                     "' is malformed: \"pad_token\" is neither a string nor {\"content\": ...}");
  }
  return "";
}

json read_text_encoder_config(const fs::path& text_dir) {
  json config = read_json(text_dir / "config.json");
  require_fields(config, text_dir / "config.json",
                 {{"hidden_size", Field::kInt},
                  {"intermediate_size", Field::kInt},
                  {"num_hidden_layers", Field::kInt},
                  {"num_attention_heads", Field::kInt},
                  {"max_position_embeddings", Field::kInt},
                  {"vocab_size", Field::kInt}});
  return config;
}

void read_tokenizer(const fs::path& folder, const std::string& name, std::string* vocab,
                    std::string* merges, std::string* pad) {
  const fs::path dir = folder / name;
  for (const char* file : {"vocab.json", "merges.txt"})
    if (!is_file(dir / file)) refuse_incomplete(folder, "'" + (dir / file).string() + "'");
  *vocab = (dir / "vocab.json").string();
  *merges = (dir / "merges.txt").string();
  *pad = pad_token_of(dir);
}

ModelFiles open_folder(const std::string& path) {
  const fs::path folder(path);
  const fs::path index_file = folder / "model_index.json";
  if (!is_file(index_file)) {
    const bool component = is_file(folder / "config.json");
    throw ModelError("'" + path +
                     "' is a folder without model_index.json, so not a diffusers "
                     "model folder" +
                     std::string(component ? " (it looks like one component of one)" : "") +
                     "; pass the model's root folder, the one holding model_index.json, or a "
                     "single .safetensors checkpoint");
  }
  const json index = read_json(index_file);
  detect_folder_family(folder, index);

  ModelFiles m;
  m.path = path;
  m.layout = "diffusers";

  const fs::path unet_dir = component_dir(folder, "unet");
  m.unet_config = read_json(unet_dir / "config.json");
  require_fields(m.unet_config, unet_dir / "config.json",
                 {{"in_channels", Field::kInt},
                  {"out_channels", Field::kInt},
                  {"block_out_channels", Field::kIntList},
                  {"layers_per_block", Field::kIntOrList},
                  {"cross_attention_dim", Field::kIntOrList},
                  {"attention_head_dim", Field::kIntOrList},
                  {"down_block_types", Field::kStringList},
                  {"up_block_types", Field::kStringList}});
  const std::string unet_config_path = (unet_dir / "config.json").string();
  check_unet_inputs(unet_config_path, m.unet_config.at("in_channels").get<int64_t>());

  const fs::path vae_dir = component_dir(folder, "vae");
  m.vae_config = read_json(vae_dir / "config.json");
  require_fields(m.vae_config, vae_dir / "config.json",
                 {{"in_channels", Field::kInt},
                  {"out_channels", Field::kInt},
                  {"latent_channels", Field::kInt},
                  {"block_out_channels", Field::kIntList},
                  {"layers_per_block", Field::kInt}});

  const fs::path text_dir = component_dir(folder, "text_encoder");
  m.text_encoder_config = read_text_encoder_config(text_dir);
  read_tokenizer(folder, "tokenizer", &m.vocab_path, &m.merges_path, &m.pad_token);
  int64_t text_width = m.text_encoder_config.at("hidden_size").get<int64_t>();

  // SDXL: a second text encoder whose hidden state is concatenated to the first's.
  const bool sdxl = is_dir(folder / "text_encoder_2");
  const bool text_time = m.unet_config.value("addition_embed_type", json()) == "text_time";
  if (sdxl != text_time)
    refuse_unrecognised(unet_config_path,
                        sdxl ? "it has text_encoder_2/ but its UNet takes no text_time "
                               "conditioning (addition_embed_type)"
                             : "its UNet takes text_time conditioning (SDXL's) but the folder "
                               "has no text_encoder_2/");
  fs::path text_dir_2;
  if (sdxl) {
    text_dir_2 = component_dir(folder, "text_encoder_2");
    m.text_encoder_2_config = read_text_encoder_config(text_dir_2);
    read_tokenizer(folder, "tokenizer_2", &m.vocab_path_2, &m.merges_path_2, &m.pad_token_2);
    text_width += m.text_encoder_2_config.at("hidden_size").get<int64_t>();
    // diffusers' StableDiffusionXLPipeline defaults it to true.
    const auto zeros = index.find("force_zeros_for_empty_prompt");
    m.force_zeros_for_empty_prompt =
        zeros == index.end() || !zeros->is_boolean() || zeros->get<bool>();
  }
  const int64_t cross = first_int(m.unet_config.at("cross_attention_dim"));
  if (cross != text_width)
    refuse_unrecognised(unet_config_path,
                        "its UNet cross-attends to width " + std::to_string(cross) +
                            " but its text encoder(s) give width " + std::to_string(text_width));
  // A label for logs and /info: the OpenCLIP (gelu) text encoder is SD 2.x's.
  m.family =
      sdxl ? "sdxl" : (m.text_encoder_config.value("hidden_act", "") == "gelu" ? "sd2" : "sd1");

  const fs::path scheduler_file = folder / "scheduler" / "scheduler_config.json";
  if (!is_file(scheduler_file)) refuse_incomplete(folder, "'" + scheduler_file.string() + "'");
  m.scheduler_config = read_json(scheduler_file);

  m.unet = open_source(find_weights(unet_dir, "diffusion_pytorch_model"), "unet");
  m.vae = open_source(find_weights(vae_dir, "diffusion_pytorch_model"), "vae");
  normalise_vae(m.vae);
  m.text_encoder = open_source(find_weights(text_dir, "model"), "text_encoder");
  normalise_text_encoder(m.text_encoder);
  if (sdxl) {
    m.text_encoder_2 = open_source(find_weights(text_dir_2, "model"), "text_encoder_2");
    normalise_text_encoder(m.text_encoder_2);
  }
  return m;
}

// Configs, tokenizers and scheduler from a diffusers folder of the same architecture, for a
// single file (diffusers' from_single_file(config=...)); the weights stay the file's, and
// load_weights checks every shape against these configs.
void take_folder_configs(ModelFiles& m, const std::string& folder) {
  ModelFiles f = open_folder(folder);
  if (f.family != m.family)
    throw ModelError("the config folder '" + folder + "' is " + family_display_name_of(f.family) +
                     " but '" + m.path + "' is " + family_display_name_of(m.family) +
                     "; pass a folder of the same family");
  m.unet_config = f.unet_config;
  m.vae_config = f.vae_config;
  m.text_encoder_config = f.text_encoder_config;
  m.text_encoder_2_config = f.text_encoder_2_config;
  m.scheduler_config = f.scheduler_config;
  m.vocab_path = f.vocab_path, m.merges_path = f.merges_path, m.pad_token = f.pad_token;
  m.vocab_path_2 = f.vocab_path_2, m.merges_path_2 = f.merges_path_2;
  m.pad_token_2 = f.pad_token_2;
  m.force_zeros_for_empty_prompt = f.force_zeros_for_empty_prompt;
}

ModelFiles open_single_file(const std::string& path, const std::string& tokenizer_dir,
                            const std::string& config_folder) {
  std::shared_ptr<SafetensorsFile> file;
  try {
    file = SafetensorsFile::open(path);
  } catch (const ModelError&) {
    if (looks_like_pickle(path)) refuse_single_pickle(path);
    throw;
  }
  ConvertedCheckpoint converted = convert_single_file(file, !config_folder.empty());

  ModelFiles m;
  m.path = path;
  m.layout = "single-file";
  m.family = converted.family;
  m.unet_config = std::move(converted.unet_config);
  m.vae_config = std::move(converted.vae_config);
  m.text_encoder_config = std::move(converted.text_encoder_config);
  m.text_encoder_2_config = std::move(converted.text_encoder_2_config);
  m.scheduler_config = std::move(converted.scheduler_config);
  m.unet = std::move(converted.unet);
  m.vae = std::move(converted.vae);
  m.text_encoder = std::move(converted.text_encoder);
  m.text_encoder_2 = std::move(converted.text_encoder_2);
  m.force_zeros_for_empty_prompt = m.family == "sdxl";  // SDXL base's model_index.json
  if (!config_folder.empty()) {
    take_folder_configs(m, config_folder);
    return m;
  }

  // Every SD family's tokenizers share CLIP's BPE vocabulary; OpenCLIP's pad with "!".
  const fs::path dir(tokenizer_dir);
  for (const char* name : {"vocab.json", "merges.txt"})
    if (!is_file(dir / name))
      throw ModelError("the default tokenizer folder '" + tokenizer_dir + "' lacks " + name +
                       ", which '" + path +
                       "' needs: single-file checkpoints carry no tokenizer; point the "
                       "tokenizer folder at CLIP's tokenizer (vocab.json, merges.txt)");
  m.vocab_path = m.vocab_path_2 = (dir / "vocab.json").string();
  m.merges_path = m.merges_path_2 = (dir / "merges.txt").string();
  if (m.family == "sd2") m.pad_token = "!";
  if (m.family == "sdxl") m.pad_token_2 = "!";
  return m;
}

}  // namespace

ModelFiles open_model_files(const std::string& path, const std::string& default_tokenizer_dir,
                            const std::string& single_file_config) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec || !fs::exists(status))
    throw ModelError("model path '" + path +
                     "' does not exist; pass a diffusers folder (with model_index.json) or an "
                     "original-layout .safetensors checkpoint");
  if (fs::is_directory(status)) return open_folder(path);
  if (has_pickle_extension(path)) refuse_single_pickle(path);
  return open_single_file(path, default_tokenizer_dir, single_file_config);
}

bool is_pickle_file(const std::string& path) {
  return has_pickle_extension(path) || looks_like_pickle(path);
}

}  // namespace sdserve::pipeline

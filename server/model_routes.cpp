#include "server/model_routes.h"

#include <algorithm>
#include <map>
#include <set>

#include "server/a1111.h"

namespace sdserve::server {
namespace {

Json short_hash(const std::string& sha256, size_t digits) {
  return sha256.empty() ? Json(nullptr) : Json(sha256.substr(0, digits));
}

// Devices each model is loaded on now.
std::map<std::string, Json> loaded_on(const Context& ctx) {
  std::map<std::string, Json> out;
  if (const auto e = ctx.engine())
    for (const auto& m : e->loaded_models()) {
      auto& list = out[m.name];
      if (list.is_null()) list = Json::array();
      list.push_back({{"device", m.device}, {"bytes", m.bytes}, {"in_use", m.in_use}});
    }
  return out;
}

Json entry_json(const engine::CatalogEntry& e) {
  Json j = {{"name", e.name},
            {"file_name", e.file_name},
            {"hash", short_hash(e.sha256, 10)},
            {"sha256", short_hash(e.sha256, 64)},
            {"bytes", e.bytes},
            {"usable", e.error.empty()}};
  if (!e.error.empty()) j["error"] = e.error;
  return j;
}

}  // namespace

Json models_json(const Context& ctx) {
  auto loaded = loaded_on(ctx);
  const std::string default_name = ctx.default_model();
  Json models = Json::array();
  const auto* catalog = ctx.catalog();
  if (!catalog) {
    if (const auto m = ctx.model()) {
      Json j = model_json(m->info());
      const auto e = ctx.engine();
      const std::string sha = e ? e->model_sha256() : "";
      j["hash"] = short_hash(sha, 10);
      j["sha256"] = short_hash(sha, 64);
      j["usable"] = true;
      j["default"] = true;
      j["loaded_on"] = loaded.count(default_name) ? loaded[default_name] : Json::array();
      models.push_back(j);
    }
    return {{"default", ctx.model() ? Json(ctx.model()->info().name) : Json()},
            {"models", models},
            {"loras", Json::array()},
            {"vaes", Json::array()},
            {"embeddings", Json::array()}};
  }
  for (const auto& e : catalog->list(engine::ModelKind::kCheckpoint)) {
    Json j = entry_json(e);
    j["layout"] = e.folder ? "diffusers" : "single-file";
    if (e.error.empty()) {
      j["family"] = e.info.family;
      j["native_size"] = e.info.native_size;
      j["text_layers"] = e.info.text_layers;
      j["inpainting"] = e.info.inpainting;
      j["weight_bytes"] = e.info.weight_bytes;
    }
    j["default"] = e.name == default_name;
    j["loaded_on"] = loaded.count(e.name) ? loaded[e.name] : Json::array();
    models.push_back(j);
  }
  Json out = {{"default", default_name}, {"models", models}};
  for (const auto& [key, kind] :
       {std::pair<const char*, engine::ModelKind>{"loras", engine::ModelKind::kLora},
        {"vaes", engine::ModelKind::kVae},
        {"embeddings", engine::ModelKind::kEmbedding}}) {
    Json list = Json::array();
    for (const auto& e : catalog->list(kind)) list.push_back(entry_json(e));
    out[key] = list;
  }
  return out;
}

void refresh_models(Context& ctx, const engine::ModelKind* kind) {
  auto* catalog = ctx.catalog();
  if (!catalog) return;  // one model: nothing to find
  if (kind)
    catalog->refresh(*kind);
  else
    catalog->refresh();
  ctx.refreshed();
}

namespace a1111 {

namespace {

Checkpoint catalog_checkpoint(const engine::CatalogEntry& entry) {
  std::string model_name = entry.name;
  std::replace(model_name.begin(), model_name.end(), '/', '_');
  return {entry.title(), model_name, entry.file_name, entry.sha256};
}

Checkpoint current_checkpoint(const Context& ctx, const std::string& resolved) {
  if (const auto* catalog = ctx.catalog()) {
    const auto e = catalog->find(engine::ModelKind::kCheckpoint,
                                 resolved.empty() ? ctx.default_model() : resolved);
    if (e) return catalog_checkpoint(*e);
  }
  const auto m = ctx.model();
  const auto e = ctx.engine();
  if (!m) return {"sdserve", "sdserve", "sdserve", ""};
  return checkpoint(m->info(), e ? e->model_sha256() : "");
}

}  // namespace

Json sd_models(const Context& ctx) {
  std::vector<Checkpoint> list;
  if (const auto* catalog = ctx.catalog()) {
    for (const auto& e : catalog->list(engine::ModelKind::kCheckpoint))
      if (e.error.empty()) list.push_back(catalog_checkpoint(e));
  } else if (ctx.model()) {
    list.push_back(current_checkpoint(ctx, ""));
  }
  return sd_models(list);
}

Json options(const Context& ctx, const std::string& caller) {
  return options(current_checkpoint(ctx, ctx.a1111_model(caller)));
}

Json set_options(Context& ctx, const std::string& caller, const BodyJson& body) {
  if (!body.is_object())
    throw ApiError(400, "invalid_json", "the body must be a JSON object of settings");
  // Settings whose value is what sdserve does anyway are accepted; the rest refused by name.
  const Json current = options(ctx, caller);
  std::string model;
  bool set_model = false;
  for (const auto& [key, value] : body.items()) {
    if (key == "sd_model_checkpoint") {
      if (!value.is_string())
        throw ApiError(400, "validation_error", "sd_model_checkpoint must be a string",
                       "sd_model_checkpoint");
      model = ctx.resolve_model(value.get<std::string>(), "sd_model_checkpoint");
      set_model = true;
    } else if (!current.contains(key) || key == "sd_checkpoint_hash") {
      throw ApiError(400, "validation_error",
                     "the setting '" + key + "' cannot be set through sdserve's A1111 API",
                     key.size() <= 64 ? key : key.substr(0, 64));
    } else if (Json(value) != current[key]) {
      throw ApiError(400, "validation_error",
                     "the setting '" + key + "' is fixed here at " + current[key].dump(), key);
    }
  }
  if (set_model) ctx.set_a1111_model(caller, model);
  return nullptr;
}

Json sd_vae(const Context& ctx) {
  Json out = Json::array();
  if (const auto* catalog = ctx.catalog())
    for (const auto& e : catalog->list(engine::ModelKind::kVae))
      if (e.error.empty()) out.push_back({{"model_name", e.file_name}, {"filename", e.path}});
  return out;
}

Json loras(const Context& ctx) {
  Json out = Json::array();
  if (const auto* catalog = ctx.catalog())
    for (const auto& e : catalog->list(engine::ModelKind::kLora))
      if (e.error.empty())
        out.push_back(
            {{"name", e.name}, {"alias", e.name}, {"path", e.path}, {"metadata", Json::object()}});
  return out;
}

Json embeddings(const Context& ctx) {
  // As A1111: the embeddings the (default) model takes, and those it skips (another family's
  // widths, a broken file); for each, its vector width and count.
  const auto item = [](const pipeline::TextualInversionInfo& i) {
    return Json{{"step", nullptr},
                {"sd_checkpoint", nullptr},
                {"sd_checkpoint_name", nullptr},
                {"shape", i.dims.empty() ? 0 : i.dims.front()},
                {"vectors", i.vectors}};
  };
  Json loaded = Json::object(), skipped = Json::object();
  if (const auto m = ctx.model()) {
    for (const auto& i : m->textual_inversions()) loaded[i.name] = item(i);
    for (const auto& s : m->skipped_textual_inversions()) skipped[s.info.name] = item(s.info);
  }
  if (const auto* catalog = ctx.catalog())
    for (const auto& e : catalog->list(engine::ModelKind::kEmbedding))
      if (!e.error.empty()) skipped[e.name] = item({e.name, e.path, "", 0, {}, ""});
  return {{"loaded", loaded}, {"skipped", skipped}};
}

}  // namespace a1111
}  // namespace sdserve::server

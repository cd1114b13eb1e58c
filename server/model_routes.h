// The models a service offers, as routes: GET /v1/models and POST /v1/models/refresh, and
// A1111's /sdapi/v1/sd-models, options (the caller's checkpoint), sd-vae, loras, embeddings and
// refresh-* routes. A service started with --model offers that one model; with --models-dir,
// the folder's (engine/model_catalog.h). No networking here: HttpSession and handle_request
// call these.
#pragma once

#include <string>

#include "server/api_json.h"
#include "server/context.h"

namespace sdserve::server {

Json models_json(const Context& ctx);  // GET /v1/models
// POST /v1/models/refresh and A1111's refresh-*: scans the folder again; `kind` null: every
// kind. Answers what GET /v1/models answers afterwards.
void refresh_models(Context& ctx, const engine::ModelKind* kind = nullptr);

namespace a1111 {
Json sd_models(const Context& ctx);
// GET /sdapi/v1/options: the caller's checkpoint (POST sets it).
Json options(const Context& ctx, const std::string& caller);
// POST /sdapi/v1/options: sd_model_checkpoint (resolved; for the caller's API key when keys are
// set, else for everyone, as A1111) and settings whose value is what sdserve does anyway; any
// other setting is refused by name. Answers null, as A1111.
Json set_options(Context& ctx, const std::string& caller, const BodyJson& body);
Json sd_vae(const Context& ctx);
Json loras(const Context& ctx);
Json embeddings(const Context& ctx);
}  // namespace a1111

}  // namespace sdserve::server

// The server's pure parsers, run under ASan + UBSan (tests/sanitize): POST /v1/jobs bodies
// (server/api_json.h) and /v1/events commands (server/ws_command.h). Checks what a client sees
// (status, type, field) and that hostile input stays bounded; not the exact wording.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/job.h"
#include "pipeline/errors.h"
#include "server/api_json.h"
#include "server/ws_command.h"

namespace sdserve::server {
namespace {

const engine::RequestBounds kLimits{};  // text_layers 12, max_timeout_s 3600

// The ApiError that parsing `body` throws (fails the test when none).
ApiError error_of(const std::string& body) {
  try {
    parse_job_request(body, kLimits);
  } catch (const ApiError& e) {
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not an ApiError: " << e.what();
    return ApiError(0, "", "");
  }
  ADD_FAILURE() << "accepted: " << body.substr(0, 200);
  return ApiError(0, "", "");
}

// The error as the client receives it parses as JSON (its message is valid UTF-8).
void expect_serialisable(const ApiError& e) {
  const std::string body = error_body(e.type, e.what(), e.field);
  EXPECT_NO_THROW((void)nlohmann::json::parse(body)) << body.substr(0, 200);
}

TEST(SanitizeJobRequest, ValidRequestWithEveryField) {
  const auto r = parse_job_request(R"({
      "prompt": "a cat", "negative_prompt": "a dog", "width": 640, "height": 384,
      "steps": 25, "guidance_scale": 6.5, "sampler": "DPM++ 2M Karras", "seed": 1234,
      "num_images": 3, "clip_skip": 2,
      "preview": {"every": 5, "format": "PNG", "max_size": 128, "method": "vae"},
      "priority": "high", "timeout_s": 90.5, "cancel_on_disconnect": true})",
                                   kLimits);
  EXPECT_EQ(r.prompt, "a cat");
  EXPECT_EQ(r.negative_prompt, "a dog");
  EXPECT_EQ(r.width, 640);
  EXPECT_EQ(r.height, 384);
  EXPECT_EQ(r.steps, 25);
  EXPECT_DOUBLE_EQ(r.guidance_scale, 6.5);
  EXPECT_EQ(r.sampler, "dpmpp_2m");
  EXPECT_EQ(r.scheduler, "karras");
  ASSERT_TRUE(r.seed.has_value());
  EXPECT_EQ(*r.seed, 1234u);
  EXPECT_EQ(r.num_images, 3);
  EXPECT_EQ(r.clip_skip, 2);
  ASSERT_TRUE(r.preview.has_value());
  EXPECT_EQ(r.preview->every, 5);
  EXPECT_EQ(r.preview->format, "png");
  EXPECT_EQ(r.preview->max_size, 128);
  EXPECT_EQ(r.preview->method, "vae");
  EXPECT_EQ(r.priority, engine::Priority::kHigh);
  ASSERT_TRUE(r.timeout_s.has_value());
  EXPECT_DOUBLE_EQ(*r.timeout_s, 90.5);
  EXPECT_TRUE(r.cancel_on_disconnect);

  // request_json renders it back with every field.
  const Json j = request_json(r);
  for (const auto& f : request_fields()) EXPECT_TRUE(j.contains(f)) << f;
}

TEST(SanitizeJobRequest, DefaultsAndRandomSeed) {
  const auto r = parse_job_request(R"({"prompt": "a cat", "seed": -1, "preview": null})", kLimits);
  EXPECT_EQ(r.width, 512);
  EXPECT_EQ(r.height, 512);
  EXPECT_EQ(r.sampler, "euler");
  EXPECT_EQ(r.scheduler, "normal");
  EXPECT_FALSE(r.preview.has_value());
  ASSERT_TRUE(r.seed.has_value());  // chosen at once so that it can be reported
  EXPECT_LE(*r.seed, 0xffffffffull);
  const auto big = parse_job_request(R"({"prompt": "", "seed": 18446744073709551615})", kLimits);
  EXPECT_EQ(*big.seed, 18446744073709551615ull);
}

TEST(SanitizeJobRequest, SizesDefaultToTheModelsAndSizeConditioningIsRead) {
  engine::RequestBounds sdxl;
  sdxl.native_size = 1024;
  const auto r = parse_job_request(
      R"({"prompt": "a cat", "original_size": {"width": 2048, "height": 1536},
          "crops_coords_top_left": {"top": 16, "left": 32},
          "target_size": {"width": 1024, "height": 768}})",
      sdxl);
  EXPECT_EQ(r.width, 1024);
  EXPECT_EQ(r.height, 1024);
  EXPECT_EQ(r.original_width, 2048);
  EXPECT_EQ(r.original_height, 1536);
  EXPECT_EQ(r.crop_top, 16);
  EXPECT_EQ(r.crop_left, 32);
  EXPECT_EQ(r.target_width, 1024);
  EXPECT_EQ(r.target_height, 768);
  const auto e = error_of(R"({"prompt": "a", "target_size": {"width": 9000}})");
  EXPECT_EQ(e.field, "target_size.width");
}

TEST(SanitizeJobRequest, EachFieldsErrorNamesItsField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({})", "prompt"},
      {R"({"prompt": 5})", "prompt"},
      {R"({"prompt": null})", "prompt"},
      {R"({"prompt": "a", "negative_prompt": ["x"]})", "negative_prompt"},
      {R"({"prompt": "a", "width": 63})", "width"},
      {R"({"prompt": "a", "width": 100})", "width"},
      {R"({"prompt": "a", "width": 4096})", "width"},
      {R"({"prompt": "a", "width": "512"})", "width"},
      {R"({"prompt": "a", "width": 512.5})", "width"},
      {R"({"prompt": "a", "width": 18446744073709551615})", "width"},
      {R"({"prompt": "a", "width": -9223372036854775808})", "width"},
      {R"({"prompt": "a", "height": 0})", "height"},
      {R"({"prompt": "a", "steps": 0})", "steps"},
      {R"({"prompt": "a", "steps": 151})", "steps"},
      {R"({"prompt": "a", "steps": 4294967297})", "steps"},
      {R"({"prompt": "a", "guidance_scale": -1})", "guidance_scale"},
      {R"({"prompt": "a", "guidance_scale": 31})", "guidance_scale"},
      {R"({"prompt": "a", "guidance_scale": "7"})", "guidance_scale"},
      {R"({"prompt": "a", "sampler": "eulr"})", "sampler"},
      {R"({"prompt": "a", "sampler": 5})", "sampler"},
      {R"({"prompt": "a", "scheduler": "exponential"})", "scheduler"},
      {R"({"prompt": "a", "sampler": "ddim", "scheduler": "karras"})", "scheduler"},
      {R"({"prompt": "a", "seed": -2})", "seed"},
      {R"({"prompt": "a", "seed": 1.5})", "seed"},
      {R"({"prompt": "a", "seed": "1"})", "seed"},
      {R"({"prompt": "a", "num_images": 0})", "num_images"},
      {R"({"prompt": "a", "num_images": 17})", "num_images"},
      {R"({"prompt": "a", "clip_skip": 0})", "clip_skip"},
      {R"({"prompt": "a", "clip_skip": 13})", "clip_skip"},
      {R"({"prompt": "a", "preview": 5})", "preview"},
      {R"({"prompt": "a", "preview": {"every": 0}})", "preview.every"},
      {R"({"prompt": "a", "steps": 10, "preview": {"every": 11}})", "preview.every"},
      {R"({"prompt": "a", "preview": {"format": "gif"}})", "preview.format"},
      {R"({"prompt": "a", "preview": {"max_size": 8}})", "preview.max_size"},
      {R"({"prompt": "a", "preview": {"method": "x"}})", "preview.method"},
      {R"({"prompt": "a", "preview": {"bogus": 1}})", "preview.bogus"},
      {R"({"prompt": "a", "priority": "urgent"})", "priority"},
      {R"({"prompt": "a", "timeout_s": 0})", "timeout_s"},
      {R"({"prompt": "a", "timeout_s": 3601})", "timeout_s"},
      {R"({"prompt": "a", "cancel_on_disconnect": "yes"})", "cancel_on_disconnect"},
      {R"({"prompt": "a", "promt": "b"})", "promt"},
      {R"({"prompt": "a", "hires": 2})", "hires"},
      {R"({"prompt": "a", "hires": {"scale": "2"}})", "hires.scale"},
      {R"({"prompt": "a", "hires": {"scale": 8}})", "hires.scale"},
      {R"({"prompt": "a", "width": 1024, "hires": {"scale": 3}})", "hires.scale"},
      {R"({"prompt": "a", "hires": {"width": 1.5}})", "hires.width"},
      {R"({"prompt": "a", "hires": {"height": 4000}})", "hires.height"},
      {R"({"prompt": "a", "hires": {"upscaler": "ESRGAN_4x"}})", "hires.upscaler"},
      {R"({"prompt": "a", "hires": {"upscaler": 4}})", "hires.upscaler"},
      {R"({"prompt": "a", "hires": {"steps": -1}})", "hires.steps"},
      {R"({"prompt": "a", "steps": 10, "hires": {"strength": 0.05}})", "hires.strength"},
      {R"({"prompt": "a", "hires": {"sampler": "eulr"}})", "hires.sampler"},
      {R"({"prompt": "a", "hires": {"sampler": "ddim", "scheduler": "karras"}})",
       "hires.scheduler"},
      {R"({"prompt": "a", "hires": {"bogus": 1}})", "hires.bogus"},
  };
  for (const auto& [body, field] : cases) {
    const ApiError e = error_of(body);
    EXPECT_EQ(e.status, 400) << body;
    EXPECT_EQ(e.type, "validation_error") << body;
    EXPECT_EQ(e.field, field) << body << " -> " << e.what();
    EXPECT_FALSE(std::string(e.what()).empty()) << body;
    EXPECT_LT(std::string(e.what()).size(), 1000u) << body;
    expect_serialisable(e);
  }
}

TEST(SanitizeJobRequest, HiresIsReadWithItsDefaults) {
  // R"j(...)j": the upscaler's name holds )" itself.
  auto r = parse_job_request(R"j({"prompt": "a", "width": 64, "height": 96, "steps": 10,
      "sampler": "Euler a", "hires": {"scale": 1.5, "upscaler": "latent (BICUBIC)"}})j",
                             kLimits);
  ASSERT_TRUE(r.hires.has_value());
  EXPECT_DOUBLE_EQ(r.hires->scale, 1.5);
  EXPECT_EQ(r.hires->upscaler, "Latent (bicubic)") << "A1111's spelling, any case";
  EXPECT_EQ(r.hires->steps, 0);
  EXPECT_DOUBLE_EQ(r.hires->strength, 0.7);
  EXPECT_EQ(r.hires->sampler, "") << "the first pass's";
  EXPECT_EQ(engine::final_size(r), std::make_pair(96, 144));
  const auto j = request_json(r);
  EXPECT_EQ(j["hires"]["sampler"], "euler_ancestral");
  EXPECT_EQ(j["hires"]["final_size"]["width"], 96);
  EXPECT_EQ(j["hires"]["final_size"]["height"], 144);
  // A scheduler alone applies to the first pass's sampler; a sampler alone takes its own default.
  r = parse_job_request(R"({"prompt": "a", "sampler": "euler", "hires": {"scheduler": "karras"}})",
                        kLimits);
  EXPECT_EQ(r.hires->sampler, "euler");
  EXPECT_EQ(r.hires->scheduler, "karras");
  r = parse_job_request(
      R"({"prompt": "a", "hires": {"sampler": "DPM++ 2M Karras", "steps": 8, "width": 1024}})",
      kLimits);
  EXPECT_EQ(r.hires->sampler, "dpmpp_2m");
  EXPECT_EQ(r.hires->scheduler, "karras");
  EXPECT_EQ(r.hires->width, 1024);
  const auto off = parse_job_request(R"({"prompt": "a", "hires": null})", kLimits);
  EXPECT_FALSE(off.hires.has_value());
  EXPECT_TRUE(request_json(off)["hires"].is_null());
}

TEST(SanitizeJobRequest, UnparseableBodiesAreInvalidJson) {
  const std::vector<std::string> bodies = {
      "",
      "{",
      "nul",
      "{\"prompt\": \"a\",}",
      "[1, 2]",
      "null",
      "\"a cat\"",
      "42",
      std::string(1 << 20, '{'),                            // deep, unterminated
      std::string(100000, '[') + std::string(100000, ']'),  // deep, well formed
      "{\"prompt\": " + std::string(100000, '[') + std::string(100000, ']') + "}",
  };
  for (const auto& body : bodies) {
    const ApiError e = error_of(body);
    EXPECT_EQ(e.status, 400) << body.substr(0, 40);
    EXPECT_EQ(e.type, "invalid_json") << body.substr(0, 40) << " -> " << e.what();
    EXPECT_LT(std::string(e.what()).size(), 1000u);
    expect_serialisable(e);
  }
}

TEST(SanitizeJobRequest, OutOfRangeNumbersAreRefusedWith400) {
  for (const std::string field : {"guidance_scale", "seed", "steps", "width", "timeout_s"}) {
    for (const std::string number : {"1e400", "-1e400", "1e-400"}) {
      const std::string body = "{\"prompt\": \"a\", \"" + field + "\": " + number + "}";
      try {
        parse_job_request(body, kLimits);
        // 1e-400 may parse as 0 (a valid number); then only a value rule may refuse it.
        EXPECT_EQ(number, "1e-400") << body;
      } catch (const ApiError& e) {
        EXPECT_EQ(e.status, 400) << body;
        expect_serialisable(e);
      }
    }
  }
}

TEST(SanitizeJobRequest, InvalidUtf8IsRefusedAndNotEchoed) {
  const std::vector<std::string> bodies = {
      "{\"prompt\": \"caf\xc3\x28\"}",         // bad continuation
      "{\"prompt\": \"\xff\xfe\"}",            // never valid
      "{\"prompt\": \"\xed\xa0\x80\"}",        // a surrogate
      "{\"prompt\": \"a\", \"\xc0\xaf\": 1}",  // overlong key
      "{\"prompt\": \"\xe2\x82\"}",            // truncated sequence
      "\xef\xbb\xbf{\"prompt\": \"\xf8\x88\x80\x80\x80\"}",
  };
  for (const auto& body : bodies) {
    const ApiError e = error_of(body);
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.type, "invalid_json") << e.what();
    for (unsigned char c : std::string(e.what())) EXPECT_LT(c, 0x80) << e.what();
    expect_serialisable(e);
  }
}

TEST(SanitizeJobRequest, HugeNamesAndValuesAreBoundedInMessages) {
  const std::string huge(1 << 20, 'x');
  const std::string wide = [] {  // 2-byte characters, so that a cut may fall inside one
    std::string s;
    for (int i = 0; i < 100000; ++i) s += "\xc3\xa9";
    return s;
  }();
  struct Case {
    std::string body, field;
  };
  const std::vector<Case> cases = {
      {"{\"prompt\": \"a\", \"sampler\": \"" + huge + "\"}", "sampler"},
      {"{\"prompt\": \"a\", \"sampler\": \"" + wide + "\"}", "sampler"},
      {"{\"prompt\": \"a\", \"sampler\": \"" + std::string(64, 'q') + "\"}", "sampler"},
      {"{\"prompt\": \"a\", \"scheduler\": \"" + huge + "\"}", "scheduler"},
      {"{\"prompt\": \"a\", \"priority\": \"" + wide + "\"}", "priority"},
      {"{\"prompt\": \"a\", \"width\": \"" + huge + "\"}", "width"},
      {"{\"prompt\": \"a\", \"steps\": [" +
           [] {
             std::string s = "0";
             for (int i = 0; i < 50000; ++i) s += ",0";
             return s;
           }() +
           "]}",
       "steps"},
      {"{\"prompt\": \"a\", \"" + huge + "\": 1}", huge.substr(0, 64)},
      {"{\"prompt\": \"a\", \"" + wide + "\": 1}", ""},  // bounded, maybe cut: checked below
      {"{\"prompt\": \"a\", \"preview\": {\"" + huge + "\": 1}}", "preview"},
      {"{\"prompt\": \"a\", \"preview\": {\"" + wide + "\": 1}}", "preview"},
  };
  for (const auto& c : cases) {
    const ApiError e = error_of(c.body);
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.type, "validation_error") << e.what();
    if (!c.field.empty()) EXPECT_EQ(e.field, c.field);
    EXPECT_LE(e.field.size(), 72u);
    EXPECT_LT(std::string(e.what()).size(), 600u) << std::string(e.what()).substr(0, 600);
    expect_serialisable(e);
  }
}

// engine::validate() is the one check of values; its errors carry the field, not a message to
// be parsed.
TEST(SanitizeJobRequest, ValidateNamesTheField) {
  const engine::RequestBounds bounds{4, 60};  // a model with 4 text layers; timeouts <= 60 s
  const auto field_of = [&](engine::JobRequest r) -> std::string {
    try {
      engine::validate(r, bounds);
    } catch (const pipeline::RequestError& e) {
      return e.field();
    }
    return "accepted";
  };
  engine::JobRequest ok;
  ok.steps = 10;
  EXPECT_EQ(field_of(ok), "accepted");
  auto r = ok;
  r.height = 72 + 4;
  EXPECT_EQ(field_of(r), "height");
  r = ok;
  r.clip_skip = 5;
  EXPECT_EQ(field_of(r), "clip_skip");
  r = ok;
  r.preview = engine::PreviewOptions{};
  r.preview->every = 11;  // more than the steps
  EXPECT_EQ(field_of(r), "preview.every");
  r.preview->every = 10;
  EXPECT_EQ(field_of(r), "accepted");
  r.preview->method = "taesd";
  EXPECT_EQ(field_of(r), "preview.method");
  r = ok;
  r.timeout_s = 61;
  EXPECT_EQ(field_of(r), "timeout_s");
  r = ok;
  r.sampler = "Euler a";  // validate() takes canonical names only
  EXPECT_EQ(field_of(r), "sampler");
}

TEST(SanitizeJobJson, RendersSnapshots) {
  engine::JobSnapshot job;
  job.id = "abc";
  job.status = engine::JobStatus::kSucceeded;
  job.request.num_images = 2;
  job.steps = 10;
  job.evaluations = job.evaluations_total = 10;
  job.times.queued_at = engine::WallClock::time_point{} + std::chrono::milliseconds(1700000000123);
  const Json j = job_json(job);
  EXPECT_EQ(j.begin().key(), "id");
  EXPECT_EQ(j["status"], "succeeded");
  ASSERT_EQ(j["images"].size(), 2u);
  EXPECT_EQ(j["images"][1], "/v1/jobs/abc/images/1");
  EXPECT_EQ(j["timings"]["queued"], "2023-11-14T22:13:20.123Z");
  EXPECT_TRUE(j["queue_position"].is_null());
  job.status = engine::JobStatus::kRunning;
  job.evaluations = 5;
  job.error = std::string("caf\xc3\x28");  // user text may be anything: dump must not throw
  const Json running = job_json(job);
  EXPECT_DOUBLE_EQ(running["progress"].get<double>(), 0.5);
  EXPECT_TRUE(running["images"].empty());
  EXPECT_NO_THROW((void)error_body("x", job.error));

  const Json s = samplers_json();
  EXPECT_FALSE(s["samplers"].empty());
  EXPECT_EQ(s["schedulers"].size(), 2u);
}

// ---- /v1/events commands ---------------------------------------------------------------------

TEST(SanitizeWsCommand, SubscribeAndUnsubscribe) {
  auto c = parse_ws_command(R"({"subscribe": "job-1"})");
  EXPECT_EQ(c.kind, WsCommand::kSubscribe);
  EXPECT_EQ(c.job_id, "job-1");
  EXPECT_STREQ(ws_command_error_type(c.kind), "");
  c = parse_ws_command(R"(  {"unsubscribe":"x"}  )");
  EXPECT_EQ(c.kind, WsCommand::kUnsubscribe);
  EXPECT_EQ(c.job_id, "x");
  c = parse_ws_command("{\"subscribe\": \"" + std::string(kMaxWsJobIdLength, 'i') + "\"}");
  EXPECT_EQ(c.kind, WsCommand::kSubscribe);
  EXPECT_EQ(c.job_id.size(), kMaxWsJobIdLength);
}

TEST(SanitizeWsCommand, UnparseableTextIsInvalidJson) {
  const std::vector<std::string> texts = {
      "",
      "{",
      "subscribe",
      "{\"subscribe\": }",
      "{\"subscribe\": \"\xff\"}",
      std::string(100000, '[') + std::string(100000, ']'),
      "{\"subscribe\": \"a\", \"x\": " + std::string(65, '{'),
      std::string(1 << 20, '{'),
  };
  for (const auto& t : texts) {
    const auto c = parse_ws_command(t);
    EXPECT_EQ(c.kind, WsCommand::kInvalidJson) << t.substr(0, 40);
    EXPECT_STREQ(ws_command_error_type(c.kind), "invalid_json");
    EXPECT_FALSE(c.message.empty());
    EXPECT_TRUE(c.job_id.empty());
  }
}

TEST(SanitizeWsCommand, OtherCommandsAreInvalidAndNeverEchoed) {
  const std::string marker = "SECRET-MARKER";
  const std::vector<std::string> texts = {
      "[\"" + marker + "\"]",
      "{}",
      "\"" + marker + "\"",
      "{\"" + marker + "\": \"a\"}",
      "{\"subscribe\": 5}",
      "{\"subscribe\": null}",
      "{\"subscribe\": [\"" + marker + "\"]}",
      "{\"subscribe\": \"a\", \"unsubscribe\": \"" + marker + "\"}",
      "{\"subscribe\": \"" + marker + std::string(kMaxWsJobIdLength, 'x') + "\"}",
      "{\"subscribe\": \"" + marker + std::string(1 << 20, 'x') + "\"}",
  };
  for (const auto& t : texts) {
    const auto c = parse_ws_command(t);
    EXPECT_EQ(c.kind, WsCommand::kInvalid) << t.substr(0, 60);
    EXPECT_STREQ(ws_command_error_type(c.kind), "invalid_command");
    EXPECT_EQ(c.message.find(marker), std::string::npos) << c.message;
    EXPECT_LT(c.message.size(), 200u);
    EXPECT_TRUE(c.job_id.empty());
  }
}

}  // namespace
}  // namespace sdserve::server

namespace sdserve::server {
namespace {

// Engine events are data; the server renders them, final events with the REST view's timings.
TEST(SanitizeEventJson, RendersEveryTypeInOneShape) {
  engine::JobEvent e;
  e.job_id = "j1";
  e.times.queued_at = engine::WallClock::time_point{} + std::chrono::seconds(100);
  e.times.started_at = e.times.queued_at + std::chrono::milliseconds(250);
  e.times.finished_at = *e.times.started_at + std::chrono::seconds(2);
  e.type = engine::EventType::kQueued;
  e.queue_position = 3;
  EXPECT_EQ(event_json(e)["position"], 3);
  e.type = engine::EventType::kProgress;
  e.evaluations = 4;
  e.evaluations_total = e.steps = 10;
  e.it_per_s = 2.5;
  Json j = event_json(e);
  EXPECT_EQ(j["type"], "progress");
  EXPECT_EQ(j["step"], 4);
  EXPECT_EQ(j["evaluations"], 4);
  // heun, 5 steps: 9 model evaluations; "step" counts the user's steps.
  e.steps = 5;
  e.evaluations_total = 9;
  e.evaluations = 3;
  EXPECT_EQ(event_json(e)["step"], 1);
  e.evaluations = 9;
  EXPECT_EQ(event_json(e)["step"], 5);
  EXPECT_EQ(event_json(e)["evaluations_total"], 9);
  e.steps = 10;
  e.evaluations = 4;
  e.evaluations_total = 10;
  EXPECT_DOUBLE_EQ(j["it_per_s"].get<double>(), 2.5);
  e.type = engine::EventType::kSucceeded;
  e.num_images = 2;
  e.seed = 7;
  j = event_json(e);
  EXPECT_EQ(j["images"][1], "/v1/jobs/j1/images/1");
  EXPECT_EQ(j["seed"], 7);
  EXPECT_DOUBLE_EQ(j["timings"]["queue_s"].get<double>(), 0.25);
  EXPECT_DOUBLE_EQ(j["timings"]["run_s"].get<double>(), 2.0);
  engine::JobSnapshot snap;
  snap.times = e.times;
  EXPECT_EQ(job_json(snap)["timings"], j["timings"]);  // REST and WebSocket agree
  e.type = engine::EventType::kCancelled;
  e.error = "";
  EXPECT_FALSE(event_json(e).contains("reason"));
  e.type = engine::EventType::kFailed;
  e.error = "boom";
  EXPECT_EQ(event_json(e)["error"], "boom");
}

}  // namespace
}  // namespace sdserve::server

// `sdserve bench`: the pipeline's speed on this machine, per phase and end to end.
#include <fstream>
#include <iostream>
#include <sstream>

#include "app/cli.h"
#include "bench/bench.h"
#include "bench/embedding_cache.h"
#include "server/logging.h"

namespace sdserve {
namespace {

constexpr const char* kHelp = R"(usage: sdserve bench [options]

Times text encoding, UNet steps, sampler steps, VAE decoding and PNG encoding, batch-1 latency
and images/s per batch size. Without --model it writes SD 1.5's architecture with seeded random
fp16 weights to --work-dir first (same compute as the real checkpoint; not counted as start-up).

  --model PATH          model to time (default: random-weight SD 1.5)
  --sdxl                the random model has SDXL base's architecture (default size 1024)
  --work-dir DIR        where the random model is written (default /tmp/sdserve-bench)
  --device D            auto | cpu | cuda | cuda:N (default auto)
  --precision P         auto | fp32 | fp16 | bf16 (default auto)
  --vae-precision P     auto | fp32 | fp16 | bf16 (default auto: fp32 under fp16)
  --batches LIST        comma-separated batch sizes (default 1,2,4,8,16,32)
  --steps N             (default 30)   --cfg X (default 7.5)   --sampler NAME (default euler)
  --width N --height N  (default 512; 1024 with --sdxl)
  --strength X          image to image at strength X (0..1) from a generated picture; the VAE
                        encode is timed, int(steps x X) steps run (default: text to image)
  --mixed               with --strength: every other image of a batch is text to image, in
                        the same UNet calls (rows at their own timesteps)
  --loras N             N random LoRAs (UNet transformers and text encoders), image k of each
                        batch with LoRA k mod N: rows with different LoRAs in one batch
  --lora-rank R         their rank (default 16)
  --lora-mode M         auto | per-row | merged (default auto: merged when a UNet call's rows
                        share one set, per-row terms otherwise; merged runs a call per set)
  --repeats N           timed runs per measurement, median reported (default 3)
  --no-cuda-graphs      run the UNet eagerly
  --no-channels-last    keep NCHW convolutions
  --json FILE           also write the report as JSON
  --profile-batch N     CUDA: finally run one step and decode at batch N inside the CUDA
                        profiler range (ncu --profile-from-start off ... --profile-batch N)

  --embedding-cache     instead: time a job's text encoding with a cold cache, an in-process
                        LRU hit and (with --redis-url URL) a Redis hit; needs --model
  --jobs N              jobs timed per tier (default 50)
)";

std::vector<int> parse_list(const std::string& flag, const std::string& v) {
  std::vector<int> out;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(parse_int_arg(flag, item, 1, 256));
  if (out.empty()) throw UsageError(flag + " needs at least one batch size");
  return out;
}

}  // namespace

int run_bench(const std::vector<std::string>& args) {
  bench::BenchOptions o;
  o.process_start = process_start_time();
  std::string json_path, redis_url;
  bool cache_mode = false, size_given = false;
  int jobs = 50;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::cout << kHelp;
      return 0;
    }
    if (a == "--no-cuda-graphs") {
      o.load.cuda_graphs = false;
      continue;
    }
    if (a == "--no-channels-last") {
      o.load.channels_last = false;
      continue;
    }
    if (a == "--embedding-cache") {
      cache_mode = true;
      continue;
    }
    if (a == "--sdxl") {
      o.sdxl = true;
      continue;
    }
    if (a == "--mixed") {
      o.mixed = true;
      continue;
    }
    if (i + 1 >= args.size()) throw UsageError(a + " needs a value");
    const std::string& v = args[++i];
    if (a == "--redis-url")
      redis_url = v;
    else if (a == "--jobs")
      jobs = parse_int_arg(a, v, 1, 100000);
    else if (a == "--model")
      o.model = v;
    else if (a == "--work-dir")
      o.work_dir = v;
    else if (a == "--device")
      o.load.device = v;
    else if (a == "--precision")
      o.load.precision = v;
    else if (a == "--vae-precision")
      o.load.vae_precision = v;
    else if (a == "--batches")
      o.batches = parse_list(a, v);
    else if (a == "--steps")
      o.steps = parse_int_arg(a, v, 1, 150);
    else if (a == "--cfg")
      o.guidance_scale = parse_double_arg(a, v, 0, 30);
    else if (a == "--sampler")
      o.sampler = v;
    else if (a == "--strength")
      o.strength = parse_double_arg(a, v, 0, 1);
    else if (a == "--width")
      o.width = parse_int_arg(a, v, 64, 2048), size_given = true;
    else if (a == "--height")
      o.height = parse_int_arg(a, v, 64, 2048), size_given = true;
    else if (a == "--repeats")
      o.repeats = parse_int_arg(a, v, 1, 100);
    else if (a == "--loras")
      o.loras = parse_int_arg(a, v, 1, 256);
    else if (a == "--lora-rank")
      o.lora_rank = parse_int_arg(a, v, 1, 1024);
    else if (a == "--lora-mode")
      o.load.lora_mode = v;
    else if (a == "--json")
      json_path = v;
    else if (a == "--profile-batch")
      o.profile_batch = parse_int_arg(a, v, 1, 256);
    else
      throw UsageError("unknown option '" + a + "'");
  }
  if (o.sdxl && !size_given) o.width = o.height = 1024;  // SDXL's native size
  if (o.mixed && o.strength <= 0) throw UsageError("--mixed needs --strength");
  setup_logging("warn");
  if (cache_mode) {
    if (o.model.empty()) throw UsageError("--embedding-cache needs --model");
    const auto model = pipeline::Model::load(o.model, o.load);
    const auto r = bench::run_cache_bench(*model, redis_url, jobs);
    std::cout << "model " << model->info().name << " on " << model->info().device << " ("
              << model->info().precision << ")\n"
              << r.to_table();
    if (!json_path.empty()) std::ofstream(json_path) << r.to_json() << "\n";
    return 0;
  }
  const auto report =
      bench::run_bench(o, [](const std::string& s) { std::cerr << "bench: " << s << "\n"; });
  std::cout << report.to_table();
  if (!json_path.empty()) {
    std::ofstream(json_path) << report.to_json() << "\n";
    std::cerr << "bench: wrote " << json_path << "\n";
  }
  return 0;
}

}  // namespace sdserve

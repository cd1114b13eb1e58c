#!/usr/bin/env python3
"""diffusers on the workload of `sdserve bench`: the comparison columns of docs/PERFORMANCE.md.

Measures what `sdserve bench` measures per batch size (bench/bench.cpp), with diffusers' own
pipelines: one request of B images = encode the prompt and the negative prompt once, 30 Euler
steps with classifier-free guidance 7.5 (the UNet sees 2B latents), VAE decode of the B latents
to 8-bit images (output_type "pil": decoded pixels, no PNG encoding, as in sdserve's timed
region). Seeds: image k uses a CPU torch.Generator seeded 1 + k, as sdserve does. Per
(mode, batch): the first call is timed alone ("first call": torch.compile's compile time plus
one run), then warm-up calls, then --repeats timed calls; the median is reported. Peak GPU
memory is torch.cuda.max_memory_allocated over the timed calls (reset after the warm-ups).
it/s = steps / (request seconds - VAE decode seconds), sdserve's definition; the decode time
(VAE + postprocessing) is the time after the last step's callback, which synchronizes once.

Model: --model DIR loads a diffusers folder (e.g. /tmp/sdserve-bench/sd15-random, written by
`sdserve bench`); without it the model is built here with random weights from the very configs
`sdserve bench` writes (parsed out of pipeline/bench_support.cpp; tokenizer and SD 1.5 scheduler
config from models/tiny-sd15), so no sdserve build is needed. Random values differ from
sdserve's; the compute is the same.

Modes: "eager" is diffusers as installed: torch SDPA attention (AttnProcessor2_0), NCHW.
"compile-<torch mode>" (compile-default, compile-reduce-overhead, compile-max-autotune-no-
cudagraphs, ...) follows diffusers' torch.compile guide (docs/source/en/optimization/fp16.md):
UNet and VAE in channels_last, `pipe.unet = torch.compile(unet, fullgraph=True)` and
`pipe.vae.decode = torch.compile(vae.decode, fullgraph=True)` (the guide compiles both);
dynamic=False, so every batch size compiles its own graphs (its "first call" is its compile).
The guide's extra inductor flags (coordinate descent tuning etc.) only with --guide-inductor-flags.

VAE precision: --vae-dtype same (default) decodes in --dtype, as sdserve's "auto" does (it
switches to float32 only after an fp16 overflow); "diffusers" is the pipelines' own rule (SDXL
upcasts to float32 when the VAE config says force_upcast, SD 1.x never does); "fp32" always.
"""
import argparse, gc, json, os, re, statistics, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    import torch
    import diffusers
    import transformers
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)
except (ImportError, RuntimeError) as e:  # diffusers' lazy imports raise RuntimeError
    from importlib.metadata import PackageNotFoundError, version

    try:
        hub = version("huggingface_hub")
    except PackageNotFoundError:
        hub = "none"
    sys.exit(f"diffusers_bench.py: {e}\nIt needs torch, transformers and diffusers (0.40 wants "
             f"huggingface_hub>=1.23; this one has {hub}). On the GPU machine install the staged "
             "wheels first: python3 -m pip install -q --no-index --no-deps --no-compile "
             "--no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
             " (.whl/optional/ has huggingface_hub 1.28.0 for an older hub)")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse, highly detailed"  # bench/bench.cpp
NEGATIVE = "blurry, low quality"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sdserve_configs():
    """The JSON configs that pipeline/bench_support.cpp writes into its random-weight folders."""
    src = (ROOT / "pipeline/bench_support.cpp").read_text()
    found = re.findall(r'const json (k\w+) = json::parse\(R"\((.*?)\)"\);', src, re.S)
    cfg = {name: json.loads(text) for name, text in found}
    missing = {"kUNet", "kVae", "kText", "kSdxlUNet", "kSdxlText2", "kSdxlScheduler"} - set(cfg)
    if missing:
        sys.exit(f"diffusers_bench.py: no {sorted(missing)} in pipeline/bench_support.cpp")
    return cfg


def random_pipeline(sdxl, dtype, device):
    """SD 1.5 / SDXL base architecture with random weights, as `sdserve bench` without --model."""
    cfg = sdserve_configs()
    tok_dir = ROOT / "models/tiny-sd15/tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if sdxl:
        sched = cfg["kSdxlScheduler"]
        vae = dict(cfg["kVae"], scaling_factor=0.13025, force_upcast=True, sample_size=1024)
    else:
        sched = json.loads((ROOT / "models/tiny-sd15/scheduler/scheduler_config.json").read_text())
        vae = cfg["kVae"]
    scheduler = EulerDiscreteScheduler.from_config(sched)  # its tables stay on the CPU
    with torch.device(device):  # initialise on the device: SDXL's UNet has 2.6e9 parameters
        parts = dict(unet=UNet2DConditionModel.from_config(cfg["kSdxlUNet" if sdxl else "kUNet"]),
                     vae=AutoencoderKL.from_config(vae),
                     text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(cfg["kText"])))
        if sdxl:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_dict(cfg["kSdxlText2"]))
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            **parts, tokenizer=tokenizer, scheduler=scheduler, add_watermarker=False,
            tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, pad_token="!"))
    else:
        pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def load_pipeline(args, dtype):
    if args.model is None:
        return random_pipeline(args.sdxl, dtype, args.device)
    if args.sdxl:
        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, dtype=dtype,
                                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            args.model, dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # sdserve's "euler"
    return pipe.to(args.device)


def setup_vae(pipe, args, dtype):
    """Fixes the VAE's dtype once, so the pipelines never cast it per call."""
    want = {"same": dtype, "fp32": torch.float32}.get(args.vae_dtype)
    if want is None:  # "diffusers": the SDXL pipeline's force_upcast rule
        upcast = args.sdxl and dtype == torch.float16 and pipe.vae.config.force_upcast
        want = torch.float32 if upcast else dtype
    if pipe.vae.dtype != want:
        pipe.vae.to(dtype=want)
    pipe.vae.register_to_config(force_upcast=False)  # done above, or not wanted
    return want


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(pipe, args, batch, vae_dtype):
    """One request of `batch` images; returns (seconds, VAE decode + postprocess seconds)."""
    marks = {}

    def on_step_end(_pipe, i, _t, kwargs):
        if i != args.steps - 1:
            return {}
        sync(args.device)
        marks["denoised"] = time.perf_counter()
        # The latents into the VAE's dtype (the pipelines cast only when they upcast themselves).
        return {"latents": kwargs["latents"].to(vae_dtype)}

    generators = [torch.Generator("cpu").manual_seed(1 + k) for k in range(batch)]
    sync(args.device)
    t0 = time.perf_counter()
    images = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=args.size, width=args.size,
                  num_inference_steps=args.steps, guidance_scale=args.cfg,
                  num_images_per_prompt=batch, generator=generators,
                  output_type=args.output_type, callback_on_step_end=on_step_end).images
    sync(args.device)
    t1 = time.perf_counter()
    assert len(images) == batch, f"{len(images)} images for batch {batch}"
    return t1 - t0, t1 - marks["denoised"]


def set_mode(pipe, mode, originals):
    """Puts the pipeline into `mode`; `originals` = (UNet module, VAE decode bound method)."""
    unet, decode = originals
    if pipe.unet is not unet:  # leaving a compiled mode: drop its graphs
        import torch._dynamo as dynamo  # (a plain "import torch._dynamo" would shadow torch)

        dynamo.reset()
    pipe.unet = unet
    pipe.vae.__dict__.pop("decode", None)  # drop an earlier compiled decode
    if mode == "eager":
        pipe.unet.to(memory_format=torch.contiguous_format)
        pipe.vae.to(memory_format=torch.contiguous_format)
        return
    torch_mode = mode[len("compile-"):]
    torch_mode = None if torch_mode == "default" else torch_mode
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(unet, mode=torch_mode, fullgraph=True, dynamic=False)
    compiled = torch.compile(decode, mode=torch_mode, fullgraph=True, dynamic=False)
    # SD 1.x passes its list of fresh generators to vae.decode, which ignores it: keep it out of
    # dynamo's guards (a new object every call could mean a recompile every call).
    pipe.vae.decode = lambda z, return_dict=True, generator=None: compiled(z, return_dict)


def measure(pipe, args, mode, batch, vae_dtype):
    cuda = args.device.startswith("cuda")
    first, _ = run_once(pipe, args, batch, vae_dtype)  # compile (if any) + one run
    warmups = max(args.warmup, 2 if "reduce-overhead" in mode else 0)  # CUDA graph recording
    for _ in range(warmups):
        run_once(pipe, args, batch, vae_dtype)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [run_once(pipe, args, batch, vae_dtype) for _ in range(max(1, args.repeats))]
    seconds = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    gib = 1024.0 ** 3
    return {"mode": mode, "batch": batch, "first_call_s": first, "seconds": seconds,
            "seconds_per_image": seconds / batch, "images_per_s": batch / seconds,
            "it_per_s": args.steps / (seconds - decode),
            "it_per_s_end_to_end": args.steps / seconds,
            "vae_decode_ms": decode * 1000, "runs_s": [r[0] for r in runs],
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib if cuda else 0.0,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib if cuda else 0.0}


def describe(r):
    if "error" in r:
        return f"{r['mode']:<36} batch {r['batch']:>3}: FAILED: {r['error']}"
    return (f"{r['mode']:<36} batch {r['batch']:>3}: {r['seconds_per_image']:.4f} s/image, "
            f"{r['images_per_s']:.2f} images/s, {r['it_per_s']:.2f} it/s, "
            f"{r['seconds']:.3f} s/request (VAE decode {r['vae_decode_ms']:.0f} ms), "
            f"peak {r['peak_allocated_gib']:.2f} GiB, first call {r['first_call_s']:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="diffusers folder (default: random weights, sdserve's configs)")
    ap.add_argument("--sdxl", action="store_true", help="SDXL base architecture / pipeline")
    ap.add_argument("--batches", help="comma-separated (default 1,16,32; SDXL 1,4,8)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--size", type=int, help="width = height (default 512; SDXL 1024)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="untimed calls after the first (which "
                    "is sdserve's one warm-up); reduce-overhead always gets 2 for CUDA graphs")
    ap.add_argument("--mode", default="eager", help="comma-separated: eager, compile-default, "
                    "compile-reduce-overhead, compile-max-autotune-no-cudagraphs, ...")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=DTYPES, default="fp16")
    ap.add_argument("--vae-dtype", choices=["same", "diffusers", "fp32"], default="same")
    ap.add_argument("--output-type", default="pil", choices=["pil", "np", "pt"])
    ap.add_argument("--guide-inductor-flags", action="store_true",
                    help="the inductor settings of diffusers' torch.compile guide")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--json", help="write the results here (rewritten after every measurement)")
    args = ap.parse_args()
    args.size = args.size or (1024 if args.sdxl else 512)
    batches = [int(b) for b in (args.batches or ("1,4,8" if args.sdxl else "1,16,32")).split(",")]
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    for m in modes:
        if m != "eager" and not m.startswith("compile-"):
            sys.exit(f"diffusers_bench.py: unknown mode '{m}' (eager or compile-<torch mode>)")
    dtype = DTYPES[args.dtype]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("diffusers_bench.py: CUDA is not available (use --device cpu)")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.guide_inductor_flags:
        import torch._inductor.config as cfg

        cfg.conv_1x1_as_mm = cfg.coordinate_descent_tuning = True
        cfg.epilogue_fusion, cfg.coordinate_descent_check_all_directions = False, True

    t0 = time.perf_counter()
    pipe = load_pipeline(args, dtype)
    vae_dtype = setup_vae(pipe, args, dtype)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    attention = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    report = {
        "tool": "bench/diffusers_bench.py", "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": sys.version.split()[0], "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "model": args.model or ("SDXL base" if args.sdxl else "SD 1.5") + " architecture, random "
        "weights (sdserve bench's configs)", "pipeline": type(pipe).__name__,
        "width": args.size, "height": args.size, "steps": args.steps, "guidance_scale": args.cfg,
        "scheduler": type(pipe.scheduler).__name__, "prompt": PROMPT, "negative_prompt": NEGATIVE,
        "dtype": args.dtype, "vae_dtype": str(vae_dtype).replace("torch.", ""),
        "attention": attention, "output_type": args.output_type, "repeats": args.repeats,
        "guide_inductor_flags": args.guide_inductor_flags, "cudnn_benchmark": args.cudnn_benchmark,
        "load_s": load_s, "results": []}
    print(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, torch "
          f"{torch.__version__} on {report['device_name']}; {report['model']}; {args.size}x"
          f"{args.size}, {args.steps} steps, CFG {args.cfg}, {report['scheduler']}, {args.dtype} "
          f"(VAE {report['vae_dtype']}), attention {','.join(attention)}; load {load_s:.1f} s",
          flush=True)

    originals = (pipe.unet, pipe.vae.decode)
    for mode in modes:
        for batch in batches:
            try:
                if batch == batches[0]:
                    set_mode(pipe, mode, originals)
                r = measure(pipe, args, mode, batch, vae_dtype)
            except Exception as e:  # e.g. out of memory: skip this mode's larger batches
                r = {"mode": mode, "batch": batch, "error": f"{type(e).__name__}: {e}"[:500]}
            report["results"].append(r)
            print(describe(r), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            if "error" in r:
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                break


if __name__ == "__main__":
    main()

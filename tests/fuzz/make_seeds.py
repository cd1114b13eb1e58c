#!/usr/bin/env python3
"""Writes the seed corpora under tests/fuzz/corpus/<target>/ (run from anywhere; idempotent).

The seeds are small, meaningful inputs: valid ones to start coverage from, and the edge cases
each parser must refuse cleanly. Found crashes do not go here but to tests/fuzz/regressions/.
"""
import base64
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- request_body: bodies of /v1/jobs, /sdapi/v1/txt2img and /sdapi/v1/png-info -----------------
api = {
    "minimal.json": '{"prompt": "a cat"}',
    "full.json": json.dumps({
        "prompt": "a photo of an astronaut riding a horse on mars",
        "negative_prompt": "blurry, low quality", "width": 512, "height": 768, "steps": 25,
        "guidance_scale": 7.5, "sampler": "dpmpp_2m", "scheduler": "karras", "seed": 1234,
        "num_images": 2, "clip_skip": 2,
        "preview": {"every": 5, "format": "jpeg", "max_size": 256, "method": "latent2rgb"},
        "priority": "high", "timeout_s": 30.5, "cancel_on_disconnect": True}),
    "a1111_sampler.json": '{"prompt": "x", "sampler": "DPM++ 2M Karras", "steps": 150}',
    "karras_conflict.json": '{"prompt": "x", "sampler": "DDIM", "scheduler": "karras"}',
    "seed_limits.json": '{"prompt": "x", "seed": 18446744073709551615, "width": 2048, "height": 64}',
    "seed_random.json": '{"prompt": "", "seed": -1, "preview": null, "priority": "LOW"}',
    "seed_overflow.json": '{"prompt": "x", "seed": 18446744073709551616}',
    "bad_types.json": '{"prompt": 5, "width": "512", "steps": 1.5, "guidance_scale": true}',
    "unknown_field.json": '{"prompt": "x", "promt": "typo", "preview": {"evry": 1}}',
    "numbers.json": '{"prompt": "x", "guidance_scale": 1e308, "timeout_s": -0.0, "width": -8}',
    "unicode.json": '{"prompt": "\\u732b \\ud83d\\ude00 caf\\u00e9 \\u0000", "negative_prompt": "\u4e00\u53ea"}',
    "duplicate_keys.json": '{"prompt": "a", "prompt": "b", "steps": 1, "steps": 2}',
    "nested.json": '{"prompt": "x", "preview": {"every": [[[[[[[[[[1]]]]]]]]]]}}',
    "truncated.json": '{"prompt": "a cat", "width": 5',
    "not_object.json": '["prompt", "a cat"]',
    "empty.json": "",
}
# A1111's txt2img and png-info (a 1x1 PNG with a "parameters" tEXt chunk, base64).
def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


TINY_PNG = base64.b64encode(
    b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) +
    png_chunk(b"tEXt", b"parameters\0a cat\nSteps: 4, Sampler: Euler a, Seed: 1, Size: 1x1") +
    png_chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + png_chunk(b"IEND", b"")).decode()
api.update({
    "a1111_txt2img.json": json.dumps({
        "prompt": "a cat", "negative_prompt": "", "steps": 20, "cfg_scale": 7,
        "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": -1, "batch_size": 2,
        "n_iter": 1, "width": 512, "height": 512, "send_images": True, "enable_hr": False,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"},
        "styles": [], "alwayson_scripts": {}, "eta": 1, "s_noise": 1}),
    "a1111_refused.json": '{"prompt": "x", "enable_hr": true, "hr_scale": 2, "restore_faces": 1}',
    "a1111_overflow.json": '{"prompt": "x", "steps": 1e400, "cfg_scale": -1e999}',
    "png_info.json": json.dumps({"image": "data:image/png;base64," + TINY_PNG}),
    "png_info_bad.json": '{"image": "data:image/png;base64,iVBORw0KGgo!!"}',
})
for name, text in api.items():
    write("request_body", name, text)

# --- ws_command: /v1/events text frames ---------------------------------------------------------
ws = {
    "subscribe.json": '{"subscribe": "j_0123456789abcdef"}',
    "unsubscribe.json": '{"unsubscribe": "j_0123456789abcdef"}',
    "empty_id.json": '{"subscribe": ""}',
    "unicode_id.json": '{"subscribe": "\\u00e9\\ud83d\\ude00\\u0000"}',
    "long_id.json": json.dumps({"subscribe": "j" * 129}),
    "max_id.json": json.dumps({"unsubscribe": "j" * 128}),
    "number_id.json": '{"subscribe": 42}',
    "two_keys.json": '{"subscribe": "a", "unsubscribe": "b"}',
    "wrong_key.json": '{"Subscribe": "a"}',
    "array.json": '["subscribe", "a"]',
    "string.json": '"subscribe"',
    "bad_json.json": '{subscribe: a}',
    "brackets_in_string.json": '{"subscribe": "[[[[{{{{\\"]]"}',
    "deep.json": "[" * 70 + "]" * 70,
    "deep_value.json": '{"subscribe": ' + "[" * 65 + "]" * 65 + "}",
}
for name, text in ws.items():
    write("ws_command", name, text)

# --- safetensors: whole files --------------------------------------------------------------------


def safetensors(header, data=b"", pad=True, length=None):
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def tensors(specs):
    """specs: [(name, dtype, shape)] -> (header, zeroed data) with contiguous offsets."""
    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}
    header, offset = {}, 0
    for name, dtype, shape in specs:
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return header, bytes(offset)


# A real header: the bundled text encoder's layer-0 norms and biases (names, dtypes and shapes as
# in models/tiny-sd15/text_encoder/model.safetensors), with zeroed data.
layer0 = "text_model.encoder.layers.0."
h, d = tensors([(layer0 + "layer_norm1.bias", "F16", [32]),
                (layer0 + "layer_norm1.weight", "F16", [32]),
                (layer0 + "mlp.fc1.bias", "F16", [37]),
                (layer0 + "self_attn.q_proj.weight", "F16", [4, 8])])
h["__metadata__"] = {"format": "pt"}
write("safetensors", "text_encoder_layer0.safetensors", safetensors(h, d))
h, d = tensors([("f32", "F32", [2, 3]), ("bf16", "BF16", [3]), ("f64", "F64", [1]),
                ("i64", "I64", [2]), ("i32", "I32", [1, 1, 1]), ("i16", "I16", [2]),
                ("i8", "I8", [4]), ("u8", "U8", [4]), ("bool", "BOOL", [3])])
write("safetensors", "all_dtypes.safetensors", safetensors(h, d))
h, d = tensors([("scalar", "F32", []), ("empty", "F32", [0, 5]), ("eight_dims", "U8", [1] * 8)])
write("safetensors", "shapes.safetensors", safetensors(h, d))
write("safetensors", "empty_header.safetensors", safetensors({}))
write("safetensors", "metadata_only.safetensors",
      safetensors({"__metadata__": {"format": "pt", "n": 1, "nested": {"a": "b"}}}))
write("safetensors", "unpadded.safetensors", safetensors({"a": {"dtype": "U8", "shape": [2],
                                                                 "data_offsets": [0, 2]}},
                                                           b"\x01\x02", pad=False))
write("safetensors", "truncated_data.safetensors",
      safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)))
write("safetensors", "bad_offsets.safetensors",
      safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, bytes(8)))
write("safetensors", "size_mismatch.safetensors",
      safetensors({"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}, bytes(4)))
write("safetensors", "huge_shape.safetensors",
      safetensors({"a": {"dtype": "F64", "shape": [4294967296, 4294967296, 16],
                         "data_offsets": [0, 0]}}))
write("safetensors", "bad_dtype.safetensors",
      safetensors({"a": {"dtype": ["F32"], "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)))
write("safetensors", "header_too_long.safetensors",
      safetensors({"a": 1}, length=0xFFFFFFFFFFFFFFFF))
write("safetensors", "short.safetensors", b"\x08\x00\x00\x00\x00\x00\x00")
# The full real header with no data: refused at the first tensor that does not fit.
real = os.path.join(REPO, "models/tiny-sd15/text_encoder/model.safetensors")
if os.path.exists(real):
    with open(real, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        write("safetensors", "text_encoder_header_only.safetensors",
              struct.pack("<Q", n) + f.read(n))

# --- config: file text [NUL args/env lines] -------------------------------------------------------
cfg = {
    "empty_object.json": "{}",
    "docs_example.json": '{"port": 9000, "max_queue": 128}',
    "full.json": json.dumps({
        "host": "0.0.0.0", "port": 0, "model": "models/tiny-sd15", "device": "cuda:1",
        "precision": "fp16", "max_queue": 64, "max_batch": 8, "batch_buckets": [1, 2, 4, 8],
        "default_timeout_s": 600, "max_timeout_s": 3600, "result_ttl_s": 3600.5,
        "result_max_mb": 1024, "max_body_bytes": 1048576, "max_header_bytes": 16384,
        "read_timeout_s": 30, "api_keys": ["key-1", "key-2"], "metrics_auth": True,
        "shutdown_grace_s": 30, "log_level": "debug", "log_format": "json", "http_threads": 4,
        "ws_queue_limit": 64}, indent=2),
    "bad_values.json": '{"port": 65536, "batch_buckets": [], "api_keys": [""], "device": "tpu"}',
    "not_ascending.json": '{"batch_buckets": [4, 2], "max_batch": 64, "default_timeout_s": 1e7}',
    "unknown_key.json": '{"max_queue": 8, "maxqueue": 8}',
    "not_object.json": "[1, 2, 3]",
    "not_json.json": "port = 9000\n",
    "flags.txt": '{"port": 9000}\0--port\n8081\n--max-batch=4\n--metrics-auth\n--log_level\nwarn',
    "env.txt": "{}\0SDSERVE_MAX_QUEUE=8\nSDSERVE_BATCH_BUCKETS=1,2,4\n"
               'SDSERVE_API_KEYS=["a","b"]\nSDSERVE_METRICS_AUTH=yes\nSDSERVE_READ_TIMEOUT_S=2.5',
    "env_bad.txt": "{}\0SDSERVE_PORT=-1\nSDSERVE_NOPE=1\nSDSERVE_RESULT_TTL_S=inf",
    "help.txt": '{"port": "bad"}\0--help',
    "bool_flag.txt": "{}\0--metrics-auth\nfalse\n--port\n",
    "bad_args.txt": "{}\0positional\n--\n--unknown-option\n1",
}
for name, text in cfg.items():
    write("config", name, text)

# --- tokenizer: prompts ---------------------------------------------------------------------------
tok = {
    "astronaut.txt": "a photo of an astronaut riding a horse on mars",
    "weights.txt": "(masterpiece:1.2), [low quality], {best}, 8k uhd, f/1.8, 35mm",
    "cjk.txt": "\u4e00\u53ea\u732b\u5728\u6708\u7403\u4e0a \u3053\u3093\u306b\u3061\u306f \ud55c\uad6d\uc5b4",
    "emoji.txt": "\U0001F600\U0001F431\u200d\U0001F4BB a cat \U0001F1EF\U0001F1F5",
    "accents.txt": "Caf\u00e9 na\u00efve Cafe\u0301 \u00c5NGSTR\u00d6M \u1e9e",
    "final_sigma.txt": "\u039f\u0394\u039f\u03a3 \u039f\u0394\u039f\u03a3. \u03a3",
    "scripts.txt": "\u0645\u0631\u062d\u0628\u0627 \u0928\u092e\u0938\u094d\u0924\u0947 \u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439\u0442\u0435",
    "contractions.txt": "it's I'M we'll they've don't she'd you're 's",
    "special_tokens.txt": "<|startoftext|>hello<|endoftext|> <|startoftext <|endoftext|>x",
    "numbers.txt": "1234567890 3.14159 1,000,000 0x1F",
    "long_word.txt": "supercalifragilisticexpialidocious" * 6,
    "long_prompt.txt": " ".join(["highly detailed portrait of a knight"] * 20),
    # Longer than the tokenizer's 4096-byte chunks, with a word across the first boundary.
    "chunked_prompt.txt": "a castle on a hill, " * 204 + "x" * 40 + " at dusk\t" * 40,
    "whitespace.txt": "\t a \n\r\x0b\x0c b \u00a0 \u3000 c \x85 \u2028",
    "control.txt": "a\x00b\x01c\x7fd\u200be\ufeff",
    "invalid_utf8.txt": b"a \xff\xfe cat \xc3 \xe4\xb8 \xed\xa0\x80 \xf4\x90\x80\x80 end",
    "empty.txt": "",
}
for name, text in tok.items():
    write("tokenizer", name, text)

# --- multipart: "Content-Type value\n" then a multipart/form-data body ---------------------------
BOUNDARY = "------------------------d74496d66958873e"


def form(fields, boundary=BOUNDARY, content_type=None):
    """fields: [(name, value bytes/str, filename or None)] -> a seed as curl -F writes the form."""
    body = b""
    for name, value, filename in fields:
        value = value.encode() if isinstance(value, str) else value
        body += b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="'
        body += name.encode() + b'"'
        if filename is not None:
            body += b'; filename="' + filename.encode() + b'"\r\nContent-Type: image/png'
        body += b"\r\n\r\n" + value + b"\r\n"
    body += b"--" + boundary.encode() + b"--\r\n"
    ct = content_type or "multipart/form-data; boundary=" + boundary
    return ct.encode() + b"\n" + body


TINY_PNG_BYTES = base64.b64decode(TINY_PNG)
with open(os.path.join(REPO, "tests", "fixtures", "img2img-init-96x64-lossless.webp"), "rb") as f:
    LOSSLESS_WEBP = f.read()
mp = {
    "curl_img2img": form([("prompt", "a cat", None), ("steps", "12", None),
                          ("init_image", TINY_PNG_BYTES, "in.png"), ("strength", "0.6", None)]),
    "every_type": form([("prompt", "12", None), ("negative_prompt", "true", None),
                        ("guidance_scale", " 6.5 ", None), ("seed", "-1", None),
                        ("cancel_on_disconnect", "true", None),
                        ("preview", '{"every": 2, "format": "png"}', None),
                        ("sampler", "DPM++ 2M Karras", None), ("width", "64", None)]),
    "webp_file": form([("prompt", "x", None), ("init_image", LOSSLESS_WEBP, "in.webp")]),
    "text_image": form([("prompt", "x", None),
                        ("init_image", "data:image/png;base64," + TINY_PNG, None)]),
    "bad_values": form([("prompt", "caf\xc3", None), ("steps", "twelve", None),
                        ("seed", "1e400", None), ("stesp", "1", None)]),
    "duplicate": form([("prompt", "a", None), ("prompt", "b", None)]),
    "empty_file": form([("prompt", "a", None), ("init_image", "", ""), ("mask", "", "m.png")]),
    "quoted_boundary": form([("prompt", "a", None)], boundary="a'()+_,-./:=? b",
                            content_type='Multipart/Form-Data; charset=utf-8; '
                                         'boundary="a\'()+_,-./:=? b"'),
    "no_boundary": b"multipart/form-data\n" + form([("prompt", "a", None)]).split(b"\n", 1)[1],
    "unterminated": form([("prompt", "a cat", None)])[:-12],
    "lf_only": form([("prompt", "a", None)]).replace(b"\r\n", b"\n"),
    "no_name": b"multipart/form-data; boundary=b\n--b\r\nContent-Disposition: form-data\r\n\r\n"
               b"x\r\n--b\r\n\r\ny\r\n--b--",
    "headers": b"multipart/form-data; boundary=b\npreamble\r\n--b \t\r\n"
               b"content-disposition: form-data; NAME=prompt; filename*=UTF-8''a%20b\r\n"
               b"Content-Transfer-Encoding: binary\r\nX-Other: 1\r\n\r\na\r\n--b\r\n"
               b'Content-Disposition: form-data; name="p\\"q"\r\n'
               b"Content-Transfer-Encoding: base64\r\n\r\neA==\r\n--b--epilogue",
}
for name, data in mp.items():
    write("multipart", name, data)

# --- image: WebP beside the PNG/JPEG seeds (made by Pillow: tests/fixtures/make) -----------------
for name, fixture in (("lossless_webp", "img2img-init-96x64-lossless.webp"),
                      ("lossy_webp", "img2img-init-96x64-lossy.webp"),
                      ("animated_webp", "webp-animated-2-frames.webp")):
    with open(os.path.join(REPO, "tests", "fixtures", fixture), "rb") as f:
        write("image", name, f.read())
# A VP8X header declaring 60000x60000 and nothing else: refused before any pixel is decoded.
write("image", "vp8x_bomb_webp",
      b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10) + bytes(4) +
      (60000 - 1).to_bytes(3, "little") + (60000 - 1).to_bytes(3, "little"))

for target in ("request_body", "multipart", "ws_command", "safetensors", "config", "tokenizer",
               "image"):
    d = os.path.join(HERE, "regressions", target)
    os.makedirs(d, exist_ok=True)
    keep = os.path.join(d, ".gitkeep")
    if not os.path.exists(keep):
        open(keep, "w").close()

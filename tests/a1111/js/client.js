// Drives sdserve's A1111 API through the npm client a1111-webui-api as its README shows it used:
// nothing here knows it talks to sdserve. Lists samplers and models, then txt2img, img2img and
// img2img with a mask (inpainting), each with the client's own defaults for every field not set
// here. Saves each returned image as the server sent it (the PNG, with its parameters) and
// prints one JSON line per call with what the client's sharp images say of them.
//
//   SDAPI_URL=http://127.0.0.1:7860 OUT=/tmp/out FIXTURES=tests/fixtures node client.js
"use strict";
const fs = require("fs");
const path = require("path");
// The client's own dependency: its API takes and returns sharp images.
const sharp = require("sharp");
const { StableDiffusionApi } = require("a1111-webui-api");

const out = process.env.OUT || ".";
const fixtures = process.env.FIXTURES;
const api = new StableDiffusionApi({ baseUrl: process.env.SDAPI_URL || "http://127.0.0.1:7860" });

async function report(name, result) {
  const images = [];
  for (const [i, image] of result.images.entries()) {
    const meta = await image.metadata();
    const file = path.join(out, `${name}-${i}.png`);
    // The client keeps the raw answer; its sharp images would re-encode without the text chunks.
    fs.writeFileSync(file, Buffer.from(result.response.data.images[i], "base64"));
    images.push({ file, format: meta.format, width: meta.width, height: meta.height });
  }
  const info = typeof result.info === "string" ? JSON.parse(result.info) : result.info;
  console.log(JSON.stringify({ call: name, images, seeds: info.all_seeds,
                               infotexts: info.infotexts, parameters: result.parameters }));
}

async function main() {
  console.log(JSON.stringify({ samplers: (await api.getSamplers()).map((s) => s.name),
                               models: (await api.getSdModels()).map((m) => m.title),
                               current: await api.getCurrentModel() }));
  await report("txt2img", await api.txt2img({
    prompt: "a lighthouse at dusk", negative_prompt: "blurry", steps: 4, width: 64, height: 64,
    seed: 1234, batch_size: 2 }));
  const picture = path.join(fixtures, "img2img-init-96x64.png");
  await report("img2img", await api.img2img({
    init_images: [sharp(picture)], prompt: "a lighthouse at dusk", steps: 6, width: 96, height: 64,
    seed: 99, denoising_strength: 0.6 }));
  // The client's inpainting defaults are A1111's: mask blur 4, only masked, fill.
  await report("inpaint", await api.img2img({
    init_images: [sharp(picture)], mask_image: sharp(path.join(fixtures, "inpaint-mask-96x64.png")),
    prompt: "a lighthouse at dusk", steps: 6, width: 64, height: 64, seed: 7 }));
}

main().catch((e) => {
  // An axios error carries the server's answer: show it, not only the status.
  console.error(e.response ? `${e.message}: ${JSON.stringify(e.response.data)}` : e.stack);
  process.exit(1);
});

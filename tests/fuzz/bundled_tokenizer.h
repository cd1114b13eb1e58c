// The CLIP tokenizer the prompt fuzzers read prompts through: the bundled tiny model's
// (models/tiny-sd15/tokenizer), or $SDSERVE_FUZZ_TOKENIZER_DIR's. Loaded once; exits 2 when it
// cannot be loaded (a setup error, not a finding).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "pipeline/errors.h"
#include "pipeline/io/tokenizer.h"

inline const sdserve::pipeline::ClipTokenizer& bundled_tokenizer(const char* target) {
  static const sdserve::pipeline::ClipTokenizer tok = [target] {
    const char* env = std::getenv("SDSERVE_FUZZ_TOKENIZER_DIR");
    const std::string dir = env && *env ? env : SDSERVE_REPO_DIR "/models/tiny-sd15/tokenizer";
    try {
      return sdserve::pipeline::ClipTokenizer::load(dir + "/vocab.json", dir + "/merges.txt", 77);
    } catch (const sdserve::pipeline::ModelError& e) {
      std::fprintf(stderr, "%s: cannot load the tokenizer: %s\n", target, e.what());
      std::exit(2);
    }
  }();
  return tok;
}

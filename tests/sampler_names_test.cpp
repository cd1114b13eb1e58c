#include "pipeline/sampler_names.h"

#include <gtest/gtest.h>

#include "pipeline/errors.h"

namespace sdserve::pipeline {
namespace {

TEST(SamplerNames, AcceptsComfyAndA1111Names) {
  auto c = resolve_sampler("dpmpp_2m", "karras");
  EXPECT_EQ(c.sampler, "dpmpp_2m");
  EXPECT_EQ(c.scheduler, "karras");
  c = resolve_sampler("DPM++ 2M Karras");
  EXPECT_EQ(c.sampler, "dpmpp_2m");
  EXPECT_EQ(c.scheduler, "karras");
  c = resolve_sampler("Euler a");
  EXPECT_EQ(c.sampler, "euler_ancestral");
  EXPECT_EQ(c.scheduler, "normal");
  EXPECT_EQ(resolve_sampler("PLMS").sampler, "pndm");
  EXPECT_EQ(resolve_sampler("UniPC").sampler, "uni_pc");
  EXPECT_EQ(display_name("euler_ancestral"), "Euler a");
}

TEST(SamplerNames, UnknownNameListsKnownOnes) {
  try {
    resolve_sampler("eulr");
    FAIL();
  } catch (const RequestError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'eulr' is unknown"), std::string::npos) << msg;
    EXPECT_NE(msg.find("euler_ancestral"), std::string::npos) << msg;
  }
}

TEST(SamplerNames, KarrasNeedsSigmaSampler) {
  EXPECT_THROW(resolve_sampler("ddim", "karras"), RequestError);
  EXPECT_THROW(resolve_sampler("PLMS Karras"), RequestError);
  EXPECT_THROW(resolve_sampler("euler", "exponential"), RequestError);
  EXPECT_THROW(resolve_sampler("DPM++ 2M Karras", "normal"), RequestError);
}

}  // namespace
}  // namespace sdserve::pipeline

// A1111's extra-network tags in prompts (pipeline/extra_networks.h): removed from the text as
// A1111's regex <(\w+):([^>]+)> removes them, and LoRA tags read as its Lora extension reads them.
#include "pipeline/extra_networks.h"

#include <gtest/gtest.h>

#include "pipeline/errors.h"

namespace sdserve::extra_networks_test {
namespace {

using pipeline::lora_tags;
using pipeline::RequestError;
using pipeline::strip_extra_networks;

TEST(ExtraNetworks, TagsAreRemovedFromTheTextAndOnlyTags) {
  EXPECT_EQ(strip_extra_networks("a cat <lora:detail:0.6> sitting"), "a cat  sitting");
  EXPECT_EQ(strip_extra_networks("<lora:a:1><hypernet:b:0.5>x"), "x");
  // Not tags: no kind, an empty argument list, no closing bracket, a space in the kind.
  for (const char* text : {"<:x>", "<lora:>", "<lora:x", "a < b: c", "<lo ra:x>", "(<3)"})
    EXPECT_EQ(strip_extra_networks(text), text) << text;
  std::vector<pipeline::ExtraNetwork> found;
  strip_extra_networks("x <hypernet:h:0.5:te=1> y", &found);
  ASSERT_EQ(found.size(), 1u);
  EXPECT_EQ(found[0].kind, "hypernet");
  EXPECT_EQ(found[0].positional, (std::vector<std::string>{"h", "0.5"}));
  EXPECT_EQ(found[0].named.at("te"), "1");
}

TEST(ExtraNetworks, LoraWeightsAsA1111ReadsThem) {
  const auto tags = lora_tags(
      "<lora:a> <lora:b:0.6> <lora:c:0.5:0.8> <lyco:d:1:te=0.2> <lora:e:unet=0.3> <lora:sub/f:-1>");
  ASSERT_EQ(tags.size(), 6u);
  const std::vector<std::tuple<std::string, double, double>> want = {
      {"a", 1, 1},     {"b", 0.6, 0.6}, {"c", 0.5, 0.8},
      {"d", 0.2, 0.2}, {"e", 1, 0.3},   {"sub/f", -1, -1}};
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(tags[i].name, std::get<0>(want[i]));
    EXPECT_DOUBLE_EQ(tags[i].te_weight, std::get<1>(want[i])) << tags[i].name;
    EXPECT_DOUBLE_EQ(tags[i].unet_weight, std::get<2>(want[i])) << tags[i].name;
  }
  EXPECT_TRUE(lora_tags("no tags (at:1.2)").empty());
}

TEST(ExtraNetworks, WhatSdserveCannotDoIsRefusedNamingTheField) {
  for (const char* bad : {"<hypernet:h:1>", "<lora:x:abc>", "<lora:x:1e9>", "<lora:x:nan>",
                          "<lora::1>", "<lora:x:1:1:8>", "<lora:x:1:dyn=8>"}) {
    try {
      lora_tags(bad, "negative_prompt");
      ADD_FAILURE() << "accepted " << bad;
    } catch (const RequestError& e) {
      EXPECT_EQ(e.field(), "negative_prompt") << bad;
    }
  }
  std::string many;
  for (size_t i = 0; i <= pipeline::kMaxExtraNetworks; ++i) many += "<lora:x:1>";
  EXPECT_THROW(lora_tags(many), RequestError);
}

}  // namespace
}  // namespace sdserve::extra_networks_test

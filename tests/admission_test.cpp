// The admission policy's arithmetic (engine/admission.h); engine_fault_test.cpp runs it through
// a worker.
#include "engine/admission.h"

#include <gtest/gtest.h>

namespace sdserve::engine {
namespace {

// UNet step seconds measured by `sdserve bench` on an H200 at 512x512 with CFG
// (docs/PERFORMANCE.md): image-steps per second (size / seconds) 100, 152, 165, 172, 174.
const std::vector<int> kSizes = {1, 4, 8, 16, 32};
const std::vector<double> kH200 = {0.0100, 0.02624, 0.04835, 0.09278, 0.18342};

TEST(Admission, LightLoadBatchIsTheSmallestWithinTheEfficiency) {
  // 90% of the best (174 at 32) is 157: 8 (165) is the first to reach it.
  EXPECT_EQ(light_load_batch(kSizes, kH200, 0.9, 32), 8);
  EXPECT_EQ(light_load_batch(kSizes, kH200, 0.97, 32), 16);
  EXPECT_EQ(light_load_batch(kSizes, kH200, 0.99, 32), 32);
  EXPECT_EQ(light_load_batch(kSizes, kH200, 0.5, 32), 1);
  EXPECT_EQ(light_load_batch(kSizes, kH200, 0.0, 32), 1);
  // Never above max_batch.
  EXPECT_EQ(light_load_batch(kSizes, kH200, 0.97, 16), 16);
}

TEST(Admission, UnmeasuredMeansNoCap) {
  EXPECT_EQ(light_load_batch(kSizes, {}, 0.9, 16), 16);
  EXPECT_EQ(light_load_batch(kSizes, {0.01, 0.02}, 0.9, 16), 16);  // sizes and times disagree
  EXPECT_EQ(light_load_batch({1, 2}, {0.01, 0.0}, 0.9, 16), 16);   // a zero time
  EXPECT_EQ(light_load_batch({1, 2}, {0.01, -1.0}, 0.9, 16), 16);
}

TEST(Admission, OpensWhenALightLoadBatchIsQueued) {
  AdmissionPolicy p({16, 0.9, 0.25}, 8);
  EXPECT_EQ(p.cap(0, 0), 8);
  EXPECT_EQ(p.cap(7, 0.1), 8);
  EXPECT_FALSE(p.open());
  EXPECT_EQ(p.cap(8, 0.0), 16);
  EXPECT_TRUE(p.open());
  // Open until the queue drains, even when fewer wait.
  EXPECT_EQ(p.cap(1, 0.0), 16);
  p.queue_drained();
  EXPECT_EQ(p.cap(1, 0.0), 8);
}

TEST(Admission, OpensWhenTheNextJobHasWaitedMaxWait) {
  AdmissionPolicy p({16, 0.9, 0.25}, 8);
  EXPECT_EQ(p.cap(1, 0.24), 8);
  EXPECT_EQ(p.cap(1, 0.25), 16);
  p.queue_drained();
  EXPECT_EQ(p.cap(0, 0.0), 8);
}

TEST(Admission, ZeroMaxWaitIsPureThroughput) {
  AdmissionPolicy p({16, 0.9, 0.0}, 8);
  EXPECT_EQ(p.cap(0, 0), 8);  // nothing waits: nothing to admit anyway
  EXPECT_EQ(p.cap(1, 0), 16);
}

}  // namespace
}  // namespace sdserve::engine

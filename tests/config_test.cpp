// Configuration layering (defaults < file < env < flags) and its error messages.
#include "config/config.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace sdserve::config {
namespace {

using Env = std::map<std::string, std::string>;

std::string temp_file(const std::string& content) {
  char name[] = "/tmp/sdserve_config_testXXXXXX";
  const int fd = mkstemp(name);
  EXPECT_GE(fd, 0);
  close(fd);
  std::ofstream(name) << content;
  return name;
}

// The message of the ConfigError `f` throws; fails the test when it throws nothing.
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no ConfigError";
  return "";
}

TEST(ConfigTest, DefaultsMatchTheDocumentedOnes) {
  const Loaded l = load({}, {});
  EXPECT_FALSE(l.help);
  EXPECT_EQ(l.config.host, "127.0.0.1");
  EXPECT_EQ(l.config.port, 8080);
  EXPECT_EQ(l.config.model, "");
  EXPECT_EQ(l.config.device, "auto");
  EXPECT_EQ(l.config.precision, "auto");
  EXPECT_EQ(l.config.max_queue, 64);
  EXPECT_EQ(l.config.max_batch, 8);
  EXPECT_EQ(l.config.batch_buckets, (std::vector<int>{1, 2, 4, 8, 16, 32}));
  EXPECT_EQ(l.config.default_timeout_s, 600);
  EXPECT_EQ(l.config.max_timeout_s, 3600);
  EXPECT_EQ(l.config.result_ttl_s, 3600);
  EXPECT_EQ(l.config.result_max_mb, 1024);
  EXPECT_EQ(l.config.max_body_bytes, 48 << 20);
  EXPECT_EQ(l.config.max_connections, 1000);
  EXPECT_TRUE(l.config.api_keys.empty());
  EXPECT_EQ(l.config.shutdown_grace_s, 30);
  EXPECT_EQ(l.config.log_level, "info");
  EXPECT_EQ(l.config.log_format, "text");
  EXPECT_EQ(l.config.http_threads, 2);
  EXPECT_EQ(l.config.ws_queue_limit, 64);
  EXPECT_EQ(l.origin.at("max_queue"), "default");
}

TEST(ConfigTest, PrecedenceIsDefaultsFileEnvFlags) {
  const std::string file =
      temp_file(R"({"max_queue": 10, "max_batch": 4, "port": 9000, "api_keys": ["a", "b"]})");
  const Env env = {{"SDSERVE_MAX_QUEUE", "20"}, {"SDSERVE_MAX_BATCH", "2"}};
  const Loaded l = load({"--config", file, "--max-queue", "30"}, env);
  EXPECT_EQ(l.config.max_queue, 30);  // flag beats env and file
  EXPECT_EQ(l.config.max_batch, 2);   // env beats file
  EXPECT_EQ(l.config.port, 9000);     // file beats default
  EXPECT_EQ(l.config.api_keys, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(l.config.ws_queue_limit, 64);
  EXPECT_EQ(l.origin.at("max_queue"), "flag");
  EXPECT_EQ(l.origin.at("max_batch"), "env");
  EXPECT_EQ(l.origin.at("port"), "file");
  EXPECT_EQ(l.origin.at("host"), "default");
  EXPECT_EQ(l.config_file, file);
  std::remove(file.c_str());
}

TEST(ConfigTest, ConfigFileFromTheEnvironment) {
  const std::string file = temp_file(R"({"log_format": "json"})");
  EXPECT_EQ(load({}, {{"SDSERVE_CONFIG", file}}).config.log_format, "json");
  std::remove(file.c_str());
}

TEST(ConfigTest, FlagSpellings) {
  const Loaded l = load({"--max_queue=5", "--port=0", "--api-keys", "k1, k2", "--metrics-auth",
                         "--batch-buckets", "[1,3]", "--max-batch", "3"},
                        {});
  EXPECT_EQ(l.config.max_queue, 5);
  EXPECT_EQ(l.config.port, 0);
  EXPECT_EQ(l.config.api_keys, (std::vector<std::string>{"k1", "k2"}));
  EXPECT_TRUE(l.config.metrics_auth);
  EXPECT_EQ(l.config.batch_buckets, (std::vector<int>{1, 3}));
  EXPECT_FALSE(load({"--metrics-auth", "false"}, {}).config.metrics_auth);
  EXPECT_EQ(load({}, {{"SDSERVE_BATCH_BUCKETS", "1,2,4"}, {"SDSERVE_MAX_BATCH", "4"}})
                .config.batch_buckets,
            (std::vector<int>{1, 2, 4}));
  EXPECT_TRUE(load({}, {{"SDSERVE_API_KEYS", ""}}).config.api_keys.empty());
  EXPECT_EQ(load({}, {{"SDSERVE_ALLOWED_HOSTS", "sd.example.com, [::1]"}}).config.allowed_hosts,
            (std::vector<std::string>{"sd.example.com", "[::1]"}));
  EXPECT_EQ(load({"--allowed-hosts", "*"}, {}).config.allowed_hosts,
            (std::vector<std::string>{"*"}));
}

TEST(ConfigTest, HelpWinsOverBadSettings) {
  EXPECT_TRUE(load({"--max-queue", "oops", "--help"}, {}).help);
  const std::string help = help_text();
  for (const auto& k : keys()) {
    EXPECT_NE(help.find(flag_name(k.name)), std::string::npos) << k.name;
    EXPECT_NE(help.find(env_name(k.name)), std::string::npos) << k.name;
    EXPECT_NE(help.find("default " + k.default_value), std::string::npos) << k.name;
  }
}

TEST(ConfigTest, UnknownKeysAreNamed) {
  EXPECT_NE(error_of([] { load({"--max-queu", "3"}, {}); }).find("--max-queu"), std::string::npos);
  EXPECT_NE(error_of([] {
              load({}, {{"SDSERVE_MAX_QUEU", "3"}});
            }).find("SDSERVE_MAX_QUEU"),
            std::string::npos);
  const std::string file = temp_file(R"({"max_queu": 3})");
  EXPECT_NE(error_of([&] { load({"--config", file}, {}); }).find("max_queu"), std::string::npos);
  std::remove(file.c_str());
  EXPECT_NE(error_of([] { load({"serve"}, {}); }).find("serve"), std::string::npos);
  // Not keys, but ours: allowed.
  EXPECT_NO_THROW(load({}, {{"SDSERVE_MODELS_DIR", "/x"}}));
}

TEST(ConfigTest, BadValuesAreNamedWithTheirSource) {
  struct Case {
    std::vector<std::string> args;
    Env env;
    std::string expect1, expect2;
  };
  const std::vector<Case> cases = {
      {{"--max-queue", "abc"}, {}, "--max-queue", "max_queue"},
      {{"--max-queue", "0"}, {}, "max_queue", "between 1"},
      {{"--port", "70000"}, {}, "port", "65535"},
      {{}, {{"SDSERVE_PORT", "-1"}}, "SDSERVE_PORT", "port"},
      {{"--default-timeout-s", "0"}, {}, "default_timeout_s", "greater than 0"},
      {{"--log-level", "loud"}, {}, "log_level", "one of"},
      {{"--log-format", "xml"}, {}, "log_format", "text, json"},
      {{"--precision", "fp8"}, {}, "precision", "fp8"},
      {{"--device", "tpu"}, {}, "device", "tpu"},
      {{"--batch-buckets", "1,x"}, {}, "batch_buckets", "integers"},
      {{"--batch-buckets", "4,2"}, {}, "batch_buckets", "ascending"},
      {{"--max-batch", "64"}, {}, "max_batch", "batch_buckets"},
      {{"--default-timeout-s", "100", "--max-timeout-s", "50"},
       {},
       "default_timeout_s",
       "max_timeout_s"},
      {{"--metrics-auth=maybe"}, {}, "metrics_auth", "true or false"},
      {{"--allowed-hosts", "https://sd.example.com"}, {}, "allowed_hosts", "without scheme"},
      {{}, {{"SDSERVE_ALLOWED_HOSTS", "sd.example.com:8080"}}, "allowed_hosts", "or port"},
      {{"--max-queue"}, {}, "--max-queue", "needs a value"},
  };
  for (const auto& c : cases) {
    const std::string msg = error_of([&] { load(c.args, c.env); });
    EXPECT_NE(msg.find(c.expect1), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.expect2), std::string::npos) << msg;
  }
}

TEST(ConfigTest, ConfigFileErrors) {
  EXPECT_NE(error_of([] {
              load({"--config", "/nonexistent/x.json"}, {});
            }).find("/nonexistent"),
            std::string::npos);
  const std::string bad = temp_file("{not json");
  EXPECT_NE(error_of([&] {
              load({"--config", bad}, {});
            }).find("not valid JSON"),
            std::string::npos);
  std::remove(bad.c_str());
  const std::string wrong = temp_file(R"({"max_queue": "8"})");
  const std::string msg = error_of([&] { load({"--config", wrong}, {}); });
  EXPECT_NE(msg.find("max_queue"), std::string::npos) << msg;
  EXPECT_NE(msg.find("config file"), std::string::npos) << msg;
  std::remove(wrong.c_str());
}

TEST(ConfigTest, EffectiveConfigMasksKeys) {
  ServiceConfig c;
  c.api_keys = {"secret"};
  const std::string j = to_json(c);
  EXPECT_EQ(j.find("secret"), std::string::npos);
  EXPECT_NE(j.find("\"max_queue\":64"), std::string::npos);
}

}  // namespace
}  // namespace sdserve::config

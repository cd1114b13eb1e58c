// How a fuzz target reports a broken property: the target's name and what broke, then abort(),
// which libFuzzer records as a crash with the input that caused it.
#pragma once

#include <errno.h>  // program_invocation_short_name (glibc)

#include <cstdio>
#include <cstdlib>
#include <string>

[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program_invocation_short_name, what.c_str());
  std::abort();
}

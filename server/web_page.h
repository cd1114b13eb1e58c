// The page at / (server/web/index.html), compiled into the binary by server/CMakeLists.txt so
// that it is served with no files beside the executable.
#pragma once

#include <string_view>

namespace sdserve::server {

std::string_view web_page();

}  // namespace sdserve::server

// `sdserve serve`: the HTTP/WebSocket service (issue 3 fills this in).
#include <iostream>

#include "server/cli.h"

namespace sdserve {

int run_serve(const std::vector<std::string>&) {
  std::cerr << "sdserve serve: not available yet\n";
  return 1;
}

}  // namespace sdserve

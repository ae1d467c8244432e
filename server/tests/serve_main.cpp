// Serves the test models (linear_fixture.hpp: scorer, ab, held) on a port until SIGTERM/SIGINT,
// for checking unmodified tritonclient against the native front:
//
//   carrara_serve_main [port]      prints "READY <port>" once serving
#include <csignal>
#include <cstdio>
#include <cstdlib>

#include "carrara/server/grpc_server.hpp"
#include "linear_fixture.hpp"

int main(int argc, char** argv) {
  // Block the stop signals before any thread starts (all inherit the mask); sigwait below.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  carrara::server::ServerOptions options;
  options.port = argc > 1 ? std::atoi(argv[1]) : 0;
  options.server_version = "test";
  auto setup = carrara::server::testing::make_setup();
  auto server = std::make_unique<carrara::server::GrpcServer>(setup.engine, options);
  std::printf("READY %d\n", server->port());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  setup.held->release();
  server->shutdown(1'000'000'000);
  server.reset();
  setup.engine->close();
  return 0;
}

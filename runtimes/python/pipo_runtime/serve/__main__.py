"""`python -m pipo_runtime.serve OUT [flags]` (also `pipo-export serve OUT`).

SIGTERM: new requests get 503, in-flight ones finish (at most --drain-timeout seconds, then they
are cancelled), the server exits 0. A second SIGTERM or Ctrl-C stops at once.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import load_manifest

from pipo_runtime.serve.config import ServeConfig, add_arguments, config_from_args

DRAIN_POLL_S = 0.05
CLOSE_TIMEOUT_S = 5  # uvicorn's wait for connections once the engine has drained
SERVE_PACKAGES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "jinja2")


def check_packages(packages=SERVE_PACKAGES, extra: str = "serve") -> None:
    """PipoUserError naming the missing packages of the server and how to install them."""
    import importlib.util
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise PipoUserError(f"the server needs {', '.join(missing)}: pip install "
                            f"'pipo-runtime[{extra}]'")


def serve(config: ServeConfig) -> int:
    """Run the server until SIGTERM/SIGINT; -> exit code."""
    check_packages()
    if config.ray:
        from pipo_runtime.serve.ray import run
        return run(config)
    load_manifest(config.out, verify_files=False)  # a wrong folder fails now, in one line
    import uvicorn

    from pipo_runtime.serve.app import create_app

    failed: list[str] = []

    def fatal(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app = create_app(config, on_fatal=fatal)
    server = _server_class()(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info", lifespan="on",
        timeout_graceful_shutdown=CLOSE_TIMEOUT_S, timeout_keep_alive=5))
    server.run()
    if failed:
        raise PipoUserError(f"could not load {config.out}: {failed[0]}")
    return 0


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn whose first SIGTERM drains the engine before the usual graceful exit."""

        def handle_exit(self, sig, frame):
            if sig != signal.SIGTERM or getattr(self, "_draining", False):
                return super().handle_exit(sig, frame)
            self._draining = True
            threading.Thread(target=self._drain, name="pipo-drain", daemon=True).start()

        def _drain(self):
            state = getattr(self.config.app.state, "pipo", None) \
                if hasattr(self.config.app, "state") else None
            if state is not None:
                state.begin_drain()
                logging.getLogger("pipo_runtime.serve").info(
                    "SIGTERM: draining (at most %.0f s)", state.config.drain_timeout)
                while state.busy() and time.monotonic() < state.drain_deadline:
                    time.sleep(DRAIN_POLL_S)
            self.should_exit = True

    return DrainingServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipo_runtime.serve",
                                     description="OpenAI-compatible server for a PIPO export")
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return serve(config_from_args(ns))
    except PipoUserError as exc:
        print(f"pipo-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

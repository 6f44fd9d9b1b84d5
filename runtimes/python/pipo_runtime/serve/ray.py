"""Ray Serve: the same FastAPI app as a deployment, one engine per replica.

    pipo-export serve OUT --ray --replicas 2          # joins `ray start --head`'s cluster if
                                                      # one runs here (or RAY_ADDRESS), else
                                                      # starts a local one
    # or, in your own Ray code / a Serve config file's import_path:
    from pipo_runtime.serve.ray import app
    serve.run(app("OUT", replicas=2, max_batch=8))

Each replica loads the export itself (the app's startup, before the replica reports ready) and
holds at most max_batch + max_queue requests (`max_ongoing_requests`), so Ray's router queues the
rest, or autoscales on them with `autoscaling_config` (docs/serving.md). Needs `ray[serve]`
(pip install 'pipo-runtime[ray]'); never `ray[llm]`.
"""
from __future__ import annotations

import signal
import threading

from pipo_graphs.errors import PipoUserError

from pipo_runtime.serve.config import ServeConfig

APP_NAME = "pipo"
DEPLOYMENT_NAME = "PipoServer"


def deployment(config: ServeConfig, autoscaling_config: dict | None = None,
               ray_actor_options: dict | None = None):
    """The Ray Serve deployment (not yet bound) serving `config.out`."""
    from ray import serve

    from pipo_runtime.serve.app import create_app

    def build():  # runs on each replica: its own app, its own engine
        return create_app(config, load_in_background=False)

    scale = {"autoscaling_config": autoscaling_config} if autoscaling_config \
        else {"num_replicas": config.replicas}

    @serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=config.max_ongoing,
                      graceful_shutdown_timeout_s=config.drain_timeout,
                      ray_actor_options=ray_actor_options or {}, **scale)
    @serve.ingress(build)
    class PipoServer:
        def check_health(self):
            """Ray restarts a replica whose model failed to load."""
            state = getattr(self.app.state, "pipo", None)
            if state is not None and state.error:
                raise RuntimeError(state.error)

    return PipoServer


def app(out: str, *, autoscaling_config: dict | None = None,
        ray_actor_options: dict | None = None, **flags):
    """A bound Ray Serve application serving the export `out`; flags are ServeConfig's fields
    (replicas, max_batch, max_queue, threads, api_key, ...)."""
    config = ServeConfig(out=str(out), **dict(flags, ray=True))
    return deployment(config, autoscaling_config, ray_actor_options).bind()


def run(config: ServeConfig) -> int:
    """`--ray`: start (or join) Ray, run the application behind Serve's HTTP proxy on
    config.host:config.port until SIGTERM/SIGINT, then shut Serve down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise PipoUserError("--ray needs Ray Serve: pip install 'pipo-runtime[ray]'") from None
    from pipo_graphs.manifest import load_manifest
    load_manifest(config.out, verify_files=False)  # a wrong folder fails here, in one line
    ray.init(include_dashboard=False)
    stop = threading.Event()

    def on_signal(*_):  # replaces Ray's own handlers; a second signal stops at once
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app(config.out, **{k: v for k, v in vars(config).items()
                                     if k not in ("out", "ray")}),
                  name=APP_NAME, route_prefix="/")
        print(f"pipo-serve: Ray Serve on http://{config.host}:{config.port} "
              f"({config.replicas} replicas)", flush=True)
        stop.wait()
        serve.delete(APP_NAME)  # replicas drain (graceful_shutdown_timeout_s = --drain-timeout)
    finally:
        serve.shutdown()
    return 0

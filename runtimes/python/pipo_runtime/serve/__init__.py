"""`pipo-export serve OUT` / `python -m pipo_runtime.serve OUT`: an OpenAI-compatible HTTP
server over the continuous-batching engine (torch-free; pip install 'pipo-runtime[serve]').

    from pipo_runtime.serve import ServeConfig, create_app
    app = create_app(ServeConfig(out="export/"))

See docs/serving.md for the endpoints, parameters, errors, metrics and Ray Serve.
"""
from pipo_runtime.serve.config import ServeConfig, add_arguments, config_from_args

__all__ = ["ServeConfig", "add_arguments", "config_from_args", "create_app"]


def __getattr__(name):
    if name == "create_app":  # fastapi is imported only when an app is built
        from pipo_runtime.serve.app import create_app
        return create_app
    raise AttributeError(name)

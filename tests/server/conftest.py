from tests.server.harness import engine, model_dir, service  # noqa: F401

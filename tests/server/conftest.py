from tests.server.harness import engine, model_dir, one_torch_thread, service  # noqa: F401

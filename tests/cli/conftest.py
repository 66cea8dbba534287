from tests.server.harness import model_dir  # noqa: F401

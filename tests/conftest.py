import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from astrolabe._compat import install_torchvision_guard  # noqa: E402

install_torchvision_guard()  # tests import peft / open_clip / transformers directly

torch.set_num_threads(1)  # tiny models: thread overhead dominates


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_world_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default world-model recipe built from scratch (a few minutes on 2 cores), once per session: the
    directory of the build (``<root>/world/<key>``). For the slow tests of the pretrained model and of RL on it."""
    from astrolabe.world.pretrain import build_world_model

    return build_world_model(tmp_path_factory.mktemp("default-world"))

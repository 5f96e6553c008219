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


# pytest-xdist (`-n 2 --dist loadgroup`, optional): each test file runs whole on one worker, so its
# module fixtures are built once; files sharing a costly session fixture share a worker (the world build, ~4 min).
_SHARED_WORKER = {"test_world_learning.py": "default_world_model", "test_world_model.py": "default_world_model"}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in _SHARED_WORKER)  # the longest group first: no long tail
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(_SHARED_WORKER.get(name, name)))
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

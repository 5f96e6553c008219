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


# pytest-xdist (`-n 2 --dist loadfile`, as CI runs): each test file runs whole on one worker, so its module and
# pipeline fixtures are built once per worker. (`loadgroup` marks do not group under pytest 9.2 + xdist 3.8: the
# group suffix xdist writes into `item._nodeid` is not what `item.nodeid` returns.) The world build (~5-7 min) is
# shared across workers through a locked directory (`default_world_model`); the file of the pretrained model's tests
# goes first (its worker builds the world), the file of the RL learning tests (which reuse it) by the middle.
_WORLD_FILES = ("test_world_model.py", "test_world_learning.py")
WORLD_TIMEOUT_S = 1200  # per test that needs the default world model (the suite's --timeout is 600)


def pytest_collection_modifyitems(config, items):
    others = sorted({item.path.name for item in items} - set(_WORLD_FILES))
    first_half = set(others[: len(others) // 2])
    rank = {"test_world_model.py": 0, "test_world_learning.py": 2, **{n: 1 if n in first_half else 3 for n in others}}
    items.sort(key=lambda item: rank[item.path.name])  # stable: the order inside each file is kept
    for item in items:  # the first of them builds the world model (about 400 s on 1 busy core), the others wait on it
        if "default_world_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(WORLD_TIMEOUT_S))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_world_model(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The default world-model recipe built from scratch (a few minutes on 2 cores), once per test session: the
    directory of the build (``<root>/world/<key>``). For the slow tests of the pretrained model and of RL on it.
    Under xdist the workers share one build (a directory beside theirs, built under a file lock by the first)."""
    import fcntl

    from astrolabe.world.pretrain import build_world_model

    if worker_id == "master":
        return build_world_model(tmp_path_factory.mktemp("default-world"))
    root = tmp_path_factory.getbasetemp().parent / "default-world"  # the session's, shared by its workers
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_world_model(root)  # content-keyed: the second worker finds the first one's build

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# `make test` runs the suite in pytest-xdist workers, one per core (at most four). A worker and the
# processes it starts run torch on their share of the cores: OpenMP threads spin while they wait, so two
# workers with two threads each on two cores ran tests 2.5 times slower than one process.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    _TORCH_THREADS = torch.get_num_threads()  # torch's default, which digits-vit trains with
    _SHARE = max(1, _TORCH_THREADS // _WORKERS)
    torch.set_num_threads(_SHARE)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_SHARE)  # for its subprocesses

# Tests never write to the user's cache: digits-vit is trained once per run into a temporary one,
# which the workers and the subprocesses the tests start share (the cache locks an entry while one
# process trains it). The process that made the folder removes it at the end.
_SHARED = "VITSPARSE_TEST_CACHE"
_OWNS_CACHE = _SHARED not in os.environ
if _OWNS_CACHE:
    os.environ[_SHARED] = tempfile.mkdtemp(prefix="vitsparse-test-cache-")
os.environ["VITSPARSE_CACHE"] = os.environ[_SHARED]


@pytest.fixture(autouse=True, scope="session")
def _digits_vit_trains_on_torchs_default_threads():
    """digits-vit trains with torch's default thread count in a worker too, as it does outside the
    tests: the thread count orders float sums, so it decides the weights, and tests assert accuracy
    margins measured on them."""
    if _WORKERS == 1:
        yield
        return
    import torch

    import vitsparse.models.pretrained as pretrained

    train = pretrained.train_digits_vit

    def on_default_threads(*args, **kwargs):
        share = torch.get_num_threads()
        torch.set_num_threads(_TORCH_THREADS)
        try:
            return train(*args, **kwargs)
        finally:
            torch.set_num_threads(share)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, "train_digits_vit", on_default_threads)
        yield


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWNS_CACHE:
        shutil.rmtree(os.environ[_SHARED], ignore_errors=True)

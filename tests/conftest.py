import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# Tests never write to the user's cache: digits-vit is trained once per session into a temporary one
# (subprocesses the tests start inherit it).
_CACHE = tempfile.mkdtemp(prefix="vitsparse-test-cache-")
os.environ["VITSPARSE_CACHE"] = _CACHE


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)

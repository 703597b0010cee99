import os
import sys
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# the numpy oracle and shared test helpers live beside the tests
sys.path.insert(0, str(Path(__file__).parent))

"""The TensorFlow/Keras 3 implementation (Keras on its TensorFlow backend).

Keras picks its backend once, at first import, from KERAS_BACKEND: this package pins it
to TensorFlow before anything imports keras, and refuses to run on a keras that another
module already started on a different backend (its numerics would not be TensorFlow's).
Importing this package does not import keras or TensorFlow.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"

if "keras" in sys.modules:
    _backend = getattr(getattr(sys.modules["keras"], "backend", None), "backend", lambda: "tensorflow")()
    if _backend != "tensorflow":
        from impls.base import FrameworkUnavailable

        raise FrameworkUnavailable(
            f"keras was already imported with the {_backend!r} backend; the TensorFlow/Keras implementation "
            "needs KERAS_BACKEND=tensorflow set before the first `import keras` (run it in a fresh process)"
        )

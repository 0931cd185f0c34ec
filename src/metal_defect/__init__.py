"""metal-defect: train, judge and serve a steel surface defect classifier."""

__version__ = "0.1.0"

from metal_defect import runtime as _runtime

# before anything imports TensorFlow, which reads it once (see runtime.py)
_runtime.prefer_onednn()

"""metal-defect: train, judge and serve a steel surface defect classifier."""

__version__ = "0.1.0"

"""Serving: what a trained model needs to answer, and nothing from training.

images (file -> model input), keras_objects (the custom layers and loss a saved model
names), bundle (the served folder: spec, files, sha256 manifest), predictor
(answers with verdicts), export (LiteRT). Training code imports from here, never the
reverse. Which bundle is served (the pointer, runs, promote) is metal_defect.served.
"""

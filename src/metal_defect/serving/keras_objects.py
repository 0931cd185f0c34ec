"""The custom Keras objects a saved model names: importing this module registers them.

Kept apart from the model builder and the training loop so that loading a model for
serving imports neither. The registered names (`metal_defect>...`) are what saved models
refer to; moving a class here keeps them loadable.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers, ops

CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="metal_defect")
class PixelPreprocess(layers.Layer):
    """uint8 pixels -> what the network expects: cast, optional grey->RGB, then `mode`.

    modes: scale (x/255), dataset ((x/255 - mean) / std with stored train statistics),
    per_image (standardise each image), caffe (RGB->BGR minus ImageNet mean), tf
    ([-1, 1]), torch (ImageNet mean/std), none (0..255 floats: EfficientNet & co.).
    """

    def __init__(self, mode: str, to_rgb: bool = False, mean: float = 0.0, std: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.mode, self.to_rgb, self.mean, self.std = mode, to_rgb, float(mean), float(std)

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, "float32")
        if self.to_rgb and x.shape[-1] == 1:
            x = ops.concatenate([x, x, x], axis=-1)
        if self.mode == "scale":
            return x / 255.0
        if self.mode == "dataset":
            return (x / 255.0 - self.mean) / self.std
        if self.mode == "per_image":
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            std = ops.std(x, axis=(1, 2, 3), keepdims=True)
            return (x - mean) / ops.maximum(std, 1.0)
        if self.mode == "caffe":
            return x[..., ::-1] - ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype="float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - ops.convert_to_tensor(TORCH_MEAN, dtype="float32")) / ops.convert_to_tensor(TORCH_STD, dtype="float32")
        return x

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], 3) if self.to_rgb else tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode, "to_rgb": self.to_rgb, "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="metal_defect")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization with its training step in TensorFlow's fused kernel.

    Keras 3 normalises a batch with separate moment, normalisation and update ops, each a pass
    over the feature map and another in the backward pass; at 160 px that was about a third of a
    training step on 2 CPU cores. The fused kernel computes the same function (outputs and
    gradients agree to float rounding, tested) in one pass each way. Inference, masks and
    anything but a 4-D channels-last input take Keras' own path, so a served model's graph is the
    same as before."""

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not (training and self.trainable) or mask is not None or self.renorm or len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.cast(inputs, tf.float32)
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=self.epsilon, is_training=True)
        # the kernel returns the unbiased batch variance; Keras' moving variance follows the biased one
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="metal_defect")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy for integer labels with label smoothing (Keras' sparse loss has none)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_smoothed_crossentropy", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        classes = keras.ops.shape(y_pred)[-1]
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="metal_defect")
class ScheduledDropout(layers.Layer):
    """Dropout whose rate is `rate` times a non-trainable `share` (0..1) that training moves between epochs
    (train.regularisation_ramp); at inference it passes its input through, like Keras' Dropout."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape: tuple) -> None:
        self.share = self.add_weight(shape=(), initializer="ones", trainable=False, name="share")

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training or self.rate <= 0:
            return inputs
        rate = self.rate * ops.cast(self.share, inputs.dtype)
        keep = keras.random.uniform(ops.shape(inputs), seed=self.seed_generator, dtype=inputs.dtype) >= rate
        return ops.where(keep, inputs / (1.0 - rate), ops.zeros_like(inputs))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rate": self.rate}

"""Model sources: tensor names, shapes and dtypes from headers; tensors read on demand."""

from mergesmith.sources.base import ModelSource, TensorMeta
from mergesmith.sources.open import open_model

__all__ = ["ModelSource", "TensorMeta", "open_model"]

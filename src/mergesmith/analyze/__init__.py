"""`mergesmith analyze`: statistics of a recipe's merge without writing a model.

Task-vector norms, cosine similarities, sign conflicts before and after trimming, the mass the
method's sparsifier removes and each model's share after sign election, per layer and per tensor
kind. `stats` takes the sums from blocks of tensors, `trim` reuses the merge's own sparsifiers,
`run` streams the plan's jobs, `groups` sums per layer and kind, `report` writes markdown and
JSON, `plots` the figures, `api` the folder.
"""

from mergesmith.analyze.api import AnalysisResult, analyze

__all__ = ["AnalysisResult", "analyze"]

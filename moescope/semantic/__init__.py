"""The semantic routing study (Olson et al. 2025): probe data, loaders, target alignment, pipeline.

The analysis itself is the pure function in ``moescope.analysis.semantic``; see
docs/analyses/semantic.md for the method.
"""

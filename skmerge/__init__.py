"""skmerge: merge separately trained neural networks by aligning their features.

The public names are imported lazily, so ``import skmerge`` stays fast and the
command line starts quickly.
"""

from importlib import import_module

__version__ = "0.1.0.dev0"

_LAZY = {
    "IdentityAligner": "skmerge.aligners",
    "PermutationAligner": "skmerge.aligners",
    "CCAAligner": "skmerge.aligners",
    "ProcrustesAligner": "skmerge.aligners",
    "OptimalTransportAligner": "skmerge.aligners",
    "CrossCovariance": "skmerge.stats",
    "ReferenceCovariance": "skmerge.stats",
    "ModelMerger": "skmerge.merge",
    "WeightMatchingMerger": "skmerge.weight_matching",
    "hierarchical_merge": "skmerge.hierarchical",
    "ReferenceFreeMerger": "skmerge.reference_free",
    "LearnedCoefficientMerger": "skmerge.coefficients",
    "ZipItMerger": "skmerge.zipit",
    "find_spaces": "skmerge.graph",
    "permute_model": "skmerge.graph",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skmerge' has no attribute {name!r}")


def __dir__():
    return __all__

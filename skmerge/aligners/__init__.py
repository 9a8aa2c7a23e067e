"""Aligners: scikit-learn estimators mapping one model's features onto another's.

Direction convention, everywhere in skmerge::

    aligner.fit(X, y)       X: (n_samples, p) activations of the model to align
                            y: (n_samples, q) activations of the reference model
    aligner.transform(X)    -> X @ mapping_          (X in y's basis, no centering)
    aligner.inverse_transform(Z) -> Z @ inverse_mapping_
"""

from skmerge.aligners._base import BaseAligner, SmallSampleWarning
from skmerge.aligners._cca import CCAAligner
from skmerge.aligners._identity import IdentityAligner
from skmerge.aligners._optimal_transport import OptimalTransportAligner
from skmerge.aligners._permutation import PermutationAligner
from skmerge.aligners._procrustes import ProcrustesAligner

__all__ = [
    "BaseAligner",
    "CCAAligner",
    "IdentityAligner",
    "OptimalTransportAligner",
    "PermutationAligner",
    "ProcrustesAligner",
    "SmallSampleWarning",
]

"""Order of the examples in the gallery (an importable class: Sphinx pickles its config)."""

import os

ORDER = [
    "plot_merge_two_models.py",
    "plot_many_models.py",
    "plot_tune_regularization.py",
    "plot_persistence.py",
    "plot_feature_spaces.py",
    "plot_diagnostics.py",
]


class GalleryOrder:
    """Sort key of sphinx-gallery's ``within_subsection_order``: position in ``ORDER``."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        name = os.path.basename(filename)
        if name not in ORDER:
            raise ValueError(f"{name} is not listed in docs/_gallery_order.py")
        return ORDER.index(name)

    def __repr__(self):
        return f"GalleryOrder({ORDER})"


#: The same order for the thumbnails of ``.. minigallery::`` (called with file paths).
gallery_position = GalleryOrder(None)

"""Sphinx configuration for the skmerge documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import skmerge  # noqa: E402

project = "skmerge"
author = "The skmerge developers"
copyright = "2026, The skmerge developers"
release = skmerge.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
]

autosummary_generate = True
autodoc_default_options = {
    "members": True,
    "inherited-members": False,
    # scikit-learn's generated metadata-routing setters refer to its own glossary.
    "exclude-members": ",".join(
        f"set_{method}_request"
        for method in ("fit", "partial_fit", "score", "transform", "inverse_transform", "predict")
    ),
}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
templates_path = ["_templates"]
exclude_patterns = ["_build", "api/generated/*.examples"]
html_theme = "alabaster"
html_static_path = []
html_theme_options = {
    "description": "Merge neural networks with a scikit-learn API",
    "fixed_sidebar": True,
}
# No network at build time: intersphinx inventories are not fetched.
intersphinx_mapping = {}
nitpicky = False

"""Sphinx configuration for the skmerge documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _gallery_order

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
    "sphinx_gallery.gen_gallery",
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
html_theme = "pydata_sphinx_theme"
html_title = "skmerge"
html_static_path = ["_static"]
html_css_files = ["skmerge.css"]
html_theme_options = {
    # The top-level toctree of index.rst is the navigation bar.
    "navbar_align": "left",
    "header_links_before_dropdown": 6,
    "show_toc_level": 2,
    "secondary_sidebar_items": {"**": ["page-toc", "sourcelink"], "index": []},
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
# The front page and the benchmarks page need the full width, not a section sidebar.
html_sidebars = {"index": [], "benchmarks": [], "changelog": []}
html_context = {"default_mode": "light"}

# The gallery: examples/gallery/*.py run at build time (a few seconds each, on
# the embedded digits data); their output and figures become docs/auto_examples/.
sphinx_gallery_conf = {
    "examples_dirs": "../examples/gallery",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # run every example, not only plot_*
    "within_subsection_order": "_gallery_order.GalleryOrder",
    "minigallery_sort_order": "_gallery_order.gallery_position",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "show_signature": False,
    "remove_config_comments": True,
    # Names in the examples' code link to the API reference.
    "doc_module": ("skmerge",),
    "reference_url": {"skmerge": None},
    "backreferences_dir": "api/generated/backreferences",
}

# No network at build time: intersphinx inventories are not fetched.
intersphinx_mapping = {}
nitpicky = False

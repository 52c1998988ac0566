"""The default tool set of the DeepEyesV2 protocol: code, search, image_search."""

from __future__ import annotations

from pathlib import Path

from .base import ToolRegistry
from .code import CodeTool
from .image_search import ImageIndex, ImageSearchTool
from .search import LocalBM25Search, SearchTool


def default_registry(corpus_path: str | Path | None = None,
                     image_index_path: str | Path | None = None) -> ToolRegistry:
    """code + search (offline BM25 over ``corpus_path``, default the shipped corpus) +
    image_search (``image_index_path`` directory, default a synthetic index of corpus entities).

    The tools take the episode's sandbox `Session`; the sandbox pool behind the sessions is passed to
    `run_episodes(..., pool=...)`, not kept here.
    """
    index = (ImageIndex.from_directory(image_index_path) if image_index_path is not None
             else ImageIndex.synthetic(corpus_path=corpus_path))
    return ToolRegistry([CodeTool(), SearchTool(LocalBM25Search(corpus_path)), ImageSearchTool(index)])

"""kNN search service over an index built by :mod:`laion_tasks.stages.index`."""

from laion_tasks.serve.app import create_app
from laion_tasks.serve.searcher import Filters, IndexNotReady, KnnIndex

__all__ = ["create_app", "Filters", "IndexNotReady", "KnnIndex"]

"""The sharded search index (issue 15 parts 2 and 4): format (format.py), the linear heads'
layout (layout.py), faiss vector stores (faiss_index.py), the Ray Data build, appends, deletes
and compaction (build.py), and the in-process search over shard groups (search.py) that
`tagray search` and the Serve Searcher replicas use."""

from tagray.index.build import IndexBuildConfig, build_index, compact, delete, parse_ids
from tagray.index.format import IndexInfo, open_index
from tagray.index.model import check_index_matches, example_vector, head_digest
from tagray.index.search import (
    Filters,
    Hit,
    ShardGroup,
    UnknownImage,
    hits_json,
    merge_hits,
    search_all,
    shard_groups,
)

__all__ = [
    "Filters", "Hit", "IndexBuildConfig", "IndexInfo", "ShardGroup", "UnknownImage", "build_index",
    "check_index_matches", "compact", "delete", "example_vector", "head_digest", "hits_json", "merge_hits",
    "open_index", "parse_ids", "search_all", "shard_groups",
]

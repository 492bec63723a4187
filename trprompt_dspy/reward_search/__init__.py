"""The TextGrad search of the optimal textual reward t*."""

from .search import (
    RewardSearch,
    RewardSearchConfig,
    RewardSearchError,
    RewardSearchResult,
    parse_improved_variable,
    search_reward,
)

__all__ = [
    "RewardSearch", "RewardSearchConfig", "RewardSearchError", "RewardSearchResult",
    "parse_improved_variable", "search_reward",
]

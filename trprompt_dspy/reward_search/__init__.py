"""The TextGrad search of the optimal textual reward t*.

The files read in the order a step runs: ``config`` (settings), ``sampling`` (held-out split,
minibatches), ``forward`` (prompter -> solver -> metric over a minibatch, in parallel),
``results`` (the results text the loss reads), ``textgrad`` (t* as a TextGrad variable, its
gradient, k proposals), ``trace`` (what is recorded and saved) and ``search`` (the loop and
:func:`search_reward`).
"""

from .config import RewardSearchConfig
from .search import RewardSearch, RewardSearchError, SearchState, search_reward
from .textgrad import IMPROVED_VARIABLE_TAGS, parse_improved_variable
from .trace import (
    BEST_REWARD_FILE,
    TRACE_FILE,
    BatchScore,
    CandidateRecord,
    RewardSearchResult,
    StepRecord,
    read_best_reward,
    read_trace,
)

__all__ = [
    "BEST_REWARD_FILE", "BatchScore", "CandidateRecord", "IMPROVED_VARIABLE_TAGS", "RewardSearch",
    "RewardSearchConfig", "RewardSearchError", "RewardSearchResult", "SearchState", "StepRecord", "TRACE_FILE",
    "parse_improved_variable", "read_best_reward", "read_trace", "search_reward",
]

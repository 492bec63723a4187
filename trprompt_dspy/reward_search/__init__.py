"""The TextGrad search of the optimal textual reward t*."""

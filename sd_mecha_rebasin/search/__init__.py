"""The search for permutations: weight matching (Git Re-Basin, Algorithm 1), its warm start, and
MergeMany (Algorithm 3)."""

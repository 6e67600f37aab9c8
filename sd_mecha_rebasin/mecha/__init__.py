"""sd-mecha integration: the `git_rebasin` and `git_rebasin_many` merge methods, the exact
implementations of sd-mecha's `rebasin` interface, block weights and the input-channel filler."""

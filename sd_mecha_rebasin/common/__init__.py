"""Bottom layer: the error users see, progress events, memory helpers and test pause points.

Imports nothing else of this package."""

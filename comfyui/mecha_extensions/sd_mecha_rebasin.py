import sd_mecha_rebasin  # noqa: F401  (registers the git_rebasin merge method and the sd2-ldm config)

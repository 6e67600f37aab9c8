"""The permutation group: spaces, segments and permutation specs (`spec`), block-structured
groups as trees (`groups`), and exact linear assignment (`lap`)."""

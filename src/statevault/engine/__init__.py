"""Plans and their execution: the save plan, staging memory, parallel writers with checksums, the
ranged and verified reader, prefetch and resharding arithmetic (checkpoint/ runs the steps)."""

"""The paper's tables in the miniature world, from one command."""

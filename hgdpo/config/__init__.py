"""Configuration: the typed YAML core, and the sections every stage shares."""

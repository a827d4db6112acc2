"""The preference pool: its files (the data contract), the builder on Ray Data, its config, OSPO's object-centric pairs."""

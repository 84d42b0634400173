"""The `appliance` command (run, demo, aps, convert, decrypt, status): starts the programs."""

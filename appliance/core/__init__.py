"""The foundation every other layer stands on: the wire protocol, the config, TLS, bounded
logging and rates, timers and tasks, private files and tokens. Imports nothing of ours."""

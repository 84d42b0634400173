"""The simulated agent desk phone: what the demo and the tests call instead of a real PBX."""

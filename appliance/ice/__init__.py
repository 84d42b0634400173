"""The media transport's ICE side, sans-IO: STUN messages, the ICE-lite agent that answers
a worker's connectivity checks and demultiplexes its one UDP and one TCP port by call, and
RFC 4571 framing for ICE-TCP. Imports only appliance.core."""

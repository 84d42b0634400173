"""The appliance's SIP user agent (UAC towards the call centre's desk phones), sans-IO.

Everything here but `endpoint` is pure: bytes and `now` in, bytes, events and the next
timer deadline out. See README.md beside this file for the module map and the events.
"""

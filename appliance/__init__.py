"""The appliance's libraries, by layer (README "Packages"): core, then sip, media and ice,
then recording and the edges. Programs (supervisor, workers, ...) import these; never the
reverse."""

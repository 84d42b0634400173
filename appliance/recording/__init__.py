"""Call recording: capture formats, the Convertor (mux + encrypt), and the encrypted file format.

See docs/recording-format.md for the on-disk formats.
"""
